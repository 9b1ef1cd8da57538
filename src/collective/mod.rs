//! Data parallelism's communication: what replicas of the model exchange, behind one trait.
//!
//! - [`Collective`]: sum a device buffer over every replica (the step's gradient), broadcast buffers and
//!   bytes from one replica (weights at the start, the leader's commands), gather bytes on one (evaluation
//!   logits). Every replica calls the same operations in the same order.
//! - [`local::Local`]: replicas in one process exchanging through host memory — the CPU's (`--devices
//!   cpu,cpu`), deterministic: sums are taken in rank order, so two replicas give the bits of one device
//!   accumulating two micro-batches.
//! - [`nccl::Nccl`]: NVIDIA's NCCL (through cudarc, loaded at run time) on CUDA devices — one communicator per
//!   GPU, one thread per GPU, several machines joined through a [`rendezvous`].
//! - [`wire`]: the little binary encodings the leader sends (windows, logits).
//!
//! How training uses it: src/train/replica.rs; docs/distributed.md for launching.

pub mod local;
pub mod nccl;
pub mod rendezvous;
pub mod wire;

use crate::backend::BackendCore;
use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// What replicas of one training run exchange. Rank 0 is the leader (it reads the data, logs and saves).
pub trait Collective<B: BackendCore>: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// e.g. "in-process (2 replicas)" or "NCCL 2.27.3 (4 ranks)".
    fn describe(&self) -> String;
    /// Replace `t` on every replica by its sum over the replicas; every replica ends with the same bits.
    fn all_reduce_sum(&self, be: &B, t: &mut Tensor<B>) -> Result<()>;
    /// Replace `t` on every replica by `root`'s.
    fn broadcast(&self, be: &B, t: &mut Tensor<B>, root: usize) -> Result<()>;
    /// `root`'s bytes on every replica (`bytes` is replaced; its length on other replicas is ignored).
    fn broadcast_bytes(&self, be: &B, bytes: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Every replica's bytes, in rank order, on `root` (None on the others).
    fn gather_bytes(&self, be: &B, bytes: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>>;
    /// Leave the group because of `why` (a failed replica): the others' next collective fails naming this
    /// replica and the reason, instead of waiting for it (where the implementation can tell them).
    fn abort(&self, _why: &str) {}
}

/// `n` items in `parts` contiguous ranges whose sizes differ by at most one, the larger first (the split of
/// a step's windows into micro-batches and replicas: 8 in 3 → 3, 3, 2). Empty ranges when n < parts.
pub fn split_even(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let (q, r) = (n / parts, n % parts);
    let mut out = Vec::with_capacity(parts);
    let mut s = 0;
    for i in 0..parts {
        let len = q + usize::from(i < r);
        out.push(s..s + len);
        s += len;
    }
    out
}

/// The devices of `--devices`: "cpu,cpu,cpu" (CPU replicas in this process) or CUDA ordinals "0,1,2,3".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    Cpu(usize),
    Cuda(Vec<usize>),
}

impl Devices {
    pub fn parse(s: &str) -> Result<Devices> {
        let items: Vec<&str> = s.split(',').map(str::trim).collect();
        if items.is_empty() || items.iter().any(|x| x.is_empty()) {
            bail!("--devices {s:?}: give a comma-separated list, e.g. 0,1,2,3 or cpu,cpu");
        }
        if items.iter().all(|x| *x == "cpu") {
            return Ok(Devices::Cpu(items.len()));
        }
        let mut ords = vec![];
        for x in &items {
            let x = x.strip_prefix("cuda:").unwrap_or(x);
            match x.parse::<usize>() {
                Ok(o) => ords.push(o),
                Err(_) if x == "cpu" => bail!(
                    "--devices {s:?}: mixes cpu with CUDA ordinals; give only GPUs (0,1,…) or only cpu replicas (cpu,cpu)"
                ),
                Err(_) => bail!("--devices {s:?}: {x:?} is neither a CUDA ordinal nor cpu"),
            }
        }
        let mut sorted = ords.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ords.len() {
            bail!("--devices {s:?}: a GPU is listed twice");
        }
        Ok(Devices::Cuda(ords))
    }

    pub fn len(&self) -> usize {
        match self {
            Devices::Cpu(n) => *n,
            Devices::Cuda(o) => o.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_sizes_differ_by_at_most_one() {
        let sizes = |n, p| split_even(n, p).iter().map(|r| r.len()).collect::<Vec<_>>();
        assert_eq!(sizes(8, 3), vec![3, 3, 2]);
        assert_eq!(sizes(8, 2), vec![4, 4]);
        assert_eq!(sizes(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(sizes(0, 2), vec![0, 0]);
        let r = split_even(10, 4);
        assert_eq!(r.first().unwrap().start, 0);
        assert_eq!(r.last().unwrap().end, 10);
        assert!(r.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn devices_parse() {
        assert_eq!(Devices::parse("cpu,cpu").unwrap(), Devices::Cpu(2));
        assert_eq!(
            Devices::parse("0,1,3").unwrap(),
            Devices::Cuda(vec![0, 1, 3])
        );
        assert_eq!(Devices::parse("cuda:1").unwrap(), Devices::Cuda(vec![1]));
        for bad in ["", "0,,1", "0,cpu", "0,0", "gpu"] {
            assert!(Devices::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
