//! `bertqa eval` and `bertqa predict`.

use crate::backend::Backend;
use crate::cli::{on_device, precision_dtype, DeviceFn};
use crate::data::features::{example_features, FeatureCfg};
use crate::data::squad::{Context as SquadContext, Dataset, Example};
use crate::data::tokenizer;
use crate::eval::postprocess::{postprocess, PostCfg};
use crate::eval::run::{predict_streaming, score, write_predictions};
use crate::model::bert::BertQa;
use crate::model::checkpoint;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Options shared by eval, predict and train.
#[derive(Args, Debug, Clone)]
pub struct EvalOpts {
    #[arg(long, default_value_t = 384)]
    pub max_seq_length: usize,
    #[arg(long, default_value_t = 128)]
    pub doc_stride: usize,
    #[arg(long, default_value_t = 64)]
    pub max_query_length: usize,
    #[arg(long, default_value_t = 20)]
    pub n_best_size: usize,
    #[arg(long, default_value_t = 30)]
    pub max_answer_length: usize,
    /// SQuAD v2.0: allow "no answer"
    #[arg(long)]
    pub version_2_with_negative: bool,
    #[arg(long, default_value_t = 0.0)]
    pub null_score_diff_threshold: f64,
    /// auto (CUDA when usable, else CPU), cpu or cuda
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl EvalOpts {
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
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// evaluate only the first N questions
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// auto (fp32 for evaluation), fp32, bf16 or fp16
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    #[command(flatten)]
    pub opts: EvalOpts,
}

/// A QA model directory and its tokenizer, weights in the `--precision` dtype.
fn load_qa_model<B: Backend>(
    be: &B,
    dir: &std::path::Path,
    precision: &str,
) -> Result<(BertQa<B>, tokenizer::WordPieceTokenizer)> {
    let dt = precision_dtype(be, precision)?;
    let (cfg, params, rep) = checkpoint::load(be, dir, dt, 0)?;
    if rep.qa_head_initialised {
        eprintln!(
            "warning: {} has no qa_outputs: the span head is random, scores will be near zero",
            dir.display()
        );
    }
    Ok((BertQa::new(cfg, params), tokenizer::load(dir)?))
}

struct EvalJob<'a>(&'a EvalArgs);
impl DeviceFn<()> for EvalJob<'_> {
    fn call<B: Backend>(self, be: &B) -> Result<()> {
        let a = self.0;
        let (model, tok) = load_qa_model(be, &a.model, &a.precision)?;
        let mut ds = Dataset::load(&a.dev_file)?;
        if let Some(n) = a.max_examples {
            ds.truncate(n);
        }
        let t1 = Instant::now();
        let (preds, n_windows) = predict_streaming(
            be,
            &model,
            &ds,
            &tok,
            &a.opts.features(),
            a.batch_size,
            &a.opts.post(),
            true,
        )?;
        let t_model = t1.elapsed().as_secs_f64();
        write_predictions(&a.output_dir, &preds, a.opts.version_2_with_negative)?;
        eprintln!(
            "{} questions, {} windows: tokenize+model+postprocess {t_model:.1}s ({:.1} questions/s); predictions in {}",
            ds.examples.len(),
            n_windows,
            ds.examples.len() as f64 / t_model,
            a.output_dir.display()
        );
        let m = score(
            &ds,
            &preds.answers,
            Some(&preds.null_odds),
            a.opts.version_2_with_negative,
        );
        println!("{}", serde_json::to_string(&m)?);
        Ok(())
    }
}

pub fn run_eval(a: &EvalArgs) -> Result<()> {
    on_device(&a.opts.device.clone(), EvalJob(a))
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub question: String,
    #[arg(long)]
    pub context: String,
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    #[command(flatten)]
    pub opts: EvalOpts,
}

struct PredictJob<'a>(&'a PredictArgs);
impl DeviceFn<()> for PredictJob<'_> {
    fn call<B: Backend>(self, be: &B) -> Result<()> {
        let a = self.0;
        let (model, tok) = load_qa_model(be, &a.model, &a.precision)?;
        let ctx = Arc::new(SquadContext::new(a.context.clone(), String::new()));
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
        };
        let q = tok.encode(&a.question)?;
        let c = tok.encode(&a.context)?;
        let feats = example_features(0, &ds.examples[0], &q, &c, &tok, &a.opts.features(), false)?;
        let (s, e) = crate::eval::run::logits_for(be, &model, &feats, 16, None)?;
        let p = postprocess(&ds, &feats, &s, &e, &a.opts.post());
        let best = &p.nbest["q"][0];
        println!(
            "{}",
            serde_json::json!({"answer": p.answers["q"], "score": best.start_logit + best.end_logit, "probability": best.probability, "char_start": best.char_start, "char_end": best.char_end})
        );
        Ok(())
    }
}

pub fn run_predict(a: &PredictArgs) -> Result<()> {
    on_device(&a.opts.device.clone(), PredictJob(a))
}
