//! BertForQuestionAnswering: whole forward and whole hand-written backward, written once for every backend,
//! on the N rows of a variable-length batch (src/model/batch.rs: packed, or padded).
//!
//! ```text
//! x0 = dropout(LN(word[ids] + pos[t] + type[types]))                 (N,C)    embeddings (fused)
//! for l in 0..L:
//!   qkv = x·Wqkvᵀ + bqkv                                              (N,3C)
//!   att = attention(qkv, seqs)            saves lse                   (N,C), lse (NH,N)
//!   ao  = att·Woᵀ                                                     (N,C)    (scratch)
//!   h   = LN1(x + dropout(ao + bo))       saves sum1, mean1, rstd1    (N,C)
//!   pre = h·W1ᵀ ; f = gelu(pre + b1)                                  (N,F)
//!   fo  = f·W2ᵀ                                                       (N,C)    (scratch)
//!   x   = LN2(h + dropout(fo + b2))       saves sum2, mean2, rstd2    (N,C)
//! logits = x·Wqaᵀ + bqa                                               (N,2)  [..,0] start, [..,1] end
//! loss = (CE(start) + CE(end)) / 2, CE per window over its positions   span_loss
//! ```
//! Each window attends only within itself (`seqs`); dropout masks come from the one stream of src/rng.rs,
//! keyed by window, position and feature. Backward runs the same list in reverse. Parameter gradients
//! accumulate; `dx` carries the residual stream.

use crate::model::acts::Acts;
use crate::model::batch::Batch;
use crate::model::config::BertConfig;
use crate::model::params::BertParams;
use crate::ops::embedding::{EmbGrads, EmbWeights};
use crate::ops::span_loss::SpanLossCfg;
use crate::ops::{Backend, STATS_LEN, STAT_LOSS_END, STAT_LOSS_START};
use crate::rng::{site_key, Dropout};
use crate::tensor::{DType, Tensor};
use anyhow::{anyhow, Result};

/// Dropout probabilities, the same for every step of a run. Each site's masks are keyed by the site
/// ([`site_key`]) and by the step's seed, which comes with the batch (`SeqLayout::step_seed`), so the
/// forward and backward of a batch launch the same kernels with the same parameters at every step.
#[derive(Clone, Copy, Debug)]
pub struct DropoutCfg {
    pub hidden: f32,
    pub attn: f32,
}

impl DropoutCfg {
    pub const OFF: DropoutCfg = DropoutCfg {
        hidden: 0.0,
        attn: 0.0,
    };
    fn site(&self, layer: usize, site: u64, p: f32) -> Dropout {
        if p <= 0.0 {
            Dropout::OFF
        } else {
            Dropout::new(p, site_key(layer as u64, site))
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

/// The span loss's sums of the per-window start and end losses over the windows whose target counts, and how
/// many those are (a step's, or a batch's: [`BertQa::loss_mean`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSums {
    pub start: f64,
    pub end: f64,
    pub n_start: usize,
    pub n_end: usize,
}

impl LossSums {
    /// The loss `(mean start CE + mean end CE) / 2` over the counted windows.
    pub fn mean(&self) -> f64 {
        let m = |s: f64, n: usize| if n > 0 { s / n as f64 } else { 0.0 };
        (m(self.start, self.n_start) + m(self.end, self.n_end)) / 2.0
    }
}

/// How the loss gradient is scaled: `dlogits` of a counted start target is `(softmax − onehot)·start`.
/// For the mean over `n_start` targets with loss scale `s`: `start = s / (2·n_start)` ([`LossScale::mean`]).
#[derive(Clone, Copy, Debug)]
pub struct LossScale {
    pub start: f64,
    pub end: f64,
}

impl LossScale {
    /// The scales of the mean loss over `n_start` and `n_end` counted targets (the whole optimizer step's:
    /// micro-batches and devices then add up to the same gradient), times `loss_scale`.
    pub fn mean(n_start: usize, n_end: usize, loss_scale: f64) -> LossScale {
        let f = |n: usize| {
            if n > 0 {
                loss_scale / (2.0 * n as f64)
            } else {
                0.0
            }
        };
        LossScale {
            start: f(n_start),
            end: f(n_end),
        }
    }

    /// Write the two scales into `t` ((2), stat dtype), where the span-loss kernel reads them: the scales
    /// change every step, so they travel in device memory, not in a kernel's parameters.
    pub fn write_to<B: Backend>(&self, be: &B, t: &mut Tensor<B>) -> Result<()> {
        t.copy_from_f64(be, &[self.start, self.end])
    }
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

    /// The counted (start, end) targets of `batch`.
    pub fn counted_targets(&self, batch: &Batch<B>) -> (usize, usize) {
        let h = &batch.host;
        let count = |end: bool| {
            (0..h.b())
                .filter(|&b| h.target_counts(b, end, self.mask_padding_in_loss))
                .count()
        };
        (count(false), count(true))
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
        let e = &self.params.emb;
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
            &batch.seqs,
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
        let seqs = &batch.seqs;
        let sub = &mut acts.sub;
        for l in 0..nl {
            let (done, rest) = acts.layers.split_at_mut(l);
            let x = if l == 0 { &acts.emb } else { &done[l - 1].out };
            let a = &mut rest[0];
            let w = &p.layers[l];
            be.linear_forward(&mut a.qkv, x, &w.qkv_w, Some(&w.qkv_b))?;
            be.attention_forward(&mut a.att, &mut a.lse, &a.qkv, seqs, nh, drop.attn(l))?;
            // the output and down projections' biases are added in the LayerNorm after them
            be.linear_forward(sub, &a.att, &w.ao_w, None)?;
            be.residual_layernorm_forward(
                &mut a.h,
                &mut a.sum1,
                &mut a.mean1,
                &mut a.rstd1,
                sub,
                Some(&w.ao_b),
                x,
                &w.ln1_g,
                &w.ln1_b,
                eps,
                drop.hidden1(l),
                seqs,
            )?;
            // the up-projection's bias is added in the GELU (forward and backward), like the output and down
            // projections' in the LayerNorm
            be.linear_forward(&mut a.pre, &a.h, &w.ff1_w, None)?;
            be.gelu_forward(&mut a.f, &a.pre, Some(&w.ff1_b))?;
            be.linear_forward(sub, &a.f, &w.ff2_w, None)?;
            be.residual_layernorm_forward(
                &mut a.out,
                &mut a.sum2,
                &mut a.mean2,
                &mut a.rstd2,
                sub,
                Some(&w.ff2_b),
                &a.h,
                &w.ln2_g,
                &w.ln2_b,
                eps,
                drop.hidden2(l),
                seqs,
            )?;
        }
        let last = acts.layers.last().map(|l| &l.out).unwrap_or(&acts.emb);
        be.linear_forward(&mut acts.logits, last, &p.qa_w, Some(&p.qa_b))?;
        Ok(())
    }

    /// The span loss of a batch: `dlogits` for backward (scaled by `scale`, (2) in the stat dtype: a
    /// [`LossScale`] written by [`LossScale::write_to`]), the per-window losses in `acts.losses`, and the
    /// batch's loss sums added to `stats` (the step's statistics, which stay on the device: see
    /// [`crate::ops::STATS_LEN`]).
    pub fn loss(
        &self,
        be: &B,
        acts: &mut Acts<B>,
        batch: &Batch<B>,
        scale: &Tensor<B>,
        stats: &mut Tensor<B>,
    ) -> Result<()> {
        let g = acts
            .grad
            .as_mut()
            .ok_or_else(|| anyhow!("loss: a forward-only activation plan has no dlogits"))?;
        let cfg = SpanLossCfg {
            mask_padding: self.mask_padding_in_loss,
        };
        be.span_loss_forward_backward(
            &mut acts.losses,
            &mut g.dlogits,
            stats,
            &acts.logits,
            &batch.starts,
            &batch.ends,
            &batch.seqs,
            scale,
            cfg,
        )
    }

    /// [`BertQa::loss`] of a batch on its own: the mean over its counted targets, gradient scaled for it.
    pub fn loss_mean(
        &self,
        be: &B,
        acts: &mut Acts<B>,
        batch: &Batch<B>,
        loss_scale: f64,
    ) -> Result<f64> {
        let (n_start, n_end) = self.counted_targets(batch);
        let sd = acts.losses.dtype();
        let mut stats = Tensor::zeros(be, &[STATS_LEN], sd)?;
        let mut scale = Tensor::zeros(be, &[2], sd)?;
        LossScale::mean(n_start, n_end, loss_scale).write_to(be, &mut scale)?;
        self.loss(be, acts, batch, &scale, &mut stats)?;
        let st = stats.to_f64_vec(be)?;
        Ok(LossSums {
            start: st[STAT_LOSS_START],
            end: st[STAT_LOSS_END],
            n_start,
            n_end,
        }
        .mean())
    }

    /// Backward from the scratch's `dlogits` (set by [`BertQa::loss`]); accumulates into `grads`.
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
        let seqs = &batch.seqs;
        let Acts {
            emb,
            emb_mean,
            emb_rstd,
            layers,
            grad,
            ..
        } = acts;
        let g = grad.as_mut().ok_or_else(|| {
            anyhow!("backward: a forward-only activation plan has no gradient scratch")
        })?;
        {
            let last = layers.last().map(|l| &l.out).unwrap_or(emb);
            // No pass for the span head's bias gradient: it is exactly zero. Each half of the bias adds one
            // constant to every position's logit of a window's start (end) softmax, which the softmax ignores:
            // Σ_j dlogits_j = scale·(Σ_j p_j − 1) = 0 in every window (ignored targets: all zero), checked in
            // tests/gradcheck.rs; summing dlogits would give rounding noise only.
            be.linear_backward(
                Some(&mut g.dx),
                false,
                &mut grads.qa_w,
                None,
                &g.dlogits,
                last,
                &p.qa_w,
            )?;
        }
        for l in (0..nl).rev() {
            let a = &layers[l];
            let x = if l == 0 { &*emb } else { &layers[l - 1].out };
            let w = &p.layers[l];
            let gl = &mut grads.layers[l];
            // x_out = LN2(h + dropout(fo + b2)): dx → dfo (dsub), dh; the down-projection's bias gradient (Σ dfo)
            // in the same pass
            be.residual_layernorm_backward(
                &mut g.dsub,
                &mut g.dh,
                &mut gl.ln2_g,
                &mut gl.ln2_b,
                Some(&mut gl.ff2_b),
                &g.dx,
                &a.sum2,
                &a.mean2,
                &a.rstd2,
                &w.ln2_g,
                drop.hidden2(l),
                seqs,
            )?;
            be.linear_backward(
                Some(&mut g.df),
                false,
                &mut gl.ff2_w,
                None,
                &g.dsub,
                &a.f,
                &w.ff2_w,
            )?;
            // dGELU and the up-projection's bias gradient in one pass (GeluOps::gelu_backward_bias)
            be.gelu_backward_bias(&mut g.dpre, &mut gl.ff1_b, &g.df, &a.pre, Some(&w.ff1_b))?;
            be.linear_backward(
                Some(&mut g.dh),
                true,
                &mut gl.ff1_w,
                None,
                &g.dpre,
                &a.h,
                &w.ff1_w,
            )?;
            // h = LN1(x + dropout(ao + bo)): dh → dao (dsub), dx; the output projection's bias gradient too
            be.residual_layernorm_backward(
                &mut g.dsub,
                &mut g.dx,
                &mut gl.ln1_g,
                &mut gl.ln1_b,
                Some(&mut gl.ao_b),
                &g.dh,
                &a.sum1,
                &a.mean1,
                &a.rstd1,
                &w.ln1_g,
                drop.hidden1(l),
                seqs,
            )?;
            be.linear_backward(
                Some(&mut g.datt),
                false,
                &mut gl.ao_w,
                None,
                &g.dsub,
                &a.att,
                &w.ao_w,
            )?;
            // the QKV projection's bias gradient comes with dqkv
            be.attention_backward(
                &mut g.dqkv,
                Some(&mut gl.qkv_b),
                &g.datt,
                &a.att,
                &a.lse,
                &a.qkv,
                seqs,
                nh,
                drop.attn(l),
                &mut g.attn,
            )?;
            be.linear_backward(
                Some(&mut g.dx),
                true,
                &mut gl.qkv_w,
                None,
                &g.dqkv,
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
            &g.dx,
            emb_mean,
            emb_rstd,
            &batch.ids,
            &batch.types,
            seqs,
            &ew,
            drop.emb(nl),
        )?;
        Ok(())
    }
}
