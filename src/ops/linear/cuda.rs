//! The CUDA launcher of the linear layer: cuBLAS(Lt) GEMMs, then the bias kernels of kernels/reduce.cu.

use super::{bias_add_launch, bias_grad_launch, dims, BiasParams, LinearOps};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

impl LinearOps for Cuda {
    fn linear_forward(
        &self,
        out: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        w: &Tensor<Cuda>,
        b: Option<&Tensor<Cuda>>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_forward", inp, out, w, b)?;
        if let Some(b) = b {
            if self.linear_bias_epilogue(out, inp, w, b, (n, ic, oc))? {
                return Ok(());
            }
        }
        self.gemm(n, ic, oc, 1.0, inp, false, w, true, 0.0, out)?;
        if let Some(b) = b {
            if out.dtype() != b.dtype() && b.dtype() != DType::F32 {
                bail!(
                    "linear_forward: bias is {}, output {}",
                    b.dtype(),
                    out.dtype()
                );
            }
            let p = BiasParams {
                out: out.buf.ptr,
                bias: b.buf.ptr,
                n: n as i32,
                oc: oc as i32,
                out_dt: dtype_code(out.dtype()),
                bias_dt: dtype_code(b.dtype()),
            };
            // SAFETY: out holds N·OC elements and bias OC (checked by dims)
            unsafe { self.run(&bias_add_launch(p)) }?;
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
        dw.expect("linear_backward: dweight", w.shape())?;
        if dw.dtype() != DType::F32 {
            bail!(
                "linear_backward: weight gradients are f32 on CUDA, found {}",
                dw.dtype()
            );
        }
        if let Some(di) = dinp {
            if di.numel() != n * ic {
                bail!(
                    "linear_backward: dinp {:?} must match inp {:?}",
                    di.shape(),
                    inp.shape()
                );
            }
            let beta = if accumulate_dinp { 1.0 } else { 0.0 };
            self.gemm(n, oc, ic, 1.0, dout, false, w, false, beta, di)?;
        }
        self.gemm(oc, n, ic, 1.0, dout, true, inp, false, 1.0, dw)?;
        if let Some(db) = db {
            db.expect("linear_backward: dbias", &[oc])?;
            if db.dtype() != DType::F32 {
                bail!(
                    "linear_backward: bias gradients are f32 on CUDA, found {}",
                    db.dtype()
                );
            }
            self.bias_grad(db, dout, n, oc)?;
        }
        Ok(())
    }
}

impl Cuda {
    /// db (OC, f32) += the column sums of dout (N, OC): kernels/reduce.cu's bias_grad (or its vec version).
    /// The caller has checked the shapes and that db is f32.
    pub(crate) fn bias_grad(
        &self,
        db: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        let p = BiasParams {
            out: dout.buf.ptr,
            bias: db.buf.ptr,
            n: n as i32,
            oc: oc as i32,
            out_dt: dtype_code(dout.dtype()),
            bias_dt: 0,
        };
        let l = bias_grad_launch(dout.dtype(), p, self.kernels().vec, self.sm_count as usize)?;
        // SAFETY: the caller checked dout (N·OC elements) and db (OC f32)
        unsafe { self.run(&l) }
    }
}
