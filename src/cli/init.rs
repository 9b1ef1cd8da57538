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
