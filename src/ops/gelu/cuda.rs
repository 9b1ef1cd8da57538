//! The CUDA launcher of GELU (kernels/gelu.cu).

use super::{
    backward_bias_launch, bias_cols, bias_dims, check, launch, GeluBiasParams, GeluOps, GeluParams,
};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::tensor::DType;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

impl GeluOps for Cuda {
    fn gelu_forward(
        &self,
        out: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
    ) -> Result<()> {
        let n = check("gelu_forward", out, inp)?;
        let c = bias_cols("gelu_forward", inp, bias)?;
        if out.dtype() != inp.dtype() || bias.is_some_and(|b| b.dtype() != inp.dtype()) {
            bail!(
                "gelu_forward: dtypes of out ({}), inp ({}) and bias must match",
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
            c: c as i32,
            bias: bias.map_or(0, |b| b.buf.ptr),
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&launch(out.dtype(), p, false, self.kernels().vec)?) }
    }
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
    ) -> Result<()> {
        let n = check("gelu_backward", dinp, inp)?;
        check("gelu_backward", dout, inp)?;
        let c = bias_cols("gelu_backward", inp, bias)?;
        if dinp.dtype() != inp.dtype()
            || dout.dtype() != inp.dtype()
            || bias.is_some_and(|b| b.dtype() != inp.dtype())
        {
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
            c: c as i32,
            bias: bias.map_or(0, |b| b.buf.ptr),
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
        bias: Option<&Tensor<Cuda>>,
    ) -> Result<()> {
        let (n, c) = bias_dims(dinp, dbias, dout, inp)?;
        bias_cols("gelu_backward_bias", inp, bias)?;
        if bias.is_some_and(|b| b.dtype() != inp.dtype()) {
            bail!("gelu_backward_bias: the bias must be {}", inp.dtype());
        }
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
            bias: bias.map_or(0, |b| b.buf.ptr),
        };
        let k = self.kernels();
        if let Some(l) = backward_bias_launch(inp.dtype(), p, k.vec, self.sm_count as usize)? {
            // SAFETY: dinp, dout, inp hold N·C elements and dbias C f32 (checked above)
            return unsafe { self.run(&l) };
        }
        // unfused: dinp (at inp + bias), then its column sums (what linear_backward would do)
        self.gelu_backward(dinp, dout, inp, bias)?;
        self.bias_grad(dbias, dinp, n, c)
    }
}
