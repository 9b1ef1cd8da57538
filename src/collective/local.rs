//! Replicas in one process exchanging through host memory: the CPU's data parallelism (`--devices
//! cpu,cpu`), and the reference the NCCL path is checked against. Sums are taken in rank order, so the
//! reduction of two replicas' gradients is the same arithmetic as one device adding a second micro-batch's
//! gradient to the first's ([`crate::ops::AdamWOps::grad_accumulate`]): bit for bit.

use super::{wire, Collective};
use crate::backend::BackendCore;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use std::sync::{Arc, Condvar, Mutex};

struct State {
    /// this round's deposits, by rank
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// rounds completed
    round: u64,
    /// the last completed round's deposits (kept until every rank has read them: the next round cannot
    /// complete before)
    last: Option<Arc<Vec<Vec<u8>>>>,
    /// ranks that have left the group (dropped their handle), with why
    gone: Vec<Option<String>>,
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

/// One replica's handle on an in-process group.
pub struct Local {
    rank: usize,
    shared: Arc<Shared>,
}

impl Local {
    /// The handles of a group of `world` replicas, rank 0 first.
    pub fn group(world: usize) -> Vec<Local> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                slots: vec![None; world],
                arrived: 0,
                round: 0,
                last: None,
                gone: vec![None; world],
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| Local {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// This handle's rank (also [`Collective::rank`], which needs the backend type).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Leave the group saying why: every replica waiting in (or later entering) an exchange gets an error
    /// naming this rank instead of waiting forever.
    pub fn abort(&self, why: &str) {
        let mut st = self.lock();
        if st.gone[self.rank].is_none() {
            st.gone[self.rank] = Some(why.to_string());
        }
        self.shared.cv.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // a panicking replica poisons the mutex; the state itself stays consistent (every update is one
        // assignment), so go on and let the others see `gone`
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_gone(&self, st: &State) -> Result<()> {
        for (r, g) in st.gone.iter().enumerate() {
            if let Some(why) = g {
                if r != self.rank {
                    bail!("replica {r} of {} has stopped: {why}", self.shared.world);
                }
            }
        }
        Ok(())
    }

    /// Deposit `mine`; once every replica has, everyone's deposits in rank order.
    fn exchange(&self, mine: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let mut st = self.lock();
        self.check_gone(&st)?;
        let round = st.round;
        st.slots[self.rank] = Some(mine);
        st.arrived += 1;
        if st.arrived == self.shared.world {
            let all: Vec<Vec<u8>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            let all = Arc::new(all);
            st.last = Some(all.clone());
            st.arrived = 0;
            st.round += 1;
            self.shared.cv.notify_all();
            return Ok(all);
        }
        loop {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            if st.round != round {
                return Ok(st.last.clone().unwrap_or_default());
            }
            self.check_gone(&st)?;
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.abort("it left the group");
    }
}

/// Elementwise sum in rank order of float buffers given as bytes.
fn sum_in_rank_order(all: &[Vec<u8>], dtype: DType, n: usize) -> Result<Vec<u8>> {
    let bytes = n * dtype.size();
    if let Some((r, b)) = all.iter().enumerate().find(|(_, b)| b.len() != bytes) {
        bail!(
            "all_reduce_sum: replica {r} sent {} bytes, expected {bytes} ({n} {dtype})",
            b.len()
        );
    }
    Ok(match dtype {
        DType::F32 => {
            let mut acc = wire::read_f32s(&all[0], n)?;
            for b in &all[1..] {
                for (a, x) in acc.iter_mut().zip(wire::read_f32s(b, n)?) {
                    *a += x;
                }
            }
            wire::f32s(&acc)
        }
        DType::F64 => {
            let mut acc = wire::read_f64s(&all[0], n)?;
            for b in &all[1..] {
                for (a, x) in acc.iter_mut().zip(wire::read_f64s(b, n)?) {
                    *a += x;
                }
            }
            wire::f64s(&acc)
        }
        d => bail!("all_reduce_sum: {d} buffers are not summed (gradients are f32 or f64)"),
    })
}

impl<B: BackendCore> Collective<B> for Local {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn describe(&self) -> String {
        format!("in-process ({} replicas)", self.shared.world)
    }
    fn abort(&self, why: &str) {
        Local::abort(self, why)
    }

    fn all_reduce_sum(&self, be: &B, t: &mut Tensor<B>) -> Result<()> {
        let (dtype, n) = (t.dtype(), t.numel());
        let buf = &mut t.buf;
        let mut mine = vec![0u8; n * dtype.size()];
        be.download(buf, dtype, &mut mine)?;
        let all = self.exchange(mine)?;
        let sum = sum_in_rank_order(&all, dtype, n)?;
        be.upload(buf, dtype, &sum)
    }

    fn broadcast(&self, be: &B, t: &mut Tensor<B>, root: usize) -> Result<()> {
        let (dtype, n) = (t.dtype(), t.numel());
        let buf = &mut t.buf;
        let mut bytes = vec![];
        if self.rank == root {
            bytes = vec![0u8; n * dtype.size()];
            be.download(buf, dtype, &mut bytes)?;
        }
        self.broadcast_bytes(be, &mut bytes, root)?;
        if self.rank != root {
            if bytes.len() != n * dtype.size() {
                bail!(
                    "broadcast: replica {root} sent {} bytes, expected {n} {dtype}",
                    bytes.len()
                );
            }
            be.upload(buf, dtype, &bytes)?;
        }
        Ok(())
    }

    fn broadcast_bytes(&self, _be: &B, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        let mine = if self.rank == root {
            std::mem::take(bytes)
        } else {
            vec![]
        };
        let all = self.exchange(mine)?;
        *bytes = all[root].clone();
        Ok(())
    }

    fn gather_bytes(&self, _be: &B, bytes: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let all = self.exchange(bytes.to_vec())?;
        Ok((self.rank == root).then(|| all.as_ref().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;

    #[test]
    fn sums_in_rank_order_and_reports_a_replica_that_left() {
        let g = Local::group(3);
        let be = Cpu::new();
        let vals = [1e8f32, 1.0, -1e8];
        let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = g
                .iter()
                .enumerate()
                .map(|(r, h)| {
                    let be = &be;
                    s.spawn(move || {
                        let mut t = Tensor::from_host(be, &[vals[r], r as f32], &[2]).unwrap();
                        Collective::<Cpu>::all_reduce_sum(h, be, &mut t).unwrap();
                        t.to_host::<f32>(be).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // (1e8 + 1) + -1e8 in f32 is 0 (1 is lost in rounding), not 1: the order is rank order
        for o in &outs {
            assert_eq!(o, &vec![(1e8f32 + 1.0) - 1e8, 3.0]);
        }
        let mut g = g;
        let last = g.pop().unwrap();
        drop(last);
        let mut t = Tensor::from_f64(&be, &[1.0], &[1], DType::F32).unwrap();
        let err = Collective::<Cpu>::all_reduce_sum(&g[0], &be, &mut t).unwrap_err();
        assert!(
            format!("{err:#}").contains("replica 2 of 3 has stopped"),
            "{err:#}"
        );
    }
}
