//! Storage, and the rest of what every backend provides below the ops (the row bucket of padding-free
//! batches, CUDA-graph capture and replay). The CPU reference ([`crate::cpu::Cpu`]) and CUDA
//! ([`crate::cuda::Cuda`]) implement [`BackendCore`]; the ops (src/ops) build on it, and the umbrella trait
//! that model and training code are written against, [`crate::ops::Backend`], lives with them. Nothing here
//! knows about any op.

use crate::tensor::DType;
use anyhow::Result;

/// Bytes held by a backend's allocator now and at most so far (reset with [`BackendCore::reset_peak`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    pub live_bytes: usize,
    pub peak_bytes: usize,
}

/// A compute peak model-FLOP utilisation is measured against: TFLOP/s, and where the number comes from
/// (a datasheet entry for this device and dtype, or a measurement).
#[derive(Clone, Debug, PartialEq)]
pub struct Peak {
    pub tflops: f64,
    pub source: String,
}

/// Storage management every backend provides. Buffers are zero-initialised when allocated.
pub trait BackendCore: Sized + Send + Sync + 'static {
    /// A view of one contiguous allocation on the device (element offset and length); views of one allocation
    /// keep it alive.
    type Buf: Send + Sync;

    /// e.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)".
    fn name(&self) -> String;
    /// Whether element type `dtype` can be stored here (f64 is CPU-only).
    fn supports(&self, dtype: DType) -> bool;
    /// A fresh allocation of `n` zeroed elements.
    fn alloc(&self, dtype: DType, n: usize) -> Result<Self::Buf>;
    /// `n` elements of `buf` (of `dtype`) from element `offset` on, sharing its allocation.
    fn view(&self, buf: &Self::Buf, dtype: DType, offset: usize, n: usize) -> Result<Self::Buf>;
    /// Overwrite `buf` (of `dtype`) with `bytes` (its exact size: elements stored as `dtype`).
    fn upload(&self, buf: &mut Self::Buf, dtype: DType, bytes: &[u8]) -> Result<()>;
    /// Copy `buf` (of `dtype`) into `out` (its exact size).
    fn download(&self, buf: &Self::Buf, dtype: DType, out: &mut [u8]) -> Result<()>;
    fn zero(&self, buf: &mut Self::Buf, dtype: DType, n: usize) -> Result<()>;
    /// `dst[i] = src[i]` converting between float dtypes (round to nearest even on narrowing).
    fn cast(
        &self,
        dst: &mut Self::Buf,
        dst_dtype: DType,
        src: &Self::Buf,
        src_dtype: DType,
        n: usize,
    ) -> Result<()>;
    /// Wait for all queued work (a no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
    /// Bytes held by this backend's allocations (backend buffers only, not scratch inside ops).
    fn memory_stats(&self) -> MemStats;
    /// Start a new peak measurement at the bytes held now.
    fn reset_peak(&self);
    /// Give back to the device the memory of dropped buffers that the backend keeps for reuse (the CUDA
    /// arena's free list, which only serves later allocations of the same sizes): before allocating buffers
    /// of other sizes in their place, such as a re-sized activation plan. A no-op where a dropped buffer is
    /// freed at once (the CPU).
    fn release_cached(&self) -> Result<()> {
        Ok(())
    }
    /// The compute peak for GEMMs with `dtype` operands, when known (MFU is reported against it).
    fn peak(&self, _dtype: DType) -> Option<Peak> {
        None
    }
    /// The multiple a packed batch's row count is rounded up to (src/model/batch.rs, filler window): more
    /// than 1 where the backend keeps per-shape state (tuned GEMM algorithms), so that the varying row counts
    /// of packed batches fall on a few shapes. 1: exact row counts.
    fn row_bucket(&self) -> usize {
        1
    }

    /// A recording of device work, executed again by [`BackendCore::replay`] (a CUDA graph; nothing on the
    /// CPU).
    type Graph;
    /// Whether work is recorded and replayed now ([`crate::train::graphs::StepGraphs`]): CUDA with
    /// `--cuda-graphs on`, not while profiling or synchronising after every launch. False on the CPU.
    fn graphs_on(&self) -> bool {
        false
    }
    /// Run `f`, recording the device work it queues instead of executing it. `f` must queue the same work
    /// with the same parameters whenever it is recorded or run for the same batch shape, read per-step values
    /// from device memory, and neither allocate, copy to or from the host, nor synchronise (the CUDA backend
    /// refuses those while recording, with an error naming the call). Nothing runs until
    /// [`BackendCore::replay`].
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Queue the work recorded in `g` again, as it was recorded (the same addresses).
    fn replay(&self, g: &Self::Graph) -> Result<()>;
}
