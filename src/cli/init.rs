//! `bertqa init-random`: a randomly initialised BertForQuestionAnswering directory (for tests and speed work:
//! e.g. BERT-base shapes without a pretrained checkpoint).

use crate::model::{checkpoint, BertConfig};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InitArgs {
    /// take the tokenizer files (and vocabulary size) from this model directory
    #[arg(long)]
    pub tokenizer_from: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 768)]
    pub hidden_size: usize,
    #[arg(long, default_value_t = 12)]
    pub layers: usize,
    #[arg(long, default_value_t = 12)]
    pub heads: usize,
    #[arg(long, default_value_t = 3072)]
    pub intermediate_size: usize,
    #[arg(long, default_value_t = 512)]
    pub max_position_embeddings: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: &InitArgs) -> Result<()> {
    let vocab = BertConfig::from_file(&a.tokenizer_from.join("config.json"))
        .map(|c| c.vocab_size)
        .unwrap_or(30522);
    let cfg = BertConfig::tiny(
        vocab,
        a.hidden_size,
        a.layers,
        a.heads,
        a.intermediate_size,
        a.max_position_embeddings,
    );
    cfg.validate()?;
    checkpoint::write_random_model(&a.output, &cfg, a.seed, &a.tokenizer_from)?;
    println!(
        "{}: random BertForQuestionAnswering, {:.1}M parameters",
        a.output.display(),
        cfg.num_params() as f64 / 1e6
    );
    Ok(())
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
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    /// seed of the span-head initialisation when the source has no qa_outputs
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub fn convert(a: &ConvertArgs) -> Result<()> {
    let be = crate::cpu::Cpu::new();
    let dt = crate::tensor::DType::parse(&a.dtype)?;
    let (cfg, params, rep) = checkpoint::load(&be, &a.model, crate::tensor::DType::F32, a.seed)?;
    std::fs::create_dir_all(&a.output)?;
    let host = checkpoint::to_hf_host(&be, &cfg, &params)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::util::write_atomic(
        &a.output.join("model.safetensors"),
        &checkpoint::safetensors_bytes_as(&host, Some(meta), dt)?,
    )?;
    let mut conf = checkpoint::raw_config(&a.model)
        .unwrap_or_else(|| serde_json::to_value(&cfg).unwrap_or_default());
    conf["architectures"] = serde_json::json!(["BertForQuestionAnswering"]);
    crate::util::write_atomic(
        &a.output.join("config.json"),
        serde_json::to_string_pretty(&conf)?.as_bytes(),
    )?;
    for f in checkpoint::TOKENIZER_FILES {
        let p = a.model.join(f);
        if p.exists() {
            std::fs::write(a.output.join(f), std::fs::read(&p)?)?;
        }
    }
    println!(
        "{} → {} ({dt}{})",
        a.model.display(),
        a.output.display(),
        if rep.qa_head_initialised {
            format!(", span head initialised with seed {}", a.seed)
        } else {
            String::new()
        }
    );
    Ok(())
}
