//! The ops, one folder each (dfdx-style), arrows pointing one way:
//! - `ops/<op>/mod.rs`: the contract — the backend trait (what the op computes, shapes, argument order),
//!   shape and dtype checks, the kernels' `#[repr(C)]` parameter structs and the launch plan as a pure
//!   function of shapes and the [`KernelConfig`](crate::kernel::KernelConfig);
//! - `ops/<op>/cpu.rs`: the CPU reference loops (the oracle);
//! - `ops/<op>/cuda.rs`: the CUDA launcher (the plan with device addresses, run on the backend).
//!
//! The backends (src/cpu, src/cuda) know no op; the ops build on them, and the model builds on the ops
//! through [`Backend`]. Argument order: outputs, saved state, inputs, weights, dims. Parameter gradients
//! accumulate (`+=`); activation gradients are overwritten unless stated.

pub mod adamw;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod span_loss;

use crate::backend::BackendCore;
use crate::tensor::DType;

pub use adamw::AdamWOps;
pub use attention::AttentionOps;
pub use dropout::DropoutOps;
pub use embedding::EmbeddingOps;
pub use gelu::GeluOps;
pub use layernorm::LayerNormOps;
pub use linear::LinearOps;
pub use span_loss::SpanLossOps;

/// Everything the model, the optimiser and the training loop need from a device: storage plus every op.
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

/// The dtype the CPU reference computes in for a given activation dtype: f64 stays f64, all else f32.
pub fn compute_dtype(act: DType) -> DType {
    if act == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// (module, kernel) for every entry point a kernel configuration can select (attention variants, vec
/// kernels), so that tests/kernels_compile.rs can check the names against the compiled PTX on a machine
/// without a GPU.
pub fn variant_entry_points() -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = Vec::new();
    v.extend(
        attention::tc_entry_points()
            .into_iter()
            .map(|n| ("attention_tc", n)),
    );
    v.extend(
        layernorm::vec_entry_points()
            .into_iter()
            .map(|n| ("layernorm", n)),
    );
    v.extend(gelu::vec_entry_points().into_iter().map(|n| ("gelu", n)));
    v.extend(
        linear::vec_entry_points()
            .into_iter()
            .map(|n| ("reduce", n)),
    );
    v.extend(
        embedding::vec_entry_points()
            .into_iter()
            .map(|n| ("embedding", n)),
    );
    v
}

/// The byte layout of every kernel parameter struct (tests/kernels_compile.rs checks each against the
/// CHECK_FIELD assertions of its .cu file, which NVRTC and the emulator's compiler enforce).
pub fn param_layouts() -> Vec<crate::kernel::ParamLayout> {
    let mut v = Vec::new();
    v.extend(attention::layouts());
    v.extend(layernorm::layouts());
    v.extend(embedding::layouts());
    v.extend(gelu::layouts());
    v.extend(linear::layouts());
    v.extend(dropout::layouts());
    v.extend(span_loss::layouts());
    v.extend(adamw::layouts());
    v.extend(crate::cuda::cast::layouts());
    v
}
