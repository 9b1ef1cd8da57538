//! The CUDA launcher of the fused attention: the plan of mod.rs (variant from the backend's kernel
//! configuration) with device addresses; the backward's scratch (D, and variant 4's f32 dQ accumulator) is
//! the caller's (the activation plan's).

use super::{check_scratch, dims, AttentionOps, AttnParams, AttnPlan, CUDA_HEAD_SIZES};
use crate::cuda::Cuda;
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

fn cuda_checks(op: &str, act: DType, others: &[DType], lse: DType, hs: usize) -> Result<()> {
    if !CUDA_HEAD_SIZES.contains(&hs) {
        bail!("{op}: head size {hs} has no CUDA kernel (supported: {CUDA_HEAD_SIZES:?})");
    }
    for d in others {
        if *d != act {
            bail!("{op}: activations must share one dtype ({act}), found {d}");
        }
    }
    if lse != DType::F32 {
        bail!("{op}: lse must be f32 on CUDA, found {lse}");
    }
    Ok(())
}

impl AttentionOps for Cuda {
    fn attention_forward(
        &self,
        out: &mut Tensor<Cuda>,
        lse: &mut Tensor<Cuda>,
        qkv: &Tensor<Cuda>,
        seqs: &Seqs<Cuda>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (n, _, hs) = dims("attention_forward", out, lse, qkv, seqs, nh)?;
        cuda_checks(
            "attention_forward",
            out.dtype(),
            &[qkv.dtype()],
            lse.dtype(),
            hs,
        )?;
        let plan = AttnPlan::new(
            self.kernels(),
            out.dtype(),
            seqs.b(),
            n,
            seqs.grid_rows(),
            nh,
            hs,
            drop,
        );
        let ptr = AttnParams {
            out: out.buf.ptr,
            lse: lse.buf.ptr,
            qkv: qkv.buf.ptr,
            cu: seqs.cu.buf.ptr,
            lens: seqs.lens.buf.ptr,
            wid: seqs.wid.buf.ptr,
            step: seqs.step.buf.ptr,
            ..bytemuck::Zeroable::zeroed()
        };
        for l in plan.forward(ptr)? {
            // SAFETY: out, lse, qkv hold the layout's N rows (checked by dims); cu, lens, wid its windows
            unsafe { self.run(&l) }?;
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Tensor<Cuda>,
        dbias: Option<&mut Tensor<Cuda>>,
        dout: &Tensor<Cuda>,
        out: &Tensor<Cuda>,
        lse: &Tensor<Cuda>,
        qkv: &Tensor<Cuda>,
        seqs: &Seqs<Cuda>,
        nh: usize,
        drop: Dropout,
        scratch: &mut Tensor<Cuda>,
    ) -> Result<()> {
        let (n, c, hs) = dims("attention_backward", out, lse, qkv, seqs, nh)?;
        dout.expect("attention_backward: dout", out.shape())?;
        dqkv.expect("attention_backward: dqkv", qkv.shape())?;
        check_scratch(scratch, lse, n, c, nh)?;
        if let Some(d) = &dbias {
            d.expect("attention_backward: dbias", &[3 * c])?;
            if d.dtype() != DType::F32 {
                bail!(
                    "attention_backward: bias gradients are f32 on CUDA, found {}",
                    d.dtype()
                );
            }
        }
        cuda_checks(
            "attention_backward",
            out.dtype(),
            &[qkv.dtype(), dout.dtype(), dqkv.dtype()],
            lse.dtype(),
            hs,
        )?;
        let plan = AttnPlan::new(
            self.kernels(),
            out.dtype(),
            seqs.b(),
            n,
            seqs.grid_rows(),
            nh,
            hs,
            drop,
        );
        // the kernels add the bias gradient themselves (tensor-core variants; their vector reductions need an
        // 8-byte-aligned dbias), or the bias-gradient kernel runs after them
        let fused = |d: &Tensor<Cuda>| plan.fuses_bias_grad() && d.buf.ptr.is_multiple_of(8);
        // variant 4's f32 dQ accumulator (N,C), then D = dO·O (NH,N), in the caller's scratch; the first kernel
        // of the backward writes every element of D (and zeroes the accumulator): no memsets
        let dq = scratch.view(self, 0, &[n, c])?;
        let dsum = scratch.view(self, n * c, &[nh, n])?;
        let dq = plan.needs_dq_accumulator().then_some(dq);
        let ptr = AttnParams {
            out: out.buf.ptr,
            lse: lse.buf.ptr,
            qkv: qkv.buf.ptr,
            cu: seqs.cu.buf.ptr,
            lens: seqs.lens.buf.ptr,
            wid: seqs.wid.buf.ptr,
            step: seqs.step.buf.ptr,
            dout: dout.buf.ptr,
            dqkv: dqkv.buf.ptr,
            dsum: dsum.buf.ptr,
            dqacc: dq.as_ref().map_or(0, |d| d.buf.ptr),
            dbias: match &dbias {
                Some(d) if fused(d) => d.buf.ptr,
                _ => 0,
            },
            ..bytemuck::Zeroable::zeroed()
        };
        for l in plan.backward(ptr)? {
            // SAFETY: as in the forward; dsum and dq hold (NH,N) and (N,C) f32, dbias 3C f32
            unsafe { self.run(&l) }?;
        }
        if let Some(d) = dbias {
            if !fused(d) {
                self.bias_grad(d, dqkv, n, 3 * c)?;
            }
        }
        Ok(())
    }
}
