//! The CUDA launcher of the standalone dropout (kernels/dropout.cu).

use super::{check, launch, DropoutOps, DropoutParams};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::Result;

impl DropoutOps for Cuda {
    fn dropout_forward(
        &self,
        out: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        d: Dropout,
        seqs: &Seqs<Cuda>,
    ) -> Result<()> {
        let (n, c) = check(out, inp, seqs)?;
        let p = DropoutParams {
            out: out.buf.ptr,
            inp: inp.buf.ptr,
            pos: seqs.pos.buf.ptr,
            roww: seqs.row_w.buf.ptr,
            site: d.site,
            step: seqs.step.buf.ptr,
            n: n as i32,
            c: c as i32,
            p: d.p,
            out_dt: dtype_code(out.dtype()),
            inp_dt: dtype_code(inp.dtype()),
            _pad: 0,
        };
        // SAFETY: out and inp hold N·C elements, pos and row_w N (checked above)
        unsafe { self.run(&launch(p)) }
    }
}
