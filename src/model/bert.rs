//! BertForQuestionAnswering: whole forward and whole hand-written backward, written once for every backend.
//!
//! ```text
//! x0 = dropout(LN(word[ids] + pos + type[types]))                     (B,T,C)   embeddings (fused)
//! for l in 0..L:
//!   qkv = x·Wqkvᵀ + bqkv                                              (B,T,3C)
//!   att = attention(qkv, mask)            saves lse                   (B,T,C), lse (B,NH,T)
//!   ao  = att·Woᵀ + bo                                                (B,T,C)
//!   h   = LN1(x + dropout(ao))            saves sum1, mean1, rstd1    (B,T,C)
//!   pre = h·W1ᵀ + b1 ; f = gelu(pre)                                  (B,T,F)
//!   fo  = f·W2ᵀ + b2                                                  (B,T,C)
//!   x   = LN2(h + dropout(fo))            saves sum2, mean2, rstd2    (B,T,C)
//! logits = x·Wqaᵀ + bqa                                               (B,T,2)  [..,0] start, [..,1] end
//! loss = (CE(start) + CE(end)) / 2                                    span_loss
//! ```
//! Backward runs the same list in reverse. Parameter gradients accumulate; `dx` carries the residual stream.

use crate::model::config::BertConfig;
use crate::model::params::BertParams;
use crate::ops::embedding::{EmbGrads, EmbWeights};
use crate::ops::span_loss::SpanLossCfg;
use crate::ops::Backend;
use crate::rng::{site_seed, Dropout};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

/// One batch of windows on the device, plus the host copies the loss needs.
pub struct Batch<B: Backend> {
    pub ids: Tensor<B>,    // (B,T) i32 input_ids
    pub types: Tensor<B>,  // (B,T) i32 token_type_ids
    pub mask: Tensor<B>,   // (B,T) i32 attention_mask (1 real, 0 padding)
    pub starts: Tensor<B>, // (B) i32 start positions, clamped to [0,T] (T = ignored)
    pub ends: Tensor<B>,   // (B) i32 end positions, likewise
    pub host_mask: Vec<i32>,
    pub host_starts: Vec<i32>,
    pub host_ends: Vec<i32>,
    pub b: usize,
    pub t: usize,
}

impl<B: Backend> Batch<B> {
    /// From host arrays: ids/types/mask are (b·t) row-major; starts/ends may be empty (inference).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        be: &B,
        b: usize,
        t: usize,
        ids: &[i32],
        types: &[i32],
        mask: &[i32],
        starts: &[i64],
        ends: &[i64],
    ) -> Result<Self> {
        for (what, v) in [
            ("input_ids", ids),
            ("token_type_ids", types),
            ("attention_mask", mask),
        ] {
            if v.len() != b * t {
                bail!(
                    "Batch::new: {what} has {} values, expected B·T = {b}·{t}",
                    v.len()
                );
            }
        }
        let (s, e) = if starts.is_empty() {
            (vec![t as i32; b], vec![t as i32; b])
        } else {
            if starts.len() != b || ends.len() != b {
                bail!(
                    "Batch::new: {} start and {} end positions for a batch of {b}",
                    starts.len(),
                    ends.len()
                );
            }
            (
                crate::ops::span_loss::clamp_positions(starts, t),
                crate::ops::span_loss::clamp_positions(ends, t),
            )
        };
        Ok(Batch {
            ids: Tensor::from_i32(be, ids, &[b, t])?,
            types: Tensor::from_i32(be, types, &[b, t])?,
            mask: Tensor::from_i32(be, mask, &[b, t])?,
            starts: Tensor::from_i32(be, &s, &[b])?,
            ends: Tensor::from_i32(be, &e, &[b])?,
            host_mask: mask.to_vec(),
            host_starts: s,
            host_ends: e,
            b,
            t,
        })
    }
}

/// Dropout probabilities and the seed of this step (masks are derived per site from it).
#[derive(Clone, Copy, Debug)]
pub struct DropoutCfg {
    pub hidden: f32,
    pub attn: f32,
    pub seed: u64,
}

impl DropoutCfg {
    pub const OFF: DropoutCfg = DropoutCfg {
        hidden: 0.0,
        attn: 0.0,
        seed: 0,
    };
    fn site(&self, layer: usize, site: u64, p: f32) -> Dropout {
        if p <= 0.0 {
            Dropout::OFF
        } else {
            Dropout::new(p, site_seed(self.seed, layer as u64, site))
        }
    }
    pub fn emb(&self, n_layers: usize) -> Dropout {
        self.site(n_layers, 3, self.hidden)
    }
    pub fn attn(&self, l: usize) -> Dropout {
        self.site(l, 0, self.attn)
    }
    pub fn hidden1(&self, l: usize) -> Dropout {
        self.site(l, 1, self.hidden)
    }
    pub fn hidden2(&self, l: usize) -> Dropout {
        self.site(l, 2, self.hidden)
    }
}

/// Saved activations of one layer.
pub struct LayerActs<B: Backend> {
    pub qkv: Tensor<B>,   // (B,T,3C)
    pub att: Tensor<B>,   // (B,T,C)
    pub lse: Tensor<B>,   // (B,NH,T) stat dtype
    pub ao: Tensor<B>,    // (B,T,C)
    pub sum1: Tensor<B>,  // (B,T,C)  x + dropout(ao)
    pub h: Tensor<B>,     // (B,T,C)  LN1 output
    pub mean1: Tensor<B>, // (B,T)
    pub rstd1: Tensor<B>, // (B,T)
    pub pre: Tensor<B>,   // (B,T,F)  before GELU
    pub f: Tensor<B>,     // (B,T,F)  after GELU
    pub fo: Tensor<B>,    // (B,T,C)
    pub sum2: Tensor<B>,  // (B,T,C)  h + dropout(fo)
    pub out: Tensor<B>,   // (B,T,C)  LN2 output = next layer's input
    pub mean2: Tensor<B>, // (B,T)
    pub rstd2: Tensor<B>, // (B,T)
}

/// Everything forward saves, plus backward's scratch buffers; allocated once per (B, T) and reused.
pub struct Acts<B: Backend> {
    pub b: usize,
    pub t: usize,
    pub emb: Tensor<B>,      // (B,T,C)  embeddings output = layer 0 input
    pub emb_mean: Tensor<B>, // (B,T)
    pub emb_rstd: Tensor<B>, // (B,T)
    pub layers: Vec<LayerActs<B>>,
    pub logits: Tensor<B>, // (B,T,2)
    pub losses: Tensor<B>, // (B,2) stat dtype
    // backward scratch
    pub dlogits: Tensor<B>, // (B,T,2)
    pub dx: Tensor<B>,      // (B,T,C)  gradient of the residual stream
    pub dh: Tensor<B>,      // (B,T,C)
    pub dsub: Tensor<B>,    // (B,T,C)  d(ao) or d(fo)
    pub datt: Tensor<B>,    // (B,T,C)
    pub dqkv: Tensor<B>,    // (B,T,3C)
    pub df: Tensor<B>,      // (B,T,F)
    pub dpre: Tensor<B>,    // (B,T,F)
}

impl<B: Backend> Acts<B> {
    pub fn new(be: &B, cfg: &BertConfig, b: usize, t: usize, dtype: DType) -> Result<Self> {
        let (c, f, nh) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
        );
        let sd = stat_dtype(dtype);
        let z = |s: &[usize], d: DType| Tensor::zeros(be, s, d);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            layers.push(LayerActs {
                qkv: z(&[b, t, 3 * c], dtype)?,
                att: z(&[b, t, c], dtype)?,
                lse: z(&[b, nh, t], sd)?,
                ao: z(&[b, t, c], dtype)?,
                sum1: z(&[b, t, c], dtype)?,
                h: z(&[b, t, c], dtype)?,
                mean1: z(&[b, t], sd)?,
                rstd1: z(&[b, t], sd)?,
                pre: z(&[b, t, f], dtype)?,
                f: z(&[b, t, f], dtype)?,
                fo: z(&[b, t, c], dtype)?,
                sum2: z(&[b, t, c], dtype)?,
                out: z(&[b, t, c], dtype)?,
                mean2: z(&[b, t], sd)?,
                rstd2: z(&[b, t], sd)?,
            });
        }
        Ok(Acts {
            b,
            t,
            emb: z(&[b, t, c], dtype)?,
            emb_mean: z(&[b, t], sd)?,
            emb_rstd: z(&[b, t], sd)?,
            layers,
            logits: z(&[b, t, 2], dtype)?,
            losses: z(&[b, 2], sd)?,
            dlogits: z(&[b, t, 2], dtype)?,
            dx: z(&[b, t, c], dtype)?,
            dh: z(&[b, t, c], dtype)?,
            dsub: z(&[b, t, c], dtype)?,
            datt: z(&[b, t, c], dtype)?,
            dqkv: z(&[b, t, 3 * c], dtype)?,
            df: z(&[b, t, f], dtype)?,
            dpre: z(&[b, t, f], dtype)?,
        })
    }

    /// Bytes held (saved activations + scratch), for memory planning.
    pub fn bytes(&self) -> usize {
        let mut n = 0;
        let mut add = |t: &Tensor<B>| n += t.numel() * t.dtype().size();
        for t in [
            &self.emb,
            &self.emb_mean,
            &self.emb_rstd,
            &self.logits,
            &self.losses,
            &self.dlogits,
            &self.dx,
            &self.dh,
            &self.dsub,
            &self.datt,
            &self.dqkv,
            &self.df,
            &self.dpre,
        ] {
            add(t);
        }
        for l in &self.layers {
            for t in [
                &l.qkv, &l.att, &l.lse, &l.ao, &l.sum1, &l.h, &l.mean1, &l.rstd1, &l.pre, &l.f,
                &l.fo, &l.sum2, &l.out, &l.mean2, &l.rstd2,
            ] {
                add(t);
            }
        }
        n
    }

    /// The encoder output (B,T,C).
    pub fn last_hidden(&self) -> &Tensor<B> {
        self.layers.last().map(|l| &l.out).unwrap_or(&self.emb)
    }
}

/// Statistics (LN mean/rstd, attention lse, losses) are f32, or f64 when the activations are f64.
pub fn stat_dtype(act: DType) -> DType {
    crate::ops::compute_dtype(act)
}

/// Gradients, master weights and moments are f32 (f64 for f64 activations).
pub fn grad_dtype(act: DType) -> DType {
    crate::ops::compute_dtype(act)
}

/// The model: config plus weights in the working dtype.
pub struct BertQa<B: Backend> {
    pub cfg: BertConfig,
    pub params: BertParams<B>,
    /// Exclude padding positions from the span softmax (see ops::span_loss). Default true.
    pub mask_padding_in_loss: bool,
}

/// What forward_loss reports.
#[derive(Clone, Copy, Debug)]
pub struct LossOut {
    pub loss: f64,
    pub n_start: usize,
    pub n_end: usize,
}

impl<B: Backend> BertQa<B> {
    pub fn new(cfg: BertConfig, params: BertParams<B>) -> Self {
        BertQa {
            cfg,
            params,
            mask_padding_in_loss: true,
        }
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype()
    }

    /// Forward through the span head: fills `acts` (logits in `acts.logits`).
    pub fn forward(
        &self,
        be: &B,
        acts: &mut Acts<B>,
        batch: &Batch<B>,
        drop: DropoutCfg,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (eps, nl) = (cfg.layer_norm_eps, cfg.num_hidden_layers);
        if acts.b != batch.b || acts.t != batch.t {
            bail!(
                "forward: activations are for (B,T) = ({}, {}), batch is ({}, {})",
                acts.b,
                acts.t,
                batch.b,
                batch.t
            );
        }
        let p = &self.params;
        let e = &p.emb;
        let ew = EmbWeights {
            word: &e.word,
            pos: &e.pos,
            ttype: &e.ttype,
            gamma: &e.ln_g,
            beta: &e.ln_b,
        };
        be.embeddings_forward(
            &mut acts.emb,
            &mut acts.emb_mean,
            &mut acts.emb_rstd,
            &batch.ids,
            &batch.types,
            &ew,
            eps,
            drop.emb(nl),
        )?;
        self.forward_encoder(be, acts, batch, drop)
    }

    /// The encoder layers and the span head, from `acts.emb` (the embeddings output) — the second half of
    /// [`BertQa::forward`], callable on its own (the gradient checks perturb the embeddings output).
    pub fn forward_encoder(
        &self,
        be: &B,
        acts: &mut Acts<B>,
        batch: &Batch<B>,
        drop: DropoutCfg,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (nh, eps, nl) = (
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
            cfg.num_hidden_layers,
        );
        let p = &self.params;
        for l in 0..nl {
            let (done, rest) = acts.layers.split_at_mut(l);
            let x = if l == 0 { &acts.emb } else { &done[l - 1].out };
            let a = &mut rest[0];
            let w = &p.layers[l];
            be.linear_forward(&mut a.qkv, x, &w.qkv_w, Some(&w.qkv_b))?;
            be.attention_forward(
                &mut a.att,
                &mut a.lse,
                &a.qkv,
                &batch.mask,
                nh,
                drop.attn(l),
            )?;
            be.linear_forward(&mut a.ao, &a.att, &w.ao_w, Some(&w.ao_b))?;
            be.residual_layernorm_forward(
                &mut a.h,
                &mut a.sum1,
                &mut a.mean1,
                &mut a.rstd1,
                &a.ao,
                x,
                &w.ln1_g,
                &w.ln1_b,
                eps,
                drop.hidden1(l),
            )?;
            be.linear_forward(&mut a.pre, &a.h, &w.ff1_w, Some(&w.ff1_b))?;
            be.gelu_forward(&mut a.f, &a.pre)?;
            be.linear_forward(&mut a.fo, &a.f, &w.ff2_w, Some(&w.ff2_b))?;
            be.residual_layernorm_forward(
                &mut a.out,
                &mut a.sum2,
                &mut a.mean2,
                &mut a.rstd2,
                &a.fo,
                &a.h,
                &w.ln2_g,
                &w.ln2_b,
                eps,
                drop.hidden2(l),
            )?;
        }
        let last = acts.layers.last().map(|l| &l.out).unwrap_or(&acts.emb);
        be.linear_forward(&mut acts.logits, last, &p.qa_w, Some(&p.qa_b))?;
        Ok(())
    }

    /// Span loss of the last forward, and `dlogits` (scaled by `loss_scale`) for backward.
    pub fn loss(
        &self,
        be: &B,
        acts: &mut Acts<B>,
        batch: &Batch<B>,
        loss_scale: f64,
    ) -> Result<LossOut> {
        let (b, t) = (batch.b, batch.t);
        let valid = |tgt: i32, bi: usize| {
            (tgt as usize) < t
                && (!self.mask_padding_in_loss || batch.host_mask[bi * t + tgt as usize] != 0)
        };
        let n_start = (0..b).filter(|&i| valid(batch.host_starts[i], i)).count();
        let n_end = (0..b).filter(|&i| valid(batch.host_ends[i], i)).count();
        let cfg = SpanLossCfg {
            mask_padding: self.mask_padding_in_loss,
            scale_start: if n_start > 0 {
                loss_scale / (2.0 * n_start as f64)
            } else {
                0.0
            },
            scale_end: if n_end > 0 {
                loss_scale / (2.0 * n_end as f64)
            } else {
                0.0
            },
        };
        be.span_loss_forward_backward(
            &mut acts.losses,
            &mut acts.dlogits,
            &acts.logits,
            &batch.starts,
            &batch.ends,
            &batch.mask,
            cfg,
        )?;
        let ls = acts.losses.to_f64_vec(be)?;
        let (mut s, mut e) = (0.0, 0.0);
        for i in 0..b {
            s += ls[2 * i];
            e += ls[2 * i + 1];
        }
        let ms = if n_start > 0 { s / n_start as f64 } else { 0.0 };
        let me = if n_end > 0 { e / n_end as f64 } else { 0.0 };
        Ok(LossOut {
            loss: (ms + me) / 2.0,
            n_start,
            n_end,
        })
    }

    /// Backward from `acts.dlogits` (set by [`BertQa::loss`]); accumulates into `grads`.
    pub fn backward(
        &self,
        be: &B,
        grads: &mut BertParams<B>,
        acts: &mut Acts<B>,
        batch: &Batch<B>,
        drop: DropoutCfg,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (nh, nl) = (cfg.num_attention_heads, cfg.num_hidden_layers);
        let p = &self.params;
        let Acts {
            emb,
            emb_mean,
            emb_rstd,
            layers,
            dlogits,
            dx,
            dh,
            dsub,
            datt,
            dqkv,
            df,
            dpre,
            ..
        } = acts;
        {
            let last = layers.last().map(|l| &l.out).unwrap_or(emb);
            be.linear_backward(
                Some(dx),
                false,
                &mut grads.qa_w,
                Some(&mut grads.qa_b),
                dlogits,
                last,
                &p.qa_w,
            )?;
        }
        for l in (0..nl).rev() {
            let a = &layers[l];
            let x = if l == 0 { &*emb } else { &layers[l - 1].out };
            let w = &p.layers[l];
            let g = &mut grads.layers[l];
            // x_out = LN2(h + dropout(fo)): dx → dfo (dsub), dh
            be.residual_layernorm_backward(
                dsub,
                dh,
                &mut g.ln2_g,
                &mut g.ln2_b,
                dx,
                &a.sum2,
                &a.mean2,
                &a.rstd2,
                &w.ln2_g,
                drop.hidden2(l),
            )?;
            be.linear_backward(
                Some(df),
                false,
                &mut g.ff2_w,
                Some(&mut g.ff2_b),
                dsub,
                &a.f,
                &w.ff2_w,
            )?;
            be.gelu_backward(dpre, df, &a.pre)?;
            be.linear_backward(
                Some(dh),
                true,
                &mut g.ff1_w,
                Some(&mut g.ff1_b),
                dpre,
                &a.h,
                &w.ff1_w,
            )?;
            // h = LN1(x + dropout(ao)): dh → dao (dsub), dx
            be.residual_layernorm_backward(
                dsub,
                dx,
                &mut g.ln1_g,
                &mut g.ln1_b,
                dh,
                &a.sum1,
                &a.mean1,
                &a.rstd1,
                &w.ln1_g,
                drop.hidden1(l),
            )?;
            be.linear_backward(
                Some(datt),
                false,
                &mut g.ao_w,
                Some(&mut g.ao_b),
                dsub,
                &a.att,
                &w.ao_w,
            )?;
            be.attention_backward(
                dqkv,
                datt,
                &a.att,
                &a.lse,
                &a.qkv,
                &batch.mask,
                nh,
                drop.attn(l),
            )?;
            be.linear_backward(
                Some(dx),
                true,
                &mut g.qkv_w,
                Some(&mut g.qkv_b),
                dqkv,
                x,
                &w.qkv_w,
            )?;
        }
        let e = &p.emb;
        let ew = EmbWeights {
            word: &e.word,
            pos: &e.pos,
            ttype: &e.ttype,
            gamma: &e.ln_g,
            beta: &e.ln_b,
        };
        let ge = &mut grads.emb;
        let mut eg = EmbGrads {
            padding_idx: cfg.pad_token_id.unwrap_or(-1),
            word: &mut ge.word,
            pos: &mut ge.pos,
            ttype: &mut ge.ttype,
            gamma: &mut ge.ln_g,
            beta: &mut ge.ln_b,
        };
        be.embeddings_backward(
            &mut eg,
            dx,
            emb_mean,
            emb_rstd,
            &batch.ids,
            &batch.types,
            &ew,
            drop.emb(nl),
        )?;
        Ok(())
    }
}
