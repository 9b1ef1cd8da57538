//! Linear layer with HF's weight layout: `out (N,OC) = inp (N,IC)·Wᵀ + b`, W `(OC,IC)`.
//! Backward: `dinp = dout·W` (overwrite, or `+=` with `accumulate_dinp` — the residual stream adds it to the
//! gradient already there), `dW += doutᵀ·inp`, `db += Σ_rows dout`.
//! CPU: the GEMMs go through `cpu::gemm` (matrixmultiply); CUDA: cublasGemmEx with f32 accumulation, bf16
//! operands and an f32 `dW`, plus the bias kernels in kernels/reduce.cu — or, with the GEMM path `lt`, every
//! GEMM through cuBLASLt and the forward as one matmul with a bias epilogue (src/cuda/lt.rs); with the vec
//! kernels on, the bias gradient with 16-byte loads.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, Launch};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub trait LinearOps: BackendCore {
    /// out (N,OC) ← inp (N,IC), w (OC,IC), b (OC).
    fn linear_forward(
        &self,
        out: &mut Tensor<Self>,
        inp: &Tensor<Self>,
        w: &Tensor<Self>,
        b: Option<&Tensor<Self>>,
    ) -> Result<()>;

    /// dinp (N,IC) (overwritten, or accumulated when `accumulate_dinp`), dw (OC,IC) +=, db (OC) += ←
    /// dout (N,OC), inp (N,IC), w (OC,IC).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dinp: Option<&mut Tensor<Self>>,
        accumulate_dinp: bool,
        dw: &mut Tensor<Self>,
        db: Option<&mut Tensor<Self>>,
        dout: &Tensor<Self>,
        inp: &Tensor<Self>,
        w: &Tensor<Self>,
    ) -> Result<()>;
}

/// (N, IC, OC) after checking shapes: activations are (…, IC) and (…, OC).
pub(crate) fn dims<B: BackendCore>(
    op: &str,
    inp: &Tensor<B>,
    out: &Tensor<B>,
    w: &Tensor<B>,
    b: Option<&Tensor<B>>,
) -> Result<(usize, usize, usize)> {
    if w.shape().len() != 2 {
        bail!("{op}: weight must be (OC,IC), found {:?}", w.shape());
    }
    let (oc, ic) = (w.shape()[0], w.shape()[1]);
    if inp.shape().last() != Some(&ic) {
        bail!(
            "{op}: input {:?} must end in IC={ic} (weight {:?})",
            inp.shape(),
            w.shape()
        );
    }
    if out.shape().last() != Some(&oc) {
        bail!(
            "{op}: output {:?} must end in OC={oc} (weight {:?})",
            out.shape(),
            w.shape()
        );
    }
    let n = inp.numel() / ic.max(1);
    if out.numel() != n * oc {
        bail!(
            "{op}: input {:?} and output {:?} have different row counts",
            inp.shape(),
            out.shape()
        );
    }
    if let Some(b) = b {
        b.expect(&format!("{op}: bias"), &[oc])?;
    }
    Ok((n, ic, oc))
}

/// kernels/reduce.cu `BiasParams`: pointers are device addresses, dtypes as `dtype_code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct BiasParams {
    pub out: u64,
    pub bias: u64,
    pub n: i32,
    pub oc: i32,
    pub out_dt: i32,
    pub bias_dt: i32,
}

unsafe impl cudarc::driver::DeviceRepr for BiasParams {}

/// The launch of out (N, OC) += bias (OC) (the linear forward without cuBLASLt's epilogue): grid-stride
/// over the N·OC elements.
pub fn bias_add_launch(p: BiasParams) -> Launch<BiasParams> {
    Launch {
        module: "reduce",
        name: "bias_add".into(),
        grid: (
            blocks(p.n as usize * p.oc as usize, 256).min(65535 * 16),
            1,
            1,
        ),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}

/// The launch of the bias gradient bias (OC, f32, accumulated) += column sums of out (N, OC) in `dt`:
/// blocks of 32 × 8 threads; the 16-byte vec kernel when `vec`, the rows are 16-byte aligned and OC splits
/// into whole vectors.
pub fn bias_grad_launch(
    dt: DType,
    p: BiasParams,
    vec: bool,
    sm_count: usize,
) -> Result<Launch<BiasParams>> {
    let (n, oc) = (p.n as usize, p.oc as usize);
    let w = crate::cuda::vec_width(dt, &[p.out]).filter(|w| vec && oc.is_multiple_of(*w));
    let (name, grid) = if let Some(w) = w {
        (
            bias_grad_vec_kernel(crate::kernel::suffix(dt)?),
            column_grid(oc / w, n, 4 * sm_count),
        )
    } else {
        // Column sums: blocks of 32 columns × 8 row-groups, then an atomicAdd per column per block.
        let grid_x = blocks(oc, 32);
        let grid_y = (n.div_ceil(256) as u32).clamp(1, 64);
        ("bias_grad".to_string(), (grid_x, grid_y, 1))
    };
    Ok(Launch {
        module: "reduce",
        name,
        grid,
        block: (32, 8, 1),
        smem: 0,
        params: p,
    })
}

/// The grid of a column-sum kernel with blocks of (32, 8) threads (common.cuh `column_partials_add`): 32 of
/// the `groups` column groups per block, and enough row slices (of 8 rows, striding) for about `want_blocks`
/// blocks, at most one per 8 of the `n` rows.
pub fn column_grid(groups: usize, n: usize, want_blocks: usize) -> (u32, u32, u32) {
    let grid_x = blocks(groups, 32);
    let grid_y = (want_blocks.max(1) as u32)
        .div_ceil(grid_x)
        .clamp(1, n.div_ceil(8).max(1) as u32);
    (grid_x, grid_y, 1)
}

fn bias_grad_vec_kernel(sfx: &str) -> String {
    format!("bias_grad_vec_{sfx}")
}

/// Every vec kernel name the launchers can ask kernels/reduce.cu for (checked by tests/kernels_compile.rs).
pub fn vec_entry_points() -> Vec<String> {
    ["f32", "bf16", "f16"]
        .into_iter()
        .map(bias_grad_vec_kernel)
        .collect()
}

/// The parameter layout (checked against kernels/reduce.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(BiasParams {
        out,
        bias,
        n,
        oc,
        out_dt,
        bias_dt
    })]
}
