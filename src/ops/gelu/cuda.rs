//! The CUDA launcher of GELU (kernels/gelu.cu).

use super::{backward_bias_launch, bias_dims, check, launch, GeluBiasParams, GeluOps, GeluParams};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::tensor::DType;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

impl GeluOps for Cuda {
    fn gelu_forward(&self, out: &mut Tensor<Cuda>, inp: &Tensor<Cuda>) -> Result<()> {
        let n = check("gelu_forward", out, inp)?;
        if out.dtype() != inp.dtype() {
            bail!(
                "gelu_forward: dtypes {} and {} differ",
                out.dtype(),
                inp.dtype()
            );
        }
        let p = GeluParams {
            out: out.buf.ptr,
            dout: 0,
            inp: inp.buf.ptr,
            n: n as u64,
            dt: dtype_code(out.dtype()),
            _pad: 0,
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&launch(out.dtype(), p, false, self.kernels().vec)?) }
    }
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        inp: &Tensor<Cuda>,
    ) -> Result<()> {
        let n = check("gelu_backward", dinp, inp)?;
        check("gelu_backward", dout, inp)?;
        if dinp.dtype() != inp.dtype() || dout.dtype() != inp.dtype() {
            bail!(
                "gelu_backward: dtypes must match ({}, {}, {})",
                dinp.dtype(),
                dout.dtype(),
                inp.dtype()
            );
        }
        let p = GeluParams {
            out: dinp.buf.ptr,
            dout: dout.buf.ptr,
            inp: inp.buf.ptr,
            n: n as u64,
            dt: dtype_code(inp.dtype()),
            _pad: 0,
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&launch(inp.dtype(), p, true, self.kernels().vec)?) }
    }

    fn gelu_backward_bias(
        &self,
        dinp: &mut Tensor<Cuda>,
        dbias: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        inp: &Tensor<Cuda>,
    ) -> Result<()> {
        let (n, c) = bias_dims(dinp, dbias, dout, inp)?;
        if dbias.dtype() != DType::F32 {
            bail!(
                "gelu_backward_bias: bias gradients are f32 on CUDA, found {}",
                dbias.dtype()
            );
        }
        if dinp.dtype() != inp.dtype() || dout.dtype() != inp.dtype() {
            bail!(
                "gelu_backward_bias: dtypes must match ({}, {}, {})",
                dinp.dtype(),
                dout.dtype(),
                inp.dtype()
            );
        }
        let p = GeluBiasParams {
            out: dinp.buf.ptr,
            dout: dout.buf.ptr,
            inp: inp.buf.ptr,
            dbias: dbias.buf.ptr,
            n: n as i32,
            c: c as i32,
        };
        let k = self.kernels();
        if let Some(l) = backward_bias_launch(inp.dtype(), p, k.vec, self.sm_count as usize)? {
            // SAFETY: dinp, dout, inp hold N·C elements and dbias C f32 (checked above)
            return unsafe { self.run(&l) };
        }
        // unfused: dinp, then its column sums (what linear_backward would do)
        self.gelu_backward(dinp, dout, inp)?;
        self.bias_grad(dbias, dinp, n, c)
    }
}
