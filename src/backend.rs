//! The backend interface. Model and training code are written once against [`Backend`]; the CPU reference
//! ([`crate::cpu::Cpu`]) and CUDA ([`crate::cuda::Cuda`]) implement it. Each op family lives in one file under
//! `src/ops/` with its trait, its CPU reference and its CUDA launcher side by side.

use crate::ops::{
    adamw::AdamWOps, attention::AttentionOps, dropout::DropoutOps, embedding::EmbeddingOps,
    gelu::GeluOps, layernorm::LayerNormOps, linear::LinearOps, span_loss::SpanLossOps,
};
use crate::tensor::DType;
use anyhow::Result;

/// Storage management every backend provides. Buffers are zero-initialised when allocated.
pub trait BackendCore: Sized + Send + Sync + 'static {
    /// One contiguous allocation on the device.
    type Buf: Send + Sync;

    /// e.g. "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3, sm_90)".
    fn name(&self) -> String;
    /// Whether element type `dtype` can be stored here (f64 is CPU-only).
    fn supports(&self, dtype: DType) -> bool;
    fn alloc(&self, dtype: DType, n: usize) -> Result<Self::Buf>;
    /// Overwrite `buf` (of `dtype`, `data.len()` elements) with host values, rounded to `dtype`.
    fn upload_f64(&self, buf: &mut Self::Buf, dtype: DType, data: &[f64]) -> Result<()>;
    fn upload_i32(&self, buf: &mut Self::Buf, data: &[i32]) -> Result<()>;
    fn download_f64(&self, buf: &Self::Buf, dtype: DType, n: usize) -> Result<Vec<f64>>;
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
    /// (bytes held now, peak bytes) by the device allocator, where it tracks them.
    fn memory_stats(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Everything the model, the optimiser and the training loop need from a device.
pub trait Backend:
    BackendCore
    + EmbeddingOps
    + LinearOps
    + LayerNormOps
    + GeluOps
    + AttentionOps
    + DropoutOps
    + SpanLossOps
    + AdamWOps
{
}

impl<B> Backend for B where
    B: BackendCore
        + EmbeddingOps
        + LinearOps
        + LayerNormOps
        + GeluOps
        + AttentionOps
        + DropoutOps
        + SpanLossOps
        + AdamWOps
{
}
