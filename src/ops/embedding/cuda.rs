//! The CUDA launcher of the embeddings (kernels/embedding.cu).

use super::{backward_launch, dims, forward_launch, EmbGrads, EmbParams, EmbWeights, EmbeddingOps};
use crate::cuda::Cuda;
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

impl EmbeddingOps for Cuda {
    fn embeddings_forward(
        &self,
        out: &mut Tensor<Cuda>,
        mean: &mut Tensor<Cuda>,
        rstd: &mut Tensor<Cuda>,
        idt: &Tensor<Cuda>,
        tyt: &Tensor<Cuda>,
        seqs: &Seqs<Cuda>,
        w: &EmbWeights<Cuda>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()> {
        let (n, c, v, _, tv) = dims("embeddings_forward", out, mean, rstd, idt, tyt, seqs, w)?;
        for d in [
            w.word.dtype(),
            w.pos.dtype(),
            w.ttype.dtype(),
            w.gamma.dtype(),
            w.beta.dtype(),
        ] {
            if d != out.dtype() {
                bail!(
                    "embeddings_forward: weights ({d}) and output ({}) must share a dtype",
                    out.dtype()
                );
            }
        }
        let p = EmbParams {
            out: out.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            ids: idt.buf.ptr,
            types: tyt.buf.ptr,
            posid: seqs.pos.buf.ptr,
            roww: seqs.row_w.buf.ptr,
            word: w.word.buf.ptr,
            pos: w.pos.buf.ptr,
            ttype: w.ttype.buf.ptr,
            gamma: w.gamma.buf.ptr,
            beta: w.beta.buf.ptr,
            dword: 0,
            dpos: 0,
            dttype: 0,
            dgamma: 0,
            dbeta: 0,
            site: drop.site,
            step: seqs.step.buf.ptr,
            n: n as i32,
            c: c as i32,
            v: v as i32,
            tv: tv as i32,
            eps,
            p: drop.p,
            padding_idx: -1,
            _pad: 0,
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&forward_launch(out.dtype(), p)?) }
    }

    fn embeddings_backward(
        &self,
        g: &mut EmbGrads<Cuda>,
        dout: &Tensor<Cuda>,
        mean: &Tensor<Cuda>,
        rstd: &Tensor<Cuda>,
        idt: &Tensor<Cuda>,
        tyt: &Tensor<Cuda>,
        seqs: &Seqs<Cuda>,
        w: &EmbWeights<Cuda>,
        drop: Dropout,
    ) -> Result<()> {
        let (n, c, v, _, tv) = dims("embeddings_backward", dout, mean, rstd, idt, tyt, seqs, w)?;
        for d in [
            g.word.dtype(),
            g.pos.dtype(),
            g.ttype.dtype(),
            g.gamma.dtype(),
            g.beta.dtype(),
        ] {
            if d != DType::F32 {
                bail!("embeddings_backward: parameter gradients must be f32 on CUDA, found {d}");
            }
        }
        let p = EmbParams {
            out: dout.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            ids: idt.buf.ptr,
            types: tyt.buf.ptr,
            posid: seqs.pos.buf.ptr,
            roww: seqs.row_w.buf.ptr,
            word: w.word.buf.ptr,
            pos: w.pos.buf.ptr,
            ttype: w.ttype.buf.ptr,
            gamma: w.gamma.buf.ptr,
            beta: w.beta.buf.ptr,
            dword: g.word.buf.ptr,
            dpos: g.pos.buf.ptr,
            dttype: g.ttype.buf.ptr,
            dgamma: g.gamma.buf.ptr,
            dbeta: g.beta.buf.ptr,
            site: drop.site,
            step: seqs.step.buf.ptr,
            n: n as i32,
            c: c as i32,
            v: v as i32,
            tv: tv as i32,
            eps: 0.0,
            p: drop.p,
            padding_idx: g.padding_idx,
            _pad: 0,
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe {
            self.run(&backward_launch(
                dout.dtype(),
                p,
                self.kernels().vec,
                self.sm_count as usize,
            )?)
        }
    }
}
