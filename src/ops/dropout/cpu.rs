//! The CPU reference of dropout: each element times its factor from the Philox stream (src/rng.rs).

use super::{check, DropoutOps};
use crate::cpu::{rd, wr, Cpu, Real};
use crate::rng::Dropout;
use crate::tensor::Tensor;
use anyhow::Result;

/// CPU reference: element i is kept with probability 1-p and scaled by 1/(1-p).
pub fn dropout_ref<T: Real>(out: &mut [T], inp: &[T], d: Dropout) {
    if !d.active() {
        out.copy_from_slice(inp);
        return;
    }
    // = d.factor(i) for every i, with one Philox call per four elements
    for ((o, &x), f) in out.iter_mut().zip(inp).zip(d.factors(inp.len())) {
        *o = x * T::of(f);
    }
}

impl DropoutOps for Cpu {
    fn dropout_forward(&self, out: &mut Tensor<Cpu>, inp: &Tensor<Cpu>, d: Dropout) -> Result<()> {
        check(out, inp)?;
        crate::cpu_compute!(out.dtype(), T => {
            let x = rd::<T>(inp);
            let mut o = wr::<T>(out, false);
            dropout_ref(&mut o, &x, d);
        });
        Ok(())
    }
}
