//! Linear layer with HF's weight layout: `out (N,OC) = inp (N,IC)·Wᵀ + b`, W `(OC,IC)`.
//! Backward: `dinp = dout·W` (overwrite, or `+=` with `accumulate_dinp` — the residual stream adds it to the
//! gradient already there), `dW += doutᵀ·inp`, `db += Σ_rows dout`.
//! CPU: the GEMMs go through `cpu::gemm` (matrixmultiply); CUDA: cublasGemmEx with f32 accumulation, bf16
//! operands and an f32 `dW`, plus the bias kernels in kernels/reduce.cu — or, with `BERTQA_GEMM=lt`, every
//! GEMM through cuBLASLt and the forward as one matmul with a bias epilogue (src/cuda/lt.rs); with
//! `BERTQA_VEC=1` the bias gradient with 16-byte loads.

use crate::backend::BackendCore;
use crate::cpu::{gemm, rd, wr, Cpu};
use crate::cuda::{dtype_code, Cuda};
use crate::ops::Launch;
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
fn dims<B: BackendCore>(
    op: &str,
    inp: &Tensor<B>,
    out: &Tensor<B>,
    w: &Tensor<B>,
    b: Option<&Tensor<B>>,
) -> Result<(usize, usize, usize)> {
    if w.shape.len() != 2 {
        bail!("{op}: weight must be (OC,IC), found {:?}", w.shape);
    }
    let (oc, ic) = (w.shape[0], w.shape[1]);
    if inp.shape.last() != Some(&ic) {
        bail!(
            "{op}: input {:?} must end in IC={ic} (weight {:?})",
            inp.shape,
            w.shape
        );
    }
    if out.shape.last() != Some(&oc) {
        bail!(
            "{op}: output {:?} must end in OC={oc} (weight {:?})",
            out.shape,
            w.shape
        );
    }
    let n = inp.numel() / ic.max(1);
    if out.numel() != n * oc {
        bail!(
            "{op}: input {:?} and output {:?} have different row counts",
            inp.shape,
            out.shape
        );
    }
    if let Some(b) = b {
        b.expect(&format!("{op}: bias"), &[oc])?;
    }
    Ok((n, ic, oc))
}

impl LinearOps for Cpu {
    fn linear_forward(
        &self,
        out: &mut Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        w: &Tensor<Cpu>,
        b: Option<&Tensor<Cpu>>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_forward", inp, out, w, b)?;
        crate::cpu_compute!(out.dtype, T => {
            let (x, wt) = (rd::<T>(inp), rd::<T>(w));
            let mut o = wr::<T>(out, false);
            gemm(n, ic, oc, T::one(), &x, false, &wt, true, T::zero(), &mut o);
            if let Some(b) = b {
                let bv = rd::<T>(b);
                for r in 0..n {
                    for j in 0..oc {
                        o[r * oc + j] += bv[j];
                    }
                }
            }
        });
        Ok(())
    }

    fn linear_backward(
        &self,
        dinp: Option<&mut Tensor<Cpu>>,
        accumulate_dinp: bool,
        dw: &mut Tensor<Cpu>,
        db: Option<&mut Tensor<Cpu>>,
        dout: &Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        w: &Tensor<Cpu>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_backward", inp, dout, w, None)?;
        dw.expect("linear_backward: dweight", &w.shape)?;
        crate::cpu_compute!(dout.dtype, T => {
            let (dy, x, wt) = (rd::<T>(dout), rd::<T>(inp), rd::<T>(w));
            if let Some(di) = dinp {
                if di.numel() != n * ic {
                    bail!("linear_backward: dinp {:?} must match inp {:?}", di.shape, inp.shape);
                }
                let beta = if accumulate_dinp { T::one() } else { T::zero() };
                let mut d = wr::<T>(di, accumulate_dinp);
                gemm(n, oc, ic, T::one(), &dy, false, &wt, false, beta, &mut d);
            }
            {
                let mut g = wr::<T>(dw, true);
                gemm(oc, n, ic, T::one(), &dy, true, &x, false, T::one(), &mut g);
            }
            if let Some(db) = db {
                db.expect("linear_backward: dbias", &[oc])?;
                let mut g = wr::<T>(db, true);
                for r in 0..n {
                    for j in 0..oc {
                        g[j] += dy[r * oc + j];
                    }
                }
            }
        });
        Ok(())
    }
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

impl LinearOps for Cuda {
    fn linear_forward(
        &self,
        out: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        b: Option<&Tensor<Cuda>>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_forward", inp, out, w, b)?;
        if let (Some(b), Some(lt)) = (b, self.lt()?) {
            let same = [inp.dtype, w.dtype, b.dtype]
                .iter()
                .all(|d| *d == out.dtype);
            let g = crate::cuda::lt::Gemm {
                m: n,
                k: ic,
                n: oc,
                ta: false,
                tb: true,
                ab: inp.dtype,
                c: out.dtype,
                bias: true,
            };
            // SAFETY: the shapes were checked above; every buffer is a device allocation of this context.
            let (a, wp, bp, o) = (inp.buf.ptr, w.buf.ptr, b.buf.ptr, out.buf.ptr);
            let mut fused = false;
            if same {
                self.profiled(
                    || crate::cuda::gemm_label(&g),
                    || {
                        fused = unsafe { lt.gemm(&self.stream, &g, 1.0, a, wp, 0.0, o, bp)? };
                        Ok(())
                    },
                )?;
            }
            if fused {
                return Ok(());
            }
        }
        self.gemm(n, ic, oc, 1.0, inp, false, w, true, 0.0, out)?;
        if let Some(b) = b {
            let p = BiasParams {
                out: out.buf.ptr,
                bias: b.buf.ptr,
                n: n as i32,
                oc: oc as i32,
                out_dt: dtype_code(out.dtype),
                bias_dt: dtype_code(b.dtype),
            };
            self.run(&bias_add_launch(p))?;
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        dinp: Option<&mut Tensor<Cuda>>,
        accumulate_dinp: bool,
        dw: &mut Tensor<Cuda>,
        db: Option<&mut Tensor<Cuda>>,
        dout: &Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_backward", inp, dout, w, None)?;
        dw.expect("linear_backward: dweight", &w.shape)?;
        if dw.dtype != DType::F32 {
            bail!(
                "linear_backward: weight gradients are f32 on CUDA, found {}",
                dw.dtype
            );
        }
        if let Some(di) = dinp {
            if di.numel() != n * ic {
                bail!(
                    "linear_backward: dinp {:?} must match inp {:?}",
                    di.shape,
                    inp.shape
                );
            }
            self.gemm(
                n,
                oc,
                ic,
                1.0,
                dout,
                false,
                w,
                false,
                if accumulate_dinp { 1.0 } else { 0.0 },
                di,
            )?;
        }
        self.gemm(oc, n, ic, 1.0, dout, true, inp, false, 1.0, dw)?;
        if let Some(db) = db {
            db.expect("linear_backward: dbias", &[oc])?;
            if db.dtype != DType::F32 {
                bail!(
                    "linear_backward: bias gradients are f32 on CUDA, found {}",
                    db.dtype
                );
            }
            let p = BiasParams {
                out: dout.buf.ptr,
                bias: db.buf.ptr,
                n: n as i32,
                oc: oc as i32,
                out_dt: dtype_code(dout.dtype),
                bias_dt: 0,
            };
            self.run(&bias_grad_launch(
                dout.dtype,
                p,
                crate::cuda::vec_kernels(),
                self.sm_count as usize,
            )?)?;
        }
        Ok(())
    }
}

/// The launch of out (N, OC) += bias (OC) (the linear forward without cuBLASLt's epilogue): grid-stride
/// over the N·OC elements.
pub fn bias_add_launch(p: BiasParams) -> Launch<BiasParams> {
    Launch {
        module: "reduce",
        name: "bias_add".into(),
        grid: (
            super::blocks(p.n as usize * p.oc as usize, 256).min(65535 * 16),
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
        // 32 groups of w columns per block; enough row-slices for ~4 blocks per SM
        let grid_x = super::blocks(oc / w, 32);
        let want = (4 * sm_count.max(1) as u32).div_ceil(grid_x);
        let grid_y = want.clamp(1, n.div_ceil(8).max(1) as u32);
        (
            bias_grad_vec_kernel(crate::cuda::suffix(dt)?),
            (grid_x, grid_y, 1),
        )
    } else {
        // Column sums: blocks of 32 columns × 8 row-groups, then an atomicAdd per column per block.
        let grid_x = super::blocks(oc, 32);
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
