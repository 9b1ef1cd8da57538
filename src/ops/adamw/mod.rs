//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW` semantics) as one step over the flat parameter
//! buffers (src/model/params.rs), and the global gradient norm as one reduction over the flat gradient.
//!
//! The step's statistics (`stats`, see [`crate::ops::STATS_LEN`]) are read on the device: when any is
//! non-finite the step changes nothing; otherwise `grad_scale = clip_coef(norm, max_grad_norm) / loss_scale`
//! with `norm = √Σg² / loss_scale` folds loss-scale removal and global-norm clipping into one multiplier
//! ([`AdamWHyper::grad_scale`]). For each parameter element, with `g = grad·grad_scale` and step `t ≥ 1`:
//! ```text
//! p ← p·(1 − lr·wd)            (only where decay: elements before `n_decay`)
//! m ← β1·m + (1−β1)·g
//! v ← β2·v + (1−β2)·g²
//! p ← p − lr · (m / (1−β1ᵗ)) / (sqrt(v / (1−β2ᵗ)) + eps)
//! working ← round(p)           (the bf16/f16 copy the forward pass uses, when there is one)
//! ```
//! The flat layout puts every tensor that decays (the weight matrices) before those that do not (biases,
//! LayerNorm weights), so one boundary `n_decay` says which is which: no per-tensor table. The alignment gaps
//! between tensors hold zeros in every buffer and stay zero. Master weights, moments and gradients are f32
//! (f64 in the CPU gradient-check world).

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, Launch};
use crate::ops::{STATS_LEN, STAT_GRAD_SQ};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step number (for bias correction).
    pub step: u64,
    /// The loss scale the gradients carry (1 without fp16 loss scaling).
    pub loss_scale: f64,
    /// Global-norm clipping threshold (0: no clipping).
    pub max_grad_norm: f64,
}

impl AdamWHyper {
    /// The multiplier applied to every gradient element, from the step's statistics (`stats`, indexed by
    /// `STAT_*`), or None when any of them is non-finite (the step is skipped): `clip_coef(norm,
    /// max_grad_norm) / loss_scale` with `norm = √Σg² / loss_scale`. kernels/adamw.cu computes the same in
    /// f32.
    pub fn grad_scale(&self, stats: &[f64]) -> Option<f64> {
        if stats.len() != STATS_LEN || !stats.iter().all(|x| x.is_finite()) {
            return None;
        }
        let norm = stats[STAT_GRAD_SQ].sqrt() / self.loss_scale;
        Some(crate::optim::clip_coef(norm, self.max_grad_norm) / self.loss_scale)
    }
}

pub trait AdamWOps: BackendCore {
    /// One AdamW step over flat buffers of n elements: `master` (f32; f64 on the CPU) updated, `working` (a
    /// bf16/f16 copy the model computes with, if any) refreshed, `grad` read, moments `m`, `v` updated;
    /// elements `0..n_decay` get weight decay. `stats (STATS_LEN)` (stat dtype) are the step's statistics,
    /// read on the device: a non-finite one leaves every buffer unchanged.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        master: &mut Tensor<Self>,
        working: Option<&mut Tensor<Self>>,
        grad: &Tensor<Self>,
        m: &mut Tensor<Self>,
        v: &mut Tensor<Self>,
        n_decay: usize,
        stats: &Tensor<Self>,
        hp: &AdamWHyper,
    ) -> Result<()>;
    /// `stats[STAT_GRAD_SQ] += Σ g²` over the whole buffer. NaN/inf in any gradient makes it non-finite.
    fn grad_sq_norm(&self, stats: &mut Tensor<Self>, grad: &Tensor<Self>) -> Result<()>;
    /// `acc += g`, element by element (one rounding each): a micro-batch's gradient added into the step's
    /// sum, the same arithmetic as the data-parallel reduction of two replicas.
    fn grad_accumulate(&self, acc: &mut Tensor<Self>, g: &Tensor<Self>) -> Result<()>;
}

/// Both gradient buffers of [`AdamWOps::grad_accumulate`] have the same shape and dtype.
pub(crate) fn check_accumulate<B: BackendCore>(acc: &Tensor<B>, g: &Tensor<B>) -> Result<()> {
    if acc.shape() != g.shape() || acc.dtype() != g.dtype() {
        anyhow::bail!(
            "grad_accumulate: acc {:?} {} and g {:?} {} must match",
            acc.shape(),
            acc.dtype(),
            g.shape(),
            g.dtype()
        );
    }
    Ok(())
}

/// n after checking that every buffer has it and `n_decay ≤ n`.
pub(crate) fn check<B: BackendCore>(
    master: &Tensor<B>,
    working: Option<&Tensor<B>>,
    grad: &Tensor<B>,
    m: &Tensor<B>,
    v: &Tensor<B>,
    n_decay: usize,
) -> Result<usize> {
    let n = master.numel();
    for (what, t) in [("grad", grad), ("m", m), ("v", v)]
        .into_iter()
        .chain(working.map(|w| ("working copy", w)))
    {
        if t.numel() != n {
            bail!(
                "adamw_step: {what} {:?} does not match the parameters {:?}",
                t.shape(),
                master.shape()
            );
        }
    }
    if n_decay > n {
        bail!("adamw_step: n_decay {n_decay} > {n} parameters");
    }
    Ok(n)
}

/// The step statistics' shape, and a stat dtype matching the parameters' (`what` names the op).
pub(crate) fn check_stats<B: BackendCore>(
    what: &str,
    stats: &Tensor<B>,
    like: &Tensor<B>,
) -> Result<()> {
    stats.expect(&format!("{what}: stats"), &[STATS_LEN])?;
    stats.expect_dtype(&format!("{what}: stats"), &[like.dtype()])
}

/// kernels/adamw.cu `AdamWParams`: device addresses (working 0: none), the element counts, the working copy's
/// `dtype_code`, the hyperparameters (bias corrections precomputed).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWParams {
    pub master: u64,
    pub working: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    /// the step's statistics (STATS_LEN f32): read by adamw_step, Σ g² added by grad_sq_norm
    pub stats: u64,
    pub n: u64,
    pub n_decay: u64,
    pub working_dt: i32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub wd: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub loss_scale: f32,
    pub max_norm: f32,
}
unsafe impl cudarc::driver::DeviceRepr for AdamWParams {}

/// The AdamW step's launch: blocks of 256 threads striding over the elements (at most 2048 blocks).
pub fn step_launch(mut p: AdamWParams, hp: &AdamWHyper) -> Launch<AdamWParams> {
    p.lr = hp.lr as f32;
    p.beta1 = hp.beta1 as f32;
    p.beta2 = hp.beta2 as f32;
    p.eps = hp.eps as f32;
    p.wd = (hp.lr * hp.weight_decay) as f32;
    p.bc1 = (1.0 - hp.beta1.powi(hp.step as i32)) as f32;
    p.bc2 = (1.0 - hp.beta2.powi(hp.step as i32)) as f32;
    p.loss_scale = hp.loss_scale as f32;
    p.max_norm = hp.max_grad_norm as f32;
    Launch {
        module: "adamw",
        name: "adamw_step".into(),
        grid: (blocks(p.n as usize, 256 * 4).min(2048), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}

/// The squared norm's launch: blocks of 256 threads striding over `grad` (n f32), each adding its partial
/// sum into `stats[STAT_GRAD_SQ]` (f32).
pub fn sq_norm_launch(grad: u64, stats: u64, n: usize) -> Launch<AdamWParams> {
    Launch {
        module: "adamw",
        name: "grad_sq_norm".into(),
        grid: (blocks(n, 256 * 8).min(1024), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: AdamWParams {
            grad,
            stats,
            n: n as u64,
            ..bytemuck::Zeroable::zeroed()
        },
    }
}

/// Master weights, gradients and moments must be f32 on CUDA.
pub(crate) fn f32_only(ts: &[DType]) -> Result<()> {
    if let Some(d) = ts.iter().find(|d| **d != DType::F32) {
        bail!("adamw_step: master weights, gradients and moments must be f32 on CUDA, found {d}");
    }
    Ok(())
}

/// The parameter layout (checked against kernels/adamw.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(AdamWParams {
        master,
        working,
        grad,
        m,
        v,
        stats,
        n,
        n_decay,
        working_dt,
        lr,
        beta1,
        beta2,
        eps,
        wd,
        bc1,
        bc2,
        loss_scale,
        max_norm
    })]
}
