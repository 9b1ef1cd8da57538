//! The CPU reference of the linear layer: two GEMMs through `cpu::gemm` and a loop for the bias.

use super::{dims, LinearOps};
use crate::cpu::{gemm, rd, wr, Cpu};
use crate::tensor::Tensor;
use anyhow::{bail, Result};

impl LinearOps for Cpu {
    fn linear_forward(
        &self,
        out: &mut Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        w: &Tensor<Cpu>,
        b: Option<&Tensor<Cpu>>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_forward", inp, out, w, b)?;
        crate::cpu_compute!(out.dtype(), T => {
            let (x, wt) = (rd::<T>(inp), rd::<T>(w));
            let mut o = wr::<T>(out, false);
            gemm(n, ic, oc, T::one(), &x, false, &wt, true, T::zero(), &mut o);
            if let Some(b) = b {
                let bv = rd::<T>(b);
                for r in 0..n {
                    for j in 0..oc {
                        o[r * oc + j] += bv[j];
                    }
                }
            }
        });
        Ok(())
    }

    fn linear_backward(
        &self,
        dinp: Option<&mut Tensor<Cpu>>,
        accumulate_dinp: bool,
        dw: &mut Tensor<Cpu>,
        db: Option<&mut Tensor<Cpu>>,
        dout: &Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        w: &Tensor<Cpu>,
    ) -> Result<()> {
        let (n, ic, oc) = dims("linear_backward", inp, dout, w, None)?;
        dw.expect("linear_backward: dweight", w.shape())?;
        crate::cpu_compute!(dout.dtype(), T => {
            let (dy, x, wt) = (rd::<T>(dout), rd::<T>(inp), rd::<T>(w));
            if let Some(di) = dinp {
                if di.numel() != n * ic {
                    bail!("linear_backward: dinp {:?} must match inp {:?}", di.shape(), inp.shape());
                }
                let beta = if accumulate_dinp { T::one() } else { T::zero() };
                let mut d = wr::<T>(di, accumulate_dinp);
                gemm(n, oc, ic, T::one(), &dy, false, &wt, false, beta, &mut d);
            }
            {
                let mut g = wr::<T>(dw, true);
                gemm(oc, n, ic, T::one(), &dy, true, &x, false, T::one(), &mut g);
            }
            if let Some(db) = db {
                db.expect("linear_backward: dbias", &[oc])?;
                let mut g = wr::<T>(db, true);
                for r in 0..n {
                    for j in 0..oc {
                        g[j] += dy[r * oc + j];
                    }
                }
            }
        });
        Ok(())
    }
}
