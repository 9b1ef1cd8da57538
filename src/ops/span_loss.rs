//! The span loss of BertForQuestionAnswering: softmax cross-entropy over the sequence for the start logits
//! and for the end logits; `loss = (CE_start + CE_end) / 2`, each CE the mean over the batch.
//!
//! Forward and backward in one op: writes the per-example losses and `dlogits = (softmax − onehot)·scale`.
//! - `logits (B,T,2)` are the span head's output (`[…, 0]` start, `[…, 1]` end).
//! - Out-of-range targets: as in HF, positions are first clamped to `[0, T]` (by [`clamp_positions`]) and
//!   a target equal to `T` is *ignored*: it adds no loss, gets zero gradient and is left out of the mean.
//! - `mask_padding`: when set, positions with `attention_mask == 0` are excluded from the softmax (logit
//!   −∞, zero gradient). HF does not mask them; the model masks by default (padding cannot be an answer),
//!   and the HF parity test turns it off.

use crate::backend::BackendCore;
use crate::cpu::{ids, rd, wr, Cpu, Real};
use crate::cuda::{dtype_code, Cuda};
use crate::ops::Launch;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug)]
pub struct SpanLossCfg {
    pub mask_padding: bool,
    /// Gradient scale for the start/end halves: usually `loss_scale / (2·n_valid_start)` etc.
    pub scale_start: f64,
    pub scale_end: f64,
}

pub trait SpanLossOps: BackendCore {
    /// losses (B,2) (f32; per example, 0 when ignored), dlogits (B,T,2) (overwritten) ← logits (B,T,2),
    /// starts (B) i32, ends (B) i32, mask (B,T) i32.
    #[allow(clippy::too_many_arguments)]
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Self>,
        dlogits: &mut Tensor<Self>,
        logits: &Tensor<Self>,
        starts: &Tensor<Self>,
        ends: &Tensor<Self>,
        mask: &Tensor<Self>,
        cfg: SpanLossCfg,
    ) -> Result<()>;
}

/// HF's treatment of positions: clamp to [0, T]; T means "ignored".
pub fn clamp_positions(pos: &[i64], t: usize) -> Vec<i32> {
    pos.iter().map(|&p| p.clamp(0, t as i64) as i32).collect()
}

fn dims<B: BackendCore>(
    losses: &Tensor<B>,
    dl: &Tensor<B>,
    logits: &Tensor<B>,
    s: &Tensor<B>,
    e: &Tensor<B>,
    mask: &Tensor<B>,
) -> Result<(usize, usize)> {
    let op = "span_loss";
    if logits.shape.len() != 3 || logits.shape[2] != 2 {
        bail!("{op}: logits must be (B,T,2), found {:?}", logits.shape);
    }
    let (b, t) = (logits.shape[0], logits.shape[1]);
    dl.expect(&format!("{op}: dlogits"), &logits.shape)?;
    losses.expect(&format!("{op}: losses"), &[b, 2])?;
    s.expect(&format!("{op}: start_positions"), &[b])?;
    e.expect(&format!("{op}: end_positions"), &[b])?;
    mask.expect(&format!("{op}: attention_mask"), &[b, t])?;
    for x in [s, e, mask] {
        x.expect_dtype(op, &[DType::I32])?;
    }
    Ok((b, t))
}

impl SpanLossOps for Cpu {
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Cpu>,
        dlogits: &mut Tensor<Cpu>,
        logits: &Tensor<Cpu>,
        starts: &Tensor<Cpu>,
        ends: &Tensor<Cpu>,
        mask: &Tensor<Cpu>,
        cfg: SpanLossCfg,
    ) -> Result<()> {
        let (b, t) = dims(losses, dlogits, logits, starts, ends, mask)?;
        let (st, en, mk) = (ids(starts)?, ids(ends)?, ids(mask)?);
        crate::cpu_compute!(logits.dtype, T => {
            let x = rd::<T>(logits);
            let mut dl = wr::<T>(dlogits, false);
            let mut ls = wr::<T>(losses, false);
            for bi in 0..b {
                for (w, tgt, scale) in [(0usize, st[bi], cfg.scale_start), (1, en[bi], cfg.scale_end)] {
                    let valid = |j: usize| !cfg.mask_padding || mk[bi * t + j] != 0;
                    let logit = |j: usize| x[(bi * t + j) * 2 + w];
                    for j in 0..t {
                        dl[(bi * t + j) * 2 + w] = T::zero();
                    }
                    ls[bi * 2 + w] = T::zero();
                    if tgt < 0 || tgt as usize >= t || !valid(tgt as usize) {
                        continue; // ignored (HF: ignore_index); a masked target is ignored too
                    }
                    let m = (0..t).filter(|&j| valid(j)).map(logit).fold(T::neg_infinity(), |a, v| a.max(v));
                    let z: T = (0..t).filter(|&j| valid(j)).map(|j| (logit(j) - m).exp()).sum();
                    let lse = m + z.ln();
                    ls[bi * 2 + w] = lse - logit(tgt as usize);
                    for j in 0..t {
                        if valid(j) {
                            let p = (logit(j) - lse).exp();
                            let y = if j == tgt as usize { T::one() } else { T::zero() };
                            dl[(bi * t + j) * 2 + w] = (p - y) * T::of(scale);
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// kernels/span_loss.cu `SpanParams`: pointers are device addresses, `dt` the logits' `dtype_code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SpanParams {
    pub losses: u64,
    pub dlogits: u64,
    pub logits: u64,
    pub starts: u64,
    pub ends: u64,
    pub mask: u64,
    pub b: i32,
    pub t: i32,
    pub mask_padding: i32,
    pub dt: i32,
    pub scale_start: f32,
    pub scale_end: f32,
}

/// The span loss kernel's launch: one block of 256 threads per (example, start|end).
pub fn launch(p: SpanParams) -> Launch<SpanParams> {
    Launch {
        module: "span_loss",
        name: "span_loss_forward_backward".into(),
        grid: (p.b as u32, 2, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}
unsafe impl cudarc::driver::DeviceRepr for SpanParams {}

impl SpanLossOps for Cuda {
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Cuda>,
        dlogits: &mut Tensor<Cuda>,
        logits: &Tensor<Cuda>,
        starts: &Tensor<Cuda>,
        ends: &Tensor<Cuda>,
        mask: &Tensor<Cuda>,
        cfg: SpanLossCfg,
    ) -> Result<()> {
        let (b, t) = dims(losses, dlogits, logits, starts, ends, mask)?;
        if losses.dtype != DType::F32 || dlogits.dtype != logits.dtype {
            bail!(
                "span_loss: losses must be f32 and dlogits must match logits ({}), found {} / {}",
                logits.dtype,
                losses.dtype,
                dlogits.dtype
            );
        }
        let p = SpanParams {
            losses: losses.buf.ptr,
            dlogits: dlogits.buf.ptr,
            logits: logits.buf.ptr,
            starts: starts.buf.ptr,
            ends: ends.buf.ptr,
            mask: mask.buf.ptr,
            b: b as i32,
            t: t as i32,
            mask_padding: cfg.mask_padding as i32,
            dt: dtype_code(logits.dtype),
            scale_start: cfg.scale_start as f32,
            scale_end: cfg.scale_end as f32,
        };
        self.run(&launch(p))
    }
}
