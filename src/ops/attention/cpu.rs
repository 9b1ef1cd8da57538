//! The CPU reference of the attention: per (window, head) in parallel, the scores as a matrix, the softmax
//! over the window's real keys, dropout factors from the shared stream, and the backward's matrix products.

use super::{dims, AttentionOps};
use crate::cpu::{gemm, ids, rd, wr, Cpu, Real};
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

/// One (window, head): rows `s0 .. s0+rows` of the batch, the first `keys` of them real.
#[derive(Clone, Copy)]
struct Block {
    s0: usize,
    rows: usize,
    keys: usize,
    w: u32,
    h: usize,
}

/// Every (window, head) of the layout.
fn blocks(cu: &[i32], lens: &[i32], wid: &[i32], nh: usize) -> Vec<Block> {
    let mut v = Vec::with_capacity(lens.len() * nh);
    for b in 0..lens.len() {
        for h in 0..nh {
            v.push(Block {
                s0: cu[b] as usize,
                rows: (cu[b + 1] - cu[b]) as usize,
                keys: lens[b] as usize,
                w: wid[b] as u32,
                h,
            });
        }
    }
    v
}

/// Head `h` of part `part` (0 Q, 1 K, 2 V) of rows `s0..s0+m` as a contiguous (m, HS) matrix.
fn head<T: Real>(
    qkv: &[T],
    s0: usize,
    m: usize,
    c: usize,
    hs: usize,
    h: usize,
    part: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); m * hs];
    for i in 0..m {
        let base = (s0 + i) * 3 * c + part * c + h * hs;
        out[i * hs..(i + 1) * hs].copy_from_slice(&qkv[base..base + hs]);
    }
    out
}

/// The scaled scores and probabilities of R queries over L keys: (P (R,L), lse (R)).
fn probs<T: Real>(q: &[T], k: &[T], r: usize, l: usize, hs: usize) -> (Vec<T>, Vec<T>) {
    let scale = T::one() / T::of(hs as f64).sqrt();
    let mut s = vec![T::zero(); r * l];
    gemm(r, hs, l, scale, q, false, k, true, T::zero(), &mut s);
    let mut lse = vec![T::zero(); r];
    for i in 0..r {
        let row = &mut s[i * l..(i + 1) * l];
        let m = row.iter().fold(T::neg_infinity(), |a, &v| a.max(v));
        // one exp per score: e_j = exp(s_j - m), z = Σ e_j, P_j = e_j / z, lse = m + ln z
        let mut z = T::zero();
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            z += *v;
        }
        lse[i] = m + z.ln();
        let inv = T::one() / z;
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
        seqs: &Seqs<Cpu>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (n, c, hs) = dims("attention_forward", out, lse, qkv, seqs, nh)?;
        let (cu, lens, wid) = (ids(&seqs.cu)?, ids(&seqs.lens)?, ids(&seqs.wid)?);
        let bl = blocks(&cu, &lens, &wid, nh);
        crate::cpu_compute!(out.dtype(), T => {
            let x = rd::<T>(qkv);
            // every (window, head) is independent: compute them in parallel, then scatter
            let per: Vec<(Vec<T>, Vec<T>)> = bl
                .par_iter()
                .map(|k| {
                    let (r, l) = (k.rows, k.keys);
                    let q = head(&x, k.s0, r, c, hs, k.h, 0);
                    let (kk, v) = (head(&x, k.s0, l, c, hs, k.h, 1), head(&x, k.s0, l, c, hs, k.h, 2));
                    let (mut p, ls) = probs(&q, &kk, r, l, hs);
                    if drop.active() {
                        // f_ij = drop.attn_factor(w, h, i, j), computed for the whole (R,L) block at once
                        for (pij, f) in p.iter_mut().zip(drop.attn_factors(k.w, k.h as u32, r, l)) {
                            *pij *= T::of(f);
                        }
                    }
                    let mut oh = vec![T::zero(); r * hs];
                    gemm(r, l, hs, T::one(), &p, false, &v, false, T::zero(), &mut oh);
                    (oh, ls)
                })
                .collect();
            let mut o = wr::<T>(out, false);
            let mut lo = wr::<T>(lse, false);
            for (k, (oh, ls)) in bl.iter().zip(&per) {
                for i in 0..k.rows {
                    lo[k.h * n + k.s0 + i] = ls[i];
                    let dst = (k.s0 + i) * c + k.h * hs;
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
        seqs: &Seqs<Cpu>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (_, c, hs) = dims("attention_backward", out, lse, qkv, seqs, nh)?;
        dout.expect("attention_backward: dout", out.shape())?;
        dqkv.expect("attention_backward: dqkv", qkv.shape())?;
        let (cu, lens, wid) = (ids(&seqs.cu)?, ids(&seqs.lens)?, ids(&seqs.wid)?);
        let bl = blocks(&cu, &lens, &wid, nh);
        crate::cpu_compute!(dout.dtype(), T => {
            let (x, dy, y) = (rd::<T>(qkv), rd::<T>(dout), rd::<T>(out));
            let scale = T::one() / T::of(hs as f64).sqrt();
            // per (window, head) in parallel: dq (R,HS), dk and dv (L,HS)
            let per: Vec<[Vec<T>; 3]> = bl
                .par_iter()
                .map(|k| {
                    let (r, l) = (k.rows, k.keys);
                    let q = head(&x, k.s0, r, c, hs, k.h, 0);
                    let (kk, v) = (head(&x, k.s0, l, c, hs, k.h, 1), head(&x, k.s0, l, c, hs, k.h, 2));
                    let (p, _) = probs(&q, &kk, r, l, hs);
                    // dO and O of this head, contiguous (R, HS)
                    let mut d_o = vec![T::zero(); r * hs];
                    let mut o = vec![T::zero(); r * hs];
                    for i in 0..r {
                        let src = (k.s0 + i) * c + k.h * hs;
                        d_o[i * hs..(i + 1) * hs].copy_from_slice(&dy[src..src + hs]);
                        o[i * hs..(i + 1) * hs].copy_from_slice(&y[src..src + hs]);
                    }
                    let fm = drop.attn_factors(k.w, k.h as u32, r, l); // (R,L): f_ij
                    // dPd = dO·Vᵀ (R,L); Pd = P∘f
                    let mut dpd = vec![T::zero(); r * l];
                    gemm(r, hs, l, T::one(), &d_o, false, &v, true, T::zero(), &mut dpd);
                    let mut pd = p.clone();
                    let mut ds = vec![T::zero(); r * l];
                    for i in 0..r {
                        let di: T = (0..hs).map(|d| d_o[i * hs + d] * o[i * hs + d]).sum();
                        for j in 0..l {
                            let fij = T::of(fm[i * l + j]);
                            pd[i * l + j] = p[i * l + j] * fij;
                            ds[i * l + j] = p[i * l + j] * (dpd[i * l + j] * fij - di);
                        }
                    }
                    let (mut dq, mut dk, mut dv) = (vec![T::zero(); r * hs], vec![T::zero(); l * hs], vec![T::zero(); l * hs]);
                    gemm(l, r, hs, T::one(), &pd, true, &d_o, false, T::zero(), &mut dv);
                    gemm(r, l, hs, scale, &ds, false, &kk, false, T::zero(), &mut dq);
                    gemm(l, r, hs, scale, &ds, true, &q, false, T::zero(), &mut dk);
                    [dq, dk, dv]
                })
                .collect();
            let mut dx = wr::<T>(dqkv, false);
            for (k, [dq, dk, dv]) in bl.iter().zip(&per) {
                for i in 0..k.rows {
                    let dst = (k.s0 + i) * 3 * c + k.h * hs;
                    dx[dst..dst + hs].copy_from_slice(&dq[i * hs..(i + 1) * hs]);
                    // padding rows are no one's keys: zero dK, dV
                    let (kd, vd) = if i < k.keys {
                        (&dk[i * hs..(i + 1) * hs], &dv[i * hs..(i + 1) * hs])
                    } else {
                        (&[][..], &[][..])
                    };
                    for (d, slot) in [(kd, c), (vd, 2 * c)] {
                        if d.is_empty() {
                            dx[dst + slot..dst + slot + hs].iter_mut().for_each(|z| *z = T::zero());
                        } else {
                            dx[dst + slot..dst + slot + hs].copy_from_slice(d);
                        }
                    }
                }
            }
        });
        Ok(())
    }
}
