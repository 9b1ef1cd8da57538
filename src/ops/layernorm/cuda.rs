//! The CUDA launcher of residual + dropout + LayerNorm (kernels/layernorm.cu).

use super::{backward_launch, dims, forward_launch, LayerNormOps, LnBwdParams, LnFwdParams};
use crate::cuda::Cuda;
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

fn cuda_dtypes(op: &str, act: DType, all_act: &[DType], f32s: &[DType]) -> Result<()> {
    for d in all_act {
        if *d != act {
            bail!("{op}: activations must share one dtype ({act}), found {d}");
        }
    }
    for d in f32s {
        if *d != DType::F32 {
            bail!("{op}: statistics and parameter gradients must be f32 on CUDA, found {d}");
        }
    }
    Ok(())
}

impl LayerNormOps for Cuda {
    fn residual_layernorm_forward(
        &self,
        out: &mut Tensor<Cuda>,
        sum: &mut Tensor<Cuda>,
        mean: &mut Tensor<Cuda>,
        rstd: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        bias: Option<&Tensor<Cuda>>,
        resid: &Tensor<Cuda>,
        gamma: &Tensor<Cuda>,
        beta: &Tensor<Cuda>,
        eps: f32,
        drop: Dropout,
        seqs: &Seqs<Cuda>,
    ) -> Result<()> {
        let op = "residual_layernorm_forward";
        let (n, c) = dims(op, inp, &[mean, rstd], &[resid, out, sum], &[gamma, beta])?;
        seqs.expect_rows(op, n)?;
        let mut acts = vec![
            sum.dtype(),
            inp.dtype(),
            resid.dtype(),
            gamma.dtype(),
            beta.dtype(),
        ];
        if let Some(b) = bias {
            dims(op, inp, &[], &[], &[b])?;
            acts.push(b.dtype());
        }
        cuda_dtypes(op, out.dtype(), &acts, &[mean.dtype(), rstd.dtype()])?;
        let p = LnFwdParams {
            out: out.buf.ptr,
            pos: seqs.pos.buf.ptr,
            roww: seqs.row_w.buf.ptr,
            sum: sum.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            inp: inp.buf.ptr,
            resid: resid.buf.ptr,
            gamma: gamma.buf.ptr,
            beta: beta.buf.ptr,
            site: drop.site,
            step: seqs.step.buf.ptr,
            n: n as i32,
            c: c as i32,
            eps,
            p: drop.p,
            bias: bias.map_or(0, |b| b.buf.ptr),
        };
        // SAFETY: shapes checked above; every address is a live buffer of this backend
        unsafe { self.run(&forward_launch(out.dtype(), p, self.kernels().vec)?) }
    }

    fn residual_layernorm_backward(
        &self,
        dinp: &mut Tensor<Cuda>,
        dresid: &mut Tensor<Cuda>,
        dgamma: &mut Tensor<Cuda>,
        dbeta: &mut Tensor<Cuda>,
        dbias: Option<&mut Tensor<Cuda>>,
        dout: &Tensor<Cuda>,
        sum: &Tensor<Cuda>,
        mean: &Tensor<Cuda>,
        rstd: &Tensor<Cuda>,
        gamma: &Tensor<Cuda>,
        drop: Dropout,
        seqs: &Seqs<Cuda>,
    ) -> Result<()> {
        let op = "residual_layernorm_backward";
        let (n, c) = dims(
            op,
            dout,
            &[mean, rstd],
            &[sum, dinp, dresid],
            &[gamma, dgamma, dbeta],
        )?;
        seqs.expect_rows(op, n)?;
        let mut f32s = vec![mean.dtype(), rstd.dtype(), dgamma.dtype(), dbeta.dtype()];
        if let Some(d) = &dbias {
            dims(op, dout, &[], &[], &[d])?;
            f32s.push(d.dtype());
        }
        cuda_dtypes(
            op,
            dout.dtype(),
            &[dinp.dtype(), dresid.dtype(), sum.dtype(), gamma.dtype()],
            &f32s,
        )?;
        let p = LnBwdParams {
            dinp: dinp.buf.ptr,
            pos: seqs.pos.buf.ptr,
            roww: seqs.row_w.buf.ptr,
            dresid: dresid.buf.ptr,
            dgamma: dgamma.buf.ptr,
            dbeta: dbeta.buf.ptr,
            dout: dout.buf.ptr,
            sum: sum.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            gamma: gamma.buf.ptr,
            site: drop.site,
            step: seqs.step.buf.ptr,
            n: n as i32,
            c: c as i32,
            p: drop.p,
            _pad: 0,
            dbias: dbias.map_or(0, |d| d.buf.ptr),
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
