//! Residual add + dropout + LayerNorm, fused: BERT's `LN(resid + dropout(inp))` after each sub-layer, over
//! the N rows of a batch (the dropout stream keys row r by its window and position: `seqs`).
//!
//! Forward:  `sum = resid + dropout(inp + bias)`, `out = (sum - mean)·rstd·gamma + beta`,
//!           rstd = 1/sqrt(var + eps), biased variance as in torch.nn.LayerNorm. Saves `sum`, `mean`, `rstd`.
//!           `bias` (optional) is the bias of the linear layer whose output `inp` is, added here instead of
//!           in a pass of its own after the GEMM (cuBLAS) or in its epilogue (cuBLASLt).
//! Backward: `x̂ = (sum - mean)·rstd`, `g = dout·gamma`,
//!           `dsum = rstd·(g - mean(g) - x̂·mean(g·x̂))`, `dgamma += Σ dout·x̂`, `dbeta += Σ dout`,
//!           `dresid = dsum` (overwrite), `dinp = dropout(dsum)` (overwrite, same mask), and, when asked,
//!           `dbias += Σ dinp`: the bias gradient of the linear layer whose output `inp` is, taken in the same
//!           pass (cuBLASLt's BGRADB epilogue does this in the weight-gradient GEMM, but overwrites where the
//!           gradients here accumulate; linear::LinearOps::linear_backward then skips its bias pass).

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, suffix, Launch};
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub trait LayerNormOps: BackendCore {
    /// out (N,C), sum (N,C), mean (N), rstd (N) ← inp (N,C), its bias (C) when given, resid (N,C), gamma (C),
    /// beta (C).
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        out: &mut Tensor<Self>,
        sum: &mut Tensor<Self>,
        mean: &mut Tensor<Self>,
        rstd: &mut Tensor<Self>,
        inp: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        resid: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        eps: f32,
        drop: Dropout,
        seqs: &Seqs<Self>,
    ) -> Result<()>;

    /// dinp (N,C), dresid (N,C) overwritten; dgamma (C), dbeta (C) accumulated; `dbias` (C), when given,
    /// accumulates the column sums of dinp (the bias gradient of the linear layer that produced `inp`).
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_backward(
        &self,
        dinp: &mut Tensor<Self>,
        dresid: &mut Tensor<Self>,
        dgamma: &mut Tensor<Self>,
        dbeta: &mut Tensor<Self>,
        dbias: Option<&mut Tensor<Self>>,
        dout: &Tensor<Self>,
        sum: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        gamma: &Tensor<Self>,
        drop: Dropout,
        seqs: &Seqs<Self>,
    ) -> Result<()>;
}

/// (N, C) from a (…, C) activation, checking the companions.
pub(crate) fn dims<B: BackendCore>(
    op: &str,
    x: &Tensor<B>,
    stats: &[&Tensor<B>],
    same: &[&Tensor<B>],
    vecs: &[&Tensor<B>],
) -> Result<(usize, usize)> {
    let c = *x.shape().last().unwrap_or(&0);
    let n = x.numel() / c.max(1);
    for t in same {
        if t.shape() != x.shape() {
            bail!(
                "{op}: shapes {:?} and {:?} must match",
                x.shape(),
                t.shape()
            );
        }
    }
    for t in stats {
        if t.numel() != n {
            bail!(
                "{op}: statistics tensor {:?} must have N={n} elements (activation {:?})",
                t.shape(),
                x.shape()
            );
        }
    }
    for t in vecs {
        if t.numel() != c {
            bail!(
                "{op}: parameter {:?} must have C={c} elements (activation {:?})",
                t.shape(),
                x.shape()
            );
        }
    }
    Ok((n, c))
}

/// kernels/layernorm.cu `LnFwdParams`: pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LnFwdParams {
    pub out: u64,
    /// (N) i32 positions, (N) i32 window indices: the dropout stream's row keys
    pub pos: u64,
    pub roww: u64,
    pub sum: u64,
    pub mean: u64,
    pub rstd: u64,
    pub inp: u64,
    pub resid: u64,
    pub gamma: u64,
    pub beta: u64,
    /// the dropout site's key ([`crate::rng::Dropout::site`]); the kernel combines it with the step seed
    pub site: u64,
    pub n: i32,
    pub c: i32,
    pub eps: f32,
    pub p: f32,
    /// device address of the step's dropout seed (a u64: [`crate::ops::Seqs::step`])
    pub step: u64,
    /// (C) the bias added to inp (the activation dtype), or 0: none
    pub bias: u64,
}

unsafe impl cudarc::driver::DeviceRepr for LnFwdParams {}

/// kernels/layernorm.cu `LnBwdParams`: pointers are device addresses; dgamma/dbeta accumulate.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LnBwdParams {
    pub dinp: u64,
    pub pos: u64,
    pub roww: u64,
    pub dresid: u64,
    pub dgamma: u64,
    pub dbeta: u64,
    pub dout: u64,
    pub sum: u64,
    pub mean: u64,
    pub rstd: u64,
    pub gamma: u64,
    /// the dropout site's key ([`crate::rng::Dropout::site`]); the kernel combines it with the step seed
    pub site: u64,
    pub n: i32,
    pub c: i32,
    pub p: f32,
    pub _pad: i32,
    /// device address of the step's dropout seed (a u64: [`crate::ops::Seqs::step`])
    pub step: u64,
    /// (C) f32 += the column sums of dinp, or 0: none
    pub dbias: u64,
}

/// The forward's launch for `act` activations of N rows × C: one warp per row, 8 rows per block; the vec
/// kernel when `vec` and it applies (`ln_kernel`).
pub fn forward_launch(act: DType, p: LnFwdParams, vec: bool) -> Result<Launch<LnFwdParams>> {
    let (n, c) = (p.n as usize, p.c as usize);
    let ptrs = [p.out, p.sum, p.inp, p.resid, p.gamma, p.beta, p.bias];
    Ok(Launch {
        module: "layernorm",
        name: ln_kernel("forward", act, c, &ptrs, vec)?.0,
        grid: (blocks(n, 8), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}

/// The backward's launch: grid-stride over rows (at most 2 blocks per SM of `sm_count`); each block reduces
/// dgamma/dbeta (and dbias, when asked) in shared memory, then one atomicAdd per column: 2·C floats, or 3·C
/// with dbias, and for the vec kernels with dbias also each warp's partials of its lanes' columns
/// (32·CH·N floats a warp: 24 KiB in all for BERT-base's C = 768 in bf16).
pub fn backward_launch(
    act: DType,
    p: LnBwdParams,
    vec: bool,
    sm_count: usize,
) -> Result<Launch<LnBwdParams>> {
    let (n, c) = (p.n as usize, p.c as usize);
    let ptrs = [p.dinp, p.dresid, p.dout, p.sum, p.gamma];
    let (name, chunks) = ln_kernel("backward", act, c, &ptrs, vec)?;
    let floats = match (p.dbias != 0, chunks) {
        (false, _) => 2 * c,
        (true, None) => 3 * c,
        (true, Some((ch, w))) => 3 * c + 8 * 32 * ch * w,
    };
    Ok(Launch {
        module: "layernorm",
        name,
        grid: (blocks(n, 8).min((sm_count.max(1) * 2) as u32), 1, 1),
        block: (256, 1, 1),
        smem: (floats * 4) as u32,
        params: p,
    })
}

unsafe impl cudarc::driver::DeviceRepr for LnBwdParams {}

/// `residual_layernorm_{dir}_vec{CH}_{dtype}` when the vec kernels are on and C splits into 16-byte chunks of N
/// elements, CH ≤ 4 of them per lane (C ≤ 1024 in bf16/f16, ≤ 512 in f32), with Some((CH, N)); else the
/// scalar kernel, with None.
fn ln_kernel(
    dir: &str,
    dt: DType,
    c: usize,
    ptrs: &[u64],
    vec: bool,
) -> Result<(String, Option<(usize, usize)>)> {
    let sfx = suffix(dt)?;
    if vec {
        if let Some(n) = crate::cuda::vec_width(dt, ptrs) {
            let ch = c.div_ceil(32 * n);
            if c.is_multiple_of(n) && (1..=4).contains(&ch) {
                return Ok((ln_vec_kernel(dir, ch, sfx), Some((ch, n))));
            }
        }
    }
    Ok((format!("residual_layernorm_{dir}_{sfx}"), None))
}

fn ln_vec_kernel(dir: &str, ch: usize, sfx: &str) -> String {
    format!("residual_layernorm_{dir}_vec{ch}_{sfx}")
}

/// Every vec kernel name the launchers can ask kernels/layernorm.cu for (checked by tests/kernels_compile.rs).
pub fn vec_entry_points() -> Vec<String> {
    let mut v = Vec::new();
    for sfx in ["f32", "bf16", "f16"] {
        for ch in 1..=4 {
            for dir in ["forward", "backward"] {
                v.push(ln_vec_kernel(dir, ch, sfx));
            }
        }
    }
    v
}

/// The parameter layouts (checked against kernels/layernorm.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![
        crate::param_layout!(LnFwdParams {
            out,
            pos,
            roww,
            sum,
            mean,
            rstd,
            inp,
            resid,
            gamma,
            beta,
            site,
            n,
            c,
            eps,
            p,
            step,
            bias
        }),
        crate::param_layout!(LnBwdParams {
            dinp,
            pos,
            roww,
            dresid,
            dgamma,
            dbeta,
            dout,
            sum,
            mean,
            rstd,
            gamma,
            site,
            n,
            c,
            p,
            _pad,
            step,
            dbias
        }),
    ]
}
