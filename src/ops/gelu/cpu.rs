//! The CPU reference of GELU: the formula, element by element (in parallel chunks).

use super::{bias_cols, bias_dims, check, GeluOps};
use crate::cpu::{rd, wr, Cpu, Real};
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

pub fn gelu_ref<T: Real>(x: T) -> T {
    let half = T::of(0.5);
    half * x * (T::one() + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

pub fn gelu_grad_ref<T: Real>(x: T) -> T {
    let half = T::of(0.5);
    let cdf = half * (T::one() + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = (-half * x * x).exp() * T::of(0.398_942_280_401_432_7);
    cdf + x * pdf
}

/// inp + bias (bias broadcast over rows of c), or inp itself without a bias (c = 0).
fn biased<T: Real>(x: &[T], bias: Option<&Tensor<Cpu>>, c: usize) -> Vec<T> {
    let mut v = x.to_vec();
    if let Some(b) = bias {
        let b = rd::<T>(b);
        v.iter_mut().enumerate().for_each(|(i, x)| *x += b[i % c]);
    }
    v
}

impl GeluOps for Cpu {
    fn gelu_forward(
        &self,
        out: &mut Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        bias: Option<&Tensor<Cpu>>,
    ) -> Result<()> {
        check("gelu_forward", out, inp)?;
        let c = bias_cols("gelu_forward", inp, bias)?;
        crate::cpu_compute!(out.dtype(), T => {
            let x = biased(&rd::<T>(inp), bias, c);
            let mut o = wr::<T>(out, false);
            o.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = gelu_ref(x);
                }
            });
        });
        Ok(())
    }
    fn gelu_backward(
        &self,
        dinp: &mut Tensor<Cpu>,
        dout: &Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        bias: Option<&Tensor<Cpu>>,
    ) -> Result<()> {
        check("gelu_backward", dinp, inp)?;
        check("gelu_backward", dout, inp)?;
        let c = bias_cols("gelu_backward", inp, bias)?;
        crate::cpu_compute!(dout.dtype(), T => {
            let (x, dy) = (biased(&rd::<T>(inp), bias, c), rd::<T>(dout));
            let mut d = wr::<T>(dinp, false);
            d.par_chunks_mut(4096).zip(dy.par_chunks(4096).zip(x.par_chunks(4096))).for_each(|(d, (dy, x))| {
                for i in 0..d.len() {
                    d[i] = dy[i] * gelu_grad_ref(x[i]);
                }
            });
        });
        Ok(())
    }

    fn gelu_backward_bias(
        &self,
        dinp: &mut Tensor<Cpu>,
        dbias: &mut Tensor<Cpu>,
        dout: &Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        bias: Option<&Tensor<Cpu>>,
    ) -> Result<()> {
        let (_, c) = bias_dims(dinp, dbias, dout, inp)?;
        self.gelu_backward(dinp, dout, inp, bias)?;
        // the column sums of dinp as stored, as linear_backward's bias gradient reads it
        crate::cpu_compute!(dinp.dtype(), T => {
            let d = rd::<T>(dinp);
            let mut g = wr::<T>(dbias, true);
            for row in d.chunks(c) {
                for (gj, &x) in g.iter_mut().zip(row) {
                    *gj += x;
                }
            }
        });
        Ok(())
    }
}
