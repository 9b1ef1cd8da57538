//! GELU in BERT's exact (erf) form: `gelu(x) = ½·x·(1 + erf(x/√2))`,
//! `gelu'(x) = ½·(1 + erf(x/√2)) + x·φ(x)`, with φ the standard normal density.
//!
//! The FFN up-projection's bias can be added here (`x = inp + bias`, bias (C) over the rows of an (N, C)
//! input) instead of in a pass of its own after the GEMM: the forward adds it on the fly, and the backward,
//! given the same bias, differentiates at the same point — `inp` stays the GEMM's output without it.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, Launch};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub trait GeluOps: BackendCore {
    /// out (N,C) ← gelu(inp + bias): inp (N,C), bias (C) when given (C the last dimension of inp).
    fn gelu_forward(
        &self,
        out: &mut Tensor<Self>,
        inp: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<()>;
    /// dinp (N,C) (overwritten) = dout (N,C) · gelu'(inp + bias): the derivative where
    /// [`GeluOps::gelu_forward`] with the same bias evaluated it.
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        inp: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<()>;
    /// [`GeluOps::gelu_backward`] over (N, C), and the bias gradient of the linear layer whose output `inp`
    /// is: `dbias (C) += Σ_rows dinp` (dinp as stored), the column sums that layer's
    /// [`crate::ops::LinearOps::linear_backward`] would add from `dinp` (on CUDA summed in another order) —
    /// which is then called without a bias gradient. One pass over dinp where the CUDA vec kernels allow it
    /// (`gelu_backward_bias_vec`).
    ///
    /// With `bias` (the forward's, C), the derivative is taken at `inp + bias` (dinp = dout·gelu'(inp + bias)),
    /// as [`GeluOps::gelu_forward`] with that bias computed it.
    fn gelu_backward_bias(
        &self,
        dinp: &mut Tensor<Self>,
        dbias: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        inp: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
    ) -> Result<()>;
}

/// (N, C) of `gelu_backward_bias` after its shape checks: dinp, dout and inp of N·C elements, dbias (C).
pub(crate) fn bias_dims<B: BackendCore>(
    dinp: &Tensor<B>,
    dbias: &Tensor<B>,
    dout: &Tensor<B>,
    inp: &Tensor<B>,
) -> Result<(usize, usize)> {
    let op = "gelu_backward_bias";
    let n = check(op, dinp, inp)?;
    check(op, dout, inp)?;
    let c = column_vec(op, "dbias", dbias, inp)?;
    Ok((n / c, c))
}

/// C (the last dimension of inp) when `bias` is given and has C elements; 0 without a bias.
pub(crate) fn bias_cols<B: BackendCore>(
    op: &str,
    inp: &Tensor<B>,
    bias: Option<&Tensor<B>>,
) -> Result<usize> {
    bias.map_or(Ok(0), |b| column_vec(op, "bias", b, inp))
}

/// C, after checking that `v` (called `what`) is a (C) vector with C > 0 the last dimension of inp.
fn column_vec<B: BackendCore>(
    op: &str,
    what: &str,
    v: &Tensor<B>,
    inp: &Tensor<B>,
) -> Result<usize> {
    match (v.shape(), inp.shape().last()) {
        ([c], Some(last)) if *c > 0 && c == last => Ok(*c),
        (s, _) => bail!(
            "{op}: {what} {s:?} must be (C) with C the last dimension of inp {:?}",
            inp.shape()
        ),
    }
}

pub(crate) fn check<B: BackendCore>(op: &str, a: &Tensor<B>, b: &Tensor<B>) -> Result<usize> {
    if a.numel() != b.numel() {
        bail!("{op}: {:?} and {:?} differ in size", a.shape(), b.shape());
    }
    Ok(a.numel())
}

/// kernels/gelu.cu `GeluParams`: pointers are device addresses; `dout` is 0 in the forward.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GeluParams {
    pub out: u64,
    pub dout: u64,
    pub inp: u64,
    pub n: u64,
    pub dt: i32,
    /// the bias's length C (inp is (N, C)), 0 without a bias
    pub c: i32,
    /// (C) the bias added to inp (its dtype), or 0
    pub bias: u64,
}

/// The launch of GELU forward (`backward` false) or backward over `p.n` elements of `dt`: grid-stride,
/// 256 threads per block; the 16-byte vec kernel when `vec` and the buffers are aligned for it (with a bias,
/// also C a multiple of the vector width, so that no vector straddles two rows).
pub fn launch(dt: DType, p: GeluParams, backward: bool, vec: bool) -> Result<Launch<GeluParams>> {
    let (dir, ptrs) = if backward {
        ("backward", vec![p.out, p.dout, p.inp, p.bias])
    } else {
        ("forward", vec![p.out, p.inp, p.bias])
    };
    let rows_whole = |w: usize| (p.c as usize).is_multiple_of(w);
    Ok(Launch {
        module: "gelu",
        name: gelu_kernel(dir, dt, &ptrs, vec, rows_whole)?,
        grid: (blocks(p.n as usize, 256).min(1 << 20), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}

unsafe impl cudarc::driver::DeviceRepr for GeluParams {}

/// kernels/gelu.cu `GeluBiasParams`: dinp `out`, `dout`, `inp` (N, C) and `dbias` (C, f32).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GeluBiasParams {
    pub out: u64,
    pub dout: u64,
    pub inp: u64,
    pub dbias: u64,
    pub n: i32,
    pub c: i32,
    /// (C) the forward's bias (inp's dtype), added to inp, or 0
    pub bias: u64,
}
unsafe impl cudarc::driver::DeviceRepr for GeluBiasParams {}

/// The fused GELU-backward-and-bias-gradient launch, when the vec kernels are on (`vec`) and the buffers
/// allow 16-byte vectors (C a multiple of the vector width, aligned rows); None otherwise (the caller then
/// runs gelu_backward and the bias-gradient kernel). Grid: 32 groups of columns per block, enough row
/// slices for ~8 blocks per SM (`sm_count`).
pub fn backward_bias_launch(
    dt: DType,
    p: GeluBiasParams,
    vec: bool,
    sm_count: usize,
) -> Result<Option<Launch<GeluBiasParams>>> {
    let (n, c) = (p.n as usize, p.c as usize);
    let Some(w) = crate::cuda::vec_width(dt, &[p.out, p.dout, p.inp, p.bias])
        .filter(|w| vec && c.is_multiple_of(*w))
    else {
        return Ok(None);
    };
    Ok(Some(Launch {
        module: "gelu",
        name: format!("gelu_backward_bias_vec_{}", crate::kernel::suffix(dt)?),
        grid: crate::ops::linear::column_grid(c / w, n, 8 * sm_count),
        block: (32, 8, 1),
        smem: 0,
        params: p,
    }))
}

/// `gelu_{dir}_vec_{dtype}` (16-byte vectors) when the kernel configuration's `vec` is on (`--vec-kernels
/// on` / `BERTQA_VEC=1`) and the buffers allow it, else the scalar
/// `gelu_{dir}` (dtype at run time).
fn gelu_kernel(
    dir: &str,
    dt: DType,
    ptrs: &[u64],
    vec: bool,
    rows_whole: impl Fn(usize) -> bool,
) -> Result<String> {
    Ok(
        if vec && crate::cuda::vec_width(dt, ptrs).is_some_and(rows_whole) {
            gelu_vec_kernel(dir, crate::kernel::suffix(dt)?)
        } else {
            format!("gelu_{dir}")
        },
    )
}

fn gelu_vec_kernel(dir: &str, sfx: &str) -> String {
    format!("gelu_{dir}_vec_{sfx}")
}

/// Every vec kernel name the launchers can ask kernels/gelu.cu for (checked by tests/kernels_compile.rs).
pub fn vec_entry_points() -> Vec<String> {
    let mut v = Vec::new();
    for sfx in ["f32", "bf16", "f16"] {
        for dir in ["forward", "backward"] {
            v.push(gelu_vec_kernel(dir, sfx));
        }
        v.push(format!("gelu_backward_bias_vec_{sfx}"));
    }
    v
}

/// The parameter layout (checked against kernels/gelu.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![
        crate::param_layout!(GeluParams {
            out,
            dout,
            inp,
            n,
            dt,
            c,
            bias
        }),
        crate::param_layout!(GeluBiasParams {
            out,
            dout,
            inp,
            dbias,
            n,
            c,
            bias
        }),
    ]
}
