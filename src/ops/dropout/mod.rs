//! Dropout with a counter-based mask (Philox, see [`crate::rng`]): `out[i] = inp[i]·factor(seed, i)`, where
//! the factor is 0 or 1/(1-p). Backward is the same multiplication applied to `dout`, with the mask
//! regenerated from the seed rather than stored. Inside the model, dropout is fused into the residual
//! layernorm, the embeddings and the attention kernel; this standalone op is the reference those fused paths
//! are tested against, and checks that CPU and GPU masks agree bit for bit.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, Launch};
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

pub trait DropoutOps: BackendCore {
    /// `out (n) = inp (n) · mask`.
    fn dropout_forward(&self, out: &mut Tensor<Self>, inp: &Tensor<Self>, d: Dropout)
        -> Result<()>;
    /// `dinp (n) = dout (n) · mask` (overwrites).
    fn dropout_backward(
        &self,
        dinp: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        d: Dropout,
    ) -> Result<()> {
        self.dropout_forward(dinp, dout, d)
    }
}

pub(crate) fn check<B: BackendCore>(out: &Tensor<B>, inp: &Tensor<B>) -> Result<()> {
    if out.numel() != inp.numel() {
        bail!(
            "dropout: out {:?} and inp {:?} differ in size",
            out.shape(),
            inp.shape()
        );
    }
    Ok(())
}

/// kernels/dropout.cu `DropoutParams`: pointers are device addresses, dtypes as `dtype_code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DropoutParams {
    pub out: u64,
    pub inp: u64,
    pub seed: u64,
    pub n: u64,
    pub p: f32,
    pub out_dt: i32,
    pub inp_dt: i32,
    pub _pad: i32,
}

/// The dropout kernel's launch: grid-stride over the n elements, 256 threads per block.
pub fn launch(p: DropoutParams) -> Launch<DropoutParams> {
    Launch {
        module: "dropout",
        name: "dropout_forward".into(),
        grid: (blocks(p.n as usize, 256).min(65535 * 8), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}

unsafe impl cudarc::driver::DeviceRepr for DropoutParams {}

/// The parameter layout (checked against kernels/dropout.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(DropoutParams {
        out,
        inp,
        seed,
        n,
        p,
        out_dt,
        inp_dt,
        _pad
    })]
}
