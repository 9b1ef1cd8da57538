//! The fine-tuning loop, written once for every backend: shuffled windows, micro-batches with gradient
//! accumulation, span loss, backward, global-norm clipping, AdamW with linear warmup/decay, mixed precision
//! (bf16/fp16 working weights with f32 master weights; dynamic loss scaling for fp16), periodic evaluation
//! with early stopping, atomic checkpoints with exact resume, a JSONL metrics log and a loss/F1 plot.

pub mod checkpoint;
pub mod graphs;
pub mod plot;
pub mod replica;

use crate::collective::{split_even, Collective};
use crate::data::features::{featurize, Feature, FeatureCfg};
use crate::data::squad::Dataset;
use crate::data::tokenizer::WordPieceTokenizer;
use crate::eval::postprocess::PostCfg;
use crate::model::batch::{chunks_fitting, pack_bucketed, Padding};
use crate::model::bert::{grad_dtype, BertQa, DropoutCfg, LossScale, LossSums};
use crate::model::params::param_specs;
use crate::model::{ActPlan, BertConfig, BertParams};
use crate::ops::adamw::AdamWHyper;
use crate::ops::{Backend, STATS_LEN, STAT_GRAD_SQ, STAT_LOSS_END, STAT_LOSS_START};
use crate::optim::{linear_schedule, LossScaler};
use crate::rng::{splitmix64, step_seed, Rng};
use crate::tensor::{DType, Tensor};
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

impl TrainConfig {
    /// The checks of a run's settings, for the command line and for a stored trainer_state.json alike: each
    /// error names the field and its flag (the caller adds where the value came from).
    pub fn validate(&self) -> Result<()> {
        let unit = |v: f64| (0.0..1.0).contains(&v);
        if self.epochs == 0 {
            bail!("epochs (--epochs) must be ≥ 1 (got 0)");
        }
        if self.batch_size == 0 {
            bail!("batch_size (--batch-size) must be ≥ 1 (got 0)");
        }
        if self.grad_accum_steps == 0 || self.grad_accum_steps > self.batch_size {
            bail!(
                "grad_accum_steps (--grad-accum-steps) must be in 1..=batch_size ({}) (got {})",
                self.batch_size,
                self.grad_accum_steps
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            bail!(
                "learning_rate (--learning-rate) must be in (0, 1) (got {})",
                self.learning_rate
            );
        }
        if !unit(self.warmup_ratio) {
            bail!(
                "warmup_ratio (--warmup-ratio) must be in [0, 1) (got {})",
                self.warmup_ratio
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "weight_decay (--weight-decay) must be a finite number ≥ 0 (got {})",
                self.weight_decay
            );
        }
        for (field, flag, v) in [
            ("adam_beta1", "--adam-beta1", self.adam_beta1),
            ("adam_beta2", "--adam-beta2", self.adam_beta2),
        ] {
            if !unit(v) {
                bail!("{field} ({flag}) must be in [0, 1) (got {v})");
            }
        }
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            bail!(
                "adam_eps (--adam-eps) must be a finite number > 0 (got {})",
                self.adam_eps
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bail!(
                "max_grad_norm (--max-grad-norm) must be a finite number ≥ 0 (0: no clipping) (got {})",
                self.max_grad_norm
            );
        }
        if self.max_steps == Some(0) {
            bail!("max_steps (--max-steps) must be ≥ 1 (got 0)");
        }
        for (field, flag, p) in [
            ("hidden_dropout", "--hidden-dropout", self.hidden_dropout),
            (
                "attention_dropout",
                "--attention-dropout",
                self.attention_dropout,
            ),
        ] {
            if !unit(p as f64) {
                bail!("{field} ({flag}) must be in [0, 1) (got {p})");
            }
        }
        if self.eval_batch_size == 0 {
            bail!("eval_batch_size (--eval-batch-size) must be ≥ 1 (got 0)");
        }
        // the window and post-processing options: the checks eval and predict make
        crate::cli::eval::EvalOpts {
            max_seq_length: self.features.max_seq_length,
            doc_stride: self.features.doc_stride,
            max_query_length: self.features.max_query_length,
            n_best_size: self.post.n_best_size,
            max_answer_length: self.post.max_answer_length,
            version_2_with_negative: self.post.version_2,
            null_score_diff_threshold: self.post.null_score_diff_threshold,
            device: "cpu".into(),
            padding: self.padding.name().into(),
            kernels: Default::default(),
        }
        .validate()
    }
}

/// What the training data of a run was: stored in trainer_state.json and checked by --resume, so that a
/// run is not continued on other data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// the --train-file the run started with (for messages; not compared)
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub max_train_examples: Option<usize>,
}

impl DataFingerprint {
    /// Size and sha256 of `path` (streamed), with `--max-train-examples`.
    pub fn of(path: &Path, max_train_examples: Option<usize>) -> Result<DataFingerprint> {
        use sha2::Digest;
        use std::io::Read;
        let mut f =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            h.update(&buf[..n]);
        }
        let sha256 = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(DataFingerprint {
            file: path.display().to_string(),
            bytes,
            sha256,
            max_train_examples,
        })
    }
}

/// The defaults of `bertqa train` (the CLI's flags take theirs from here): the standard SQuAD recipe.
impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 2,
            learning_rate: 3e-5,
            batch_size: 32,
            grad_accum_steps: 1,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            max_steps: None,
            eval_every: 0,
            save_every: 0,
            save_total_limit: 2,
            early_stopping_patience: 0,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            padding: Padding::Packed,
            max_bad_steps: 10,
            eval_batch_size: 64,
            log_every: 1,
            features: FeatureCfg::default().into(),
            post: PostCfg::default().into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct FeatureCfgSer {
    pub max_seq_length: usize,
    pub doc_stride: usize,
    pub max_query_length: usize,
}
impl From<FeatureCfg> for FeatureCfgSer {
    fn from(f: FeatureCfg) -> Self {
        FeatureCfgSer {
            max_seq_length: f.max_seq_length,
            doc_stride: f.doc_stride,
            max_query_length: f.max_query_length,
        }
    }
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
impl From<PostCfg> for PostCfgSer {
    fn from(p: PostCfg) -> Self {
        PostCfgSer {
            n_best_size: p.n_best_size,
            max_answer_length: p.max_answer_length,
            version_2: p.version_2,
            null_score_diff_threshold: p.null_score_diff_threshold,
        }
    }
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
    /// the training data (absent in checkpoints written before it was recorded)
    #[serde(default)]
    pub train_data: Option<DataFingerprint>,
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

/// Whether the run in `dir` ended — not interrupted — at `step`: its summary.json says so. A run that reached
/// its last step but was stopped by a signal before its final evaluation has not ended: a --resume does that.
fn finished_at(dir: &Path, step: usize) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("summary.json")) else {
        return false;
    };
    let Ok(s) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    s["interrupted"] == serde_json::json!(false) && s["steps"].as_u64() == Some(step as u64)
}

/// What a finished run reports.
pub struct RunSummary {
    pub state: TrainState,
    pub final_metrics: Option<serde_json::Value>,
    pub losses: Vec<f64>,
    pub seconds: f64,
    pub train_windows: usize,
    pub seq_per_s: f64,
    /// the run stopped on `interrupt` (or `stop_after_steps`) before its end
    pub interrupted: bool,
    /// where this process's part of the run spent its time, and what it trained on
    pub timings: RunTimings,
    pub windows: WindowsReport,
    /// resumed at or past where the run stops (`--epochs`, `--max-steps`): nothing was trained, and the
    /// output directory was left as it was
    pub already_done: bool,
}

/// Where a run spent its time (this process's part of it: a resumed run counts from its resume).
#[derive(Clone, Debug, Default)]
pub struct RunTimings {
    /// tokenizing and windowing the training and dev sets
    pub featurize_s: f64,
    /// each optimizer step, host-timed from its start to the device's end (packing, upload, forward,
    /// backward, norm, AdamW, one synchronisation)
    pub step_s: Vec<f64>,
    /// evaluations (logits, post-processing, scoring, predictions files; best/ saves are in `save_s`)
    pub eval_s: f64,
    pub evals: usize,
    /// checkpoint and best/ saves
    pub save_s: f64,
    pub saves: usize,
}

/// The steps left out of [`RunTimings::step_median_s`] as warm-up: the first 10, or half of a shorter run
/// (scripts/hf_squad.py uses the same rule).
pub fn warmup_steps(n: usize) -> usize {
    10.min(n / 2)
}

impl RunTimings {
    /// The steady-state step times: all but the first [`warmup_steps`].
    pub fn steady(&self) -> &[f64] {
        &self.step_s[warmup_steps(self.step_s.len())..]
    }
    /// The median step time after warm-up (the mean of the middle two for an even count); None without
    /// steps.
    pub fn step_median_s(&self) -> Option<f64> {
        let mut v = self.steady().to_vec();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let k = v.len() / 2;
        Some(if v.len() % 2 == 1 {
            v[k]
        } else {
            (v[k - 1] + v[k]) / 2.0
        })
    }
    /// The mean step time after warm-up.
    pub fn step_mean_s(&self) -> Option<f64> {
        let v = self.steady();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// What a run trained and evaluated on, for side-by-side checks (scripts/hf_squad.py computes the same).
#[derive(Clone, Debug, Default)]
pub struct WindowsReport {
    pub train: usize,
    /// training windows whose answer lies inside them (the rest are labelled `[CLS]`)
    pub train_with_answer: usize,
    /// [`windows_digest`] of the training windows with their labels, in featurization order
    pub train_sha256: String,
    pub dev: usize,
    /// [`windows_digest`] of the dev windows (no labels)
    pub dev_sha256: String,
}

/// SHA-256 of windows, in order: for each, its real length `n`, its first `n` token ids and, with `labels`,
/// its start and end positions, each as a little-endian i32. Equal digests: the same windows, tokens and
/// labels (scripts/hf_squad.py's `windows_digest` is the same function).
pub fn windows_digest(feats: &[Feature], labels: bool) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(4 * 512);
    for f in feats {
        let n = f.len();
        buf.clear();
        buf.extend_from_slice(&(n as i32).to_le_bytes());
        for &id in &f.input_ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        if labels {
            buf.extend_from_slice(&(f.start_position as i32).to_le_bytes());
            buf.extend_from_slice(&(f.end_position as i32).to_le_bytes());
        }
        h.update(&buf);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
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
    /// the step's statistics on the device (ops::STATS_LEN: loss sums, Σ g²)
    stats: Tensor<B>,
    /// the step's loss-gradient scales on the device (2: start, end; [`LossScale::write_to`])
    loss_scale: Tensor<B>,
    /// recorded micro-batches (CUDA graphs), by batch shape
    pub graphs: graphs::StepGraphs<B::Graph>,
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
    /// milliseconds from the step's start to its one host synchronisation: the host's work (packing,
    /// uploads, queueing every launch). With one micro-batch per step (the device is idle when the step's
    /// batch is uploaded) it is the host's share alone, and near the step's whole time the host — launch
    /// overhead — bounds the step, not the device (what CUDA graphs remove). With several micro-batches it
    /// also holds the device time each later batch's upload waits for.
    pub host_ms: f64,
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
            stats: Tensor::zeros(be, &[STATS_LEN], gd)?,
            loss_scale: Tensor::zeros(be, &[2], gd)?,
            graphs: graphs::StepGraphs::default(),
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
        let rows = micro
            .checked_mul(cfg.features.max_seq_length)
            .with_context(|| {
                format!(
                    "--batch-size {}: {micro} windows of {} tokens per micro-batch are more rows than can be \
                     counted",
                    cfg.batch_size, cfg.features.max_seq_length
                )
            })?;
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

    /// The run's dropout probabilities (the same at every step).
    pub fn dropout(&self) -> DropoutCfg {
        DropoutCfg {
            hidden: self.cfg.hidden_dropout,
            attn: self.cfg.attention_dropout,
        }
    }

    /// The dropout seed of optimizer step `step`: one for the whole step (every micro-batch, every device),
    /// carried by each of its batches; the masks are keyed by it, the site, and window, position and feature
    /// (src/rng.rs).
    pub fn step_seed(&self, step: usize) -> u64 {
        step_seed(self.cfg.seed, step as u64)
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
        let t_step = Instant::now();
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
        let bucket = be.row_bucket();
        let step_seed = self.step_seed(self.state.global_step);
        let mut parts = vec![];
        for range in split_even(n, world * accum) {
            let mut first = range.start;
            let mut pieces = vec![];
            for piece in chunks_fitting(&feats[range], self.cfg.padding, pw, pr)? {
                let mut hb = pack_bucketed(piece, first, self.cfg.padding, bucket, pr)?;
                hb.layout.step_seed = step_seed;
                pieces.push(hb);
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
        LossScale::mean(n_start, n_end, loss_scale).write_to(be, &mut self.loss_scale)?;
        let drop = self.dropout();
        self.grads.zero_(be)?;
        // the step's loss sums and Σ g² stay on the device (ops::STATS_LEN) until the one read below
        self.stats.zero_(be)?;
        // real and computed rows of the whole step (every replica's)
        let real = parts.iter().flatten().map(|hb| hb.real_tokens()).sum();
        let rows = parts.iter().flatten().map(|hb| hb.n()).sum();
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
                let (batch, acts) = self.plan.load(be, hb)?;
                let g = match (into_scratch, self.scratch.as_mut()) {
                    (true, Some(s)) => s,
                    _ => &mut self.grads,
                };
                let key = graphs::GraphKey {
                    rows: hb.n(),
                    windows: hb.b(),
                    grid_rows: hb.layout.grid_rows(),
                    into_scratch,
                };
                let (model, stats, scale) = (&self.model, &mut self.stats, &self.loss_scale);
                // forward, loss and backward: recorded once per batch shape and replayed (CUDA graphs), or
                // simply run; the batch, its step seed and the loss scales are in device memory already
                self.graphs.run(be, key, &mut || {
                    model.forward(be, acts, batch, drop)?;
                    model.loss(be, acts, batch, scale, stats)?;
                    model.backward(be, g, acts, batch, drop)
                })?;
            }
            if let (true, Some(s)) = (into_scratch, self.scratch.as_ref()) {
                be.grad_accumulate(self.grads.flat_mut(), s.flat())?;
            }
            first_part = false;
        }
        let mut allreduce_ms = None;
        if let Some(g) = &self.group {
            // the step's gradient and loss sums: sums over the replicas (every replica gets the same bits, so
            // the norm, the loss-scale decision and the AdamW update agree everywhere); timed between two
            // synchronisations (cheap next to a step, and only with several devices)
            be.synchronize()?;
            let t0 = Instant::now();
            g.all_reduce_sum(be, self.grads.flat_mut())?;
            be.synchronize()?;
            allreduce_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
            g.all_reduce_sum(be, &mut self.stats)?;
        }
        be.grad_sq_norm(&mut self.stats, self.grads.flat())?;
        // AdamW reads the statistics on the device: a non-finite loss or gradient changes nothing there, and
        // the host, reading the same numbers once afterwards, does not count the step
        let hp = AdamWHyper {
            lr,
            beta1: self.cfg.adam_beta1,
            beta2: self.cfg.adam_beta2,
            eps: self.cfg.adam_eps,
            weight_decay: self.cfg.weight_decay,
            step: self.state.adam_t + 1,
            loss_scale,
            max_grad_norm: self.cfg.max_grad_norm,
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
            &self.stats,
            &hp,
        )?;
        // the step's one host synchronisation
        let host_ms = t_step.elapsed().as_secs_f64() * 1e3;
        let st = self.stats.to_f64_vec(be)?;
        let finite = hp.grad_scale(&st).is_some();
        let loss = LossSums {
            start: st[STAT_LOSS_START],
            end: st[STAT_LOSS_END],
            n_start,
            n_end,
        }
        .mean();
        let norm = st[STAT_GRAD_SQ].sqrt() / loss_scale;
        // (fp16: halve the loss scale after a non-finite step, grow it after a run of good ones)
        self.scaler.update(finite);
        if finite {
            self.state.adam_t += 1;
        }
        Ok(StepOut {
            loss,
            grad_norm: norm,
            applied: finite,
            windows: n,
            real_tokens: real,
            rows,
            allreduce_ms,
            host_ms,
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
        let m =
            crate::eval::run::score(ds, &preds.answers, Some(&preds.na_probs()), post.version_2);
        Ok((m, preds))
    }
}

/// Training features: every window of every example whose answer is aligned and covers a token of its
/// context (v2.0 impossible questions included, labelled \[CLS\]).
pub fn training_features(
    ds: &Dataset,
    tok: &WordPieceTokenizer,
    fc: &FeatureCfg,
) -> Result<Vec<Feature>> {
    Ok(training_features_and_skips(ds, tok, fc)?.0)
}

/// [`training_features`], and the examples (by index) left out because their answer covers no token of
/// their context (the misaligned ones are reported when the file is read).
pub fn training_features_and_skips(
    ds: &Dataset,
    tok: &WordPieceTokenizer,
    fc: &FeatureCfg,
) -> Result<(Vec<Feature>, Vec<usize>)> {
    let f = featurize(ds, tok, fc, true)?;
    let skip: std::collections::HashSet<usize> = f.answer_without_tokens.iter().copied().collect();
    let feats = f
        .features
        .into_iter()
        .filter(|x| ds.examples[x.example].answer_aligned && !skip.contains(&x.example))
        .collect();
    Ok((feats, f.answer_without_tokens))
}

/// The warning for training examples whose answer covers no token, naming the first few.
fn without_tokens_report(ds: &Dataset, skipped: &[usize]) -> Option<String> {
    if skipped.is_empty() {
        return None;
    }
    let named: Vec<String> = skipped
        .iter()
        .take(5)
        .map(|&i| {
            let e = &ds.examples[i];
            format!(
                "{:?} ({:?})",
                e.id,
                e.answers.first().map_or("", |a| a.text.as_str())
            )
        })
        .collect();
    let (count, its) = match skipped.len() {
        1 => ("1 answer covers".to_string(), "its"),
        n => (format!("{n} answers cover"), "their"),
    };
    Some(format!(
        "{count} no token of {its} passage (only characters the tokenizer drops: control or format characters, \
         or marks removed with the accents), so no span can be {its} label: skipped for training, kept for \
         evaluation: {}{}",
        named.join(", "),
        if skipped.len() > named.len() { ", …" } else { "" }
    ))
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

/// Test-only: sleep this many milliseconds after each optimizer step (`BERTQA_TEST_STEP_DELAY_MS`), so that
/// tests can signal a run part-way through without racing it.
pub const STEP_DELAY_VAR: &str = "BERTQA_TEST_STEP_DELAY_MS";

/// On resume, keep the lines of `metrics.jsonl` up to `step` (the checkpoint's): lines written after it by
/// a run that died before its next checkpoint would otherwise appear twice.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    for line in text.lines() {
        let s = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match s {
            Some(s) if s > step as u64 => dropped += 1,
            // a torn last line (a crash mid-write) goes too
            None if !line.trim().is_empty() => dropped += 1,
            _ => {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    if dropped > 0 {
        crate::say!(
            "{}: dropped {dropped} lines written after step {step} (the checkpoint resumed from)",
            path.display()
        );
        crate::util::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Evaluations still to come after step `done` of a run that stops at `stop`: every multiple of
/// `eval_every` (0: none), every epoch end not already counted, and the final one at `stop` (only with a
/// dev set).
pub fn evals_left(done: usize, stop: usize, steps_per_epoch: usize, eval_every: usize) -> usize {
    if stop <= done {
        return 0;
    }
    // multiples of k in (done, stop] (none for k = 0)
    let count = |k: usize| match (stop.checked_div(k), done.checked_div(k)) {
        (Some(a), Some(b)) => a - b,
        _ => 0,
    };
    let spe = steps_per_epoch.max(1);
    let mut n = count(eval_every) + count(spe);
    if eval_every > 0 {
        let g = {
            let (mut a, mut b) = (eval_every, spe);
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        n -= count(eval_every / g * spe);
    }
    let at_stop = (eval_every > 0 && stop.is_multiple_of(eval_every)) || stop.is_multiple_of(spe);
    n + usize::from(!at_stop)
}

/// Seconds left in a run: the steps to come at the measured step time, plus the evaluations to come at
/// the measured evaluation time.
pub fn eta_seconds(steps_left: usize, step_s: f64, evals_left: usize, eval_s: f64) -> f64 {
    steps_left as f64 * step_s + evals_left as f64 * eval_s
}

fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The first non-finite master weight (tensor name, index, value), in one pass.
fn first_non_finite<B: Backend>(tr: &Trainer<B>) -> Result<Option<(String, usize, f32)>> {
    for (name, t) in tr.names.iter().zip(tr.master_params().tensors()) {
        let v = t.to_f32_vec(tr.be)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Ok(Some((name.clone(), i, v[i])));
        }
    }
    Ok(None)
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
    let (feats, without_tokens) = training_features_and_skips(inp.train, inp.tokenizer, &fc)?;
    if let Some(msg) = without_tokens_report(inp.train, &without_tokens) {
        crate::say!("warning: --train-file: {msg}");
    }
    if feats.is_empty() {
        let n = inp.train.examples.len();
        let bad = inp
            .train
            .examples
            .iter()
            .filter(|e| !e.answer_aligned)
            .count()
            + without_tokens.len();
        bail!(
            "--train-file: no training windows: {}",
            if n == 0 {
                "the file holds no questions".to_string()
            } else {
                format!(
                    "none of its {n} questions gives one ({bad} with an answer that does not align with its \
                     context, is empty or covers no token, skipped as warned above)"
                )
            }
        );
    }
    let dev_feats = match inp.dev {
        Some(d) => Some(featurize(d, inp.tokenizer, &fc, false)?.features),
        None => None,
    };
    let mut tm = RunTimings {
        featurize_s: t0.elapsed().as_secs_f64(),
        ..Default::default()
    };
    crate::say!(
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
    // where this run stops (--epochs, --max-steps: may change on resume) …
    // (more epochs than steps can count: fine when --max-steps bounds the run)
    let mut stop_at = match (steps_per_epoch.checked_mul(cfg.epochs), cfg.max_steps) {
        (Some(n), _) => n,
        (None, Some(_)) => usize::MAX,
        (None, None) => bail!(
            "--epochs {}: {} epochs of {steps_per_epoch} steps is more steps than can be counted (give \
             --max-steps to train by steps)",
            cfg.epochs,
            cfg.epochs
        ),
    };
    if let Some(ms) = cfg.max_steps {
        stop_at = stop_at.min(ms);
    }
    // … and the learning-rate schedule's length: fixed when the run starts, kept on resume (0: recompute)
    let st = &mut trainer.state;
    if st.total_steps == 0 {
        st.total_steps = stop_at;
        st.warmup_steps = (cfg.warmup_ratio * stop_at as f64).ceil() as usize;
        if st.global_step > 0 {
            crate::say!(
                "learning-rate schedule recomputed: {} steps, {} of warmup",
                st.total_steps,
                st.warmup_steps
            );
        }
    }
    if let Some(s) = &st.scaler {
        trainer.scaler = s.clone();
    }
    let metrics_path = inp.output_dir.join("metrics.jsonl");
    if inp.resume_from.is_some() {
        if (trainer.state.global_step >= stop_at || trainer.state.stopped_early)
            && finished_at(&inp.output_dir, trainer.state.global_step)
        {
            // a finished run resumed again (a scheduler relaunching after the end, say): nothing to train,
            // and its files — summary.json, predictions, best/ — stay as the run left them
            return Ok(RunSummary {
                state: trainer.state.clone(),
                final_metrics: None,
                losses: vec![],
                seconds: 0.0,
                train_windows: feats.len(),
                seq_per_s: 0.0,
                interrupted: false,
                timings: tm,
                windows: WindowsReport::default(),
                already_done: true,
            });
        }
        truncate_metrics(&metrics_path, trainer.state.global_step)?;
        // the previous part's summary no longer describes the run; this part writes its own
        let _ = std::fs::remove_file(inp.output_dir.join("summary.json"));
    }
    let delay = std::env::var(STEP_DELAY_VAR)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(std::time::Duration::from_millis);
    let pb = if inp.show_progress {
        let pb = indicatif::ProgressBar::new(stop_at as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template("train {bar:30} {pos}/{len} steps {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_position(trainer.state.global_step as u64);
        Some(pb)
    } else {
        None
    };
    let is_interrupted = || {
        inp.interrupt
            .as_ref()
            .map(|f| f.load(Ordering::SeqCst))
            .unwrap_or(false)
    };
    let mut interrupted = false;
    let mut losses = vec![];
    let mut seq_total = 0usize;
    let mut time_total = 0.0f64;
    'outer: while trainer.state.epoch < cfg.epochs
        && trainer.state.global_step < stop_at
        && !trainer.state.stopped_early
    {
        let order = epoch_order(feats.len(), cfg.seed, trainer.state.epoch);
        while trainer.state.batch_in_epoch < steps_per_epoch {
            if trainer.state.global_step >= stop_at {
                break 'outer;
            }
            // a signal that came between steps (during an evaluation or a save): stop before the next
            if is_interrupted() {
                interrupted = true;
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
            tm.step_s.push(dt);
            trainer.state.global_step += 1;
            trainer.state.batch_in_epoch += 1;
            if !applied {
                trainer.state.skipped_steps += 1;
                trainer.state.consecutive_bad += 1;
                crate::say!("step {}: non-finite loss/gradient (loss {loss}, grad norm {norm}); step skipped{}", trainer.state.global_step, if trainer.scaler.enabled { format!(", loss scale now {}", trainer.scaler.scale) } else { String::new() });
                if trainer.state.consecutive_bad >= cfg.max_bad_steps {
                    let n = trainer.state.consecutive_bad;
                    let g = trainer.state.global_step;
                    match first_non_finite(trainer)? {
                        Some((name, i, v)) => bail!(
                            "{n} non-finite steps in a row at step {g}: aborting. The weights themselves are \
                             non-finite ({name} is {v} at index {i}): an update before these steps overflowed \
                             them, and every step since computes on them. Start again from a checkpoint \
                             saved before the divergence (or the original model) with a smaller \
                             --learning-rate or --weight-decay"
                        ),
                        None => bail!(
                            "{n} non-finite steps in a row at step {g}: aborting; the weights are finite, \
                             the loss or gradients overflow (try a lower --learning-rate, --precision fp32, \
                             or check the data)"
                        ),
                    }
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
                .map(|f| trainer.model.cfg.train_flops_per_seq(f.len()))
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
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            let mut stop = false;
            if cfg.eval_every > 0 && trainer.state.global_step.is_multiple_of(cfg.eval_every) {
                stop = eval_and_track(
                    trainer,
                    inp,
                    dev_feats.as_deref(),
                    &post,
                    &metrics_path,
                    &mut tm,
                )?;
            }
            if let Some(pb) = &pb {
                let g = trainer.state.global_step;
                let step_s = time_total / losses.len() as f64;
                let (n_evals, eval_s) = match &dev_feats {
                    None => (0, 0.0),
                    Some(d) => (
                        evals_left(g, stop_at, steps_per_epoch, cfg.eval_every),
                        if tm.evals > 0 {
                            tm.eval_s / tm.evals as f64
                        } else {
                            // not timed yet: a forward pass costs about a third of a training step
                            step_s / cfg.batch_size as f64 * d.len() as f64 / 3.0
                        },
                    ),
                };
                let eta = eta_seconds(stop_at.saturating_sub(g), step_s, n_evals, eval_s);
                pb.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {seq_s:.1} seq/s ETA {}{}",
                    hms(eta),
                    if n_evals > 0 {
                        format!(" ({n_evals} evaluations to come)")
                    } else {
                        String::new()
                    }
                ));
                pb.set_position(g as u64);
            }
            interrupted =
                is_interrupted() || inp.stop_after_steps == Some(trainer.state.global_step);
            // the last step of an epoch is saved once, at the epoch end below (after its evaluation)
            let epoch_end = trainer.state.batch_in_epoch == steps_per_epoch;
            let save_step =
                cfg.save_every > 0 && trainer.state.global_step.is_multiple_of(cfg.save_every);
            if (save_step && !epoch_end) || interrupted || stop {
                trainer.state.scaler = Some(trainer.scaler.clone());
                timed_save(&mut tm, || checkpoint::save(trainer, inp))?;
            }
            if interrupted {
                break 'outer;
            }
            if stop {
                trainer.state.stopped_early = true;
                crate::say!("early stopping at step {}: dev F1 has not improved for {} evaluations (best {:.2} at step {})", trainer.state.global_step, cfg.early_stopping_patience, trainer.state.best_f1.unwrap_or(0.0), trainer.state.best_step);
                break 'outer;
            }
        }
        // epoch end
        trainer.state.epoch += 1;
        trainer.state.batch_in_epoch = 0;
        let stop =
            if cfg.eval_every == 0 || !trainer.state.global_step.is_multiple_of(cfg.eval_every) {
                eval_and_track(
                    trainer,
                    inp,
                    dev_feats.as_deref(),
                    &post,
                    &metrics_path,
                    &mut tm,
                )?
            } else {
                false
            };
        trainer.state.scaler = Some(trainer.scaler.clone());
        timed_save(&mut tm, || checkpoint::save(trainer, inp))?;
        if stop {
            trainer.state.stopped_early = true;
            break;
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    // a run that ended on --max-steps (not at an epoch end or a save step), or was interrupted between
    // steps, still leaves a checkpoint of its last step
    let last = checkpoint::latest(&inp.output_dir).and_then(|p| {
        p.file_name()?
            .to_str()?
            .strip_prefix("checkpoint-")?
            .parse::<usize>()
            .ok()
    });
    if last != Some(trainer.state.global_step) && trainer.state.global_step > 0 {
        trainer.state.scaler = Some(trainer.scaler.clone());
        timed_save(&mut tm, || checkpoint::save(trainer, inp))?;
    }
    let g = trainer.graphs.stats;
    if g.recorded > 0 {
        crate::say!(
            "CUDA graphs: {} batch shapes recorded, {} micro-batches replayed, {} run directly",
            g.recorded,
            g.replayed,
            g.eager
        );
    }
    // a signal during the last evaluation or save: the run stops here too (a --resume does what is left)
    interrupted = interrupted || is_interrupted();
    if interrupted {
        match checkpoint::latest(&inp.output_dir) {
            Some(p) => crate::say!(
                "interrupted: checkpoint {} (step {}); continue with --resume",
                p.display(),
                trainer.state.global_step
            ),
            None => crate::say!(
                "interrupted before the first step: nothing to save; the same command starts the run again"
            ),
        }
    }
    // final metrics: the last evaluation, or one now if the run ended between evaluations (not when
    // interrupted: the run is to stop now)
    let final_metrics = match (&trainer.state.last_eval, inp.dev) {
        (Some(v), _)
            if v.get("step").and_then(|s| s.as_u64()) == Some(trainer.state.global_step as u64) =>
        {
            v.get("eval").cloned()
        }
        (_, Some(_)) if !interrupted => {
            eval_and_track(
                trainer,
                inp,
                dev_feats.as_deref(),
                &post,
                &metrics_path,
                &mut tm,
            )?;
            trainer
                .state
                .last_eval
                .as_ref()
                .and_then(|v| v.get("eval").cloned())
        }
        _ => None,
    };
    // the loss/F1 chart is a convenience: a failure to draw it is a warning, and a chart of an earlier point
    // of the run is removed rather than left looking current
    let curves = inp.output_dir.join("curves.svg");
    if metrics_path.is_file() {
        if let Err(e) = plot::write_curves(&metrics_path, &curves) {
            let stale = curves.is_file() && std::fs::remove_file(&curves).is_ok();
            crate::say!(
                "warning: {} not drawn: {e:#}{}",
                curves.display(),
                if stale {
                    " (the previous one, of an earlier step, is removed)"
                } else {
                    ""
                }
            );
        }
    }
    let secs = t_start.elapsed().as_secs_f64();
    // after the run, outside every timing: what it trained and evaluated on
    let windows = WindowsReport {
        train: feats.len(),
        train_with_answer: feats.iter().filter(|f| f.has_answer).count(),
        train_sha256: windows_digest(&feats, true),
        dev: dev_feats.as_ref().map_or(0, |d| d.len()),
        dev_sha256: dev_feats
            .as_deref()
            .map(|d| windows_digest(d, false))
            .unwrap_or_default(),
    };
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
        interrupted,
        timings: tm,
        windows,
        already_done: false,
    })
}

/// Run a save, adding its duration to `tm`.
fn timed_save(tm: &mut RunTimings, save: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    let r = save();
    tm.save_s += t.elapsed().as_secs_f64();
    tm.saves += 1;
    r
}

/// Evaluate on the dev set (if any), log it, keep best/, and say whether to stop early.
fn eval_and_track<B: Backend>(
    trainer: &mut Trainer<B>,
    inp: &RunInputs,
    dev_feats: Option<&[Feature]>,
    post: &PostCfg,
    metrics_path: &Path,
    tm: &mut RunTimings,
) -> Result<bool> {
    let (Some(dev), Some(df)) = (inp.dev, dev_feats) else {
        return Ok(false);
    };
    // the weights may be non-finite (an update overflowed them; the step that did so was applied): nothing
    // is scored from them (an F1 of NaN logits) or saved as best/. One copy of the weights to the host, small
    // next to an evaluation.
    if let Some((name, i, v)) = first_non_finite(trainer)? {
        bail!(
            "step {}: the weights are non-finite ({name} is {v} at index {i}): an update overflowed them. \
             Nothing is evaluated or saved from them; start again from a checkpoint saved before the \
             divergence (or the original model) with a smaller --learning-rate or --weight-decay",
            trainer.state.global_step
        );
    }
    let t = Instant::now();
    let (m, preds) = trainer.evaluate_with_predictions(dev, df, post)?;
    // predictions.json / nbest_predictions.json (/ null_odds.json) of the latest evaluation
    crate::eval::run::write_predictions(&inp.output_dir, &preds, post.version_2)?;
    tm.eval_s += t.elapsed().as_secs_f64();
    tm.evals += 1;
    let f1 = m.get("f1").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let line = serde_json::json!({"step": trainer.state.global_step, "epoch": trainer.state.epoch, "eval": m, "eval_seconds": t.elapsed().as_secs_f64()});
    append_jsonl(metrics_path, &line)?;
    crate::say!("eval at step {}: {}", trainer.state.global_step, m);
    trainer.state.last_eval = Some(line);
    let improved = trainer.state.best_f1.map(|b| f1 > b).unwrap_or(true);
    if improved {
        trainer.state.best_f1 = Some(f1);
        trainer.state.best_step = trainer.state.global_step;
        trainer.state.evals_since_best = 0;
        timed_save(tm, || {
            checkpoint::save_model_dir(trainer, inp, &inp.output_dir.join("best"))
        })?;
    } else {
        trainer.state.evals_since_best += 1;
    }
    let p = trainer.cfg.early_stopping_patience;
    Ok(p > 0 && trainer.state.evals_since_best >= p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The evaluations a run does from step `done` to `stop`, counted by walking its steps.
    fn walk(done: usize, stop: usize, spe: usize, eval_every: usize) -> usize {
        (done + 1..=stop)
            .filter(|&g| {
                (eval_every > 0 && g.is_multiple_of(eval_every))
                    || g.is_multiple_of(spe)
                    || g == stop
            })
            .count()
    }

    #[test]
    fn evals_left_counts_every_evaluation_to_come() {
        assert_eq!(evals_left(0, 12, 6, 0), 2); // the two epoch ends
        assert_eq!(evals_left(0, 12, 6, 4), 4); // 4, 6 (epoch end), 8, 12 (both)
        assert_eq!(evals_left(12, 12, 6, 4), 0);
        assert_eq!(evals_left(0, 5, 6, 0), 1); // --max-steps mid-epoch: the final evaluation
        for spe in 1..8 {
            for every in 0..7 {
                for stop in 1..30 {
                    for done in 0..=stop {
                        assert_eq!(
                            evals_left(done, stop, spe, every),
                            walk(done, stop, spe, every),
                            "done {done} stop {stop} spe {spe} every {every}"
                        );
                    }
                }
            }
        }
    }

    /// scripts/hf_squad.py re-implements the shuffle (its `--self-test` checks the same numbers), so that
    /// the transformers side of the comparison trains on the same batches in the same order.
    #[test]
    fn epoch_order_known_answer() {
        assert_eq!(epoch_order(10, 42, 0), vec![2, 6, 4, 8, 5, 1, 7, 9, 0, 3]);
        assert_eq!(epoch_order(10, 42, 1), vec![2, 3, 0, 1, 7, 4, 8, 6, 5, 9]);
    }

    /// The step-time statistic scripts/hf_squad.py computes the same way: warm-up left out, then the median.
    #[test]
    fn step_median_leaves_out_the_warmup() {
        let mut t = RunTimings::default();
        assert_eq!(t.step_median_s(), None);
        t.step_s = vec![9.0, 1.0, 3.0];
        assert_eq!(warmup_steps(3), 1);
        assert_eq!(t.step_median_s(), Some(2.0));
        t.step_s = (0..30)
            .map(|i| if i < 10 { 100.0 } else { i as f64 })
            .collect();
        assert_eq!(t.step_median_s(), Some(19.5));
        assert_eq!(t.step_mean_s(), Some(19.5));
    }

    /// The digest scripts/hf_squad.py computes (`Windows.digest`), on a known window.
    #[test]
    fn windows_digest_known_answer() {
        let f = Feature {
            example: 0,
            input_ids: vec![101, 7, 102, 8, 9, 102],
            token_type_ids: vec![0, 0, 0, 1, 1, 1],
            offsets: vec![None; 6],
            max_len: 8,
            start_position: 3,
            end_position: 4,
            has_answer: true,
        };
        assert_eq!(
            windows_digest(std::slice::from_ref(&f), true),
            "10ef0c56f0ee800bc0ff43cde1f880a24fd271fde4ae2c401bb4473d53dfd30a"
        );
        assert_eq!(
            windows_digest(std::slice::from_ref(&f), false),
            "d343be784e22e3becfd78a8a8cab96fe8fbe8591bb7471c1f597d3582472ea3d"
        );
    }

    #[test]
    fn the_eta_covers_the_steps_and_the_evaluations_to_come() {
        // 100 steps of 0.5 s and 3 evaluations of 20 s: not the current epoch's steps alone
        assert_eq!(eta_seconds(100, 0.5, 3, 20.0), 110.0);
        assert_eq!(hms(3725.0), "1:02:05");
    }
}
