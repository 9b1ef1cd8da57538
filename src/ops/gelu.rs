//! GELU in BERT's exact (erf) form: `gelu(x) = ½·x·(1 + erf(x/√2))`,
//! `gelu'(x) = ½·(1 + erf(x/√2)) + x·φ(x)`, with φ the standard normal density.

use crate::backend::BackendCore;
use crate::cpu::{rd, wr, Cpu, Real};
use crate::cuda::{dtype_code, Cuda};
use crate::ops::Launch;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use rayon::prelude::*;

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

fn check<B: BackendCore>(op: &str, a: &Tensor<B>, b: &Tensor<B>) -> Result<usize> {
    if a.numel() != b.numel() {
        bail!("{op}: {:?} and {:?} differ in size", a.shape, b.shape);
    }
    Ok(a.numel())
}

pub fn gelu_ref<T: Real>(x: T) -> T {
    let half = T::of(0.5);
    half * x * (T::one() + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

pub fn gelu_grad_ref<T: Real>(x: T) -> T {
    let half = T::of(0.5);
    let cdf = half * (T::one() + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (-half * x * x).exp() * T::of(0.398_942_280_401_432_7);
    cdf + x * pdf
}

impl GeluOps for Cpu {
    fn gelu_forward(&self, out: &mut Tensor<Cpu>, inp: &Tensor<Cpu>) -> Result<()> {
        check("gelu_forward", out, inp)?;
        crate::cpu_compute!(out.dtype, T => {
            let x = rd::<T>(inp);
            let mut o = wr::<T>(out, false);
            o.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = gelu_ref(x);
                }
            });
        });
        Ok(())
    }
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Cpu>,
        dout: &Tensor<Cpu>,
        inp: &Tensor<Cpu>,
    ) -> Result<()> {
        check("gelu_backward", dinp, inp)?;
        check("gelu_backward", dout, inp)?;
        crate::cpu_compute!(dout.dtype, T => {
            let (x, dy) = (rd::<T>(inp), rd::<T>(dout));
            let mut d = wr::<T>(dinp, false);
            d.par_chunks_mut(4096).zip(dy.par_chunks(4096).zip(x.par_chunks(4096))).for_each(|(d, (dy, x))| {
                for i in 0..d.len() {
                    d[i] = dy[i] * gelu_grad_ref(x[i]);
                }
            });
        });
        Ok(())
    }
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
        grid: (super::blocks(p.n as usize, 256).min(1 << 20), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}
unsafe impl cudarc::driver::DeviceRepr for GeluParams {}

impl GeluOps for Cuda {
    fn gelu_forward(&self, out: &mut Tensor<Cuda>, inp: &Tensor<Cuda>) -> Result<()> {
        let n = check("gelu_forward", out, inp)?;
        if out.dtype != inp.dtype {
            bail!(
                "gelu_forward: dtypes {} and {} differ",
                out.dtype,
                inp.dtype
            );
        }
        let p = GeluParams {
            out: out.buf.ptr,
            dout: 0,
            inp: inp.buf.ptr,
            n: n as u64,
            dt: dtype_code(out.dtype),
            _pad: 0,
        };
        self.run(&launch(out.dtype, p, false, crate::cuda::vec_kernels())?)
    }
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        inp: &Tensor<Cuda>,
    ) -> Result<()> {
        let n = check("gelu_backward", dinp, inp)?;
        check("gelu_backward", dout, inp)?;
        if dinp.dtype != inp.dtype || dout.dtype != inp.dtype {
            bail!(
                "gelu_backward: dtypes must match ({}, {}, {})",
                dinp.dtype,
                dout.dtype,
                inp.dtype
            );
        }
        let p = GeluParams {
            out: dinp.buf.ptr,
            dout: dout.buf.ptr,
            inp: inp.buf.ptr,
            n: n as u64,
            dt: dtype_code(inp.dtype),
            _pad: 0,
        };
        self.run(&launch(inp.dtype, p, true, crate::cuda::vec_kernels())?)
    }
}

/// `gelu_{dir}_vec_{dtype}` (16-byte vectors) when `BERTQA_VEC=1` and the buffers allow it, else the scalar
/// `gelu_{dir}` (dtype at run time).
fn gelu_kernel(dir: &str, dt: DType, ptrs: &[u64], vec: bool) -> Result<String> {
    Ok(if vec && crate::cuda::vec_width(dt, ptrs).is_some() {
        gelu_vec_kernel(dir, crate::cuda::suffix(dt)?)
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
