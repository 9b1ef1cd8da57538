//! The fine-tuning loop, written once for every backend: shuffled windows, micro-batches with gradient
//! accumulation, span loss, backward, global-norm clipping, AdamW with linear warmup/decay, mixed precision
//! (bf16/fp16 working weights with f32 master weights; dynamic loss scaling for fp16), periodic evaluation
//! with early stopping, atomic checkpoints with exact resume, a JSONL metrics log and a loss/F1 plot.

pub mod checkpoint;
pub mod plot;
pub mod replica;

use crate::collective::{split_even, Collective};
use crate::data::features::{featurize, Feature, FeatureCfg};
use crate::data::squad::Dataset;
use crate::data::tokenizer::WordPieceTokenizer;
use crate::eval::postprocess::PostCfg;
use crate::model::batch::{chunks_fitting, pack, real_len, Padding};
use crate::model::bert::{grad_dtype, BertQa, DropoutCfg, LossScale, LossSums};
use crate::model::params::param_specs;
use crate::model::{ActPlan, BertConfig, BertParams};
use crate::ops::adamw::AdamWHyper;
use crate::ops::Backend;
use crate::optim::{clip_coef, linear_schedule, LossScaler};
use crate::rng::{splitmix64, step_seed, Rng};
use crate::tensor::DType;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Everything that defines a run (saved in trainer_state.json).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub grad_accum_steps: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub max_steps: Option<usize>,
    pub eval_every: usize,
    pub save_every: usize,
    pub save_total_limit: usize,
    pub early_stopping_patience: usize,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
    /// how windows are laid out in a batch (results do not depend on it)
    pub padding: Padding,
    pub max_bad_steps: usize,
    pub eval_batch_size: usize,
    pub log_every: usize,
    pub features: FeatureCfgSer,
    pub post: PostCfgSer,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct FeatureCfgSer {
    pub max_seq_length: usize,
    pub doc_stride: usize,
    pub max_query_length: usize,
}
impl From<FeatureCfgSer> for FeatureCfg {
    fn from(f: FeatureCfgSer) -> Self {
        FeatureCfg {
            max_seq_length: f.max_seq_length,
            doc_stride: f.doc_stride,
            max_query_length: f.max_query_length,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PostCfgSer {
    pub n_best_size: usize,
    pub max_answer_length: usize,
    pub version_2: bool,
    pub null_score_diff_threshold: f64,
}
impl From<PostCfgSer> for PostCfg {
    fn from(p: PostCfgSer) -> Self {
        PostCfg {
            n_best_size: p.n_best_size,
            max_answer_length: p.max_answer_length,
            version_2: p.version_2,
            null_score_diff_threshold: p.null_score_diff_threshold,
        }
    }
}

/// Progress of a run (saved in trainer_state.json; restored by --resume).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// optimizer steps taken (applied or skipped)
    pub global_step: usize,
    /// AdamW updates applied (Adam's bias-correction step t)
    pub adam_t: u64,
    pub epoch: usize,
    /// batches consumed in the current epoch
    pub batch_in_epoch: usize,
    pub total_steps: usize,
    pub warmup_steps: usize,
    pub best_f1: Option<f64>,
    pub best_step: usize,
    pub evals_since_best: usize,
    pub skipped_steps: usize,
    pub consecutive_bad: usize,
    pub scaler: Option<LossScaler>,
    pub last_eval: Option<serde_json::Value>,
    pub stopped_early: bool,
}

/// Inputs of a run that are not saved: data, device, paths.
pub struct RunInputs<'a> {
    pub train: &'a Dataset,
    pub dev: Option<&'a Dataset>,
    pub tokenizer: &'a WordPieceTokenizer,
    pub output_dir: PathBuf,
    pub model_dir: PathBuf,
    pub precision: DType,
    pub resume_from: Option<PathBuf>,
    pub show_progress: bool,
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Behave as if interrupted after this many optimizer steps (tests of --resume).
    pub stop_after_steps: Option<usize>,
}

/// What a finished run reports.
pub struct RunSummary {
    pub state: TrainState,
    pub final_metrics: Option<serde_json::Value>,
    pub losses: Vec<f64>,
    pub seconds: f64,
    pub train_windows: usize,
    pub seq_per_s: f64,
}

pub struct Trainer<'a, B: Backend> {
    pub be: &'a B,
    pub cfg: TrainConfig,
    pub model: BertQa<B>,
    /// f32 master weights when the model computes in bf16/f16 (None: the model's weights are the master)
    pub master: Option<BertParams<B>>,
    pub grads: BertParams<B>,
    pub m: BertParams<B>,
    pub v: BertParams<B>,
    pub names: Vec<String>,
    pub state: TrainState,
    pub scaler: LossScaler,
    /// the activations of every batch, training and evaluation: sized once for the largest
    plan: ActPlan<B>,
    /// the compute peak MFU is measured against (None: not reported)
    peak: Option<crate::backend::Peak>,
    /// the other replicas of a data-parallel run (None: this device alone); see src/train/replica.rs
    group: Option<Box<dyn Collective<B>>>,
    /// a micro-batch's gradient, before it is added to the step's sum (only when this replica computes
    /// more than one micro-batch per step)
    scratch: Option<BertParams<B>>,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug)]
pub struct StepOut {
    /// the mean span loss over the step's windows
    pub loss: f64,
    /// the gradient norm (before clipping; non-finite on overflow)
    pub grad_norm: f64,
    /// whether AdamW ran (false: a non-finite step was skipped)
    pub applied: bool,
    /// windows, real tokens, and rows computed (real tokens plus padding)
    pub windows: usize,
    pub real_tokens: usize,
    pub rows: usize,
    /// data parallelism: milliseconds of the gradient all-reduce, from the moment this replica's backward
    /// had finished (waiting for slower replicas included); None on one device
    pub allreduce_ms: Option<f64>,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// A trainer for `master` weights (f32, or f64 on the CPU), computing in `precision`.
    pub fn new(
        be: &'a B,
        bcfg: BertConfig,
        master: BertParams<B>,
        precision: DType,
        cfg: TrainConfig,
    ) -> Result<Self> {
        let gd = grad_dtype(precision);
        if master.dtype() != gd {
            bail!(
                "master weights must be {gd} for {precision} training, got {}",
                master.dtype()
            );
        }
        let (model_params, master) = if precision == gd {
            (master, None)
        } else {
            (master.cast(be, precision)?, Some(master))
        };
        let names = param_specs(&bcfg).into_iter().map(|(n, _)| n).collect();
        let grads = BertParams::zeros(be, &bcfg, gd)?;
        let m = BertParams::zeros(be, &bcfg, gd)?;
        let v = BertParams::zeros(be, &bcfg, gd)?;
        let scaler = LossScaler::new(precision == DType::F16);
        let plan = Self::plan_for(be, &bcfg, &cfg, precision, 1)?;
        Ok(Trainer {
            be,
            cfg,
            model: BertQa::new(bcfg, model_params),
            master,
            grads,
            m,
            v,
            names,
            state: TrainState::default(),
            scaler,
            plan,
            peak: None,
            group: None,
            scratch: None,
        })
    }

    /// The activation plan of a run: a micro-batch of full windows in training (a step's windows split
    /// over `replicas` devices and --grad-accum-steps), and evaluation batches of up to --eval-batch-size
    /// windows in the same rows.
    fn plan_for(
        be: &B,
        bcfg: &BertConfig,
        cfg: &TrainConfig,
        dt: DType,
        replicas: usize,
    ) -> Result<ActPlan<B>> {
        let micro = cfg
            .batch_size
            .div_ceil(cfg.grad_accum_steps.max(1) * replicas.max(1))
            .max(1);
        let rows = micro * cfg.features.max_seq_length;
        ActPlan::new(be, bcfg, rows, micro.max(cfg.eval_batch_size), dt, true)
    }

    /// Bytes held by the activation plan.
    pub fn activation_bytes(&self) -> usize {
        self.plan.bytes()
    }

    /// The weights being optimised (f32).
    pub fn master_params(&self) -> &BertParams<B> {
        self.master.as_ref().unwrap_or(&self.model.params)
    }

    /// The compute peak MFU is measured against (the CLI sets the device's).
    pub fn set_peak(&mut self, p: Option<crate::backend::Peak>) {
        self.peak = p;
    }
    pub fn peak(&self) -> Option<&crate::backend::Peak> {
        self.peak.as_ref()
    }

    /// Dropout of optimizer step `step`: one seed for the whole step (every micro-batch, every device);
    /// the masks are keyed by window, position and feature (src/rng.rs).
    pub fn dropout(&self, step: usize) -> DropoutCfg {
        DropoutCfg {
            hidden: self.cfg.hidden_dropout,
            attn: self.cfg.attention_dropout,
            seed: step_seed(self.cfg.seed, step as u64),
        }
    }

    /// This replica's rank and the number of replicas (0 and 1 without data parallelism).
    pub fn rank_world(&self) -> (usize, usize) {
        self.group
            .as_ref()
            .map(|g| (g.rank(), g.world()))
            .unwrap_or((0, 1))
    }

    /// One optimizer step over `feats`. The step's windows are split into `replicas × --grad-accum-steps`
    /// micro-batches of sizes differing by at most one (in order; replica r computes micro-batches
    /// r·A .. (r+1)·A); each micro-batch's gradient is computed on its own and the step's gradient is their
    /// sum in order, whether one device adds them one after another or the replicas' sums are reduced — the
    /// same arithmetic, so `--devices cpu,cpu` gives the bits of `--grad-accum-steps 2`. The k-th window of
    /// the step is window k of the dropout stream wherever it is computed, and the loss is the mean over the
    /// step's counted targets. On the leader of a data-parallel run, the other replicas are told to take the
    /// same step (src/train/replica.rs).
    pub fn step(&mut self, feats: &[&Feature], lr: f64) -> Result<StepOut> {
        replica::lead_step(self, feats, lr)?;
        self.step_replica(feats, lr)
    }

    /// [`Trainer::step`] as every replica runs it (the followers call it directly).
    pub(crate) fn step_replica(&mut self, feats: &[&Feature], lr: f64) -> Result<StepOut> {
        let be = self.be;
        let n = feats.len();
        if n == 0 {
            bail!("step: no windows");
        }
        let (rank, world) = self.rank_world();
        let accum = self.cfg.grad_accum_steps.max(1);
        let loss_scale = self.scaler.loss_scale();
        // every micro-batch of the step (each cut further where it does not fit the activation plan: a step
        // may be given more windows than --batch-size); window k of the step keeps index k in the dropout
        // stream
        let (pw, pr) = (self.plan.max_windows(), self.plan.max_rows());
        let mut parts = vec![];
        for range in split_even(n, world * accum) {
            let mut first = range.start;
            let mut pieces = vec![];
            for piece in chunks_fitting(&feats[range], self.cfg.padding, pw, pr)? {
                pieces.push(pack(piece, first, self.cfg.padding)?);
                first += piece.len();
            }
            parts.push(pieces);
        }
        // the whole step's counted targets (every replica's) normalise every micro-batch's gradient
        let mask = self.model.mask_padding_in_loss;
        let (mut n_start, mut n_end) = (0, 0);
        for hb in parts.iter().flatten() {
            n_start += (0..hb.b())
                .filter(|&b| hb.target_counts(b, false, mask))
                .count();
            n_end += (0..hb.b())
                .filter(|&b| hb.target_counts(b, true, mask))
                .count();
        }
        let scale = LossScale::mean(n_start, n_end, loss_scale);
        let drop = self.dropout(self.state.global_step);
        self.grads.zero_(be)?;
        let mut sums = LossSums::default();
        let (mut real, mut rows) = (0, 0);
        let mut first_part = true;
        for pieces in &parts[rank * accum..(rank + 1) * accum] {
            if pieces.is_empty() {
                continue;
            }
            // the first micro-batch's gradient goes straight into the step's sum (zero + g = g exactly);
            // each later one is computed apart and then added
            let into_scratch = !first_part;
            if into_scratch {
                match self.scratch.as_mut() {
                    Some(s) => s.zero_(be)?,
                    None => {
                        self.scratch =
                            Some(BertParams::zeros(be, &self.model.cfg, self.grads.dtype())?)
                    }
                }
            }
            for hb in pieces {
                real += hb.layout.real_tokens();
                rows += hb.n();
                let (batch, acts) = self.plan.load(be, hb)?;
                self.model.forward(be, acts, batch, drop)?;
                sums.add(&self.model.loss(be, acts, batch, scale)?);
                let g = match (into_scratch, self.scratch.as_mut()) {
                    (true, Some(s)) => s,
                    _ => &mut self.grads,
                };
                self.model.backward(be, g, acts, batch, drop)?;
            }
            if let (true, Some(s)) = (into_scratch, self.scratch.as_ref()) {
                be.grad_accumulate(self.grads.flat_mut(), s.flat())?;
            }
            first_part = false;
        }
        let mut allreduce_ms = None;
        if let Some(g) = &self.group {
            // the step's gradient and loss: sums over the replicas (every replica gets the same bits, so
            // the norm, the loss-scale decision and the AdamW update agree everywhere); timed between two
            // synchronisations (cheap next to a step, and only with several devices)
            be.synchronize()?;
            let t0 = Instant::now();
            g.all_reduce_sum(be, self.grads.flat_mut())?;
            be.synchronize()?;
            allreduce_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            let mut v = [
                sums.start,
                sums.end,
                sums.n_start as f64,
                sums.n_end as f64,
                real as f64,
                rows as f64,
            ];
            g.sum_host(be, &mut v)?;
            sums = LossSums {
                start: v[0],
                end: v[1],
                n_start: v[2] as usize,
                n_end: v[3] as usize,
            };
            (real, rows) = (v[4] as usize, v[5] as usize);
        }
        let loss = sums.mean();
        let norm = be.grad_sq_norm(self.grads.flat())?.sqrt() / loss_scale;
        let finite = norm.is_finite() && loss.is_finite();
        let apply = self.scaler.update(finite);
        if apply {
            self.state.adam_t += 1;
            let hp = AdamWHyper {
                lr,
                beta1: self.cfg.adam_beta1,
                beta2: self.cfg.adam_beta2,
                eps: self.cfg.adam_eps,
                weight_decay: self.cfg.weight_decay,
                step: self.state.adam_t,
                grad_scale: clip_coef(norm, self.cfg.max_grad_norm) / loss_scale,
            };
            // one launch over the flat buffers; the bf16/f16 working copy is refreshed in the same pass
            let n_decay = self.grads.layout().n_decay;
            let (master, working) = match self.master.as_mut() {
                Some(m) => (m.flat_mut(), Some(self.model.params.flat_mut())),
                None => (self.model.params.flat_mut(), None),
            };
            be.adamw_step(
                master,
                working,
                self.grads.flat(),
                self.m.flat_mut(),
                self.v.flat_mut(),
                n_decay,
                &hp,
            )?;
        }
        Ok(StepOut {
            loss,
            grad_norm: norm,
            applied: apply,
            windows: n,
            real_tokens: real,
            rows,
            allreduce_ms,
        })
    }

    /// The start and end logits (full window length each) of `feats`, evaluated in batches that fit the
    /// activation plan.
    pub fn logits(&mut self, feats: &[&Feature]) -> Result<crate::eval::run::SpanLogits> {
        replica::lead_logits(self, feats)?;
        Ok(self.logits_replica(feats)?.unwrap_or_default())
    }

    /// [`Trainer::logits`] as every replica runs it: each computes a contiguous share of the windows and
    /// the leader gathers them in order (None on the other replicas).
    pub(crate) fn logits_replica(
        &mut self,
        feats: &[&Feature],
    ) -> Result<Option<crate::eval::run::SpanLogits>> {
        let (rank, world) = self.rank_world();
        let share = split_even(feats.len(), world)[rank].clone();
        let (s, e) = crate::eval::run::plan_logits(
            self.be,
            &self.model,
            &mut self.plan,
            &feats[share],
            self.cfg.padding,
        )?;
        let Some(g) = &self.group else {
            return Ok(Some((s, e)));
        };
        let mut w = crate::collective::wire::Writer::default();
        crate::collective::wire::write_logits(&mut w, &s, &e);
        let Some(all) = g.gather_bytes(self.be, &w.0, 0)? else {
            return Ok(None);
        };
        let (mut starts, mut ends) = (vec![], vec![]);
        for (r, b) in all.iter().enumerate() {
            let mut rd = crate::collective::wire::Reader::new(b);
            let (s, e) = crate::collective::wire::read_logits(&mut rd)
                .with_context(|| format!("logits from replica {r}"))?;
            starts.extend(s);
            ends.extend(e);
        }
        Ok(Some((starts, ends)))
    }

    /// Evaluate on features of `ds`: the metrics JSON.
    pub fn evaluate(
        &mut self,
        ds: &Dataset,
        feats: &[Feature],
        post: &PostCfg,
    ) -> Result<serde_json::Value> {
        Ok(self.evaluate_with_predictions(ds, feats, post)?.0)
    }

    /// Evaluate and also return the predictions (answers, n-best lists, null odds).
    pub fn evaluate_with_predictions(
        &mut self,
        ds: &Dataset,
        feats: &[Feature],
        post: &PostCfg,
    ) -> Result<(serde_json::Value, crate::eval::postprocess::Predictions)> {
        let refs: Vec<&Feature> = feats.iter().collect();
        let (s, e) = self.logits(&refs)?;
        let preds = crate::eval::postprocess::postprocess(ds, feats, &s, &e, post);
        let m = crate::eval::run::score(ds, &preds.answers, Some(&preds.null_odds), post.version_2);
        Ok((m, preds))
    }
}

/// Training features: every window of every example whose answer is aligned (v2.0 impossible questions
/// included, labelled \[CLS\]).
pub fn training_features(
    ds: &Dataset,
    tok: &WordPieceTokenizer,
    fc: &FeatureCfg,
) -> Result<Vec<Feature>> {
    let f = featurize(ds, tok, fc, true)?;
    Ok(f.features
        .into_iter()
        .filter(|x| ds.examples[x.example].answer_aligned)
        .collect())
}

/// The order of windows in `epoch`: a shuffle seeded by (seed, epoch), so a resumed run sees the same order.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(splitmix64(seed ^ (0xE90C_u64 << 32) ^ epoch as u64)).shuffle(&mut order);
    order
}

fn append_jsonl(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("writing {}", path.display()))
}

/// Run training to the end (or early stop / interrupt). `trainer` holds the initial (or resumed) state.
pub fn run<B: Backend>(trainer: &mut Trainer<B>, inp: &RunInputs) -> Result<RunSummary> {
    let cfg = trainer.cfg.clone();
    let t_start = Instant::now();
    std::fs::create_dir_all(&inp.output_dir)
        .with_context(|| format!("creating {}", inp.output_dir.display()))?;
    let fc: FeatureCfg = cfg.features.into();
    let post: PostCfg = cfg.post.into();
    let t0 = Instant::now();
    let feats = training_features(inp.train, inp.tokenizer, &fc)?;
    if feats.is_empty() {
        bail!("no training windows (empty training file?)");
    }
    let dev_feats = match inp.dev {
        Some(d) => Some(featurize(d, inp.tokenizer, &fc, false)?.features),
        None => None,
    };
    eprintln!(
        "bertqa train: {} examples → {} training windows{}; featurized in {:.1}s",
        inp.train.examples.len(),
        feats.len(),
        dev_feats
            .as_ref()
            .map(|d| format!(", {} dev windows", d.len()))
            .unwrap_or_default(),
        t0.elapsed().as_secs_f64()
    );
    let steps_per_epoch = feats.len().div_ceil(cfg.batch_size);
    let mut total = steps_per_epoch * cfg.epochs;
    if let Some(ms) = cfg.max_steps {
        total = total.min(ms);
    }
    let st = &mut trainer.state;
    if st.total_steps == 0 {
        st.total_steps = total;
        st.warmup_steps = (cfg.warmup_ratio * total as f64).ceil() as usize;
    }
    if let Some(s) = &st.scaler {
        trainer.scaler = s.clone();
    }
    let metrics_path = inp.output_dir.join("metrics.jsonl");
    let pb = if inp.show_progress {
        let pb = indicatif::ProgressBar::new(trainer.state.total_steps as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "train {bar:30} {pos}/{len} steps {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(trainer.state.global_step as u64);
        Some(pb)
    } else {
        None
    };
    let mut losses = vec![];
    let mut seq_total = 0usize;
    let mut time_total = 0.0f64;
    'outer: while trainer.state.epoch < cfg.epochs
        && trainer.state.global_step < trainer.state.total_steps
    {
        let order = epoch_order(feats.len(), cfg.seed, trainer.state.epoch);
        while trainer.state.batch_in_epoch < steps_per_epoch {
            if trainer.state.global_step >= trainer.state.total_steps {
                break 'outer;
            }
            let bi = trainer.state.batch_in_epoch;
            let idx = &order[bi * cfg.batch_size..((bi + 1) * cfg.batch_size).min(order.len())];
            let batch: Vec<&Feature> = idx.iter().map(|&i| &feats[i]).collect();
            let lr = linear_schedule(
                trainer.state.global_step,
                trainer.state.warmup_steps,
                trainer.state.total_steps,
                cfg.learning_rate,
            );
            let ts = Instant::now();
            let out = trainer.step(&batch, lr)?;
            let (loss, norm, applied) = (out.loss, out.grad_norm, out.applied);
            trainer.be.synchronize()?;
            let dt = ts.elapsed().as_secs_f64();
            trainer.state.global_step += 1;
            trainer.state.batch_in_epoch += 1;
            if !applied {
                trainer.state.skipped_steps += 1;
                trainer.state.consecutive_bad += 1;
                eprintln!("step {}: non-finite loss/gradient (loss {loss}, grad norm {norm}); step skipped{}", trainer.state.global_step, if trainer.scaler.enabled { format!(", loss scale now {}", trainer.scaler.scale) } else { String::new() });
                if trainer.state.consecutive_bad >= cfg.max_bad_steps {
                    bail!("{} non-finite steps in a row at step {}: aborting (try a lower --learning-rate, --precision fp32, or check the data)", trainer.state.consecutive_bad, trainer.state.global_step);
                }
            } else {
                trainer.state.consecutive_bad = 0;
            }
            losses.push(loss);
            seq_total += batch.len();
            time_total += dt;
            let seq_s = batch.len() as f64 / dt;
            // model FLOPs of the real tokens (useful work): each window's own length, attention included
            let flops: f64 = batch
                .iter()
                .map(|f| trainer.model.cfg.train_flops_per_seq(real_len(f)))
                .sum();
            let mfu = trainer.peak().map(|p| flops / dt / 1e12 / p.tflops);
            if trainer
                .state
                .global_step
                .is_multiple_of(cfg.log_every.max(1))
                || !applied
            {
                let mut line = serde_json::json!({"step": trainer.state.global_step, "epoch": trainer.state.epoch as f64 + trainer.state.batch_in_epoch as f64 / steps_per_epoch as f64,
                    "loss": loss, "lr": lr, "grad_norm": norm, "seq_per_s": seq_s,
                    "real_tokens_per_s": out.real_tokens as f64 / dt, "computed_tokens_per_s": out.rows as f64 / dt,
                    "applied": applied});
                if let Some(m) = mfu {
                    line["mfu"] = serde_json::json!(m);
                }
                if let Some(ms) = out.allreduce_ms {
                    line["allreduce_ms"] = serde_json::json!(ms);
                }
                if trainer.scaler.enabled {
                    line["loss_scale"] = serde_json::json!(trainer.scaler.scale);
                }
                append_jsonl(&metrics_path, &line)?;
            }
            if let Some(pb) = &pb {
                pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {seq_s:.1} seq/s"));
                pb.set_position(trainer.state.global_step as u64);
            }
            let mut stop = false;
            if cfg.eval_every > 0 && trainer.state.global_step.is_multiple_of(cfg.eval_every) {
                stop = eval_and_track(trainer, inp, dev_feats.as_deref(), &post, &metrics_path)?;
            }
            let interrupted = inp
                .interrupt
                .as_ref()
                .map(|f| f.load(Ordering::SeqCst))
                .unwrap_or(false)
                || inp.stop_after_steps == Some(trainer.state.global_step);
            if (cfg.save_every > 0 && trainer.state.global_step.is_multiple_of(cfg.save_every))
                || interrupted
                || stop
            {
                trainer.state.scaler = Some(trainer.scaler.clone());
                checkpoint::save(trainer, inp)?;
            }
            if interrupted {
                eprintln!(
                    "interrupted: checkpoint saved at step {}; continue with --resume",
                    trainer.state.global_step
                );
                break 'outer;
            }
            if stop {
                trainer.state.stopped_early = true;
                eprintln!("early stopping at step {}: dev F1 has not improved for {} evaluations (best {:.2} at step {})", trainer.state.global_step, cfg.early_stopping_patience, trainer.state.best_f1.unwrap_or(0.0), trainer.state.best_step);
                break 'outer;
            }
        }
        // epoch end
        trainer.state.epoch += 1;
        trainer.state.batch_in_epoch = 0;
        let stop =
            if cfg.eval_every == 0 || !trainer.state.global_step.is_multiple_of(cfg.eval_every) {
                eval_and_track(trainer, inp, dev_feats.as_deref(), &post, &metrics_path)?
            } else {
                false
            };
        trainer.state.scaler = Some(trainer.scaler.clone());
        checkpoint::save(trainer, inp)?;
        if stop {
            trainer.state.stopped_early = true;
            break;
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    // a run that ended on --max-steps (not at an epoch end or a save step) still leaves a checkpoint
    let last = checkpoint::latest(&inp.output_dir).and_then(|p| {
        p.file_name()?
            .to_str()?
            .strip_prefix("checkpoint-")?
            .parse::<usize>()
            .ok()
    });
    if last != Some(trainer.state.global_step) {
        trainer.state.scaler = Some(trainer.scaler.clone());
        checkpoint::save(trainer, inp)?;
    }
    // final metrics: the last evaluation, or one now if the run ended between evaluations
    let final_metrics = match (&trainer.state.last_eval, inp.dev) {
        (Some(v), _)
            if v.get("step").and_then(|s| s.as_u64()) == Some(trainer.state.global_step as u64) =>
        {
            v.get("eval").cloned()
        }
        (_, Some(_)) => {
            eval_and_track(trainer, inp, dev_feats.as_deref(), &post, &metrics_path)?;
            trainer
                .state
                .last_eval
                .as_ref()
                .and_then(|v| v.get("eval").cloned())
        }
        _ => None,
    };
    plot::write_curves(&metrics_path, &inp.output_dir.join("curves.svg")).ok();
    let secs = t_start.elapsed().as_secs_f64();
    Ok(RunSummary {
        state: trainer.state.clone(),
        final_metrics,
        losses,
        seconds: secs,
        train_windows: feats.len(),
        seq_per_s: if time_total > 0.0 {
            seq_total as f64 / time_total
        } else {
            0.0
        },
    })
}

/// Evaluate on the dev set (if any), log it, keep best/, and say whether to stop early.
fn eval_and_track<B: Backend>(
    trainer: &mut Trainer<B>,
    inp: &RunInputs,
    dev_feats: Option<&[Feature]>,
    post: &PostCfg,
    metrics_path: &Path,
) -> Result<bool> {
    let (Some(dev), Some(df)) = (inp.dev, dev_feats) else {
        return Ok(false);
    };
    let t = Instant::now();
    let (m, preds) = trainer.evaluate_with_predictions(dev, df, post)?;
    // predictions.json / nbest_predictions.json (/ null_odds.json) of the latest evaluation
    crate::eval::run::write_predictions(&inp.output_dir, &preds, post.version_2)?;
    let f1 = m.get("f1").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let line = serde_json::json!({"step": trainer.state.global_step, "epoch": trainer.state.epoch, "eval": m, "eval_seconds": t.elapsed().as_secs_f64()});
    append_jsonl(metrics_path, &line)?;
    eprintln!("eval at step {}: {}", trainer.state.global_step, m);
    trainer.state.last_eval = Some(line);
    let improved = trainer.state.best_f1.map(|b| f1 > b).unwrap_or(true);
    if improved {
        trainer.state.best_f1 = Some(f1);
        trainer.state.best_step = trainer.state.global_step;
        trainer.state.evals_since_best = 0;
        checkpoint::save_model_dir(trainer, inp, &inp.output_dir.join("best"))?;
    } else {
        trainer.state.evals_since_best += 1;
    }
    let p = trainer.cfg.early_stopping_patience;
    Ok(p > 0 && trainer.state.evals_since_best >= p)
}
