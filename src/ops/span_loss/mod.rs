//! The span loss of BertForQuestionAnswering: per window, softmax cross-entropy over the window's positions
//! for the start logits and for the end logits; the model averages over windows (`(CE_start + CE_end) / 2`).
//!
//! Forward and backward in one op: writes the per-window losses and `dlogits = (softmax − onehot)·scale`,
//! and adds the batch's loss sums (in window order) to the step's statistics (`stats[STAT_LOSS_START]`,
//! `stats[STAT_LOSS_END]`, see [`crate::ops::STATS_LEN`]), which stay on the device.
//! - `logits (N,2)` are the span head's output for the N rows of a batch (`[…, 0]` start, `[…, 1]` end);
//!   window b owns rows `cu[b]..cu[b+1]` (`seqs`).
//! - Targets are positions within the window. Out-of-range targets: as in HF, positions are first clamped
//!   to `[0, T]` (by [`clamp_positions`]); a target at or past the softmax range is *ignored*: it adds no
//!   loss, gets zero gradient and is left out of the mean.
//! - `mask_padding`: when set, the softmax runs over the window's real tokens only (`lens[b]`; its padding
//!   rows get zero gradient). HF does not mask them; the model masks by default (padding cannot be an
//!   answer), and the HF parity test turns it off. A packed window has no padding: the two agree.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::Launch;
use crate::ops::Seqs;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug)]
pub struct SpanLossCfg {
    pub mask_padding: bool,
}

pub trait SpanLossOps: BackendCore {
    /// losses (B,2) (stat dtype; per window, 0 when ignored), dlogits (N,2) (overwritten), stats
    /// (STATS_LEN) (stat dtype; `[STAT_LOSS_START] += Σ_b losses[b,0]`, `[STAT_LOSS_END] += Σ_b losses[b,1]`)
    /// ← logits (N,2), starts (B) i32, ends (B) i32 (positions within the windows), seqs, scale (2) (stat
    /// dtype: the gradient scales of the start and end halves, usually `loss_scale / (2·n_counted_start)`
    /// etc. — in device memory, because they change every step and the kernels of a step must not: see
    /// [`crate::rng::Dropout`] for the same reason).
    #[allow(clippy::too_many_arguments)]
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Self>,
        dlogits: &mut Tensor<Self>,
        stats: &mut Tensor<Self>,
        logits: &Tensor<Self>,
        starts: &Tensor<Self>,
        ends: &Tensor<Self>,
        seqs: &Seqs<Self>,
        scale: &Tensor<Self>,
        cfg: SpanLossCfg,
    ) -> Result<()>;
}

/// HF's treatment of positions: clamp to [0, T]; T (the window's length) and beyond mean "ignored".
pub fn clamp_positions(pos: &[i64], t: usize) -> Vec<i32> {
    pos.iter().map(|&p| p.clamp(0, t as i64) as i32).collect()
}

/// (N, B) after checking every shape.
pub(crate) fn dims<B: BackendCore>(
    losses: &Tensor<B>,
    dl: &Tensor<B>,
    stats: &Tensor<B>,
    logits: &Tensor<B>,
    s: &Tensor<B>,
    e: &Tensor<B>,
    seqs: &Seqs<B>,
    scale: &Tensor<B>,
) -> Result<(usize, usize)> {
    let op = "span_loss";
    if logits.shape().len() != 2 || logits.shape()[1] != 2 {
        bail!("{op}: logits must be (N,2), found {:?}", logits.shape());
    }
    let (n, b) = (logits.shape()[0], seqs.b());
    seqs.expect_rows(op, n)?;
    dl.expect(&format!("{op}: dlogits"), logits.shape())?;
    losses.expect(&format!("{op}: losses"), &[b, 2])?;
    stats.expect(&format!("{op}: stats"), &[crate::ops::STATS_LEN])?;
    stats.expect_dtype(&format!("{op}: stats"), &[losses.dtype()])?;
    scale.expect(&format!("{op}: scale"), &[2])?;
    scale.expect_dtype(&format!("{op}: scale"), &[losses.dtype()])?;
    s.expect(&format!("{op}: start_positions"), &[b])?;
    e.expect(&format!("{op}: end_positions"), &[b])?;
    for x in [s, e] {
        x.expect_dtype(op, &[DType::I32])?;
    }
    Ok((n, b))
}

/// kernels/span_loss.cu `SpanParams`: pointers are device addresses, `dt` the logits' `dtype_code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SpanParams {
    pub losses: u64,
    /// the step's statistics (STATS_LEN f32; the loss sums are added to the first two)
    pub stats: u64,
    pub dlogits: u64,
    pub logits: u64,
    pub starts: u64,
    pub ends: u64,
    /// (B+1) i32 window row offsets, (B) i32 real lengths
    pub cu: u64,
    pub lens: u64,
    pub b: i32,
    pub mask_padding: i32,
    pub dt: i32,
    pub _pad: i32,
    /// (2) f32: the gradient scales of the start and end halves
    pub scale: u64,
}

/// The span loss's launches: one block of 256 threads per (window, start|end), then one block adding the
/// per-window losses into the step's statistics in window order (deterministic, the CPU reference's order).
pub fn launch(p: SpanParams) -> [Launch<SpanParams>; 2] {
    [
        Launch {
            module: "span_loss",
            name: "span_loss_forward_backward".into(),
            grid: (p.b as u32, 2, 1),
            block: (256, 1, 1),
            smem: 0,
            params: p,
        },
        Launch {
            module: "span_loss",
            name: "span_loss_sums".into(),
            grid: (1, 1, 1),
            block: (32, 1, 1),
            smem: 0,
            params: p,
        },
    ]
}
unsafe impl cudarc::driver::DeviceRepr for SpanParams {}

/// The parameter layout (checked against kernels/span_loss.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(SpanParams {
        losses,
        stats,
        dlogits,
        logits,
        starts,
        ends,
        cu,
        lens,
        b,
        mask_padding,
        dt,
        _pad,
        scale
    })]
}
