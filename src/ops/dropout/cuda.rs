//! The CUDA launcher of the standalone dropout (kernels/dropout.cu).

use super::{check, launch, DropoutOps, DropoutParams};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::Result;

impl DropoutOps for Cuda {
    fn dropout_forward(
        &self,
        out: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        d: Dropout,
    ) -> Result<()> {
        check(out, inp)?;
        let n = out.numel();
        let p = DropoutParams {
            out: out.buf.ptr,
            inp: inp.buf.ptr,
            seed: d.seed,
            n: n as u64,
            p: d.p,
            out_dt: dtype_code(out.dtype()),
            inp_dt: dtype_code(inp.dtype()),
            _pad: 0,
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&launch(p)) }
    }
}
