//! The CPU reference of the attention: per (window, head) in parallel, the scores as a matrix, the softmax
//! over the window's real keys, dropout factors from the shared stream, and the backward's matrix products
//! (the backward recomputes P from the saved log-sum-exp, as the CUDA kernels do). The matrix products
//! run single-threaded inside the per-head tasks (see `cpu::gemm`).

use super::{dims, AttentionOps};
use crate::cpu::{gemm, ids, rd, wr, Cpu, Real};
use crate::ops::Seqs;
use crate::rng::{Dropout, DropoutMask};
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

/// Calls `g(i·L + j, i, f_ij)` for every entry of block `k`'s (R, L) matrix with its dropout factor
/// (1 everywhere when the site is off; otherwise one Philox call per 8 entries).
fn each_factor<T: Real>(drop: DropoutMask, k: &Block, mut g: impl FnMut(usize, usize, T)) {
    let (r, l) = (k.rows, k.keys);
    if !drop.active() {
        (0..r * l).for_each(|ij| g(ij, ij / l, T::one()));
        return;
    }
    drop.attn_factor_blocks(k.w, k.h as u32, r, l, |i, j, f| g(i * l + j, i, T::of(f)));
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

/// The exponentiated scaled scores of R queries over L keys: `E_ij = exp(s_ij − m_i)` with `m_i` the row's
/// largest score, the row sums `z_i = Σ_j E_ij` and `lse_i = m_i + ln z_i` (so `P = E / z`).
fn exp_scores<T: Real>(
    q: &[T],
    k: &[T],
    r: usize,
    l: usize,
    hs: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let scale = T::one() / T::of(hs as f64).sqrt();
    let mut e = vec![T::zero(); r * l];
    gemm(r, hs, l, scale, q, false, k, true, T::zero(), &mut e);
    let (mut z, mut lse) = (vec![T::zero(); r], vec![T::zero(); r]);
    for (i, row) in e.chunks_mut(l).enumerate() {
        let m = row.iter().fold(T::neg_infinity(), |a, &v| a.max(v));
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            z[i] += *v;
        }
        lse[i] = m + z[i].ln();
    }
    (e, z, lse)
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
        let drop = drop.at(seqs.step_seed(self)?);
        crate::cpu_compute!(out.dtype(), T => {
            let x = rd::<T>(qkv);
            // every (window, head) is independent: compute them in parallel, then scatter
            let per: Vec<(Vec<T>, Vec<T>)> = bl
                .par_iter()
                .map(|k| {
                    let (r, l) = (k.rows, k.keys);
                    let q = head(&x, k.s0, r, c, hs, k.h, 0);
                    let (kk, v) = (head(&x, k.s0, l, c, hs, k.h, 1), head(&x, k.s0, l, c, hs, k.h, 2));
                    let (mut e, z, ls) = exp_scores(&q, &kk, r, l, hs);
                    // E∘f, f_ij = drop.attn_factor(w, h, i, j) (one Philox call per 8 entries)
                    if drop.active() {
                        each_factor(drop, k, |ij, _, f: T| e[ij] *= f);
                    }
                    // O = (P∘f)·V = ((E∘f)·V) / z, row by row
                    let mut oh = vec![T::zero(); r * hs];
                    gemm(r, l, hs, T::one(), &e, false, &v, false, T::zero(), &mut oh);
                    for (row, zi) in oh.chunks_mut(hs).zip(&z) {
                        let inv = T::one() / *zi;
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
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
        dbias: Option<&mut Tensor<Cpu>>,
        dout: &Tensor<Cpu>,
        out: &Tensor<Cpu>,
        lse: &Tensor<Cpu>,
        qkv: &Tensor<Cpu>,
        seqs: &Seqs<Cpu>,
        nh: usize,
        drop: Dropout,
        scratch: &mut Tensor<Cpu>,
    ) -> Result<()> {
        let (n, c, hs) = dims("attention_backward", out, lse, qkv, seqs, nh)?;
        dout.expect("attention_backward: dout", out.shape())?;
        dqkv.expect("attention_backward: dqkv", qkv.shape())?;
        if let Some(d) = &dbias {
            d.expect("attention_backward: dbias", &[3 * c])?;
        }
        super::check_scratch(scratch, lse, n, c, nh)?;
        let (cu, lens, wid) = (ids(&seqs.cu)?, ids(&seqs.lens)?, ids(&seqs.wid)?);
        let bl = blocks(&cu, &lens, &wid, nh);
        let drop = drop.at(seqs.step_seed(self)?);
        crate::cpu_compute!(dout.dtype(), T => {
            let (x, dy, y, ls) = (rd::<T>(qkv), rd::<T>(dout), rd::<T>(out), rd::<T>(lse));
            let scale = T::one() / T::of(hs as f64).sqrt();
            // per (window, head) in parallel: dq (R,HS), dk and dv (L,HS)
            let per: Vec<[Vec<T>; 3]> = bl
                .par_iter()
                .map(|k| {
                    let (r, l) = (k.rows, k.keys);
                    let q = head(&x, k.s0, r, c, hs, k.h, 0);
                    let (kk, v) = (head(&x, k.s0, l, c, hs, k.h, 1), head(&x, k.s0, l, c, hs, k.h, 2));
                    // P from the forward's log-sum-exp: P_ij = exp(scale·q_i·k_j − lse_i)
                    let mut p = vec![T::zero(); r * l];
                    gemm(r, hs, l, scale, &q, false, &kk, true, T::zero(), &mut p);
                    for (i, row) in p.chunks_mut(l).enumerate() {
                        let lse_i = ls[k.h * n + k.s0 + i];
                        row.iter_mut().for_each(|s| *s = (*s - lse_i).exp());
                    }
                    // dO of this head, contiguous (R, HS); D_i = dO_i·O_i
                    let mut d_o = vec![T::zero(); r * hs];
                    let mut di = vec![T::zero(); r];
                    for i in 0..r {
                        let src = (k.s0 + i) * c + k.h * hs;
                        d_o[i * hs..(i + 1) * hs].copy_from_slice(&dy[src..src + hs]);
                        di[i] = (0..hs).map(|d| dy[src + d] * y[src + d]).sum();
                    }
                    // dPd = dO·Vᵀ (R,L); then in place: P → Pd = P∘f, dPd → dS = P∘(dPd∘f − D)
                    let mut ds = vec![T::zero(); r * l];
                    gemm(r, hs, l, T::one(), &d_o, false, &v, true, T::zero(), &mut ds);
                    let mut grad = |ij: usize, i: usize, f: T| {
                        let pij = p[ij];
                        p[ij] = pij * f;
                        ds[ij] = pij * (ds[ij] * f - di[i]);
                    };
                    each_factor(drop, k, &mut grad);
                    let pd = p;
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
            // the QKV bias gradient: column sums of dqkv (before rounding to its dtype)
            if let Some(db) = dbias {
                let mut db = wr::<T>(db, true);
                for row in dx.chunks(3 * c) {
                    db.iter_mut().zip(row).for_each(|(b, v)| *b += *v);
                }
            }
        });
        Ok(())
    }
}
