//! The CPU reference of the span loss: per example and start/end, a masked log-softmax over positions.

use super::{dims, SpanLossCfg, SpanLossOps};
use crate::cpu::{ids, rd, wr, Cpu, Real};
use crate::tensor::Tensor;
use anyhow::Result;

impl SpanLossOps for Cpu {
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Cpu>,
        dlogits: &mut Tensor<Cpu>,
        logits: &Tensor<Cpu>,
        starts: &Tensor<Cpu>,
        ends: &Tensor<Cpu>,
        mask: &Tensor<Cpu>,
        cfg: SpanLossCfg,
    ) -> Result<()> {
        let (b, t) = dims(losses, dlogits, logits, starts, ends, mask)?;
        let (st, en, mk) = (ids(starts)?, ids(ends)?, ids(mask)?);
        crate::cpu_compute!(logits.dtype(), T => {
            let x = rd::<T>(logits);
            let mut dl = wr::<T>(dlogits, false);
            let mut ls = wr::<T>(losses, false);
            for bi in 0..b {
                for (w, tgt, scale) in [(0usize, st[bi], cfg.scale_start), (1, en[bi], cfg.scale_end)] {
                    let valid = |j: usize| !cfg.mask_padding || mk[bi * t + j] != 0;
                    let logit = |j: usize| x[(bi * t + j) * 2 + w];
                    for j in 0..t {
                        dl[(bi * t + j) * 2 + w] = T::zero();
                    }
                    ls[bi * 2 + w] = T::zero();
                    if tgt < 0 || tgt as usize >= t || !valid(tgt as usize) {
                        continue; // ignored (HF: ignore_index); a masked target is ignored too
                    }
                    let m = (0..t).filter(|&j| valid(j)).map(logit).fold(T::neg_infinity(), |a, v| a.max(v));
                    let z: T = (0..t).filter(|&j| valid(j)).map(|j| (logit(j) - m).exp()).sum();
                    let lse = m + z.ln();
                    ls[bi * 2 + w] = lse - logit(tgt as usize);
                    for j in 0..t {
                        if valid(j) {
                            let p = (logit(j) - lse).exp();
                            let y = if j == tgt as usize { T::one() } else { T::zero() };
                            dl[(bi * t + j) * 2 + w] = (p - y) * T::of(scale);
                        }
                    }
                }
            }
        });
        Ok(())
    }
}
