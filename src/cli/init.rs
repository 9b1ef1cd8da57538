//! `bertqa init-random`: a randomly initialised BertForQuestionAnswering directory (for tests and speed work:
//! e.g. BERT-base shapes without a pretrained checkpoint); `bertqa convert`: a BERT directory rewritten as a
//! BertForQuestionAnswering checkpoint in f32/f16/bf16.

use crate::model::{checkpoint, BertConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// take the tokenizer files (and vocabulary size) from this model directory
    #[arg(long)]
    pub tokenizer_from: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 768, allow_negative_numbers = true)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 12, allow_negative_numbers = true)]
    pub layers: usize,
    #[arg(long, default_value_t = 12, allow_negative_numbers = true)]
    pub heads: usize,
    #[arg(long, default_value_t = 3072, allow_negative_numbers = true)]
    pub intermediate_size: usize,
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    pub max_position_embeddings: usize,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// replace --output even if it is not empty (built beside it, swapped in when complete)
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: &InitArgs) -> Result<()> {
    crate::util::check_output_dir(&a.output, a.force)?;
    // the embedding table must hold every token id of the tokenizer
    let tok = crate::data::tokenizer::load(&a.tokenizer_from)?;
    let cfg_path = a.tokenizer_from.join("config.json");
    let vocab = if cfg_path.exists() {
        BertConfig::from_file(&cfg_path)?.vocab_size
    } else {
        0
    }
    .max(tok.id_extent());
    let cfg = BertConfig::tiny(
        vocab,
        a.hidden_size,
        a.layers,
        a.heads,
        a.intermediate_size,
        a.max_position_embeddings,
    );
    cfg.validate()
        .context("--hidden-size/--layers/--heads/--intermediate-size/--max-position-embeddings")?;
    crate::util::replace_dir(&a.output, |tmp| {
        checkpoint::write_random_model(tmp, &cfg, a.seed, &a.tokenizer_from)
    })?;
    crate::util::print_line(format_args!(
        "{}: random BertForQuestionAnswering, {:.1}M parameters",
        a.output.display(),
        cfg.num_params() as f64 / 1e6
    ))
    .with_context(|| format!("{} is written", a.output.display()))
}

/// `bertqa convert`: rewrite a BERT directory as a BertForQuestionAnswering checkpoint in another dtype
/// (e.g. f16 to fit a transfer limit), initialising the span head (seeded) if the source has none, so that
/// several tools can start from exactly the same weights.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    /// f32, f16 or bf16
    #[arg(long, default_value = "f16", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
    /// seed of the span-head initialisation when the source has no qa_outputs
    #[arg(long, default_value_t = 42, allow_negative_numbers = true)]
    pub seed: u64,
    /// replace --output even if it is not empty or is --model itself (built beside it, swapped in when
    /// complete)
    #[arg(long)]
    pub force: bool,
}

pub fn convert(a: &ConvertArgs) -> Result<()> {
    let same = match (a.model.canonicalize(), a.output.canonicalize()) {
        (Ok(m), Ok(o)) => m == o,
        _ => false,
    };
    if same && !a.force {
        bail!(
            "--output {} is the --model directory: converting in place would replace the original weights \
             ({} → {} may lose precision); choose another --output, or pass --force to replace it \
             (written beside it and swapped in when complete)",
            a.output.display(),
            checkpoint_dtype(&a.model),
            a.dtype
        );
    }
    crate::util::check_output_dir(&a.output, a.force)?;
    let be = crate::cpu::Cpu::new();
    let dt = crate::tensor::DType::parse(&a.dtype)?;
    let (cfg, params, rep) = checkpoint::load(&be, &a.model, crate::tensor::DType::F32, a.seed)?;
    let host = checkpoint::to_hf_host(&be, &cfg, &params)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let weights = checkpoint::safetensors_bytes_as(&host, Some(meta), dt)?;
    let mut conf = match checkpoint::raw_config(&a.model) {
        Some(c) if c.is_object() => c,
        _ => serde_json::to_value(&cfg)?,
    };
    conf["architectures"] = serde_json::json!(["BertForQuestionAnswering"]);
    checkpoint::set_config_dtype(&mut conf, dt)?;
    let conf = serde_json::to_string_pretty(&conf)?;
    // everything is read from --model before anything replaces --output (they may be the same directory)
    let mut tok_files = vec![];
    for f in checkpoint::TOKENIZER_FILES {
        let p = a.model.join(f);
        if p.exists() {
            tok_files.push((
                *f,
                std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
            ));
        }
    }
    crate::util::replace_dir(&a.output, |tmp| {
        crate::util::write_atomic(&tmp.join("model.safetensors"), &weights)?;
        crate::util::write_atomic(&tmp.join("config.json"), conf.as_bytes())?;
        for (f, bytes) in &tok_files {
            crate::util::write_atomic(&tmp.join(f), bytes)?;
        }
        Ok(())
    })?;
    crate::util::print_line(format_args!(
        "{} → {} ({dt}{})",
        a.model.display(),
        a.output.display(),
        if rep.qa_head_initialised {
            format!(", span head initialised with seed {}", a.seed)
        } else {
            String::new()
        }
    ))
    .with_context(|| format!("{} is written", a.output.display()))
}

/// The dtype(s) of a model directory's weights, for messages.
fn checkpoint_dtype(dir: &std::path::Path) -> String {
    checkpoint::model_dtype(dir)
}
