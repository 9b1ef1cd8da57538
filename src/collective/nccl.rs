//! NCCL on CUDA devices, through cudarc's bindings (its `nccl` feature; libnccl is opened at run time like
//! the other CUDA libraries, so bertqa builds and runs without it until `--devices` asks for several GPUs).
//!
//! One communicator per GPU, made by `ncclCommInitRank` in that GPU's thread from one unique id (generated
//! by the leader; handed to other machines through [`super::rendezvous`]). Every collective is queued on
//! the backend's own stream, so it is ordered with the kernels around it without extra synchronisation;
//! byte messages (commands, gathered logits) wait for the stream, gradient sums do not.

use super::Collective;
use crate::backend::BackendCore;
use crate::cuda::{Cuda, CudaBuf};
use crate::tensor::{DType, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::nccl::{result as nr, sys as ns};

/// Why libnccl cannot be used, or None when it can. cudarc looks for `libnccl.so` (and CUDA-versioned
/// names) on the loader path; NCCL itself ships `libnccl.so.2` (Debian's libnccl2, the pip wheel
/// nvidia-nccl-cu13), so say where one was found and how to expose it.
pub fn unavailable() -> Option<String> {
    let present = std::panic::catch_unwind(|| unsafe { ns::is_culib_present() }).unwrap_or(false);
    if present {
        return None;
    }
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Some(p) = std::env::var_os("BERTQA_CUDA_PIP") {
        dirs.push(std::path::PathBuf::from(p).join("nvidia/nccl/lib"));
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/lib64",
        "/usr/lib",
    ] {
        dirs.push(d.into());
    }
    let found = dirs
        .iter()
        .map(|d| d.join("libnccl.so.2"))
        .find(|p| p.exists());
    Some(match found {
        Some(p) => format!(
            "NCCL is needed for --devices with several GPUs, and {} exists, but the loader looks for \
             libnccl.so: link it into a folder on LD_LIBRARY_PATH (ln -s {} DIR/libnccl.so; \
             scripts/train_squad.sh does this for the pip wheel)",
            p.display(),
            p.display()
        ),
        None => "NCCL is needed for --devices with several GPUs and was not found: install libnccl2 \
                 (with libnccl-dev for libnccl.so) or `pip install nvidia-nccl-cu13` and put its \
                 nvidia/nccl/lib (holding libnccl.so) on LD_LIBRARY_PATH; or train on one GPU with --device"
            .to_string(),
    })
}

fn check(what: &str, r: std::result::Result<nr::NcclStatus, nr::NcclError>) -> Result<()> {
    r.map(|_| ())
        .map_err(|e| anyhow!("NCCL {what} failed: {e:?}"))
}

/// The library's version as "2.27.3".
pub fn version() -> Result<String> {
    let v = nr::get_nccl_version().map_err(|e| anyhow!("ncclGetVersion: {e:?}"))?;
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// A fresh unique id (the leader makes it; every rank of the run joins with it).
pub fn unique_id() -> Result<[u8; super::rendezvous::ID_BYTES]> {
    if let Some(why) = unavailable() {
        bail!(why);
    }
    let id = nr::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId failed: {e:?}"))?;
    Ok(id.internal.map(|c| c as u8))
}

/// The communicators alive in this process (address, rank), watched by [`watchdog`].
static LIVE: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// NCCL's collectives have no timeout: when a peer dies (a replica's error ends its process, a node is
/// lost), the survivors would wait in their next collective for ever. A thread polls every live
/// communicator's asynchronous error (`ncclCommGetAsyncError`, callable from any thread) twice a second;
/// on one it ends this process with the error (checkpoints are written atomically: `--resume` continues
/// from the last), which in turn surfaces as an error at the other nodes.
fn watchdog() {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
                for &(comm, rank) in live.iter() {
                    let mut res = ns::ncclResult_t::ncclSuccess;
                    // SAFETY: the communicator is alive while it is listed (Drop unlists it first, under
                    // this lock)
                    let st = unsafe { ns::ncclCommGetAsyncError(comm as ns::ncclComm_t, &mut res) };
                    let bad = |r: ns::ncclResult_t| {
                        r != ns::ncclResult_t::ncclSuccess && r != ns::ncclResult_t::ncclInProgress
                    };
                    if bad(st) || bad(res) {
                        crate::say!(
                            "error: NCCL reports {res:?} on rank {rank} (a peer failed or the network broke): \
                             stopping; the last checkpoint is whole, continue with --resume"
                        );
                        crate::collective::rendezvous::exit(1);
                    }
                }
            });
    });
}

/// One GPU's communicator.
pub struct Nccl {
    comm: ns::ncclComm_t,
    rank: usize,
    world: usize,
    version: String,
}

// SAFETY: a communicator is used by the one thread that drives its GPU (the trait's methods take &self but
// a replica calls them from its own thread only); NCCL allows a communicator to move between threads.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Join rank `rank` of `world` with `id`, on `be`'s device (blocks until every rank has joined).
    pub fn join(
        be: &Cuda,
        id: &[u8; super::rendezvous::ID_BYTES],
        rank: usize,
        world: usize,
    ) -> Result<Nccl> {
        if let Some(why) = unavailable() {
            bail!(why);
        }
        be.bind_to_thread()?;
        let uid = ns::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        // SAFETY: comm is a valid out-pointer; the id is 128 bytes as NCCL defines it
        check("ncclCommInitRank", unsafe {
            nr::comm_init_rank(&mut comm, world as i32, uid, rank as i32)
        })
        .with_context(|| format!("rank {rank} of {world} on cuda:{}", be.ordinal()))?;
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((comm as usize, rank));
        watchdog();
        Ok(Nccl {
            comm,
            rank,
            world,
            version: version().unwrap_or_else(|_| "?".into()),
        })
    }

    fn dt(d: DType) -> Result<ns::ncclDataType_t> {
        Ok(match d {
            DType::F32 => ns::ncclDataType_t::ncclFloat32,
            DType::BF16 => ns::ncclDataType_t::ncclBfloat16,
            DType::F16 => ns::ncclDataType_t::ncclFloat16,
            DType::I32 => ns::ncclDataType_t::ncclInt32,
            DType::F64 => ns::ncclDataType_t::ncclFloat64,
        })
    }

    fn check_buf(what: &str, buf: &CudaBuf, dtype: DType, n: usize) -> Result<()> {
        if buf.bytes() < n * dtype.size() {
            bail!(
                "NCCL {what}: buffer of {} bytes holds fewer than {n} {dtype}",
                buf.bytes()
            );
        }
        Ok(())
    }

    /// A device buffer holding `bytes` (padded to whole i32).
    fn staged(be: &Cuda, bytes: &[u8], len: usize) -> Result<CudaBuf> {
        let words = len.div_ceil(4).max(1);
        let mut b = be.alloc(DType::I32, words)?;
        let mut host = vec![0u8; words * 4];
        host[..bytes.len().min(len)].copy_from_slice(&bytes[..bytes.len().min(len)]);
        be.upload(&mut b, DType::I32, &host)?;
        Ok(b)
    }

    /// The first `n` bytes of a buffer made by [`Nccl::staged`] (waits for the stream).
    fn fetch(be: &Cuda, b: &CudaBuf, n: usize) -> Result<Vec<u8>> {
        let mut host = vec![0u8; n.div_ceil(4).max(1) * 4];
        be.download(b, DType::I32, &mut host)?;
        host.truncate(n);
        Ok(host)
    }

    /// Root's first `n` bytes of `b` on every rank, in place.
    fn broadcast_u8(&self, be: &Cuda, b: &CudaBuf, n: usize, root: usize) -> Result<()> {
        Self::check_buf("broadcast", b, DType::I32, n.div_ceil(4))?;
        // SAFETY: b holds at least n bytes on this communicator's device; in place is allowed
        check("ncclBroadcast", unsafe {
            nr::broadcast(
                b.ptr as *const _,
                b.ptr as *mut _,
                n,
                ns::ncclDataType_t::ncclUint8,
                root as i32,
                self.comm,
                be.raw_stream() as _,
            )
        })
    }

    /// Every rank's first `n` bytes of `src`, in rank order, into `dst` (n bytes per rank).
    fn all_gather_u8(&self, be: &Cuda, src: &CudaBuf, dst: &CudaBuf, n: usize) -> Result<()> {
        Self::check_buf("all_gather", src, DType::I32, n.div_ceil(4))?;
        Self::check_buf("all_gather", dst, DType::I32, (n * self.world).div_ceil(4))?;
        // SAFETY: src holds n bytes, dst n per rank
        check("ncclAllGather", unsafe {
            nr::all_gather(
                src.ptr as *const _,
                dst.ptr as *mut _,
                n,
                ns::ncclDataType_t::ncclUint8,
                self.comm,
                be.raw_stream() as _,
            )
        })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        LIVE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&(c, _)| c != self.comm as usize);
        // SAFETY: the communicator was made by join and is not used after this
        unsafe {
            let _ = nr::comm_destroy(self.comm);
        }
    }
}

impl Collective<Cuda> for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn describe(&self) -> String {
        format!("NCCL {} ({} ranks)", self.version, self.world)
    }

    fn all_reduce_sum(&self, be: &Cuda, t: &mut Tensor<Cuda>) -> Result<()> {
        let (dtype, n, buf) = (t.dtype(), t.numel(), &t.buf);
        Self::check_buf("all_reduce", buf, dtype, n)?;
        // SAFETY: buf holds n elements of dtype on this communicator's device; in place is allowed
        check("ncclAllReduce", unsafe {
            nr::all_reduce(
                buf.ptr as *const _,
                buf.ptr as *mut _,
                n,
                Self::dt(dtype)?,
                ns::ncclRedOp_t::ncclSum,
                self.comm,
                be.raw_stream() as _,
            )
        })
    }

    fn broadcast(&self, be: &Cuda, t: &mut Tensor<Cuda>, root: usize) -> Result<()> {
        let (dtype, n, buf) = (t.dtype(), t.numel(), &t.buf);
        Self::check_buf("broadcast", buf, dtype, n)?;
        // SAFETY: as above
        check("ncclBroadcast", unsafe {
            nr::broadcast(
                buf.ptr as *const _,
                buf.ptr as *mut _,
                n,
                Self::dt(dtype)?,
                root as i32,
                self.comm,
                be.raw_stream() as _,
            )
        })
    }

    fn broadcast_bytes(&self, be: &Cuda, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        // the length, then the bytes
        let len = Self::staged(be, &(bytes.len() as u64).to_le_bytes(), 8)?;
        self.broadcast_u8(be, &len, 8, root)?;
        let n = u64::from_le_bytes(Self::fetch(be, &len, 8)?.try_into().unwrap_or([0; 8])) as usize;
        let payload = Self::staged(be, bytes, n)?;
        self.broadcast_u8(be, &payload, n, root)?;
        *bytes = Self::fetch(be, &payload, n)?;
        Ok(())
    }

    fn gather_bytes(&self, be: &Cuda, bytes: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        // every rank's length, then every rank's bytes padded to the longest (an all-gather: NCCL's gather
        // is point-to-point, and these messages are small next to a step's gradients)
        let mine = Self::staged(be, &(bytes.len() as u64).to_le_bytes(), 8)?;
        let lens = be.alloc(DType::I32, 2 * self.world)?;
        self.all_gather_u8(be, &mine, &lens, 8)?;
        let lens: Vec<usize> = Self::fetch(be, &lens, 8 * self.world)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0).div_ceil(4).max(1) * 4;
        let src = Self::staged(be, bytes, max)?;
        let all = be.alloc(DType::I32, max / 4 * self.world)?;
        self.all_gather_u8(be, &src, &all, max)?;
        if self.rank != root {
            be.synchronize()?;
            return Ok(None);
        }
        let host = Self::fetch(be, &all, max * self.world)?;
        Ok(Some(
            (0..self.world)
                .map(|r| host[r * max..r * max + lens[r]].to_vec())
                .collect(),
        ))
    }
}
