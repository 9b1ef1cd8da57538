//! The CPU reference of AdamW and of the squared gradient norm: one loop each over the flat buffers.

use super::{check, check_stats, AdamWHyper, AdamWOps};
use crate::cpu::{rd, wr, Cpu, Real};
use crate::ops::STAT_GRAD_SQ;
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

/// Elements per parallel chunk of the flat buffers.
const CHUNK: usize = 1 << 16;

/// The per-element update (reference) of elements `0..p.len()`, the first `n_decay` of them with weight decay,
/// each gradient multiplied by `gs` (see [`AdamWHyper::grad_scale`]).
pub fn adamw_ref<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamWHyper,
    gs: f64,
    n_decay: usize,
) {
    let d = n_decay.min(p.len());
    let (pd, pn) = p.split_at_mut(d);
    let (md, mn) = m.split_at_mut(d);
    let (vd, vn) = v.split_at_mut(d);
    update(pd, &g[..d], md, vd, hp, gs, true);
    update(pn, &g[d..], mn, vn, hp, gs, false);
}

/// AdamW on equal-length slices, all with or all without weight decay (no branch in the loop: it
/// vectorises).
fn update<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamWHyper,
    gs: f64,
    decay: bool,
) {
    let (b1, b2) = (T::of(hp.beta1), T::of(hp.beta2));
    let (c1, c2) = (T::one() - b1, T::one() - b2);
    let bc1 = T::one() - T::of(hp.beta1.powi(hp.step as i32));
    let bc2 = T::one() - T::of(hp.beta2.powi(hp.step as i32));
    let lr = T::of(hp.lr);
    let wd = T::of(hp.lr * hp.weight_decay);
    let gs = T::of(gs);
    let eps = T::of(hp.eps);
    let step = |p: &mut T, g: T, m: &mut T, v: &mut T| {
        let gi = g * gs;
        *m = b1 * *m + c1 * gi;
        *v = b2 * *v + c2 * gi * gi;
        let mhat = *m / bc1;
        let vhat = *v / bc2;
        *p -= lr * mhat / (vhat.sqrt() + eps);
    };
    let it = p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut()));
    if decay {
        it.for_each(|((p, &g), (m, v))| {
            *p = *p - wd * *p;
            step(p, g, m, v)
        });
    } else {
        it.for_each(|((p, &g), (m, v))| step(p, g, m, v));
    }
}

impl AdamWOps for Cpu {
    fn adamw_step(
        &self,
        master: &mut Tensor<Cpu>,
        working: Option<&mut Tensor<Cpu>>,
        grad: &Tensor<Cpu>,
        m: &mut Tensor<Cpu>,
        v: &mut Tensor<Cpu>,
        n_decay: usize,
        stats: &Tensor<Cpu>,
        hp: &AdamWHyper,
    ) -> Result<()> {
        check(master, working.as_deref(), grad, m, v, n_decay)?;
        check_stats("adamw_step", stats, master)?;
        let st: Vec<f64> = crate::cpu_compute!(stats.dtype(), T => {
            rd::<T>(stats).iter().map(|x| x.f64()).collect()
        });
        let Some(gs) = hp.grad_scale(&st) else {
            return Ok(()); // a non-finite loss or gradient: no update
        };
        crate::cpu_compute!(master.dtype(), T => {
            let g = rd::<T>(grad);
            let (mut mm, mut vv) = (wr::<T>(m, true), wr::<T>(v, true));
            let mut p = wr::<T>(master, true);
            // element-wise, so chunks in parallel give the same bits as one loop
            p.par_chunks_mut(CHUNK)
                .zip(mm.par_chunks_mut(CHUNK))
                .zip(vv.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .enumerate()
                .for_each(|(k, (((p, m), v), g))| {
                    let decay = n_decay.saturating_sub(k * CHUNK).min(p.len());
                    adamw_ref(p, g, m, v, hp, gs, decay);
                });
            if let Some(w) = working {
                wr::<T>(w, false).copy_from_slice(&p);
            }
        });
        Ok(())
    }
    fn grad_sq_norm(&self, stats: &mut Tensor<Cpu>, grad: &Tensor<Cpu>) -> Result<()> {
        check_stats("grad_sq_norm", stats, grad)?;
        crate::cpu_compute!(grad.dtype(), T => {
            let g = rd::<T>(grad);
            // partial sums per chunk in parallel, added in chunk order: deterministic
            let parts: Vec<f64> = g
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| x.f64() * x.f64()).sum::<f64>())
                .collect();
            let mut st = wr::<T>(stats, true);
            st[STAT_GRAD_SQ] += T::of(parts.iter().sum::<f64>());
        });
        Ok(())
    }

    fn grad_accumulate(&self, acc: &mut Tensor<Cpu>, g: &Tensor<Cpu>) -> Result<()> {
        super::check_accumulate(acc, g)?;
        crate::cpu_compute!(g.dtype(), T => {
            let gv = rd::<T>(g);
            let mut a = wr::<T>(acc, true);
            a.par_chunks_mut(CHUNK)
                .zip(gv.par_chunks(CHUNK))
                .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, &g)| *a += g));
        });
        Ok(())
    }
}
