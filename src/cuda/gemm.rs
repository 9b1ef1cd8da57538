//! GEMMs on the CUDA backend: cuBLASLt when the kernel configuration asks for it (and it has an algorithm),
//! else cublasGemmEx; f32 accumulation either way. The entry points take tensors and check that every operand
//! holds the elements the shapes imply, so the device pointers never leave this module unchecked.

use super::{lt, Cuda};
use crate::tensor::{DType, Tensor};
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys as bsys;

/// How the profiler names a GEMM: `gemm M×K×N` (row-major C(M,N) = op(A)(M,K)·op(B)(K,N)), transposes,
/// dtypes, ` lt` when cuBLASLt ran it and `+bias` for its bias epilogue.
fn label(g: &lt::Gemm, ran_lt: bool) -> String {
    let lt = if ran_lt { " lt" } else { "" };
    let bias = if g.bias { " +bias" } else { "" };
    format!("gemm {}{lt}{bias}", g.shape())
}

fn fits(what: &str, t: &Tensor<Cuda>, n: usize) -> Result<()> {
    if t.numel() < n {
        bail!(
            "gemm: {what} {:?} holds {} elements, the GEMM needs {n}",
            t.shape(),
            t.numel()
        );
    }
    Ok(())
}

impl Cuda {
    /// Row-major GEMM: `C(m,n) = alpha·op(A)(m,k)·op(B)(k,n) + beta·C`, A stored (m,k) or (k,m) when `ta`, B
    /// stored (k,n) or (n,k) when `tb` — the same contract as [`crate::cpu::gemm`]. A and B share a dtype (f32
    /// or bf16/f16); C is that dtype or f32; accumulation is f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &Tensor<Cuda>,
        ta: bool,
        b: &Tensor<Cuda>,
        tb: bool,
        beta: f32,
        c: &mut Tensor<Cuda>,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if a.dtype() != b.dtype() {
            bail!("gemm: A is {} but B is {}", a.dtype(), b.dtype());
        }
        fits("A", a, m * k)?;
        fits("B", b, k * n)?;
        fits("C", c, m * n)?;
        let g = lt::Gemm {
            m,
            k,
            n,
            ta,
            tb,
            ab: a.dtype(),
            c: c.dtype(),
            bias: false,
        };
        let (ap, bp, cp) = (a.buf.ptr, b.buf.ptr, c.buf.ptr);
        let ran_lt = std::cell::Cell::new(false);
        self.profiled(
            || label(&g, ran_lt.get()),
            // SAFETY: every operand holds the elements the shapes imply (checked above)
            || {
                ran_lt.set(unsafe { self.gemm_raw(&g, alpha, ap, bp, beta, cp)? });
                Ok(())
            },
        )
    }

    /// `out (n_rows, oc) = inp (n_rows, ic)·wᵀ + bias` as one cuBLASLt matmul with the bias in its epilogue,
    /// when cuBLASLt is on and has an algorithm for it (all operands one bf16/f16 dtype); Ok(false), having
    /// done nothing, otherwise.
    pub(crate) fn linear_bias_epilogue(
        &self,
        out: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        bias: &Tensor<Cuda>,
        (rows, ic, oc): (usize, usize, usize),
    ) -> Result<bool> {
        let Some(lt) = self.lt()? else {
            return Ok(false);
        };
        let dt = out.dtype();
        if [inp.dtype(), w.dtype(), bias.dtype()]
            .iter()
            .any(|d| *d != dt)
        {
            return Ok(false);
        }
        fits("A", inp, rows * ic)?;
        fits("B", w, oc * ic)?;
        fits("bias", bias, oc)?;
        fits("C", out, rows * oc)?;
        let g = lt::Gemm {
            m: rows,
            k: ic,
            n: oc,
            ta: false,
            tb: true,
            ab: dt,
            c: dt,
            bias: true,
        };
        let (a, wp, bp, o) = (inp.buf.ptr, w.buf.ptr, bias.buf.ptr, out.buf.ptr);
        let mut fused = false;
        let ran = std::cell::Cell::new(false);
        // a declined epilogue ran nothing: no profiler row (the caller's GEMM and bias pass file their own)
        self.profiled_if(
            || ran.get().then(|| label(&g, true)),
            || {
                // SAFETY: the operands hold the elements the shapes imply (checked above)
                fused =
                    unsafe { lt.gemm(&self.stream, &g, 1.0, a, wp, 0.0, o, bp, self.may_plan())? };
                ran.set(fused);
                Ok(())
            },
        )?;
        Ok(fused)
    }

    /// `g` through cuBLASLt when it is on and has an algorithm (Ok(true)), else through cublasGemmEx
    /// (Ok(false)).
    ///
    /// # Safety
    /// `a`, `b` and `c` are device buffers of this context holding the elements `g` describes.
    unsafe fn gemm_raw(
        &self,
        g: &lt::Gemm,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
    ) -> Result<bool> {
        let &lt::Gemm {
            m,
            k,
            n,
            ta,
            tb,
            ab: adt,
            c: cdt,
            ..
        } = g;
        if let Some(lt) = self.lt()? {
            if unsafe { lt.gemm(&self.stream, g, alpha, a, b, beta, c, 0, self.may_plan())? } {
                return Ok(true);
            }
        }
        let dt = |d: DType| -> Result<bsys::cudaDataType_t> {
            Ok(match d {
                DType::F32 => bsys::cudaDataType_t::CUDA_R_32F,
                DType::BF16 => bsys::cudaDataType_t::CUDA_R_16BF,
                DType::F16 => bsys::cudaDataType_t::CUDA_R_16F,
                _ => bail!("gemm: dtype {d} not supported on CUDA"),
            })
        };
        // f32 GEMMs are the parity path: full f32 (no TF32)
        let compute = bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
        // Column-major view: B stored (k,n) row-major is a (n,k) column-major matrix with ld n.
        let (opb, ldb) = if tb {
            (bsys::cublasOperation_t::CUBLAS_OP_T, k)
        } else {
            (bsys::cublasOperation_t::CUBLAS_OP_N, n)
        };
        let (opa, lda) = if ta {
            (bsys::cublasOperation_t::CUBLAS_OP_T, m)
        } else {
            (bsys::cublasOperation_t::CUBLAS_OP_N, k)
        };
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                opb,
                opa,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b as *const _,
                dt(adt)?,
                ldb as i32,
                a as *const _,
                dt(adt)?,
                lda as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                dt(cdt)?,
                n as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            anyhow!(
                "cublasGemmEx (m={m}, k={k}, n={n}, {adt}->{cdt}, ta={ta}, tb={tb}) failed: {e:?}"
            )
        })?;
        Ok(false)
    }
}

impl Cuda {
    /// `y[i] += x[i]` for `n` f32 (cuBLAS saxpy, alpha 1, on this backend's stream); device addresses of
    /// buffers the caller checked.
    pub(crate) fn saxpy_one(&self, y: u64, x: u64, n: usize) -> Result<()> {
        let alpha = 1.0f32;
        // SAFETY: the caller checked that x and y hold n f32 each; the handle is bound to self.stream
        let st = unsafe {
            bsys::cublasSaxpy_v2_64(
                *self.blas.handle(),
                n as i64,
                &alpha,
                x as *const f32,
                1,
                y as *mut f32,
                1,
            )
        };
        match st {
            bsys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
            e => bail!("cublasSaxpy (n={n}) failed: {e:?}"),
        }
    }
}
