//! BERT-for-QA parameters in one flat buffer with per-tensor views (the same struct holds master weights,
//! working weights, gradients and both Adam moments — each its own flat buffer with the same layout).
//!
//! Names follow Hugging Face's; Q, K and V are stored fused as one `(3C, C)` matrix (rows: query, key, value)
//! so the projection is one GEMM — checkpoint.rs splits and joins HF's three tensors.
//!
//! Why flat (llm.c does the same): zeroing the gradients is one memset, the gradient norm one reduction,
//! AdamW one launch with no per-step pointer table, a cast of all weights one kernel, and the data-parallel
//! all-reduce one collective call. The layout ([`FlatLayout`]) puts every tensor that gets weight decay (the
//! matrices) first and the rest (biases, LayerNorm weights) after, so one boundary, `n_decay`, tells AdamW
//! which is which; every tensor starts at a multiple of [`ALIGN`] elements (16-byte vector loads, 256-byte
//! GEMM operands in f32), and the gaps hold zeros that stay zero. Files never see the layout: checkpoints are
//! written from the views, one tensor per name.

use crate::backend::BackendCore;
use crate::model::config::BertConfig;
use crate::tensor::{encode_f64, DType, Tensor};
use anyhow::{bail, Result};
use std::sync::Arc;

/// Every tensor's offset in a flat buffer is a multiple of this many elements.
pub const ALIGN: usize = 64;

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

/// The parameters: views into one flat buffer.
pub struct BertParams<B: BackendCore> {
    pub emb: EmbeddingParams<B>,
    pub layers: Vec<LayerParams<B>>, // L of them: encoder.layer.{l}
    pub qa_w: Tensor<B>,             // (2, C)  qa_outputs.weight
    pub qa_b: Tensor<B>,             // (2)     qa_outputs.bias
    flat: Tensor<B>,
    layout: Arc<FlatLayout>,
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

/// One tensor's place in the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// first element, a multiple of [`ALIGN`]
    pub offset: usize,
    pub decay: bool,
}

impl FlatEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where every parameter lives in a flat buffer: entries in [`param_specs`] order, offsets decayed-first.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    pub entries: Vec<FlatEntry>,
    /// elements in the buffer (the last tensor's end, rounded up to [`ALIGN`])
    pub total: usize,
    /// elements `0..n_decay` belong to tensors with weight decay, the rest to tensors without
    pub n_decay: usize,
}

impl FlatLayout {
    pub fn new(cfg: &BertConfig) -> FlatLayout {
        let specs = param_specs(cfg);
        let mut offsets = vec![0; specs.len()];
        let mut next = 0usize;
        let mut n_decay = 0;
        for pass_decay in [true, false] {
            for (i, (name, shape)) in specs.iter().enumerate() {
                if decays(name) == pass_decay {
                    offsets[i] = next;
                    next = (next + shape.iter().product::<usize>()).div_ceil(ALIGN) * ALIGN;
                }
            }
            if pass_decay {
                n_decay = next;
            }
        }
        let entries = specs
            .into_iter()
            .zip(offsets)
            .map(|((name, shape), offset)| FlatEntry {
                decay: decays(&name),
                name,
                shape,
                offset,
            })
            .collect();
        FlatLayout {
            entries,
            total: next.max(ALIGN),
            n_decay,
        }
    }

    /// The entry of internal name `name`.
    pub fn entry(&self, name: &str) -> Option<&FlatEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Elements holding parameters (without the alignment gaps).
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|e| e.numel()).sum()
    }
}

impl<B: BackendCore> BertParams<B> {
    /// All zeros, in `dtype`: one allocation of `layout.total` elements and a view per tensor.
    pub fn zeros(be: &B, cfg: &BertConfig, dtype: DType) -> Result<Self> {
        Self::with_layout(be, Arc::new(FlatLayout::new(cfg)), dtype)
    }

    fn with_layout(be: &B, layout: Arc<FlatLayout>, dtype: DType) -> Result<Self> {
        let flat = Tensor::zeros(be, &[layout.total], dtype)?;
        let mut views = Vec::with_capacity(layout.entries.len());
        for e in &layout.entries {
            views.push(flat.view(be, e.offset, &e.shape)?);
        }
        let n_layers = (layout.entries.len() - 7) / 12;
        let mut it = views.into_iter();
        // `param_specs` order, which FlatLayout keeps
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
        Ok(BertParams {
            emb,
            layers,
            qa_w,
            qa_b,
            flat,
            layout,
        })
    }

    /// Parameters in `dtype` from host values: `f(name, shape)` gives each tensor's values (row-major), in
    /// [`param_specs`] order. One upload of the whole flat buffer.
    pub fn from_host(
        be: &B,
        cfg: &BertConfig,
        dtype: DType,
        mut f: impl FnMut(&str, &[usize]) -> Result<Vec<f64>>,
    ) -> Result<Self> {
        let mut p = Self::zeros(be, cfg, dtype)?;
        let mut host = vec![0.0f64; p.layout.total];
        for e in &p.layout.entries {
            let v = f(&e.name, &e.shape)?;
            if v.len() != e.numel() {
                bail!(
                    "parameter {}: {} values for shape {:?}",
                    e.name,
                    v.len(),
                    e.shape
                );
            }
            host[e.offset..e.offset + v.len()].copy_from_slice(&v);
        }
        be.upload(&mut p.flat.buf, dtype, &encode_f64(&host, dtype))?;
        Ok(p)
    }

    /// The layout of the flat buffer.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The whole flat buffer (`layout().total` elements).
    pub fn flat(&self) -> &Tensor<B> {
        &self.flat
    }

    /// The whole flat buffer, writable (while it is borrowed, no per-tensor view can be used).
    pub fn flat_mut(&mut self) -> &mut Tensor<B> {
        &mut self.flat
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

    /// Zero every tensor: one memset of the flat buffer.
    pub fn zero_(&mut self, be: &B) -> Result<()> {
        self.flat.zero_(be)
    }

    /// A copy in `dtype` (the same layout): one cast of the flat buffer.
    pub fn cast(&self, be: &B, dtype: DType) -> Result<Self> {
        let mut p = Self::with_layout(be, self.layout.clone(), dtype)?;
        p.flat.assign(be, &self.flat)?;
        Ok(p)
    }

    /// Overwrite with `src`'s values (any float dtype, the same layout): one cast of the flat buffer.
    pub fn assign(&mut self, be: &B, src: &BertParams<B>) -> Result<()> {
        if *self.layout != *src.layout {
            bail!("assign: the parameter layouts differ (different configs?)");
        }
        self.flat.assign(be, &src.flat)
    }

    pub fn dtype(&self) -> DType {
        self.flat.dtype()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;

    #[test]
    fn layout_is_aligned_decay_first_and_covers_every_tensor() {
        let cfg = BertConfig::tiny(101, 24, 2, 2, 40, 33);
        let l = FlatLayout::new(&cfg);
        assert_eq!(l.entries.len(), param_specs(&cfg).len());
        let mut spans: Vec<(usize, usize)> = vec![];
        for e in &l.entries {
            assert_eq!(e.offset % ALIGN, 0, "{}", e.name);
            assert!(e.offset + e.numel() <= l.total);
            // decayed tensors before the boundary, the rest after
            assert_eq!(e.offset + e.numel() <= l.n_decay, e.decay, "{}", e.name);
            spans.push((e.offset, e.offset + e.numel()));
        }
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlap");
        assert_eq!(l.num_params(), cfg.num_params());
        assert_eq!(cfg.num_params_checked(), Some(cfg.num_params()));
    }

    #[test]
    fn views_write_into_the_flat_buffer() {
        let be = Cpu::new();
        let cfg = BertConfig::tiny(11, 8, 1, 2, 16, 5);
        let mut p = BertParams::from_host(&be, &cfg, DType::F32, |name, shape| {
            let n: usize = shape.iter().product();
            Ok(vec![if name == "qa_outputs.bias" { 7.0 } else { 1.0 }; n])
        })
        .unwrap();
        let flat = p.flat().to_f64_vec(&be).unwrap();
        let e = p.layout().entry("qa_outputs.bias").unwrap().clone();
        assert_eq!(&flat[e.offset..e.offset + 2], &[7.0, 7.0]);
        // the gaps are zero; every parameter element is 1 or 7
        let ones = flat.iter().filter(|&&x| x == 1.0).count();
        assert_eq!(ones + 2, cfg.num_params());
        p.qa_b.copy_from_f64(&be, &[3.0, 4.0]).unwrap();
        assert_eq!(
            &p.flat().to_f64_vec(&be).unwrap()[e.offset..e.offset + 2],
            &[3.0, 4.0]
        );
        p.zero_(&be).unwrap();
        assert!(p.qa_b.to_f64_vec(&be).unwrap().iter().all(|&x| x == 0.0));
        let b16 = p.cast(&be, DType::BF16).unwrap();
        assert_eq!(b16.qa_w.dtype(), DType::BF16);
        assert_eq!(b16.flat().numel(), p.flat().numel());
    }
}
