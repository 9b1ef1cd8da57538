//! The CUDA launcher of the span loss (kernels/span_loss.cu).

use super::{dims, launch, SpanLossCfg, SpanLossOps, SpanParams};
use crate::cuda::Cuda;
use crate::kernel::dtype_code;
use crate::ops::Seqs;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

impl SpanLossOps for Cuda {
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Cuda>,
        dlogits: &mut Tensor<Cuda>,
        stats: &mut Tensor<Cuda>,
        logits: &Tensor<Cuda>,
        starts: &Tensor<Cuda>,
        ends: &Tensor<Cuda>,
        seqs: &Seqs<Cuda>,
        scale: &Tensor<Cuda>,
        cfg: SpanLossCfg,
    ) -> Result<()> {
        let (_, b) = dims(losses, dlogits, stats, logits, starts, ends, seqs, scale)?;
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
            stats: stats.buf.ptr,
            dlogits: dlogits.buf.ptr,
            logits: logits.buf.ptr,
            starts: starts.buf.ptr,
            ends: ends.buf.ptr,
            cu: seqs.cu.buf.ptr,
            lens: seqs.lens.buf.ptr,
            b: b as i32,
            mask_padding: cfg.mask_padding as i32,
            dt: dtype_code(logits.dtype()),
            _pad: 0,
            scale: scale.buf.ptr,
        };
        // SAFETY: the shapes match the layout (checked by dims); every address is a live buffer
        for l in launch(p) {
            unsafe { self.run(&l) }?;
        }
        Ok(())
    }
}
