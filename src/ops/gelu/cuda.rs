//! The CUDA launcher of GELU (kernels/gelu.cu).

use super::{check, launch, GeluOps, GeluParams};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
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
}
