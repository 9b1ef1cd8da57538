//! The CPU reference of the attention: per (batch, head) in parallel, the scores as a matrix, a masked
//! softmax, dropout factors from the shared stream, and the backward's matrix products.

use super::{dims, AttentionOps};
use crate::cpu::{gemm, ids, rd, wr, Cpu, Real};
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

/// Copy head `h` of part `part` (0 Q, 1 K, 2 V) of batch row `bi` into a contiguous (T, HS) matrix.
fn head<T: Real>(
    qkv: &[T],
    bi: usize,
    t: usize,
    c: usize,
    hs: usize,
    h: usize,
    part: usize,
) -> Vec<T> {
    let mut m = vec![T::zero(); t * hs];
    for i in 0..t {
        let base = (bi * t + i) * 3 * c + part * c + h * hs;
        m[i * hs..(i + 1) * hs].copy_from_slice(&qkv[base..base + hs]);
    }
    m
}

/// The scaled, masked scores and probabilities of one (b, h): returns (P (T,T), lse (T)).
fn probs<T: Real>(q: &[T], k: &[T], mask: &[i32], t: usize, hs: usize) -> (Vec<T>, Vec<T>) {
    let scale = T::one() / T::of(hs as f64).sqrt();
    let mut s = vec![T::zero(); t * t];
    gemm(t, hs, t, scale, q, false, k, true, T::zero(), &mut s);
    let mut lse = vec![T::zero(); t];
    for i in 0..t {
        let row = &mut s[i * t..(i + 1) * t];
        let mut m = T::neg_infinity();
        for j in 0..t {
            if mask[j] != 0 {
                m = m.max(row[j]);
            }
        }
        // one exp per score: e_j = exp(s_j - m), l = Σ e_j, P_j = e_j / l, lse = m + ln l
        let mut l = T::zero();
        for j in 0..t {
            row[j] = if mask[j] != 0 {
                (row[j] - m).exp()
            } else {
                T::zero()
            };
            l += row[j];
        }
        lse[i] = m + l.ln();
        let inv = T::one() / l;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
    (s, lse)
}

impl AttentionOps for Cpu {
    fn attention_forward(
        &self,
        out: &mut Tensor<Cpu>,
        lse: &mut Tensor<Cpu>,
        qkv: &Tensor<Cpu>,
        mask: &Tensor<Cpu>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, c, hs) = dims("attention_forward", out, lse, qkv, mask, nh)?;
        let mk = ids(mask)?;
        crate::cpu_compute!(out.dtype(), T => {
            let x = rd::<T>(qkv);
            // every (b, h) is independent: compute them in parallel, then scatter into (B,T,C) and (B,NH,T)
            let per_head: Vec<(Vec<T>, Vec<T>)> = (0..b * nh)
                .into_par_iter()
                .map(|bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let (q, k, v) = (head(&x, bi, t, c, hs, h, 0), head(&x, bi, t, c, hs, h, 1), head(&x, bi, t, c, hs, h, 2));
                    let (mut p, l) = probs(&q, &k, &mk[bi * t..(bi + 1) * t], t, hs);
                    if drop.active() {
                        // f_ij = drop.attn_factor(bh, i, j, t), computed for the whole (T,T) block at once
                        for (pij, f) in p.iter_mut().zip(drop.attn_factors(bh as u64, t)) {
                            *pij *= T::of(f);
                        }
                    }
                    let mut oh = vec![T::zero(); t * hs];
                    gemm(t, t, hs, T::one(), &p, false, &v, false, T::zero(), &mut oh);
                    (oh, l)
                })
                .collect();
            let mut o = wr::<T>(out, false);
            let mut ls = wr::<T>(lse, false);
            for (bh, (oh, l)) in per_head.iter().enumerate() {
                let (bi, h) = (bh / nh, bh % nh);
                ls[bh * t..(bh + 1) * t].copy_from_slice(l);
                for i in 0..t {
                    let dst = (bi * t + i) * c + h * hs;
                    o[dst..dst + hs].copy_from_slice(&oh[i * hs..(i + 1) * hs]);
                }
            }
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Tensor<Cpu>,
        dout: &Tensor<Cpu>,
        out: &Tensor<Cpu>,
        lse: &Tensor<Cpu>,
        qkv: &Tensor<Cpu>,
        mask: &Tensor<Cpu>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, c, hs) = dims("attention_backward", out, lse, qkv, mask, nh)?;
        dout.expect("attention_backward: dout", out.shape())?;
        dqkv.expect("attention_backward: dqkv", qkv.shape())?;
        let mk = ids(mask)?;
        crate::cpu_compute!(dout.dtype(), T => {
            let (x, dy, y) = (rd::<T>(qkv), rd::<T>(dout), rd::<T>(out));
            let scale = T::one() / T::of(hs as f64).sqrt();
            // per (b, h) in parallel: (dq, dk, dv), each (T, HS)
            let per_head: Vec<[Vec<T>; 3]> = (0..b * nh)
                .into_par_iter()
                .map(|bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let (q, k, v) = (head(&x, bi, t, c, hs, h, 0), head(&x, bi, t, c, hs, h, 1), head(&x, bi, t, c, hs, h, 2));
                    let (p, _) = probs(&q, &k, &mk[bi * t..(bi + 1) * t], t, hs);
                    // dO and O of this head, contiguous (T, HS)
                    let mut d_o = vec![T::zero(); t * hs];
                    let mut o = vec![T::zero(); t * hs];
                    for i in 0..t {
                        let src = (bi * t + i) * c + h * hs;
                        d_o[i * hs..(i + 1) * hs].copy_from_slice(&dy[src..src + hs]);
                        o[i * hs..(i + 1) * hs].copy_from_slice(&y[src..src + hs]);
                    }
                    let fm = drop.attn_factors(bh as u64, t); // (T,T): f_ij = drop.attn_factor(bh, i, j, t)
                    let f = |i: usize, j: usize| T::of(fm[i * t + j]);
                    // dPd = dO·Vᵀ (T,T); Pd = P∘f
                    let mut dpd = vec![T::zero(); t * t];
                    gemm(t, hs, t, T::one(), &d_o, false, &v, true, T::zero(), &mut dpd);
                    let mut pd = p.clone();
                    let mut ds = vec![T::zero(); t * t];
                    for i in 0..t {
                        let di: T = (0..hs).map(|d| d_o[i * hs + d] * o[i * hs + d]).sum();
                        for j in 0..t {
                            let fij = f(i, j);
                            pd[i * t + j] = p[i * t + j] * fij;
                            ds[i * t + j] = p[i * t + j] * (dpd[i * t + j] * fij - di);
                        }
                    }
                    let (mut dq, mut dk, mut dv) = (vec![T::zero(); t * hs], vec![T::zero(); t * hs], vec![T::zero(); t * hs]);
                    gemm(t, t, hs, T::one(), &pd, true, &d_o, false, T::zero(), &mut dv);
                    gemm(t, t, hs, scale, &ds, false, &k, false, T::zero(), &mut dq);
                    gemm(t, t, hs, scale, &ds, true, &q, false, T::zero(), &mut dk);
                    [dq, dk, dv]
                })
                .collect();
            let mut dx = wr::<T>(dqkv, false);
            for (bh, [dq, dk, dv]) in per_head.iter().enumerate() {
                let (bi, h) = (bh / nh, bh % nh);
                for i in 0..t {
                    let dst = (bi * t + i) * 3 * c + h * hs;
                    dx[dst..dst + hs].copy_from_slice(&dq[i * hs..(i + 1) * hs]);
                    dx[dst + c..dst + c + hs].copy_from_slice(&dk[i * hs..(i + 1) * hs]);
                    dx[dst + 2 * c..dst + 2 * c + hs].copy_from_slice(&dv[i * hs..(i + 1) * hs]);
                }
            }
        });
        Ok(())
    }
}
