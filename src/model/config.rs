//! `BertConfig`, read from a Hugging Face config.json.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn d_vocab() -> usize {
    30522
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_drop() -> f32 {
    0.1
}
fn d_pos() -> usize {
    512
}
fn d_types() -> usize {
    2
}
fn d_init() -> f32 {
    0.02
}
fn d_eps() -> f32 {
    1e-12
}

/// An f32 setting written as the shortest decimal that reads back as it (`0.1`, not the f32's exact
/// `0.10000000149011612`): config.json keeps the numbers its author wrote.
fn short_f32<S: serde::Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(format!("{x}").parse::<f64>().unwrap_or(*x as f64))
}

/// The fields of HF's BertConfig that define the computation (defaults are HF's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_drop", serialize_with = "short_f32")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "d_drop", serialize_with = "short_f32")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "d_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_types")]
    pub type_vocab_size: usize,
    #[serde(default = "d_init", serialize_with = "short_f32")]
    pub initializer_range: f32,
    #[serde(default = "d_eps", serialize_with = "short_f32")]
    pub layer_norm_eps: f32,
    /// The \[PAD\] id: its word embedding gets no gradient (as nn.Embedding(padding_idx) in HF).
    #[serde(default)]
    pub pad_token_id: Option<i32>,
}

impl BertConfig {
    /// Parse config.json; unknown fields are kept by the caller (see checkpoint::save) and ignored here.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{origin}: not valid JSON"))?;
        if !v.is_object() {
            let kind = match v {
                serde_json::Value::Array(_) => "a list",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            };
            bail!("{origin}: config.json must be a JSON object (got {kind})");
        }
        // settings that change the computation and that this BERT does not implement: refused, not ignored
        if v.get("is_decoder").and_then(|b| b.as_bool()) == Some(true) {
            bail!(
                "{origin}: unsupported config: is_decoder = true (a causal decoder; bertqa computes BERT's \
                 bidirectional encoder)"
            );
        }
        match v.get("position_embedding_type") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) if s == "absolute" => {}
            Some(other) => bail!(
                "{origin}: unsupported config: position_embedding_type {other} (only \"absolute\")"
            ),
        }
        let cfg: BertConfig = serde_path_to_error::deserialize(v).map_err(|e| {
            let field = e.path().to_string();
            anyhow::anyhow!("{origin}: field {field}: {}", e.into_inner())
        })?;
        cfg.validate()
            .with_context(|| format!("{origin}: unsupported config"))?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Shapes and constants that a model can be built and run with; errors name the config.json field.
    pub fn validate(&self) -> Result<()> {
        for (name, v, min) in [
            ("vocab_size", self.vocab_size, 1),
            ("hidden_size", self.hidden_size, 1),
            ("num_hidden_layers", self.num_hidden_layers, 1),
            ("num_attention_heads", self.num_attention_heads, 1),
            ("intermediate_size", self.intermediate_size, 1),
            ("max_position_embeddings", self.max_position_embeddings, 1),
            // features use token types 0 (question) and 1 (context)
            ("type_vocab_size", self.type_vocab_size, 2),
        ] {
            if v < min {
                bail!("{name} = {v} must be ≥ {min}");
            }
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            bail!(
                "layer_norm_eps = {} must be a positive finite number (e.g. 1e-12)",
                self.layer_norm_eps
            );
        }
        if !(self.initializer_range.is_finite() && self.initializer_range >= 0.0) {
            bail!(
                "initializer_range = {} must be a finite number ≥ 0",
                self.initializer_range
            );
        }
        if let Some(p) = self.pad_token_id {
            if p >= 0 && p as usize >= self.vocab_size {
                bail!(
                    "pad_token_id = {p} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                );
            }
        }
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_python") {
            bail!(
                "hidden_act {:?} is not supported (only the exact erf \"gelu\")",
                self.hidden_act
            );
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("{name} = {p} must be in [0, 1)");
            }
        }
        Ok(())
    }

    /// A small config for tests: hidden `c`, `l` layers, `nh` heads, vocabulary `v`, positions `p`.
    pub fn tiny(v: usize, c: usize, l: usize, nh: usize, f: usize, p: usize) -> Self {
        BertConfig {
            vocab_size: v,
            hidden_size: c,
            num_hidden_layers: l,
            num_attention_heads: nh,
            intermediate_size: f,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: p,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
        }
    }

    /// BERT-base shapes (random weights are used for speed work).
    pub fn bert_base() -> Self {
        Self::tiny(30522, 768, 12, 12, 3072, 512)
    }

    /// [`BertConfig::num_params`], or None where it is more than can be counted.
    pub fn num_params_checked(&self) -> Option<usize> {
        let (c, f, l) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        );
        let m = |a: usize, b: usize| a.checked_mul(b);
        let emb = self
            .vocab_size
            .checked_add(self.max_position_embeddings)?
            .checked_add(self.type_vocab_size)?
            .checked_add(2)?
            .checked_mul(c)?;
        let layer = m(4, m(c, c)?)?
            .checked_add(m(2, m(c, f)?)?)?
            .checked_add(m(9, c)?)?
            .checked_add(f)?;
        emb.checked_add(m(l, layer)?)?
            .checked_add(m(2, c)?)?
            .checked_add(2)
    }

    /// Parameter count (without the pooler).
    pub fn num_params(&self) -> usize {
        let (c, f, l) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        );
        let emb =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * c + 2 * c;
        let layer = 4 * c * c + 4 * c + 2 * c * f + f + c + 4 * c;
        emb + l * layer + 2 * c + 2
    }

    /// FLOPs of one training step (forward + backward ≈ 3× forward) per sequence of length `t`, counting the
    /// GEMMs and the attention matmuls (2 FLOPs per multiply-add).
    pub fn train_flops_per_seq(&self, t: usize) -> f64 {
        let (c, f, l) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            self.num_hidden_layers as f64,
        );
        let t = t as f64;
        let gemm = 2.0 * t * (4.0 * c * c + 2.0 * c * f) * l + 2.0 * t * c * 2.0;
        let attn = 2.0 * 2.0 * t * t * c * l;
        3.0 * (gemm + attn)
    }
}
