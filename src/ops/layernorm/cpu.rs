//! The CPU reference of residual + dropout + LayerNorm, and the plain LayerNorm loops the embeddings share.

use super::{dims, LayerNormOps};
use crate::cpu::ids;
use crate::cpu::{rd, wr, Cpu, Real};
use crate::ops::dropout::cpu::dropout_rows_ref;
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::Result;

/// CPU reference LayerNorm forward over rows of length c.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd_ref<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    c: usize,
    eps: f64,
) {
    let n = x.len() / c;
    for r in 0..n {
        let row = &x[r * c..(r + 1) * c];
        let mu = row.iter().copied().sum::<T>() / T::of(c as f64);
        let var = row.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() / T::of(c as f64);
        let rs = T::one() / (var + T::of(eps)).sqrt();
        for i in 0..c {
            out[r * c + i] = (row[i] - mu) * rs * gamma[i] + beta[i];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/// CPU reference LayerNorm backward: dx overwritten, dgamma/dbeta accumulated.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_ref<T: Real>(
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    dout: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    gamma: &[T],
    c: usize,
) {
    let n = x.len() / c;
    for r in 0..n {
        let (mu, rs) = (mean[r], rstd[r]);
        let xhat = |i: usize| (x[r * c + i] - mu) * rs;
        let mut mean_g = T::zero();
        let mut mean_gx = T::zero();
        for i in 0..c {
            let g = dout[r * c + i] * gamma[i];
            mean_g += g;
            mean_gx += g * xhat(i);
        }
        mean_g /= T::of(c as f64);
        mean_gx /= T::of(c as f64);
        for i in 0..c {
            let g = dout[r * c + i] * gamma[i];
            dx[r * c + i] = rs * (g - mean_g - xhat(i) * mean_gx);
            dgamma[i] += dout[r * c + i] * xhat(i);
            dbeta[i] += dout[r * c + i];
        }
    }
}

impl LayerNormOps for Cpu {
    fn residual_layernorm_forward(
        &self,
        out: &mut Tensor<Cpu>,
        sum: &mut Tensor<Cpu>,
        mean: &mut Tensor<Cpu>,
        rstd: &mut Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        bias: Option<&Tensor<Cpu>>,
        resid: &Tensor<Cpu>,
        gamma: &Tensor<Cpu>,
        beta: &Tensor<Cpu>,
        eps: f32,
        drop: Dropout,
        seqs: &Seqs<Cpu>,
    ) -> Result<()> {
        let (n, c) = dims(
            "residual_layernorm_forward",
            inp,
            &[mean, rstd],
            &[resid, out, sum],
            &[gamma, beta],
        )?;
        seqs.expect_rows("residual_layernorm_forward: inp", n)?;
        if let Some(b) = bias {
            dims("residual_layernorm_forward: bias", inp, &[], &[], &[b])?;
        }
        let (pos, roww) = (ids(&seqs.pos)?, ids(&seqs.row_w)?);
        let drop = drop.at(seqs.step_seed(self)?);
        let sum_dtype = sum.dtype();
        crate::cpu_compute!(out.dtype(), T => {
            let (x, r, g, b) = (rd::<T>(inp), rd::<T>(resid), rd::<T>(gamma), rd::<T>(beta));
            // inp + bias, then dropped out
            let mut xb = x.to_vec();
            if let Some(bias) = bias {
                let bias = rd::<T>(bias);
                xb.iter_mut().enumerate().for_each(|(i, v)| *v += bias[i % c]);
            }
            let mut dropped = vec![T::zero(); x.len()];
            dropout_rows_ref(&mut dropped, &xb, c, &pos, &roww, drop);
            let mut s = wr::<T>(sum, false);
            for i in 0..s.len() {
                s[i] = r[i] + dropped[i];
            }
            // Normalise the sum as stored (rounded to its dtype), exactly what backward will read back.
            crate::cpu::round_slice(&mut s, sum_dtype);
            let (mut o, mut m, mut rs) = (wr::<T>(out, false), wr::<T>(mean, false), wr::<T>(rstd, false));
            layernorm_fwd_ref(&mut o, &mut m, &mut rs, &s, &g, &b, c, eps as f64);
        });
        Ok(())
    }

    fn residual_layernorm_backward(
        &self,
        dinp: &mut Tensor<Cpu>,
        dresid: &mut Tensor<Cpu>,
        dgamma: &mut Tensor<Cpu>,
        dbeta: &mut Tensor<Cpu>,
        dbias: Option<&mut Tensor<Cpu>>,
        dout: &Tensor<Cpu>,
        sum: &Tensor<Cpu>,
        mean: &Tensor<Cpu>,
        rstd: &Tensor<Cpu>,
        gamma: &Tensor<Cpu>,
        drop: Dropout,
        seqs: &Seqs<Cpu>,
    ) -> Result<()> {
        let (n, c) = dims(
            "residual_layernorm_backward",
            dout,
            &[mean, rstd],
            &[sum, dinp, dresid],
            &[gamma, dgamma, dbeta],
        )?;
        if let Some(d) = &dbias {
            dims("residual_layernorm_backward: dbias", dout, &[], &[], &[d])?;
        }
        seqs.expect_rows("residual_layernorm_backward: dout", n)?;
        let (pos, roww) = (ids(&seqs.pos)?, ids(&seqs.row_w)?);
        let drop = drop.at(seqs.step_seed(self)?);
        crate::cpu_compute!(dout.dtype(), T => {
            let (dy, x, m, rs, g) = (rd::<T>(dout), rd::<T>(sum), rd::<T>(mean), rd::<T>(rstd), rd::<T>(gamma));
            let mut dsum = vec![T::zero(); x.len()];
            {
                let (mut dg, mut db) = (wr::<T>(dgamma, true), wr::<T>(dbeta, true));
                layernorm_bwd_ref(&mut dsum, &mut dg, &mut db, &dy, &x, &m, &rs, &g, c);
            }
            wr::<T>(dresid, false).copy_from_slice(&dsum);
            let mut di = wr::<T>(dinp, false);
            dropout_rows_ref(&mut di, &dsum, c, &pos, &roww, drop);
            if let Some(dbias) = dbias {
                let mut dbs = wr::<T>(dbias, true);
                for (i, v) in di.iter().enumerate() {
                    dbs[i % c] += *v;
                }
            }
        });
        Ok(())
    }
}
