//! The CUDA launcher of the span loss (kernels/span_loss.cu).

use super::{dims, launch, SpanLossCfg, SpanLossOps, SpanParams};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

impl SpanLossOps for Cuda {
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Cuda>,
        dlogits: &mut Tensor<Cuda>,
        logits: &Tensor<Cuda>,
        starts: &Tensor<Cuda>,
        ends: &Tensor<Cuda>,
        mask: &Tensor<Cuda>,
        cfg: SpanLossCfg,
    ) -> Result<()> {
        let (b, t) = dims(losses, dlogits, logits, starts, ends, mask)?;
        if losses.dtype() != DType::F32 || dlogits.dtype() != logits.dtype() {
            bail!(
                "span_loss: losses must be f32 and dlogits must match logits ({}), found {} / {}",
                logits.dtype(),
                losses.dtype(),
                dlogits.dtype()
            );
        }
        let p = SpanParams {
            losses: losses.buf.ptr,
            dlogits: dlogits.buf.ptr,
            logits: logits.buf.ptr,
            starts: starts.buf.ptr,
            ends: ends.buf.ptr,
            mask: mask.buf.ptr,
            b: b as i32,
            t: t as i32,
            mask_padding: cfg.mask_padding as i32,
            dt: dtype_code(logits.dtype()),
            scale_start: cfg.scale_start as f32,
            scale_end: cfg.scale_end as f32,
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&launch(p)) }
    }
}
