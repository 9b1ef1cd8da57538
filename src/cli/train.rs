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
use crate::train::{
    self, checkpoint, DataFingerprint, FeatureCfgSer, PostCfgSer, RunInputs, TrainConfig,
    TrainState, Trainer,
};
use crate::util::{DirLock, DirLockHandle};
use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
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
    #[arg(long, default_value_t = TrainConfig::default().epochs, allow_negative_numbers = true)]
    pub epochs: usize,
    #[arg(long, default_value_t = TrainConfig::default().learning_rate, allow_negative_numbers = true)]
    pub learning_rate: f64,
    /// windows per optimizer step
    #[arg(long, default_value_t = TrainConfig::default().batch_size, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// split each batch into this many micro-batches (same result, less memory)
    #[arg(long, default_value_t = TrainConfig::default().grad_accum_steps, allow_negative_numbers = true)]
    pub grad_accum_steps: usize,
    #[arg(long, default_value_t = TrainConfig::default().warmup_ratio, allow_negative_numbers = true)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = TrainConfig::default().weight_decay, allow_negative_numbers = true)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = TrainConfig::default().adam_beta1, allow_negative_numbers = true)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = TrainConfig::default().adam_beta2, allow_negative_numbers = true)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = TrainConfig::default().adam_eps, allow_negative_numbers = true)]
    pub adam_eps: f64,
    /// global gradient-norm clipping (0: off)
    #[arg(long, default_value_t = TrainConfig::default().max_grad_norm, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    /// auto (bf16 on GPU, fp32 on CPU), fp32, bf16 (f32 master weights) or fp16 (plus dynamic loss scaling)
    #[arg(long, default_value = "auto")]
    pub precision: String,
    #[arg(long, default_value_t = TrainConfig::default().seed, allow_negative_numbers = true)]
    pub seed: u64,
    /// stop after this many optimizer steps, or at the end of --epochs if that comes first (unlike
    /// transformers' max_steps, which overrides num_train_epochs); the learning-rate schedule spans the
    /// smaller of the two
    #[arg(long, allow_negative_numbers = true)]
    pub max_steps: Option<usize>,
    /// train on the first N questions only (quick runs)
    #[arg(long, allow_negative_numbers = true)]
    pub max_train_examples: Option<usize>,
    /// evaluate on the first N dev questions only
    #[arg(long, allow_negative_numbers = true)]
    pub max_eval_examples: Option<usize>,
    /// evaluate every N steps (0: at each epoch end only)
    #[arg(long, default_value_t = TrainConfig::default().eval_every, allow_negative_numbers = true)]
    pub eval_every: usize,
    /// checkpoint every N steps (0: at each epoch end only)
    #[arg(long, default_value_t = TrainConfig::default().save_every, allow_negative_numbers = true)]
    pub save_every: usize,
    /// keep at most N checkpoint-* folders (0: all)
    #[arg(long, default_value_t = TrainConfig::default().save_total_limit, allow_negative_numbers = true)]
    pub save_total_limit: usize,
    /// continue from the latest checkpoint in --output-dir (or from the checkpoint folder given)
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
    /// start afresh in an --output-dir that holds a run: removes what bertqa wrote there (checkpoint-*/,
    /// best/, metrics.jsonl, predictions.json, nbest_predictions.json, null_odds.json, curves.svg,
    /// summary.json and the debris of its saves) and nothing else
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// stop when dev F1 has not improved for N evaluations (0: never)
    #[arg(long, default_value_t = TrainConfig::default().early_stopping_patience, allow_negative_numbers = true)]
    pub early_stopping_patience: usize,
    /// override the config's hidden_dropout_prob
    #[arg(long, allow_negative_numbers = true)]
    pub hidden_dropout: Option<f32>,
    /// override the config's attention_probs_dropout_prob
    #[arg(long, allow_negative_numbers = true)]
    pub attention_dropout: Option<f32>,
    /// the same as --padding max (every window padded to --max-seq-length; same results, slower)
    #[arg(long)]
    pub no_dynamic_padding: bool,
    /// abort after this many non-finite steps in a row
    #[arg(long, default_value_t = TrainConfig::default().max_bad_steps, allow_negative_numbers = true)]
    pub max_bad_steps: usize,
    #[arg(long, default_value_t = TrainConfig::default().eval_batch_size, allow_negative_numbers = true)]
    pub eval_batch_size: usize,
    /// write a metrics line every N steps
    #[arg(long, default_value_t = TrainConfig::default().log_every, allow_negative_numbers = true)]
    pub log_every: usize,
    #[arg(long)]
    pub no_progress: bool,
    /// data parallelism: train on these devices of this machine, CUDA ordinals (0,1,2,3) or CPU replicas
    /// (cpu,cpu); each step's --batch-size windows are split across them, with the result of one device
    /// (instead of --device)
    #[arg(long, conflicts_with = "device")]
    pub devices: Option<String>,
    /// machines in the run (each runs this command with its own --node-rank and the same --devices count)
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub nnodes: usize,
    /// this machine's index, 0 .. --nnodes (node 0 logs, evaluates and saves)
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub node_rank: usize,
    /// how the machines find each other: file:PATH (a shared file system) or tcp:HOST:PORT (node 0's)
    #[arg(long)]
    pub rendezvous: Option<String>,
    /// seconds to wait for the other machines
    #[arg(long, default_value_t = 600, allow_negative_numbers = true)]
    pub rendezvous_timeout: u64,
    #[command(flatten)]
    pub opts: EvalOpts,
}

impl TrainArgs {
    /// The command line's checks: the options shared with eval/predict, then the run's settings
    /// ([`TrainConfig::validate`], the checks a stored trainer_state.json gets too).
    pub fn validate(&self) -> Result<()> {
        self.opts.validate()?;
        if self.resume.is_some() && self.overwrite_output_dir {
            bail!("--resume continues the run in --output-dir and --overwrite-output-dir removes it: give one of them");
        }
        if self.max_train_examples == Some(0) {
            bail!("--max-train-examples 0 leaves nothing to train on");
        }
        if self.max_eval_examples == Some(0) {
            bail!("--max-eval-examples 0 leaves no question to evaluate");
        }
        // flags that act through the dev set do nothing without one: say so rather than ignore them
        if self.dev_file.is_none() {
            if let Some(flag) = dev_set_flag(
                self.eval_every,
                self.early_stopping_patience,
                self.max_eval_examples,
            ) {
                bail!("{flag} needs --dev-file: without a dev set nothing is evaluated");
            }
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
        // the model's dropout is checked when it loads; here only the flags'
        self.config_with(
            self.hidden_dropout.unwrap_or(0.0),
            self.attention_dropout.unwrap_or(0.0),
        )?
        .validate()
    }

    /// The run's settings: these flags, dropout from the flags or else the model's config.
    pub fn config(&self, bcfg: &crate::model::BertConfig) -> Result<TrainConfig> {
        self.config_with(
            self.hidden_dropout.unwrap_or(bcfg.hidden_dropout_prob),
            self.attention_dropout
                .unwrap_or(bcfg.attention_probs_dropout_prob),
        )
    }

    fn padding(&self) -> Result<crate::model::Padding> {
        Ok(if self.no_dynamic_padding {
            crate::model::Padding::Max
        } else {
            crate::model::Padding::parse(&self.opts.padding)?
        })
    }

    fn config_with(&self, hidden_dropout: f32, attention_dropout: f32) -> Result<TrainConfig> {
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
            hidden_dropout,
            attention_dropout,
            padding: self.padding()?,
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

/// The flags of `train` given on the command line (not defaults), by argument id (the field name:
/// `max_steps`, `padding`, …): on --resume, these override or are compared with the checkpoint's settings.
#[derive(Debug, Default, Clone)]
pub struct GivenFlags(HashSet<String>);

impl GivenFlags {
    /// From the `train` subcommand's matches (None: no flag counts as given).
    pub fn from_matches(m: Option<&ArgMatches>) -> GivenFlags {
        let Some(m) = m else {
            return GivenFlags::default();
        };
        GivenFlags(
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.as_str().to_string())
                .collect(),
        )
    }
    /// These ids, as if given on the command line (for tests and callers without clap).
    pub fn of(ids: &[&str]) -> GivenFlags {
        GivenFlags(ids.iter().map(|s| s.to_string()).collect())
    }
    pub fn has(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

fn show_opt(v: Option<usize>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "none".into())
}

/// On --resume: the flags given on the command line against the checkpoint's settings `cfg` (stored in
/// `origin`). Those that may change on resume override it, each reported on stderr: where the run stops
/// (--max-steps, --epochs; the learning-rate schedule keeps its stored length unless --epochs changes it),
/// when it evaluates, saves, prunes and stops early, and settings that do not change the result (--padding,
/// --eval-batch-size, --log-every, --max-bad-steps). Any other flag given with another value than the
/// checkpoint's is an error naming the flag and both values.
pub fn apply_resume_flags(
    a: &TrainArgs,
    given: &GivenFlags,
    cfg: &mut TrainConfig,
    st: &mut TrainState,
    stored_precision: DType,
    cli_precision: DType,
    origin: &Path,
) -> Result<Vec<String>> {
    let mut notes = vec![];
    // --epochs first: it decides whether the schedule keeps its length
    let mut schedule_recomputed = false;
    if given.has("epochs") && a.epochs != cfg.epochs {
        notes.push(format!(
            "--epochs {} (the checkpoint had {}): the learning-rate schedule ({} steps) is recomputed for \
             the new length",
            a.epochs, cfg.epochs, st.total_steps
        ));
        cfg.epochs = a.epochs;
        st.total_steps = 0; // train::run recomputes it (and the warmup) from --epochs / --max-steps
        st.warmup_steps = 0;
        schedule_recomputed = true;
    }
    if given.has("max_steps") && a.max_steps != cfg.max_steps {
        let schedule = if schedule_recomputed {
            "the learning-rate schedule is recomputed (--epochs)".to_string()
        } else {
            let past = a.max_steps.is_none_or(|m| m > st.total_steps);
            format!(
                "the learning-rate schedule keeps its length of {} steps{}",
                st.total_steps,
                if past {
                    " (it has decayed to 0 there: steps after it run at learning rate 0; give --epochs to \
                     recompute it)"
                } else {
                    ""
                }
            )
        };
        notes.push(format!(
            "--max-steps {} (the checkpoint had {}): {schedule}",
            show_opt(a.max_steps),
            show_opt(cfg.max_steps)
        ));
        cfg.max_steps = a.max_steps;
    }
    for (id, flag, stored, new) in [
        (
            "eval_every",
            "--eval-every",
            &mut cfg.eval_every,
            a.eval_every,
        ),
        (
            "save_every",
            "--save-every",
            &mut cfg.save_every,
            a.save_every,
        ),
        (
            "save_total_limit",
            "--save-total-limit",
            &mut cfg.save_total_limit,
            a.save_total_limit,
        ),
        (
            "early_stopping_patience",
            "--early-stopping-patience",
            &mut cfg.early_stopping_patience,
            a.early_stopping_patience,
        ),
        // settings that do not change the result
        (
            "eval_batch_size",
            "--eval-batch-size",
            &mut cfg.eval_batch_size,
            a.eval_batch_size,
        ),
        ("log_every", "--log-every", &mut cfg.log_every, a.log_every),
        (
            "max_bad_steps",
            "--max-bad-steps",
            &mut cfg.max_bad_steps,
            a.max_bad_steps,
        ),
    ] {
        if given.has(id) && *stored != new {
            notes.push(format!("{flag} {new} (the checkpoint had {stored})"));
            *stored = new;
        }
    }
    if given.has("padding") || given.has("no_dynamic_padding") {
        let p = a.padding()?;
        if p != cfg.padding {
            notes.push(format!(
                "--padding {} (the checkpoint had {}; the result does not depend on it)",
                p.name(),
                cfg.padding.name()
            ));
            cfg.padding = p;
        }
    }
    // The number of devices (--devices, --nnodes) is not a setting of the run: like --padding it does not
    // change the result (one dropout stream and one loss normalisation for the whole step), so a run may
    // resume on any number of devices (the leader sends the restored state to every replica).

    // everything else that changes the result must be what the run started with
    let mut diffs: Vec<String> = vec![];
    let mut usize_flag = |id: &str, flag: &str, field: &str, stored: usize, new: usize| {
        if given.has(id) && stored != new {
            diffs.push(format!(
                "{flag} {new} (the checkpoint's {field} is {stored})"
            ));
        }
    };
    usize_flag(
        "batch_size",
        "--batch-size",
        "batch_size",
        cfg.batch_size,
        a.batch_size,
    );
    usize_flag(
        "grad_accum_steps",
        "--grad-accum-steps",
        "grad_accum_steps",
        cfg.grad_accum_steps,
        a.grad_accum_steps,
    );
    usize_flag(
        "max_seq_length",
        "--max-seq-length",
        "features.max_seq_length",
        cfg.features.max_seq_length,
        a.opts.max_seq_length,
    );
    usize_flag(
        "doc_stride",
        "--doc-stride",
        "features.doc_stride",
        cfg.features.doc_stride,
        a.opts.doc_stride,
    );
    usize_flag(
        "max_query_length",
        "--max-query-length",
        "features.max_query_length",
        cfg.features.max_query_length,
        a.opts.max_query_length,
    );
    usize_flag(
        "n_best_size",
        "--n-best-size",
        "post.n_best_size",
        cfg.post.n_best_size,
        a.opts.n_best_size,
    );
    usize_flag(
        "max_answer_length",
        "--max-answer-length",
        "post.max_answer_length",
        cfg.post.max_answer_length,
        a.opts.max_answer_length,
    );
    let same = |x: f64, y: f64| x == y || (x - y).abs() <= 1e-12 * x.abs().max(y.abs());
    for (id, flag, field, stored, new) in [
        (
            "learning_rate",
            "--learning-rate",
            "learning_rate",
            cfg.learning_rate,
            a.learning_rate,
        ),
        (
            "warmup_ratio",
            "--warmup-ratio",
            "warmup_ratio",
            cfg.warmup_ratio,
            a.warmup_ratio,
        ),
        (
            "weight_decay",
            "--weight-decay",
            "weight_decay",
            cfg.weight_decay,
            a.weight_decay,
        ),
        (
            "adam_beta1",
            "--adam-beta1",
            "adam_beta1",
            cfg.adam_beta1,
            a.adam_beta1,
        ),
        (
            "adam_beta2",
            "--adam-beta2",
            "adam_beta2",
            cfg.adam_beta2,
            a.adam_beta2,
        ),
        (
            "adam_eps",
            "--adam-eps",
            "adam_eps",
            cfg.adam_eps,
            a.adam_eps,
        ),
        (
            "max_grad_norm",
            "--max-grad-norm",
            "max_grad_norm",
            cfg.max_grad_norm,
            a.max_grad_norm,
        ),
        (
            "null_score_diff_threshold",
            "--null-score-diff-threshold",
            "post.null_score_diff_threshold",
            cfg.post.null_score_diff_threshold,
            a.opts.null_score_diff_threshold,
        ),
        (
            "hidden_dropout",
            "--hidden-dropout",
            "hidden_dropout",
            cfg.hidden_dropout as f64,
            a.hidden_dropout.unwrap_or(cfg.hidden_dropout) as f64,
        ),
        (
            "attention_dropout",
            "--attention-dropout",
            "attention_dropout",
            cfg.attention_dropout as f64,
            a.attention_dropout.unwrap_or(cfg.attention_dropout) as f64,
        ),
    ] {
        if given.has(id) && !same(stored, new) {
            diffs.push(format!(
                "{flag} {new} (the checkpoint's {field} is {stored})"
            ));
        }
    }
    if given.has("seed") && a.seed != cfg.seed {
        diffs.push(format!(
            "--seed {} (the checkpoint's seed is {})",
            a.seed, cfg.seed
        ));
    }
    if given.has("version_2_with_negative") && a.opts.version_2_with_negative != cfg.post.version_2
    {
        diffs.push(format!(
            "--version-2-with-negative (the checkpoint's post.version_2 is {})",
            cfg.post.version_2
        ));
    }
    if given.has("precision") && cli_precision != stored_precision {
        diffs.push(format!(
            "--precision {} = {cli_precision} (the checkpoint's precision is {stored_precision})",
            a.precision
        ));
    }
    if !diffs.is_empty() {
        bail!(
            "{}: --resume continues a run with the settings it started with, and the command line differs: {}. \
             Leave these flags out (or give the checkpoint's values), or start a new run",
            origin.display(),
            diffs.join("; ")
        );
    }
    cfg.validate()
        .with_context(|| format!("{} with the command line's overrides", origin.display()))?;
    Ok(notes)
}

/// The --max-train-examples of a resumed run: the checkpoint's unless given (then it must be the same).
fn resume_max_train_examples(
    a: &TrainArgs,
    given: &GivenFlags,
    stored: Option<&DataFingerprint>,
    origin: &Path,
) -> Result<Option<usize>> {
    let Some(fp) = stored else {
        return Ok(a.max_train_examples);
    };
    if given.has("max_train_examples") && a.max_train_examples != fp.max_train_examples {
        bail!(
            "{}: --max-train-examples {} differs from the run's ({}): --resume continues a run on the data it started with",
            origin.display(),
            show_opt(a.max_train_examples),
            show_opt(fp.max_train_examples)
        );
    }
    Ok(fp.max_train_examples)
}

/// Error unless `now` (the --train-file of this command) is the data the run in `origin` trained on.
fn check_same_data(now: &DataFingerprint, stored: &DataFingerprint, origin: &Path) -> Result<()> {
    if now.bytes != stored.bytes || now.sha256 != stored.sha256 {
        bail!(
            "--train-file {} ({} bytes, sha256 {}) is not the data this run trained on ({}: {} bytes, sha256 {}, \
             then at {}): --resume continues a run on the same data; start a new run (another --output-dir) to \
             train on other data",
            now.file,
            now.bytes,
            &now.sha256[..16.min(now.sha256.len())],
            origin.display(),
            stored.bytes,
            &stored.sha256[..16.min(stored.sha256.len())],
            stored.file
        );
    }
    Ok(())
}

/// The signal that interrupted a run: "SIGINT", "SIGTERM".
fn signal_name(sig: i32) -> String {
    match sig {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

/// SIGINT and SIGTERM during a run. The first: finish the current step, save a checkpoint, exit 128 +
/// the signal (130, 143). A second during a save: the save completes, then the run stops as after the first
/// (the loop checks the flag right after every save); a second outside a save: exit at once (the latest
/// checkpoint stays; anything half-written is debris that the next start removes). The same signal again
/// within [`ECHO`] of the first is the first's echo, not a second: coreutils `timeout` (and a shell's Ctrl-C
/// to a process group) signal the process and then its group, so one request arrives twice.
const ECHO: std::time::Duration = std::time::Duration::from_millis(100);

struct Interrupts {
    /// set by the first signal: the training loop stops after its current step
    flag: Arc<AtomicBool>,
    /// set when the training starts (the job's train::run): a signal before it — loading, a rendezvous that
    /// waits for other machines — exits at once, as there is nothing to save
    started: Arc<AtomicBool>,
    /// the first signal's number (0: none yet)
    first: Arc<AtomicI32>,
    handle: signal_hook::iterator::Handle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Interrupts {
    fn install(lock: DirLockHandle, output_dir: PathBuf) -> Result<Interrupts> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("installing the SIGINT/SIGTERM handlers")?;
        let handle = signals.handle();
        let flag = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let first = Arc::new(AtomicI32::new(0));
        let (f, fs, st) = (flag.clone(), first.clone(), started.clone());
        let thread = std::thread::spawn(move || {
            let mut first_at: Option<std::time::Instant> = None;
            for sig in signals.forever() {
                let name = signal_name(sig);
                if fs
                    .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    if !st.load(Ordering::SeqCst) {
                        crate::say!(
                            "\n{name} before the training started: exiting now (nothing to save)"
                        );
                        lock.release();
                        crate::collective::rendezvous::exit(128 + sig);
                    }
                    first_at = Some(std::time::Instant::now());
                    f.store(true, Ordering::SeqCst);
                    crate::say!(
                        "\n{name}: finishing this step, saving a checkpoint, then exiting (send it again to \
                         quit at once; a save in progress completes first)"
                    );
                    continue;
                }
                if sig == fs.load(Ordering::SeqCst) && first_at.is_some_and(|t| t.elapsed() < ECHO)
                {
                    continue; // the first one's echo (see ECHO)
                }
                // a second signal during a save: the save completes, and the training loop, which has seen
                // the first, stops right after it (it writes the summary and exits 128 + the first signal)
                let Some(_gate) = checkpoint::try_save_gate() else {
                    crate::say!(
                        "\n{name} again: a save is in progress; it completes, then bertqa exits"
                    );
                    continue;
                };
                // outside a save: quit now, holding the gate so that no save starts
                lock.release();
                let s0 = fs.load(Ordering::SeqCst);
                let latest = checkpoint::latest(&output_dir);
                crate::say!(
                    "\n{name} again: quitting now; the latest checkpoint is {}",
                    latest
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "none".into())
                );
                // (exiting either way: a closed stdout changes nothing)
                let _ = crate::util::print_line(
                    serde_json::json!({"interrupted": true, "signal": signal_name(s0), "forced": true,
                        "checkpoint": latest.map(|p| p.display().to_string())}),
                );
                crate::collective::rendezvous::exit(128 + s0);
            }
        });
        Ok(Interrupts {
            flag,
            started,
            first,
            handle,
            thread: Some(thread),
        })
    }

    fn signal(&self) -> Option<i32> {
        Some(self.first.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for Interrupts {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct TrainJob<'a> {
    a: &'a TrainArgs,
    given: &'a GivenFlags,
    interrupts: &'a Interrupts,
    /// the replica group of a data-parallel run: a `Box<dyn Collective<B>>` for the backend `call` gets
    group: Option<Box<dyn std::any::Any + Send>>,
}

impl DeviceFn<bool> for TrainJob<'_> {
    /// Ok(true): the run was interrupted.
    fn call<B: Backend>(self, be: &B) -> Result<bool> {
        let (a, given) = (self.a, self.given);
        let group = match self.group {
            Some(g) => Some(
                *g.downcast::<Box<dyn Collective<B>>>()
                    .map_err(|_| anyhow::anyhow!("internal: a replica group of another backend"))?,
            ),
            None => None,
        };
        let tok = tokenizer::load(&a.model)?;
        let resume_dir = match a.resume.as_deref() {
            None => None,
            Some("") => Some(checkpoint::latest(&a.output_dir).with_context(|| {
                let held = checkpoint::run_contents(&a.output_dir);
                format!(
                    "--resume: no checkpoint-* with trainer_state.json in {}{}",
                    a.output_dir.display(),
                    if held.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (it holds {}): nothing to continue from; move what you want to keep away, or \
                             pass --overwrite-output-dir instead of --resume to start afresh",
                            held.join(", ")
                        )
                    }
                )
            })?),
            Some(p) => Some(PathBuf::from(p)),
        };
        let cli_precision = precision_dtype(be, &a.precision)?;
        // the model and the run's settings: the checkpoint's (with the flags that may change), or the flags'
        let (mut trainer, max_train_examples) = match &resume_dir {
            Some(dir) => {
                let mut r = checkpoint::restore(be, dir)?;
                let origin = dir.join("trainer_state.json");
                let notes = apply_resume_flags(
                    a,
                    given,
                    &mut r.config,
                    &mut r.state,
                    r.precision,
                    cli_precision,
                    &origin,
                )?;
                crate::say!(
                    "resuming from {} (step {}, epoch {}) with the checkpoint's settings",
                    dir.display(),
                    r.state.global_step,
                    r.state.epoch
                );
                for n in notes {
                    crate::say!("resume: {n}");
                }
                tok.check_fits(r.bcfg.vocab_size, &format!("--model {}", a.model.display()))?;
                let mut o = a.opts.clone();
                o.max_seq_length = r.config.features.max_seq_length;
                o.check_model(&r.bcfg, dir)?;
                let max =
                    resume_max_train_examples(a, given, r.state.train_data.as_ref(), &origin)?;
                let now = DataFingerprint::of(&a.train_file, max)?;
                match &r.state.train_data {
                    Some(fp) => check_same_data(&now, fp, &origin)?,
                    None => {
                        crate::say!(
                            "note: {} has no training-data fingerprint (written by an older bertqa): --train-file \
                             is not checked against the run's data; it is recorded from now on",
                            origin.display()
                        );
                        r.state.train_data = Some(now);
                    }
                }
                (checkpoint::into_trainer(be, r)?, max)
            }
            None => {
                let (bcfg, master, rep) = mc::load(be, &a.model, DType::F32, a.seed)?;
                a.opts.check_model(&bcfg, &a.model)?;
                tok.check_fits(bcfg.vocab_size, &a.model.display().to_string())?;
                if rep.qa_head_initialised {
                    crate::say!("{}: no qa_outputs in the checkpoint: span head initialised normal(0, {}) with seed {}", a.model.display(), bcfg.initializer_range, a.seed);
                }
                let cfg = a.config(&bcfg)?;
                cfg.validate()?;
                let fp = DataFingerprint::of(&a.train_file, a.max_train_examples)?;
                let mut tr = Trainer::new(be, bcfg, master, cli_precision, cfg)?;
                tr.state.train_data = Some(fp);
                (tr, a.max_train_examples)
            }
        };
        let mut train_ds = Dataset::load(&a.train_file)?;
        if let Some(msg) = train_ds.misaligned_report() {
            crate::say!("{}: {msg}", a.train_file.display());
        }
        if let Some(n) = max_train_examples {
            train_ds.truncate(n);
        }
        if !trainer.cfg.post.version_2 && !train_ds.is_v2() {
            if let Some(msg) = train_ds.unanswerable_report() {
                crate::say!("warning: {}: {msg}", a.train_file.display());
            }
        }
        let dev = match &a.dev_file {
            Some(p) => {
                let (d, v2) = crate::cli::eval::load_eval_set(
                    p,
                    a.max_eval_examples,
                    trainer.cfg.post.version_2,
                )?;
                // scored as v2.0 when the dev file is (a note on stderr says so)
                trainer.cfg.post.version_2 = v2;
                if let Some(msg) = d.shared_report(&train_ds, &a.train_file.display().to_string()) {
                    crate::say!("warning: {}: {msg}", p.display());
                }
                Some(d)
            }
            None => {
                // a resumed run's stored settings that act through the dev set (the command line's are
                // checked in validate)
                let c = &trainer.cfg;
                if let Some(flag) = dev_set_flag(c.eval_every, c.early_stopping_patience, None) {
                    bail!(
                        "the run's {flag} (from its checkpoint) needs --dev-file: pass the dev file it was \
                         trained with, or {flag} 0"
                    );
                }
                None
            }
        };
        let peak = be.peak(trainer.model.dtype());
        trainer.set_peak(peak.clone());
        if let Some(g) = group {
            replica::lead(&mut trainer, g)?;
        }
        let peak = trainer.peak().cloned();
        crate::say!(
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
        let inp = RunInputs {
            train: &train_ds,
            dev: dev.as_ref(),
            tokenizer: &tok,
            output_dir: a.output_dir.clone(),
            model_dir: a.model.clone(),
            precision: trainer.model.dtype(),
            resume_from: resume_dir,
            show_progress: !a.no_progress,
            interrupt: Some(self.interrupts.flag.clone()),
            stop_after_steps: None,
        };
        self.interrupts.started.store(true, Ordering::SeqCst);
        let s = train::run(&mut trainer, &inp)?;
        // the followers stop with the leader (on an error the group is dropped instead: they see it gone)
        trainer.leave_group()?;
        if s.already_done {
            let checkpoint = checkpoint::latest(&a.output_dir).map(|p| p.display().to_string());
            crate::say!(
                "{}: the run already reached step {} (where --epochs/--max-steps stop it): nothing to resume, \
                 its files are left as they are (raise --epochs or --max-steps to train further)",
                a.output_dir.display(),
                s.state.global_step
            );
            // the last line stays JSON, as after an interrupted run: where the run stands
            crate::util::print_line(
                serde_json::json!({"already_finished": true, "step": s.state.global_step, "checkpoint": checkpoint}),
            )?;
            return Ok(false);
        }
        let signal = self.interrupts.signal().map(signal_name);
        let interrupted = s.interrupted;
        let checkpoint = checkpoint::latest(&a.output_dir).map(|p| p.display().to_string());
        let layout = crate::model::params::FlatLayout::new(&trainer.model.cfg);
        let mut summary = serde_json::json!({
            "steps": s.state.global_step, "skipped_steps": s.state.skipped_steps, "epochs": s.state.epoch,
            "train_windows": s.train_windows, "seconds": s.seconds, "train_seq_per_s": s.seq_per_s,
            "final_loss": s.losses.last(), "best_f1": s.state.best_f1, "best_step": s.state.best_step,
            "stopped_early": s.state.stopped_early, "precision": trainer.model.dtype().to_string(), "device": be.name(),
            "devices": a.devices.as_ref().map(|d| Devices::parse(d).map(|d| d.len() * a.nnodes).unwrap_or(0)).unwrap_or(1),
            "peak_device_memory_gib": be.memory_stats().peak_bytes as f64 / 1073741824.0,
            "train_flops_per_seq_at_max_len": trainer.model.cfg.train_flops_per_seq(trainer.cfg.features.max_seq_length),
            "interrupted": interrupted, "signal": if interrupted { signal.clone() } else { None },
            "checkpoint": checkpoint,
        });
        let compare = serde_json::json!({
            // for side-by-side comparisons (scripts/compare_pytorch.sh): the time by phase, the step time's
            // median after warm-up, what was trained on, the optimizer's groups
            "featurize_seconds": s.timings.featurize_s,
            "train_step_seconds": s.timings.step_s.iter().sum::<f64>(),
            "train_step_ms_median": s.timings.step_median_s().map(|v| v * 1e3),
            "train_step_ms_mean": s.timings.step_mean_s().map(|v| v * 1e3),
            "timed_steps": s.timings.step_s.len(),
            // the first step of a process compiles the kernels (NVRTC, unless cached) and tunes GEMMs
            "first_step_seconds": s.timings.step_s.first(),
            "warmup_steps_excluded": train::warmup_steps(s.timings.step_s.len()),
            "eval_seconds": s.timings.eval_s, "evaluations": s.timings.evals,
            "save_seconds": s.timings.save_s, "saves": s.timings.saves,
            "train_windows_with_answer": s.windows.train_with_answer,
            "train_windows_sha256": s.windows.train_sha256,
            "dev_windows": s.windows.dev, "dev_windows_sha256": s.windows.dev_sha256,
            "batch_size": trainer.cfg.batch_size, "padding": trainer.cfg.padding.name(),
            "max_seq_length": trainer.cfg.features.max_seq_length, "doc_stride": trainer.cfg.features.doc_stride,
            "max_query_length": trainer.cfg.features.max_query_length,
            "span_loss": if trainer.model.mask_padding_in_loss { "softmax over each window's real tokens (padding masked)" } else { "softmax over each window's rows (padding included)" },
            "params": layout.entries.iter().map(|e| e.numel()).sum::<usize>(),
            "params_decay": layout.entries.iter().filter(|e| e.decay).map(|e| e.numel()).sum::<usize>(),
            "params_no_decay": layout.entries.iter().filter(|e| !e.decay).map(|e| e.numel()).sum::<usize>(),
            "weight_precision": if trainer.master.is_some() { format!("{} working weights, f32 master weights and Adam moments", trainer.model.dtype()) } else { format!("{} weights and Adam moments", trainer.model.dtype()) },
        });
        if let (Some(m), serde_json::Value::Object(c)) = (summary.as_object_mut(), compare) {
            m.extend(c);
        }
        // stopped before its first step: no checkpoint, and no summary either, so that the directory holds no
        // run and the same command starts it again
        if !(interrupted && summary["checkpoint"].is_null()) {
            crate::util::write_atomic(
                &a.output_dir.join("summary.json"),
                serde_json::to_string_pretty(&summary)?.as_bytes(),
            )?;
        }
        // the run's files are complete: a stdout that cannot be written is reported as an error (exit 1) all
        // the same, since whoever reads these lines did not get them
        let last = if interrupted {
            // the last line stays JSON: what stopped the run and where it can go on from
            serde_json::json!({"interrupted": true, "signal": signal, "step": s.state.global_step,
                "checkpoint": summary["checkpoint"]})
        } else {
            s.final_metrics.unwrap_or_else(|| serde_json::json!({}))
        };
        let printed = crate::util::print_line(format_args!("summary: {summary}\n{last}"));
        match printed {
            // an interrupted run keeps its exit code (130/143: a wrapper resumes on it)
            Err(e) if interrupted => crate::say!(
                "warning: {e:#}: the run stopped{}",
                match summary["checkpoint"].as_str() {
                    Some(c) => format!(" at {c}; continue it with --resume"),
                    None => " before its first step".into(),
                }
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "the run ended and its files in {} are complete, but its summary could not be printed",
                        a.output_dir.display()
                    )
                })
            }
            Ok(()) => {}
        }
        Ok(interrupted)
    }
}

/// `bertqa train`: Ok(0) when the run finished (or stopped early), Ok(128 + signal) when a signal
/// interrupted it (130 SIGINT, 143 SIGTERM). `given`: the flags given on the command line.
pub fn run(a: &TrainArgs, given: &GivenFlags) -> Result<i32> {
    a.validate()?;
    if a.node_rank > 0 {
        return follow_on_this_node(a);
    }
    let dir = &a.output_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating --output-dir {}", dir.display()))?;
    // one run per directory; the clean-up below only while holding the lock
    let lock = DirLock::acquire(dir)?;
    for n in checkpoint::clean_debris(dir)? {
        crate::say!(
            "{}: {n} (left by an earlier run that stopped part-way)",
            dir.display()
        );
    }
    if let Some(r) = a.resume.as_deref().filter(|r| !r.is_empty()) {
        checkpoint::check_resume_target(dir, Path::new(r))?;
    }
    if a.resume.is_some() {
        // a save of the continued run would have to replace them: say so now, not after some steps
        let foreign = checkpoint::foreign_dirs(dir);
        if !foreign.is_empty() {
            bail!(
                "--resume: {} in {} hold(s) files bertqa does not write (or are files where bertqa writes \
                 folders), which a save of this run would have to replace; move them away first",
                foreign.join(", "),
                dir.display()
            );
        }
    }
    // `--resume` where the earlier attempt saved nothing (it crashed or was killed before its first
    // checkpoint, and before any evaluation wrote best/): nothing to continue from and nothing of value in its
    // logs, so the run starts again from step 0 in their place (named on stderr), with this command line's
    // settings, the only ones there are. (Without --resume such a directory is refused like any other run:
    // a predictions.json alone may be an `eval`'s.)
    let started_over;
    let a = if a.resume.as_deref() == Some("") && saved_nothing(dir) {
        let removed = checkpoint::remove_run(dir)?;
        crate::say!(
            "--resume: {} holds no checkpoint and no best/ (the earlier attempt saved nothing): starting from \
             step 0 with this command line's settings, in place of its {}",
            dir.display(),
            removed.join(", ")
        );
        started_over = TrainArgs {
            resume: None,
            ..a.clone()
        };
        &started_over
    } else {
        a
    };
    if a.resume.is_none() {
        let held = checkpoint::run_contents(dir);
        if !held.is_empty() {
            if !a.overwrite_output_dir {
                let more = if held.len() > 5 {
                    format!(", … ({} entries)", held.len())
                } else {
                    String::new()
                };
                let resume = if saved_nothing(dir) {
                    "pass --resume to start it again from step 0 (it saved no checkpoint)"
                } else {
                    "pass --resume to continue it"
                };
                bail!(
                    "--output-dir {} already holds a run ({}{more}): {resume}, or --overwrite-output-dir to \
                     start afresh (it removes only what bertqa wrote there)",
                    dir.display(),
                    held[..held.len().min(5)].join(", ")
                );
            }
            let removed = checkpoint::remove_run(dir)?;
            crate::say!(
                "--overwrite-output-dir: removed {} from {}",
                removed.join(", "),
                dir.display()
            );
        }
    }
    let interrupts = Interrupts::install(lock.handle(), dir.clone())?;
    let job = |group| TrainJob {
        a,
        given,
        interrupts: &interrupts,
        group,
    };
    let interrupted = match &a.devices {
        None => on_device(&a.opts.device, &a.opts.kernels, job(None))?,
        Some(d) => data_parallel(a, Devices::parse(d)?, Some(&job))?,
    };
    let code = match (interrupted, interrupts.signal()) {
        (true, Some(sig)) => 128 + sig,
        _ => 0,
    };
    drop(interrupts);
    drop(lock);
    Ok(code)
}

/// The first flag set among those that act through the dev set (they do nothing without one).
fn dev_set_flag(
    eval_every: usize,
    early_stopping_patience: usize,
    max_eval_examples: Option<usize>,
) -> Option<&'static str> {
    [
        ("--eval-every", eval_every > 0),
        ("--early-stopping-patience", early_stopping_patience > 0),
        ("--max-eval-examples", max_eval_examples.is_some()),
    ]
    .into_iter()
    .find_map(|(flag, set)| set.then_some(flag))
}

/// Whether `dir` holds only the logs of a run that saved nothing: its metrics.jsonl, maybe the predictions
/// and curves.svg, as plain files — no checkpoint-N (complete or not), no best/, no summary.json (a run that
/// ended).
fn saved_nothing(dir: &Path) -> bool {
    let held = checkpoint::run_contents(dir);
    // metrics.jsonl: a training run's (predictions alone may be an eval's)
    held.iter().any(|n| n == "metrics.jsonl")
        && held.iter().all(|n| {
            n != "summary.json"
                && checkpoint::RUN_FILES.contains(&n.as_str())
                && std::fs::symlink_metadata(dir.join(n)).is_ok_and(|m| m.is_file())
        })
}

/// `--devices`: one thread per device of this machine, each with its own backend and replica; the leader
/// (rank 0, on node 0) runs the training loop, the others follow it (src/train/replica.rs).
/// The leader's job for a replica group (None on a node other than 0: every replica there follows).
type LeaderJob<'j, 'a> = Option<&'j dyn Fn(Option<Box<dyn std::any::Any + Send>>) -> TrainJob<'a>>;

/// Set on a node other than 0 once it has node 0's id (the rendezvous is over): its signals are then node 0's
/// to act on (see [`follow_on_this_node`]).
static JOINED: AtomicBool = AtomicBool::new(false);

/// A node other than 0 of a run on several machines: its GPUs follow the leader on node 0. It writes
/// nothing (node 0 holds the output directory and its lock). A signal before the rendezvous is over ends it
/// at once; after it, a first SIGINT/SIGTERM is left to the leader (a scheduler signals every node: node 0
/// finishes the step, saves and stops everyone), and a second one (not the first one's echo) ends this
/// process at once. Exits 128 + the first signal when node 0 stopped the run after one.
fn follow_on_this_node(a: &TrainArgs) -> Result<i32> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Some(d) = &a.devices else {
        bail!("--node-rank {} needs --devices", a.node_rank);
    };
    // Before the rendezvous is over, a signal ends the node at once: nothing runs yet. After it, the first
    // signal is left to node 0 (a scheduler signals every node: node 0 finishes the step, saves and stops
    // everyone); another one — not the first one's echo, see ECHO — ends this node at once.
    let first = Arc::new(AtomicI32::new(0));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the signal handlers")?;
    let f = first.clone();
    std::thread::spawn(move || {
        let mut first_at: Option<std::time::Instant> = None;
        for sig in signals.forever() {
            let name = signal_name(sig);
            if !JOINED.load(Ordering::SeqCst) {
                crate::say!("\n{name} before the training started: exiting now");
                crate::collective::rendezvous::exit(128 + sig);
            }
            if f.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                first_at = Some(std::time::Instant::now());
                crate::say!("\n{name}: left to node 0, which finishes the step, saves and stops every node (send it again to quit this node at once)");
                continue;
            }
            if sig == f.load(Ordering::SeqCst) && first_at.is_some_and(|t| t.elapsed() < ECHO) {
                continue; // the first one's echo
            }
            crate::say!("\n{name} again: quitting this node now");
            crate::collective::rendezvous::exit(128 + sig);
        }
    });
    data_parallel(a, Devices::parse(d)?, None)?;
    // stopped by node 0 after a signal: exit as node 0 does (128 + the signal)
    Ok(match first.load(Ordering::SeqCst) {
        0 => 0,
        s => 128 + s,
    })
}

fn data_parallel(a: &TrainArgs, devs: Devices, job: LeaderJob) -> Result<bool> {
    let world = devs.len() * a.nnodes;
    match devs {
        Devices::Cpu(n) => {
            crate::say!("bertqa: data parallel over {n} CPU replicas in this process");
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
            let job = job.context("CPU replicas run on node 0")?;
            let res = job(Some(Box::new(g))).call(&Cpu::new());
            // the leader's group is gone by now (stopped, or dropped on an error): every follower returns
            let mut errors = vec![];
            for (i, h) in followers.into_iter().enumerate() {
                match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => errors.push(format!("{e:#}")),
                    Err(_) => errors.push(format!("replica {} panicked", i + 1)),
                }
            }
            // a follower that only saw the leader leave (replica 0) says nothing the leader's own error does not:
            // the leader's error then stands alone (before: one line per replica, the cause last)
            let own: Vec<String> = errors
                .into_iter()
                .filter(|m| !m.contains("replica 0 of"))
                .collect();
            match res {
                Ok(interrupted) if own.is_empty() => Ok(interrupted),
                Ok(_) => bail!("{}", own.join("; ")),
                // the followers' own errors say why when the leader only saw one of them leave
                Err(e) if own.is_empty() => Err(e),
                Err(e) => Err(e.context(own.join("; "))),
            }
        }
        Devices::Cuda(ords) => {
            let k = a.opts.kernels.config()?;
            /// Node 0 removes the rendezvous file when its run ends, however it ends: a later run must
            /// not find this run's id.
            struct Retire(Option<Rendezvous>);
            impl Drop for Retire {
                fn drop(&mut self) {
                    if let Some(r) = &self.0 {
                        r.retire();
                    }
                }
            }
            let mut _retire = Retire(None);
            // what every node must agree on (checked at the rendezvous)
            let shape = crate::collective::rendezvous::RunShape {
                nnodes: a.nnodes,
                devices_per_node: ords.len(),
            };
            let id = if a.node_rank == 0 {
                let id = crate::collective::nccl::unique_id()?;
                if a.nnodes > 1 {
                    let r = Rendezvous::parse(a.rendezvous.as_deref().unwrap_or_default())?;
                    crate::say!(
                        "bertqa: node 0 of {}: waiting for the other nodes ({r:?})",
                        a.nnodes
                    );
                    r.publish(&id, shape, Duration::from_secs(a.rendezvous_timeout))?;
                    _retire = Retire(Some(r));
                }
                id
            } else {
                let r = Rendezvous::parse(a.rendezvous.as_deref().unwrap_or_default())?;
                let id = r.fetch(
                    a.node_rank,
                    shape,
                    Duration::from_secs(a.rendezvous_timeout),
                )?;
                JOINED.store(true, Ordering::SeqCst);
                id
            };
            crate::say!(
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
                    crate::say!("error: replica {rank} (cuda:{ord}): {e:#}; stopping the run");
                    crate::collective::rendezvous::exit(1);
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
                        .spawn(move || {
                            // a panic, like an error, ends the process: the others would wait in NCCL for it
                            let rank = first_rank + i;
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                follower(i, ord)
                            }))
                            .is_err()
                            {
                                crate::say!(
                                    "error: replica {rank} (cuda:{ord}) panicked; stopping the run"
                                );
                                crate::collective::rendezvous::exit(1);
                            }
                        })
                })
                .collect::<std::io::Result<_>>()
                .context("starting the replica threads")?;
            let mut interrupted = false;
            if let (true, Some(job)) = (lead_here, job) {
                let be =
                    Cuda::new(ords[0], k).with_context(|| format!("opening cuda:{}", ords[0]))?;
                let g: Box<dyn Collective<Cuda>> = Box::new(Nccl::join(&be, &id, 0, world)?);
                crate::say!("bertqa: {}", g.describe());
                interrupted = job(Some(Box::new(g))).call(&be)?;
            }
            for h in handles {
                let _ = h.join();
            }
            Ok(interrupted)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: TrainArgs,
    }

    /// `bertqa train` with no optional flag runs `TrainConfig::default()` (one source for the defaults).
    #[test]
    fn the_flags_defaults_are_the_configs() {
        let cli = Cli::try_parse_from([
            "train",
            "--model",
            "m",
            "--train-file",
            "t.json",
            "--output-dir",
            "o",
        ])
        .unwrap();
        let d = TrainConfig::default();
        let c = cli
            .a
            .config_with(d.hidden_dropout, d.attention_dropout)
            .unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(&d).unwrap()
        );
    }
}
