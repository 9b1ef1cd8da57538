//! The CPU reference of the embeddings: gather, LayerNorm, dropout; backward scatters into the tables.

use super::{dims, EmbGrads, EmbWeights, EmbeddingOps};
use crate::cpu::{ids, rd, wr, Cpu, Real};
use crate::ops::dropout::cpu::dropout_rows_ref;
use crate::ops::layernorm::cpu::{layernorm_bwd_ref, layernorm_fwd_ref};
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

fn check_ids(op: &str, ids: &[i32], limit: usize, what: &str) -> Result<()> {
    if let Some((i, &bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, &x)| x < 0 || x as usize >= limit)
    {
        bail!("{op}: {what}[{i}] = {bad} is outside 0..{limit}");
    }
    Ok(())
}

/// CPU reference gather: `x[r] = word[ids[r]] + pos[posid[r]] + type[types[r]]`.
pub fn gather_ref<T: Real>(
    x: &mut [T],
    ids: &[i32],
    types: &[i32],
    posid: &[i32],
    word: &[T],
    pos: &[T],
    ttype: &[T],
    c: usize,
) {
    for (r, ((&id, &ty), &tt)) in ids.iter().zip(types).zip(posid).enumerate() {
        let (id, ty, tt) = (id as usize, ty as usize, tt as usize);
        for i in 0..c {
            x[r * c + i] = word[id * c + i] + pos[tt * c + i] + ttype[ty * c + i];
        }
    }
}

impl EmbeddingOps for Cpu {
    fn embeddings_forward(
        &self,
        out: &mut Tensor<Cpu>,
        mean: &mut Tensor<Cpu>,
        rstd: &mut Tensor<Cpu>,
        idt: &Tensor<Cpu>,
        tyt: &Tensor<Cpu>,
        seqs: &Seqs<Cpu>,
        w: &EmbWeights<Cpu>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()> {
        let op = "embeddings_forward";
        let (_, c, v, _, tv) = dims(op, out, mean, rstd, idt, tyt, seqs, w)?;
        let (idg, tyg) = (ids(idt)?, ids(tyt)?);
        let (id, ty): (&[i32], &[i32]) = (&idg, &tyg);
        check_ids(op, id, v, "input_ids")?;
        check_ids(op, ty, tv, "token_type_ids")?;
        let (pos, roww) = (ids(&seqs.pos)?, ids(&seqs.row_w)?);
        let drop = drop.at(seqs.step_seed(self)?);
        crate::cpu_compute!(out.dtype(), T => {
            let mut x = vec![T::zero(); out.numel()];
            gather_ref(&mut x, id, ty, &pos, &rd::<T>(w.word), &rd::<T>(w.pos), &rd::<T>(w.ttype), c);
            let mut y = vec![T::zero(); x.len()];
            let (mut m, mut r) = (wr::<T>(mean, false), wr::<T>(rstd, false));
            layernorm_fwd_ref(&mut y, &mut m, &mut r, &x, &rd::<T>(w.gamma), &rd::<T>(w.beta), c, eps as f64);
            dropout_rows_ref(&mut wr::<T>(out, false), &y, c, &pos, &roww, drop);
        });
        Ok(())
    }

    fn embeddings_backward(
        &self,
        g: &mut EmbGrads<Cpu>,
        dout: &Tensor<Cpu>,
        mean: &Tensor<Cpu>,
        rstd: &Tensor<Cpu>,
        idt: &Tensor<Cpu>,
        tyt: &Tensor<Cpu>,
        seqs: &Seqs<Cpu>,
        w: &EmbWeights<Cpu>,
        drop: Dropout,
    ) -> Result<()> {
        let op = "embeddings_backward";
        let (_, c, v, _, tv) = dims(op, dout, mean, rstd, idt, tyt, seqs, w)?;
        let (idg, tyg) = (ids(idt)?, ids(tyt)?);
        let (id, ty): (&[i32], &[i32]) = (&idg, &tyg);
        check_ids(op, id, v, "input_ids")?;
        check_ids(op, ty, tv, "token_type_ids")?;
        let (pos, roww) = (ids(&seqs.pos)?, ids(&seqs.row_w)?);
        let drop = drop.at(seqs.step_seed(self)?);
        crate::cpu_compute!(dout.dtype(), T => {
            let mut x = vec![T::zero(); dout.numel()];
            gather_ref(&mut x, id, ty, &pos, &rd::<T>(w.word), &rd::<T>(w.pos), &rd::<T>(w.ttype), c);
            let mut dy = vec![T::zero(); x.len()];
            dropout_rows_ref(&mut dy, &rd::<T>(dout), c, &pos, &roww, drop);
            let mut dx = vec![T::zero(); x.len()];
            {
                let (mut dg, mut db) = (wr::<T>(g.gamma, true), wr::<T>(g.beta, true));
                layernorm_bwd_ref(&mut dx, &mut dg, &mut db, &dy, &x, &rd::<T>(mean), &rd::<T>(rstd), &rd::<T>(w.gamma), c);
            }
            let (mut dw, mut dp, mut dt) = (wr::<T>(g.word, true), wr::<T>(g.pos, true), wr::<T>(g.ttype, true));
            for (r, ((&i, &y), &tt)) in id.iter().zip(ty).zip(pos.iter()).enumerate() {
                let skip_word = i == g.padding_idx;
                let (i, y, tt) = (i as usize, y as usize, tt as usize);
                for k in 0..c {
                    if !skip_word {
                        dw[i * c + k] += dx[r * c + k];
                    }
                    dp[tt * c + k] += dx[r * c + k];
                    dt[y * c + k] += dx[r * c + k];
                }
            }
        });
        Ok(())
    }
}
