//! The CPU reference of the span loss: per window and start/end, a log-softmax over the window's positions.

use super::{dims, SpanLossCfg, SpanLossOps};
use crate::cpu::{ids, rd, wr, Cpu, Real};
use crate::ops::{Seqs, STAT_LOSS_END, STAT_LOSS_START};
use crate::tensor::Tensor;
use anyhow::Result;

impl SpanLossOps for Cpu {
    fn span_loss_forward_backward(
        &self,
        losses: &mut Tensor<Cpu>,
        dlogits: &mut Tensor<Cpu>,
        stats: &mut Tensor<Cpu>,
        logits: &Tensor<Cpu>,
        starts: &Tensor<Cpu>,
        ends: &Tensor<Cpu>,
        seqs: &Seqs<Cpu>,
        scale: &Tensor<Cpu>,
        cfg: SpanLossCfg,
    ) -> Result<()> {
        let (_, b) = dims(losses, dlogits, stats, logits, starts, ends, seqs, scale)?;
        let sc = scale.to_f64_vec(self)?;
        let (st, en, cu, lens) = (ids(starts)?, ids(ends)?, ids(&seqs.cu)?, ids(&seqs.lens)?);
        crate::cpu_compute!(logits.dtype(), T => {
            let x = rd::<T>(logits);
            let mut dl = wr::<T>(dlogits, false);
            dl.iter_mut().for_each(|v| *v = T::zero());
            let mut ls = wr::<T>(losses, false);
            for bi in 0..b {
                let s0 = cu[bi] as usize;
                let rows = (cu[bi + 1] - cu[bi]) as usize;
                // the softmax's positions: the real tokens, or the whole window
                let range = if cfg.mask_padding { lens[bi] as usize } else { rows };
                for (w, tgt, scale) in [(0usize, st[bi], sc[0]), (1, en[bi], sc[1])] {
                    let logit = |j: usize| x[(s0 + j) * 2 + w];
                    ls[bi * 2 + w] = T::zero();
                    if tgt < 0 || tgt as usize >= range {
                        continue; // ignored (HF: ignore_index); a target in masked padding is ignored too
                    }
                    let m = (0..range).map(logit).fold(T::neg_infinity(), |a, v| a.max(v));
                    let z: T = (0..range).map(|j| (logit(j) - m).exp()).sum();
                    let lse = m + z.ln();
                    ls[bi * 2 + w] = lse - logit(tgt as usize);
                    for j in 0..range {
                        let p = (logit(j) - lse).exp();
                        let y = if j == tgt as usize { T::one() } else { T::zero() };
                        dl[(s0 + j) * 2 + w] = (p - y) * T::of(scale);
                    }
                }
            }
            // the batch's sums, in window order, added to the step's statistics
            let mut st = wr::<T>(stats, true);
            for w in 0..2 {
                let sum = (0..b).fold(T::zero(), |a, bi| a + ls[bi * 2 + w]);
                st[[STAT_LOSS_START, STAT_LOSS_END][w]] += sum;
            }
        });
        Ok(())
    }
}
