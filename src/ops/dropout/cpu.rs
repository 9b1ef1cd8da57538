//! The CPU reference of dropout: each row times its factors from the dropout stream (src/rng.rs).

use super::{check, DropoutOps};
use crate::cpu::{ids, rd, wr, Cpu, Real};
use crate::ops::Seqs;
use crate::rng::{Dropout, DropoutMask};
use crate::tensor::Tensor;
use anyhow::Result;

/// `out = inp ∘ mask` over rows of `c` features, row r keyed (window `row_w[r]`, position `pos[r]`).
pub fn dropout_rows_ref<T: Real>(
    out: &mut [T],
    inp: &[T],
    c: usize,
    pos: &[i32],
    row_w: &[i32],
    d: DropoutMask,
) {
    if !d.active() {
        out.copy_from_slice(inp);
        return;
    }
    for (r, (o, x)) in out.chunks_mut(c).zip(inp.chunks(c)).enumerate() {
        let f = d.hidden_factors(row_w[r] as u32, pos[r] as u32, c);
        for k in 0..c {
            o[k] = x[k] * T::of(f[k]);
        }
    }
}

impl DropoutOps for Cpu {
    fn dropout_forward(
        &self,
        out: &mut Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        d: Dropout,
        seqs: &Seqs<Cpu>,
    ) -> Result<()> {
        let (_, c) = check(out, inp, seqs)?;
        let (pos, roww) = (ids(&seqs.pos)?, ids(&seqs.row_w)?);
        let d = d.at(seqs.step_seed(self)?);
        crate::cpu_compute!(out.dtype(), T => {
            let x = rd::<T>(inp);
            let mut o = wr::<T>(out, false);
            dropout_rows_ref(&mut o, &x, c, &pos, &roww, d);
        });
        Ok(())
    }
}
