//! BERT-for-QA parameters as explicit structs (the same struct holds gradients and Adam moments).
//! Names follow Hugging Face's; Q, K and V are stored fused as one `(3C, C)` matrix (rows: query, key, value)
//! so the projection is one GEMM — checkpoint.rs splits and joins HF's three tensors.

use crate::backend::BackendCore;
use crate::model::config::BertConfig;
use crate::tensor::{DType, Tensor};
use anyhow::Result;

pub struct EmbeddingParams<B: BackendCore> {
    pub word: Tensor<B>,  // (V, C)   embeddings.word_embeddings.weight
    pub pos: Tensor<B>,   // (P, C)   embeddings.position_embeddings.weight
    pub ttype: Tensor<B>, // (TV, C)  embeddings.token_type_embeddings.weight
    pub ln_g: Tensor<B>,  // (C)      embeddings.LayerNorm.weight
    pub ln_b: Tensor<B>,  // (C)      embeddings.LayerNorm.bias
}

pub struct LayerParams<B: BackendCore> {
    pub qkv_w: Tensor<B>, // (3C, C)  attention.self.{query,key,value}.weight, stacked
    pub qkv_b: Tensor<B>, // (3C)     attention.self.{query,key,value}.bias, stacked
    pub ao_w: Tensor<B>,  // (C, C)   attention.output.dense.weight
    pub ao_b: Tensor<B>,  // (C)      attention.output.dense.bias
    pub ln1_g: Tensor<B>, // (C)      attention.output.LayerNorm.weight
    pub ln1_b: Tensor<B>, // (C)      attention.output.LayerNorm.bias
    pub ff1_w: Tensor<B>, // (F, C)   intermediate.dense.weight
    pub ff1_b: Tensor<B>, // (F)      intermediate.dense.bias
    pub ff2_w: Tensor<B>, // (C, F)   output.dense.weight
    pub ff2_b: Tensor<B>, // (C)      output.dense.bias
    pub ln2_g: Tensor<B>, // (C)      output.LayerNorm.weight
    pub ln2_b: Tensor<B>, // (C)      output.LayerNorm.bias
}

pub struct BertParams<B: BackendCore> {
    pub emb: EmbeddingParams<B>,
    pub layers: Vec<LayerParams<B>>, // L of them: encoder.layer.{l}
    pub qa_w: Tensor<B>,             // (2, C)  qa_outputs.weight
    pub qa_b: Tensor<B>,             // (2)     qa_outputs.bias
}

/// (internal name, shape) of every parameter, in a fixed order. Layer tensors are prefixed
/// `encoder.layer.{l}.`; the fused projection is named `attention.self.qkv.{weight,bias}`.
pub fn param_specs(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut v = vec![
        (
            "embeddings.word_embeddings.weight".to_string(),
            vec![cfg.vocab_size, c],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![cfg.max_position_embeddings, c],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![cfg.type_vocab_size, c],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![c]),
        ("embeddings.LayerNorm.bias".into(), vec![c]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}.");
        for (n, s) in [
            ("attention.self.qkv.weight", vec![3 * c, c]),
            ("attention.self.qkv.bias", vec![3 * c]),
            ("attention.output.dense.weight", vec![c, c]),
            ("attention.output.dense.bias", vec![c]),
            ("attention.output.LayerNorm.weight", vec![c]),
            ("attention.output.LayerNorm.bias", vec![c]),
            ("intermediate.dense.weight", vec![f, c]),
            ("intermediate.dense.bias", vec![f]),
            ("output.dense.weight", vec![c, f]),
            ("output.dense.bias", vec![c]),
            ("output.LayerNorm.weight", vec![c]),
            ("output.LayerNorm.bias", vec![c]),
        ] {
            v.push((format!("{p}{n}"), s));
        }
    }
    v.push(("qa_outputs.weight".into(), vec![2, c]));
    v.push(("qa_outputs.bias".into(), vec![2]));
    v
}

/// Weight decay applies to matrices only: not to biases, LayerNorm weights (BERT's recipe).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm"))
}

impl<B: BackendCore> BertParams<B> {
    /// Build from tensors in `param_specs` order.
    pub fn from_vec(cfg: &BertConfig, tensors: Vec<Tensor<B>>) -> Self {
        Self::from_tensors(cfg.num_hidden_layers, tensors)
    }

    /// Build from tensors in `param_specs` order for `n_layers` layers.
    pub fn from_tensors(n_layers: usize, tensors: Vec<Tensor<B>>) -> Self {
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("param_specs order");
        let emb = EmbeddingParams {
            word: next(),
            pos: next(),
            ttype: next(),
            ln_g: next(),
            ln_b: next(),
        };
        let mut layers = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            layers.push(LayerParams {
                qkv_w: next(),
                qkv_b: next(),
                ao_w: next(),
                ao_b: next(),
                ln1_g: next(),
                ln1_b: next(),
                ff1_w: next(),
                ff1_b: next(),
                ff2_w: next(),
                ff2_b: next(),
                ln2_g: next(),
                ln2_b: next(),
            });
        }
        let qa_w = next();
        let qa_b = next();
        BertParams {
            emb,
            layers,
            qa_w,
            qa_b,
        }
    }

    /// All zeros, in `dtype`.
    pub fn zeros(be: &B, cfg: &BertConfig, dtype: DType) -> Result<Self> {
        let ts = param_specs(cfg)
            .iter()
            .map(|(_, s)| Tensor::zeros(be, s, dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_vec(cfg, ts))
    }

    /// References in `param_specs` order.
    pub fn tensors(&self) -> Vec<&Tensor<B>> {
        let e = &self.emb;
        let mut v = vec![&e.word, &e.pos, &e.ttype, &e.ln_g, &e.ln_b];
        for l in &self.layers {
            v.extend([
                &l.qkv_w, &l.qkv_b, &l.ao_w, &l.ao_b, &l.ln1_g, &l.ln1_b, &l.ff1_w, &l.ff1_b,
                &l.ff2_w, &l.ff2_b, &l.ln2_g, &l.ln2_b,
            ]);
        }
        v.push(&self.qa_w);
        v.push(&self.qa_b);
        v
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor<B>> {
        let e = &mut self.emb;
        let mut v = vec![
            &mut e.word,
            &mut e.pos,
            &mut e.ttype,
            &mut e.ln_g,
            &mut e.ln_b,
        ];
        for l in &mut self.layers {
            v.extend([
                &mut l.qkv_w,
                &mut l.qkv_b,
                &mut l.ao_w,
                &mut l.ao_b,
                &mut l.ln1_g,
                &mut l.ln1_b,
                &mut l.ff1_w,
                &mut l.ff1_b,
                &mut l.ff2_w,
                &mut l.ff2_b,
                &mut l.ln2_g,
                &mut l.ln2_b,
            ]);
        }
        v.push(&mut self.qa_w);
        v.push(&mut self.qa_b);
        v
    }

    pub fn zero_(&mut self, be: &B) -> Result<()> {
        for t in self.tensors_mut() {
            t.zero_(be)?;
        }
        Ok(())
    }

    /// A copy of every tensor in `dtype`.
    pub fn cast(&self, be: &B, dtype: DType) -> Result<Self> {
        let ts = self
            .tensors()
            .into_iter()
            .map(|t| t.cast(be, dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_tensors(self.layers.len(), ts))
    }

    pub fn dtype(&self) -> DType {
        self.emb.word.dtype
    }
}
