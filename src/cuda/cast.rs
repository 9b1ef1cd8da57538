//! Dtype casts on the device (`BackendCore::cast`): kernels/reduce.cu `cast`, grid-stride over the elements.

use super::Cuda;
use crate::kernel::{blocks, dtype_code, Launch};
use crate::tensor::DType;
use anyhow::{bail, Result};

/// kernels/reduce.cu `CastParams`: device addresses, element count, `dtype_code`s.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CastParams {
    pub dst: u64,
    pub src: u64,
    pub n: u64,
    pub dst_dt: i32,
    pub src_dt: i32,
}
unsafe impl cudarc::driver::DeviceRepr for CastParams {}

/// The cast kernel's launch: grid-stride over the n elements.
pub fn cast_launch(p: CastParams) -> Launch<CastParams> {
    Launch {
        module: "reduce",
        name: "cast".into(),
        grid: (blocks(p.n as usize, 256).min(1 << 16), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}

/// The parameter layout (checked against kernels/reduce.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(CastParams {
        dst,
        src,
        n,
        dst_dt,
        src_dt
    })]
}

/// `dst[i] = src[i]` for n elements, converting; the caller has checked both buffers hold n elements.
pub(super) fn cast(be: &Cuda, dst: u64, dd: DType, src: u64, sd: DType, n: usize) -> Result<()> {
    if !dd.is_float() || !sd.is_float() {
        bail!("cast: only float dtypes ({sd} -> {dd})");
    }
    let p = CastParams {
        dst,
        src,
        n: n as u64,
        dst_dt: dtype_code(dd),
        src_dt: dtype_code(sd),
    };
    // SAFETY: dst and src hold n elements of their dtypes (checked by BackendCore::cast)
    unsafe { be.run(&cast_launch(p)) }
}
