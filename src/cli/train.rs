//! `bertqa train`: fine-tune a BERT checkpoint on SQuAD.

use crate::cli::eval::EvalOpts;
use crate::cli::{on_device, precision_dtype, DeviceFn};
use crate::collective::local::Local;
use crate::collective::nccl::Nccl;
use crate::collective::rendezvous::Rendezvous;
use crate::collective::{Collective, Devices};
use crate::cpu::Cpu;
use crate::cuda::Cuda;
use crate::data::squad::Dataset;
use crate::data::tokenizer;
use crate::model::checkpoint as mc;
use crate::ops::Backend;
use crate::tensor::DType;
use crate::train::replica;
use crate::train::{self, checkpoint, FeatureCfgSer, PostCfgSer, RunInputs, TrainConfig, Trainer};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// HF-format BERT directory to start from (BertModel or BertForQuestionAnswering)
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub train_file: PathBuf,
    /// dev set for evaluation, early stopping and best/
    #[arg(long)]
    pub dev_file: Option<PathBuf>,
    #[arg(long)]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 3e-5)]
    pub learning_rate: f64,
    /// windows per optimizer step
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// split each batch into this many micro-batches (same result, less memory)
    #[arg(long, default_value_t = 1)]
    pub grad_accum_steps: usize,
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f64,
    /// global gradient-norm clipping (0: off)
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// auto (bf16 on GPU, fp32 on CPU), fp32, bf16 (f32 master weights) or fp16 (plus dynamic loss scaling)
    #[arg(long, default_value = "auto")]
    pub precision: String,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// stop after this many optimizer steps
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// train on the first N questions only (quick runs)
    #[arg(long)]
    pub max_train_examples: Option<usize>,
    /// evaluate on the first N dev questions only
    #[arg(long)]
    pub max_eval_examples: Option<usize>,
    /// evaluate every N steps (0: at each epoch end only)
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// checkpoint every N steps (0: at each epoch end only)
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// keep at most N checkpoint-* folders (0: all)
    #[arg(long, default_value_t = 2)]
    pub save_total_limit: usize,
    /// continue from the latest checkpoint in --output-dir (or from the checkpoint folder given)
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
    /// stop when dev F1 has not improved for N evaluations (0: never)
    #[arg(long, default_value_t = 0)]
    pub early_stopping_patience: usize,
    /// override the config's hidden_dropout_prob
    #[arg(long)]
    pub hidden_dropout: Option<f32>,
    /// override the config's attention_probs_dropout_prob
    #[arg(long)]
    pub attention_dropout: Option<f32>,
    /// the same as --padding max (every window padded to --max-seq-length; same results, slower)
    #[arg(long)]
    pub no_dynamic_padding: bool,
    /// abort after this many non-finite steps in a row
    #[arg(long, default_value_t = 10)]
    pub max_bad_steps: usize,
    #[arg(long, default_value_t = 64)]
    pub eval_batch_size: usize,
    /// write a metrics line every N steps
    #[arg(long, default_value_t = 1)]
    pub log_every: usize,
    #[arg(long)]
    pub no_progress: bool,
    /// data parallelism: train on these devices of this machine, CUDA ordinals (0,1,2,3) or CPU replicas
    /// (cpu,cpu); each step's --batch-size windows are split across them, with the result of one device
    /// (instead of --device)
    #[arg(long, conflicts_with = "device")]
    pub devices: Option<String>,
    /// machines in the run (each runs this command with its own --node-rank and the same --devices count)
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// this machine's index, 0 .. --nnodes (node 0 logs, evaluates and saves)
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// how the machines find each other: file:PATH (a shared file system) or tcp:HOST:PORT (node 0's)
    #[arg(long)]
    pub rendezvous: Option<String>,
    /// seconds to wait for the other machines
    #[arg(long, default_value_t = 600)]
    pub rendezvous_timeout: u64,
    #[command(flatten)]
    pub opts: EvalOpts,
}

impl TrainArgs {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0
            || self.grad_accum_steps == 0
            || self.grad_accum_steps > self.batch_size
        {
            bail!(
                "--batch-size ({}) must be ≥ 1 and ≥ --grad-accum-steps ({})",
                self.batch_size,
                self.grad_accum_steps
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            bail!("--learning-rate {} must be in (0, 1)", self.learning_rate);
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            bail!("--warmup-ratio {} must be in [0, 1)", self.warmup_ratio);
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            bail!("--adam-beta1/--adam-beta2 must be in [0, 1)");
        }
        if self.epochs == 0 {
            bail!("--epochs must be ≥ 1");
        }
        if self.opts.doc_stride >= self.opts.max_seq_length
            || self.opts.max_query_length + 8 > self.opts.max_seq_length
        {
            bail!("--doc-stride ({}) and --max-query-length ({}) must leave room in --max-seq-length ({})", self.opts.doc_stride, self.opts.max_query_length, self.opts.max_seq_length);
        }
        if self.nnodes == 0 || self.node_rank >= self.nnodes {
            bail!(
                "--node-rank ({}) must be below --nnodes ({}), and --nnodes ≥ 1",
                self.node_rank,
                self.nnodes
            );
        }
        if self.nnodes > 1 && (self.devices.is_none() || self.rendezvous.is_none()) {
            bail!("--nnodes {} needs --devices (this machine's GPUs) and --rendezvous (file:PATH or tcp:HOST:PORT)", self.nnodes);
        }
        if let Some(d) = &self.devices {
            let d = Devices::parse(d)?;
            if matches!(d, Devices::Cpu(_)) && self.nnodes > 1 {
                bail!("--devices cpu,…: CPU replicas run in one process; several machines need GPUs (NCCL)");
            }
            if self.batch_size < d.len() * self.nnodes {
                bail!(
                    "--batch-size ({}) must give every device at least one window ({} devices)",
                    self.batch_size,
                    d.len() * self.nnodes
                );
            }
        }
        if let Some(r) = &self.rendezvous {
            Rendezvous::parse(r)?;
        }
        for (n, p) in [
            ("--hidden-dropout", self.hidden_dropout),
            ("--attention-dropout", self.attention_dropout),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    bail!("{n} {p} must be in [0, 1)");
                }
            }
        }
        Ok(())
    }

    pub fn config(&self, bcfg: &crate::model::BertConfig) -> Result<TrainConfig> {
        Ok(TrainConfig {
            epochs: self.epochs,
            learning_rate: self.learning_rate,
            batch_size: self.batch_size,
            grad_accum_steps: self.grad_accum_steps,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            adam_beta1: self.adam_beta1,
            adam_beta2: self.adam_beta2,
            adam_eps: self.adam_eps,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            max_steps: self.max_steps,
            eval_every: self.eval_every,
            save_every: self.save_every,
            save_total_limit: self.save_total_limit,
            early_stopping_patience: self.early_stopping_patience,
            hidden_dropout: self.hidden_dropout.unwrap_or(bcfg.hidden_dropout_prob),
            attention_dropout: self
                .attention_dropout
                .unwrap_or(bcfg.attention_probs_dropout_prob),
            padding: if self.no_dynamic_padding {
                crate::model::Padding::Max
            } else {
                crate::model::Padding::parse(&self.opts.padding)?
            },
            max_bad_steps: self.max_bad_steps,
            eval_batch_size: self.eval_batch_size,
            log_every: self.log_every,
            features: FeatureCfgSer {
                max_seq_length: self.opts.max_seq_length,
                doc_stride: self.opts.doc_stride,
                max_query_length: self.opts.max_query_length,
            },
            post: PostCfgSer {
                n_best_size: self.opts.n_best_size,
                max_answer_length: self.opts.max_answer_length,
                version_2: self.opts.version_2_with_negative,
                null_score_diff_threshold: self.opts.null_score_diff_threshold,
            },
        })
    }
}

/// The leader's job: the arguments, and the replica group of a data-parallel run (a
/// `Box<dyn Collective<B>>` for the backend `call` is given).
struct TrainJob<'a>(&'a TrainArgs, Option<Box<dyn std::any::Any + Send>>);
impl DeviceFn<()> for TrainJob<'_> {
    fn call<B: Backend>(self, be: &B) -> Result<()> {
        let a = self.0;
        let group = match self.1 {
            Some(g) => Some(
                *g.downcast::<Box<dyn Collective<B>>>()
                    .map_err(|_| anyhow::anyhow!("internal: a replica group of another backend"))?,
            ),
            None => None,
        };
        let mut train_ds = Dataset::load(&a.train_file)?;
        if let Some(msg) = train_ds.misaligned_report() {
            eprintln!("{}: {msg}", a.train_file.display());
        }
        if let Some(n) = a.max_train_examples {
            train_ds.truncate(n);
        }
        let dev = match &a.dev_file {
            Some(p) => {
                let mut d = Dataset::load(p)?;
                if let Some(n) = a.max_eval_examples {
                    d.truncate(n);
                }
                Some(d)
            }
            None => None,
        };
        let tok = tokenizer::load(&a.model)?;
        let resume_dir = match a.resume.as_deref() {
            None => None,
            Some("") => Some(checkpoint::latest(&a.output_dir).with_context(|| {
                format!(
                    "--resume: no checkpoint-* with trainer_state.json in {}",
                    a.output_dir.display()
                )
            })?),
            Some(p) => Some(PathBuf::from(p)),
        };
        let mut trainer = match &resume_dir {
            Some(dir) => {
                let r = checkpoint::restore(be, dir)?;
                eprintln!("resuming from {} (step {}, epoch {}); the checkpoint's hyperparameters are used", dir.display(), r.state.global_step, r.state.epoch);
                checkpoint::into_trainer(be, r)?
            }
            None => {
                let precision = precision_dtype(be, &a.precision)?;
                let (bcfg, master, rep) = mc::load(be, &a.model, DType::F32, a.seed)?;
                if rep.qa_head_initialised {
                    eprintln!("{}: no qa_outputs in the checkpoint: span head initialised normal(0, {}) with seed {}", a.model.display(), bcfg.initializer_range, a.seed);
                }
                let cfg = a.config(&bcfg)?;
                Trainer::new(be, bcfg, master, precision, cfg)?
            }
        };
        let peak = be.peak(trainer.model.dtype());
        trainer.set_peak(peak.clone());
        if let Some(g) = group {
            replica::lead(&mut trainer, g)?;
        }
        let peak = trainer.peak().cloned();
        eprintln!(
            "model: {} layers, hidden {}, {:.1}M parameters; precision {}; device {}; padding {}; activations {:.2} GiB; MFU {}",
            trainer.model.cfg.num_hidden_layers,
            trainer.model.cfg.hidden_size,
            trainer.model.cfg.num_params() as f64 / 1e6,
            trainer.model.dtype(),
            be.name(),
            trainer.cfg.padding.name(),
            trainer.activation_bytes() as f64 / 1073741824.0,
            match &peak {
                Some(p) => format!("against {} TFLOP/s ({})", p.tflops, p.source),
                None => "not reported (no known peak for this device)".into(),
            }
        );
        let flag = Arc::new(AtomicBool::new(false));
        {
            let f = flag.clone();
            let _ = ctrlc::set_handler(move || {
                if f.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                eprintln!("\nCtrl-C: finishing this step and saving a checkpoint (press again to quit now)");
            });
        }
        let inp = RunInputs {
            train: &train_ds,
            dev: dev.as_ref(),
            tokenizer: &tok,
            output_dir: a.output_dir.clone(),
            model_dir: a.model.clone(),
            precision: trainer.model.dtype(),
            resume_from: resume_dir,
            show_progress: !a.no_progress,
            interrupt: Some(flag),
            stop_after_steps: None,
        };
        let s = train::run(&mut trainer, &inp);
        // the followers stop with the leader (an error drops the group instead: they see it has gone)
        let s = match s {
            Ok(s) => {
                trainer.leave_group()?;
                s
            }
            Err(e) => return Err(e),
        };
        let summary = serde_json::json!({
            "steps": s.state.global_step, "skipped_steps": s.state.skipped_steps, "epochs": s.state.epoch,
            "train_windows": s.train_windows, "seconds": s.seconds, "train_seq_per_s": s.seq_per_s,
            "final_loss": s.losses.last(), "best_f1": s.state.best_f1, "best_step": s.state.best_step,
            "stopped_early": s.state.stopped_early, "precision": trainer.model.dtype().to_string(), "device": be.name(),
            "devices": a.devices.as_ref().map(|d| Devices::parse(d).map(|d| d.len() * a.nnodes).unwrap_or(0)).unwrap_or(1),
            "peak_device_memory_gib": be.memory_stats().peak_bytes as f64 / 1073741824.0,
            "train_flops_per_seq_at_max_len": trainer.model.cfg.train_flops_per_seq(a.opts.max_seq_length),
        });
        crate::util::write_atomic(
            &a.output_dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        println!("summary: {summary}");
        match s.final_metrics {
            Some(m) => println!("{m}"),
            None => println!("{{}}"),
        }
        Ok(())
    }
}

pub fn run(a: &TrainArgs) -> Result<()> {
    a.validate()?;
    match &a.devices {
        None => on_device(&a.opts.device, &a.opts.kernels, TrainJob(a, None)),
        Some(d) => data_parallel(a, Devices::parse(d)?),
    }
}

/// `--devices`: one thread per device of this machine, each with its own backend and replica; the leader
/// (rank 0, on node 0) runs the training loop, the others follow it (src/train/replica.rs).
fn data_parallel(a: &TrainArgs, devs: Devices) -> Result<()> {
    let world = devs.len() * a.nnodes;
    match devs {
        Devices::Cpu(n) => {
            eprintln!("bertqa: data parallel over {n} CPU replicas in this process");
            let mut groups = Local::group(n).into_iter();
            let leader = groups.next().context("--devices: no device")?;
            let followers: Vec<_> = groups
                .map(|g| {
                    let rank = g.rank();
                    std::thread::Builder::new()
                        .name(format!("replica-{rank}"))
                        .spawn(move || replica::follow(&Cpu::new(), Box::new(g)))
                })
                .collect::<std::io::Result<_>>()
                .context("starting the replica threads")?;
            let g: Box<dyn Collective<Cpu>> = Box::new(leader);
            let res = TrainJob(a, Some(Box::new(g))).call(&Cpu::new());
            // the leader's group is gone by now (stopped, or dropped on an error): every follower returns
            let mut errors = vec![];
            for (i, h) in followers.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => errors.push(format!("{e:#}")),
                    Err(_) => errors.push(format!("replica {} panicked", i + 1)),
                }
            }
            match res {
                Err(e) => Err(e),
                Ok(()) if errors.is_empty() => Ok(()),
                Ok(()) => bail!("{}", errors.join("; ")),
            }
        }
        Devices::Cuda(ords) => {
            let k = a.opts.kernels.config()?;
            let id = if a.node_rank == 0 {
                let id = crate::collective::nccl::unique_id()?;
                if a.nnodes > 1 {
                    let r = Rendezvous::parse(a.rendezvous.as_deref().unwrap_or_default())?;
                    eprintln!(
                        "bertqa: node 0 of {}: waiting for the other nodes ({r:?})",
                        a.nnodes
                    );
                    r.publish(&id, a.nnodes, Duration::from_secs(a.rendezvous_timeout))?;
                }
                id
            } else {
                let r = Rendezvous::parse(a.rendezvous.as_deref().unwrap_or_default())?;
                r.fetch(a.node_rank, Duration::from_secs(a.rendezvous_timeout))?
            };
            eprintln!(
                "bertqa: data parallel: node {} of {}, GPUs {ords:?}, {world} ranks in all ({})",
                a.node_rank,
                a.nnodes,
                k.describe()
            );
            let first_rank = a.node_rank * ords.len();
            // a failing follower ends the process: the others would wait in NCCL for it forever (the last
            // checkpoint is whole: they are written atomically)
            let follower = move |i: usize, ord: usize| {
                let rank = first_rank + i;
                let res = (|| -> Result<()> {
                    let be = Cuda::new(ord, k).with_context(|| format!("opening cuda:{ord}"))?;
                    let g = Nccl::join(&be, &id, rank, world)?;
                    replica::follow(&be, Box::new(g))
                })();
                if let Err(e) = res {
                    eprintln!("error: replica {rank} (cuda:{ord}): {e:#}; stopping the run");
                    std::process::exit(1);
                }
            };
            let lead_here = a.node_rank == 0;
            let skip = usize::from(lead_here);
            let handles: Vec<_> = ords
                .iter()
                .enumerate()
                .skip(skip)
                .map(|(i, &ord)| {
                    std::thread::Builder::new()
                        .name(format!("replica-{}", first_rank + i))
                        .spawn(move || follower(i, ord))
                })
                .collect::<std::io::Result<_>>()
                .context("starting the replica threads")?;
            if lead_here {
                let be =
                    Cuda::new(ords[0], k).with_context(|| format!("opening cuda:{}", ords[0]))?;
                let g: Box<dyn Collective<Cuda>> = Box::new(Nccl::join(&be, &id, 0, world)?);
                eprintln!("bertqa: {}", g.describe());
                TrainJob(a, Some(Box::new(g))).call(&be)?;
            }
            for h in handles {
                let _ = h.join();
            }
            Ok(())
        }
    }
}
