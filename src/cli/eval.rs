//! `bertqa eval` and `bertqa predict`.

use crate::cli::{on_device, precision_dtype, DeviceFn};
use crate::data::features::FeatureCfg;
use crate::data::squad::{Context as SquadContext, Dataset, Example};
use crate::data::tokenizer;
use crate::eval::postprocess::PostCfg;
use crate::eval::run::{predict_streaming, resolve_version_2, score, write_predictions};
use crate::model::bert::BertQa;
use crate::model::checkpoint;
use crate::ops::Backend;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Options shared by eval, predict and train.
#[derive(Args, Debug, Clone)]
pub struct EvalOpts {
    #[arg(long, default_value_t = 384, allow_negative_numbers = true)]
    pub max_seq_length: usize,
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    pub doc_stride: usize,
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub max_query_length: usize,
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub n_best_size: usize,
    #[arg(long, default_value_t = 30, allow_negative_numbers = true)]
    pub max_answer_length: usize,
    /// SQuAD v2.0: allow "no answer"
    #[arg(long)]
    pub version_2_with_negative: bool,
    /// SQuAD v2.0: answer "" when the null score beats the best span by more than this (negative values
    /// allowed)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub null_score_diff_threshold: f64,
    /// auto (CUDA when usable, else CPU), cpu or cuda
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// how windows are laid out in a batch: packed (real tokens only; default), longest (each padded to the
    /// batch's longest, rounded up to 64), max (each padded to --max-seq-length). Results do not depend on it.
    #[arg(long, default_value = "packed", value_parser = ["packed", "longest", "max"])]
    pub padding: String,
    #[command(flatten)]
    pub kernels: crate::cli::KernelArgs,
}

impl EvalOpts {
    /// `--padding`.
    pub fn padding(&self) -> Result<crate::model::Padding> {
        crate::model::Padding::parse(&self.padding)
    }

    /// The checks of the options shared by `eval`, `predict` and `train` (train's own validation calls this
    /// too). The window budget — context tokens per window — is `max_seq_length − max_query_length − 3`
    /// (\[CLS\] question \[SEP\] context \[SEP\]); consecutive windows start `budget − doc_stride` tokens
    /// apart, so `doc_stride` must be below the budget (at or above it every window would start one token
    /// after the previous one).
    pub fn validate(&self) -> Result<()> {
        for (flag, v) in [
            ("--max-seq-length", self.max_seq_length),
            ("--max-query-length", self.max_query_length),
            ("--n-best-size", self.n_best_size),
            ("--max-answer-length", self.max_answer_length),
        ] {
            if v == 0 {
                bail!("{flag} must be ≥ 1 (got 0)");
            }
        }
        let budget = self
            .max_seq_length
            .checked_sub(self.max_query_length.saturating_add(3))
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                anyhow!(
                    "--max-query-length ({}) leaves no room for the context in --max-seq-length ({}): \
                     [CLS] question [SEP] context [SEP] needs max_seq_length ≥ max_query_length + 4",
                    self.max_query_length,
                    self.max_seq_length
                )
            })?;
        if self.doc_stride >= budget {
            bail!(
                "--doc-stride ({}) must be below the window budget of {budget} context tokens \
                 (--max-seq-length {} − --max-query-length {} − 3): windows overlap by doc_stride tokens, \
                 so at or above the budget each would start one token after the previous one",
                self.doc_stride,
                self.max_seq_length,
                self.max_query_length
            );
        }
        if !self.null_score_diff_threshold.is_finite() {
            bail!(
                "--null-score-diff-threshold must be a finite number (got {})",
                self.null_score_diff_threshold
            );
        }
        Ok(())
    }

    /// Error if the windows are longer than the model's position table.
    pub fn check_model(&self, cfg: &crate::model::BertConfig, model_dir: &Path) -> Result<()> {
        if self.max_seq_length > cfg.max_position_embeddings {
            bail!(
                "--max-seq-length {} is longer than {}'s position table (max_position_embeddings {})",
                self.max_seq_length,
                model_dir.display(),
                cfg.max_position_embeddings
            );
        }
        Ok(())
    }

    pub fn features(&self) -> FeatureCfg {
        FeatureCfg {
            max_seq_length: self.max_seq_length,
            doc_stride: self.doc_stride,
            max_query_length: self.max_query_length,
        }
    }
    pub fn post(&self) -> PostCfg {
        PostCfg {
            n_best_size: self.n_best_size,
            max_answer_length: self.max_answer_length,
            version_2: self.version_2_with_negative,
            null_score_diff_threshold: self.null_score_diff_threshold,
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// HF-format BertForQuestionAnswering directory (config.json, model.safetensors, tokenizer files)
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub dev_file: PathBuf,
    /// where predictions.json, nbest_predictions.json (and null_odds.json) go
    #[arg(long, default_value = "eval-out")]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// evaluate only the first N questions
    #[arg(long, allow_negative_numbers = true)]
    pub max_examples: Option<usize>,
    /// fp32 (default), bf16, fp16, or auto (bf16 on a GPU, fp32 on the CPU)
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    #[command(flatten)]
    pub opts: EvalOpts,
}

/// A QA model directory and its tokenizer, weights in the `--precision` dtype.
fn load_qa_model<B: Backend>(
    be: &B,
    dir: &Path,
    precision: &str,
    opts: &EvalOpts,
) -> Result<(BertQa<B>, tokenizer::WordPieceTokenizer)> {
    let dt = precision_dtype(be, precision)?;
    let (cfg, params, rep) = checkpoint::load(be, dir, dt, 0)?;
    opts.check_model(&cfg, dir)?;
    if rep.qa_head_initialised {
        crate::say!(
            "warning: {} has no qa_outputs: the span head is random, scores will be near zero",
            dir.display()
        );
    }
    let tok = tokenizer::load(dir)?;
    tok.check_fits(cfg.vocab_size, &dir.display().to_string())?;
    Ok((BertQa::new(cfg, params), tok))
}

impl EvalArgs {
    pub fn validate(&self) -> Result<()> {
        self.opts.validate()?;
        if self.batch_size == 0 {
            bail!("--batch-size must be ≥ 1 (got 0)");
        }
        if self.max_examples == Some(0) {
            bail!("--max-examples 0 leaves no question to evaluate");
        }
        Ok(())
    }
}

/// The evaluation set: loaded, truncated to `max_examples`, checked to be scorable; and whether it is
/// scored as SQuAD v2.0 (the flag, or detected from the file with a note on stderr).
pub fn load_eval_set(
    path: &Path,
    max_examples: Option<usize>,
    version_2_flag: bool,
) -> Result<(Dataset, bool)> {
    let mut ds = Dataset::load(path)?;
    if let Some(n) = max_examples {
        ds.truncate(n);
    }
    let v2 = resolve_version_2(&ds, path, version_2_flag);
    ds.check_evaluable(v2, &path.display().to_string())?;
    Ok((ds, v2))
}

struct EvalJob<'a>(&'a EvalArgs);
impl DeviceFn<()> for EvalJob<'_> {
    fn call<B: Backend>(self, be: &B) -> Result<()> {
        let a = self.0;
        let (ds, v2) = load_eval_set(&a.dev_file, a.max_examples, a.opts.version_2_with_negative)?;
        let mut opts = a.opts.clone();
        opts.version_2_with_negative = v2;
        let (model, tok) = load_qa_model(be, &a.model, &a.precision, &opts)?;
        let t1 = Instant::now();
        let (preds, n_windows) = predict_streaming(
            be,
            &model,
            &ds,
            &tok,
            &opts.features(),
            a.batch_size,
            opts.padding()?,
            &opts.post(),
            true,
        )?;
        let t_model = t1.elapsed().as_secs_f64();
        write_predictions(&a.output_dir, &preds, v2)?;
        crate::say!(
            "{} questions, {} windows: tokenize+model+postprocess {t_model:.1}s ({:.1} questions/s); predictions in {}",
            ds.examples.len(),
            n_windows,
            ds.examples.len() as f64 / t_model.max(1e-9),
            a.output_dir.display()
        );
        if !preds.no_valid_span.is_empty() {
            crate::say!(
                "{} questions had no valid span in any window (answered with the empty string), e.g. {}",
                preds.no_valid_span.len(),
                preds.no_valid_span[..preds.no_valid_span.len().min(5)].join(", ")
            );
        }
        let m = score(&ds, &preds.answers, Some(&preds.na_probs()), v2);
        crate::util::print_line(serde_json::to_string(&m)?).with_context(|| {
            format!(
                "the predictions in {} are written, but the metrics could not be printed",
                a.output_dir.display()
            )
        })
    }
}

pub fn run_eval(a: &EvalArgs) -> Result<()> {
    a.validate()?;
    // checked before the model runs, not when its predictions are written
    if a.output_dir.exists() && !a.output_dir.is_dir() {
        bail!(
            "--output-dir {} exists and is not a folder",
            a.output_dir.display()
        );
    }
    on_device(&a.opts.device, &a.opts.kernels, EvalJob(a))
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("passage").required(true).args(["context", "context_file"])))]
pub struct PredictArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub question: String,
    /// the passage, as an argument
    #[arg(long)]
    pub context: Option<String>,
    /// the passage, read from a UTF-8 file (`-`: standard input) — for passages too long for a command
    /// line (about 128 KiB on Linux) or holding characters an argument cannot (NUL). A byte-order mark at
    /// its start is not part of the passage: character offsets count from after it
    #[arg(long, value_name = "PATH")]
    pub context_file: Option<PathBuf>,
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    #[command(flatten)]
    pub opts: EvalOpts,
}

impl PredictArgs {
    /// The passage (from --context or --context-file) and the flag that gave it, for messages.
    fn passage(&self) -> Result<(String, String)> {
        use std::io::Read;
        match (&self.context, &self.context_file) {
            (Some(c), None) => Ok((c.clone(), "--context".into())),
            (None, Some(p)) => {
                let mut bytes = vec![];
                let what = if p.as_os_str() == "-" {
                    std::io::stdin()
                        .read_to_end(&mut bytes)
                        .context("--context-file -: reading standard input")?;
                    "--context-file - (standard input)".to_string()
                } else {
                    bytes = std::fs::read(p)
                        .with_context(|| format!("--context-file {}: reading it", p.display()))?;
                    format!("--context-file {}", p.display())
                };
                let text = String::from_utf8(bytes).map_err(|e| {
                    anyhow!(
                        "{what}: not UTF-8 (invalid byte at offset {})",
                        e.utf8_error().valid_up_to()
                    )
                })?;
                // a byte-order mark is not part of the passage (char offsets count from after it)
                let text = text
                    .strip_prefix('\u{feff}')
                    .map(str::to_string)
                    .unwrap_or(text);
                Ok((text, what))
            }
            _ => bail!("give the passage once: --context or --context-file"),
        }
    }
}

struct PredictJob<'a>(&'a PredictArgs);
impl DeviceFn<()> for PredictJob<'_> {
    fn call<B: Backend>(self, be: &B) -> Result<()> {
        let a = self.0;
        let (context, flag) = a.passage()?;
        let (model, tok) = load_qa_model(be, &a.model, &a.precision, &a.opts)?;
        if tok.encode(&context)?.ids.is_empty() {
            bail!(
                "{flag} has no tokens (it is empty, or only characters the tokenizer drops: whitespace, \
                 control and format characters such as a zero-width space, marks removed with the accents)"
            );
        }
        let ctx = Arc::new(SquadContext::new(context, String::new()));
        let ex = Example {
            id: "q".into(),
            question: a.question.clone(),
            context: ctx,
            paragraph: 0,
            answers: vec![],
            is_impossible: false,
            answer_aligned: true,
        };
        let ds = Dataset {
            version: None,
            examples: vec![ex],
            num_paragraphs: 1,
            misaligned: vec![],
            locations: vec![(0, 0, 0)],
        };
        let (p, _) = predict_streaming(
            be,
            &model,
            &ds,
            &tok,
            &a.opts.features(),
            16,
            a.opts.padding()?,
            &a.opts.post(),
            false,
        )?;
        let nbest = p
            .nbest
            .get("q")
            .ok_or_else(|| anyhow!("no prediction was made"))?;
        let out = if p.no_valid_span.iter().any(|id| id == "q") {
            serde_json::json!({
                "answer": null,
                "no_answer": true,
                "reason": format!(
                    "no valid span: none of the {} best start and end positions form a span of at most {} tokens inside the context (--n-best-size, --max-answer-length)",
                    a.opts.n_best_size, a.opts.max_answer_length
                ),
            })
        } else {
            let best = nbest
                .iter()
                .find(|n| !n.is_null)
                .ok_or_else(|| anyhow!("no span in the n-best list"))?;
            let score = best.start_logit + best.end_logit;
            if !score.is_finite() || !best.probability.is_finite() {
                bail!(
                    "{}: the model produced non-finite logits (score {score}); its weights or --precision overflow",
                    a.model.display()
                );
            }
            let text = &p.answers["q"];
            let diff = p.null_odds.get("q").copied().filter(|d| d.is_finite());
            // (the probabilities are over the n-best list, v2.0's null entry included, as transformers')
            let span = serde_json::json!({
                "score": score,
                "probability": best.probability,
                "char_start": best.char_start,
                "char_end": best.char_end,
            });
            if a.opts.version_2_with_negative && text.is_empty() {
                let d = diff.unwrap_or(f64::NAN);
                serde_json::json!({
                    "answer": null,
                    "no_answer": true,
                    "reason": format!(
                        "the null score beats the best span by {d} > --null-score-diff-threshold {}",
                        a.opts.null_score_diff_threshold
                    ),
                    "null_score_diff": diff,
                    "rejected_span": dict_with(span, "text", serde_json::json!(best.text)),
                })
            } else {
                // "answer" and "no_answer" first, as always
                let mut o = dict_with(
                    dict_with(span, "no_answer", serde_json::json!(false)),
                    "answer",
                    serde_json::json!(text),
                );
                if let Some(d) = diff {
                    o["null_score_diff"] = serde_json::json!(d);
                }
                o
            }
        };
        crate::util::print_line(out)
    }
}

/// `obj` with `key: value` put first.
fn dict_with(obj: serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert(key.into(), value);
    if let serde_json::Value::Object(o) = obj {
        m.extend(o);
    }
    serde_json::Value::Object(m)
}

pub fn run_predict(a: &PredictArgs) -> Result<()> {
    a.opts.validate()?;
    on_device(&a.opts.device, &a.opts.kernels, PredictJob(a))
}
