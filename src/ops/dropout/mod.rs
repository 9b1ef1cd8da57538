//! Hidden-state dropout with the counter-based mask of the dropout stream (src/rng.rs): element (row r,
//! feature c) of an (N,C) activation is multiplied by the factor of (window `row_w[r]`, position `pos[r]`,
//! feature c) — 0 or 1/(1-p). Backward is the same multiplication applied to `dout`, with the mask
//! regenerated rather than stored. Inside the model, dropout is fused into the residual LayerNorm, the
//! embeddings and the attention kernel; this standalone op is the reference those fused paths are tested
//! against, and checks that CPU and GPU masks agree bit for bit.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, Launch};
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

pub trait DropoutOps: BackendCore {
    /// `out (N,C) = inp (N,C) · mask`, rows keyed by `seqs`.
    fn dropout_forward(
        &self,
        out: &mut Tensor<Self>,
        inp: &Tensor<Self>,
        d: Dropout,
        seqs: &Seqs<Self>,
    ) -> Result<()>;
    /// `dinp (N,C) = dout (N,C) · mask` (overwrites).
    fn dropout_backward(
        &self,
        dinp: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        d: Dropout,
        seqs: &Seqs<Self>,
    ) -> Result<()> {
        self.dropout_forward(dinp, dout, d, seqs)
    }
}

/// (N, C) after checking `out` and `inp` are the same (N, C) and N is the layout's.
pub(crate) fn check<B: BackendCore>(
    out: &Tensor<B>,
    inp: &Tensor<B>,
    seqs: &Seqs<B>,
) -> Result<(usize, usize)> {
    if inp.shape().len() != 2 || out.shape() != inp.shape() {
        bail!(
            "dropout: out {:?} and inp {:?} must both be (N,C)",
            out.shape(),
            inp.shape()
        );
    }
    seqs.expect_rows("dropout: inp", inp.shape()[0])?;
    Ok((inp.shape()[0], inp.shape()[1]))
}

/// kernels/dropout.cu `DropoutParams`: pointers are device addresses, dtypes as `dtype_code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DropoutParams {
    pub out: u64,
    pub inp: u64,
    /// (N) i32 positions
    pub pos: u64,
    /// (N) i32 window indices
    pub roww: u64,
    /// the dropout site's key ([`crate::rng::Dropout::site`]); the kernel combines it with the step seed
    pub site: u64,
    pub n: i32,
    pub c: i32,
    pub p: f32,
    pub out_dt: i32,
    pub inp_dt: i32,
    pub _pad: i32,
    /// device address of the step's dropout seed (a u64: [`crate::ops::Seqs::step`])
    pub step: u64,
}
unsafe impl cudarc::driver::DeviceRepr for DropoutParams {}

/// The dropout kernel's launch: grid-stride over the N·C elements, 256 threads per block.
pub fn launch(p: DropoutParams) -> Launch<DropoutParams> {
    Launch {
        module: "dropout",
        name: "dropout_forward".into(),
        grid: (
            blocks(p.n as usize * p.c as usize, 256).min(65535 * 8),
            1,
            1,
        ),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}

/// The parameter layout (checked against kernels/dropout.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(DropoutParams {
        out,
        inp,
        pos,
        roww,
        site,
        n,
        c,
        p,
        out_dt,
        inp_dt,
        _pad,
        step
    })]
}
