//! GELU in BERT's exact (erf) form: `gelu(x) = ½·x·(1 + erf(x/√2))`,
//! `gelu'(x) = ½·(1 + erf(x/√2)) + x·φ(x)`, with φ the standard normal density.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, Launch};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub trait GeluOps: BackendCore {
    /// out (n) ← inp (n).
    fn gelu_forward(&self, out: &mut Tensor<Self>, inp: &Tensor<Self>) -> Result<()>;
    /// dinp (n) (overwritten) ← dout (n), inp (n).
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        inp: &Tensor<Self>,
    ) -> Result<()>;
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
    pub _pad: i32,
}

/// The launch of GELU forward (`backward` false) or backward over `p.n` elements of `dt`: grid-stride,
/// 256 threads per block; the 16-byte vec kernel when `vec` and the buffers are aligned for it.
pub fn launch(dt: DType, p: GeluParams, backward: bool, vec: bool) -> Result<Launch<GeluParams>> {
    let (dir, ptrs) = if backward {
        ("backward", vec![p.out, p.dout, p.inp])
    } else {
        ("forward", vec![p.out, p.inp])
    };
    Ok(Launch {
        module: "gelu",
        name: gelu_kernel(dir, dt, &ptrs, vec)?,
        grid: (blocks(p.n as usize, 256).min(1 << 20), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}

unsafe impl cudarc::driver::DeviceRepr for GeluParams {}

/// `gelu_{dir}_vec_{dtype}` (16-byte vectors) when `BERTQA_VEC=1` and the buffers allow it, else the scalar
/// `gelu_{dir}` (dtype at run time).
fn gelu_kernel(dir: &str, dt: DType, ptrs: &[u64], vec: bool) -> Result<String> {
    Ok(if vec && crate::cuda::vec_width(dt, ptrs).is_some() {
        gelu_vec_kernel(dir, crate::kernel::suffix(dt)?)
    } else {
        format!("gelu_{dir}")
    })
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
    }
    v
}

/// The parameter layout (checked against kernels/gelu.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(GeluParams {
        out,
        dout,
        inp,
        n,
        dt,
        _pad
    })]
}
