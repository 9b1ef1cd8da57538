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

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::Launch;
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

pub(crate) fn dims<B: BackendCore>(
    losses: &Tensor<B>,
    dl: &Tensor<B>,
    logits: &Tensor<B>,
    s: &Tensor<B>,
    e: &Tensor<B>,
    mask: &Tensor<B>,
) -> Result<(usize, usize)> {
    let op = "span_loss";
    if logits.shape().len() != 3 || logits.shape()[2] != 2 {
        bail!("{op}: logits must be (B,T,2), found {:?}", logits.shape());
    }
    let (b, t) = (logits.shape()[0], logits.shape()[1]);
    dl.expect(&format!("{op}: dlogits"), logits.shape())?;
    losses.expect(&format!("{op}: losses"), &[b, 2])?;
    s.expect(&format!("{op}: start_positions"), &[b])?;
    e.expect(&format!("{op}: end_positions"), &[b])?;
    mask.expect(&format!("{op}: attention_mask"), &[b, t])?;
    for x in [s, e, mask] {
        x.expect_dtype(op, &[DType::I32])?;
    }
    Ok((b, t))
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

/// The parameter layout (checked against kernels/span_loss.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(SpanParams {
        losses,
        dlogits,
        logits,
        starts,
        ends,
        mask,
        b,
        t,
        mask_padding,
        dt,
        scale_start,
        scale_end
    })]
}
