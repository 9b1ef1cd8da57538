//! # bertqa — fine-tune BERT for extractive question answering, from scratch
//!
//! A tensor runtime with two backends (a readable CPU reference in `cpu/` and CUDA in `cuda/`), hand-written
//! forward and backward passes for BERT plus the span head (`ops/`, `model/`), the SQuAD pipeline (`data/`,
//! `eval/`), AdamW (`ops/adamw/`) with its schedule, clipping and loss scaling (`optim/`), the training loop
//! (`train/`) and data parallelism (`collective/`).
//!
//! ## Shape legend (used in the shape comments of the crate)
//! | letter | meaning |
//! |---|---|
//! | `B`  | windows in a batch (one micro-batch; a step has several with --grad-accum-steps or --devices) |
//! | `T`  | sequence length (tokens per window, `max_seq_length`) |
//! | `N`  | rows of a token-major matrix: `B·T` padded to `T`; a variable-length batch's row count (`SeqLayout`) |
//! | `C`  | hidden size (`hidden_size`) |
//! | `NH` | attention heads (`num_attention_heads`) |
//! | `HS` | head size, `HS = C / NH` |
//! | `F`  | feed-forward size (`intermediate_size`) |
//! | `V`  | vocabulary size (`vocab_size`) |
//! | `P`  | position table rows (`max_position_embeddings`) |
//! | `TV` | token-type table rows (`type_vocab_size`) |
//! | `L`  | encoder layers (`num_hidden_layers`) |
//!
//! Row-major everywhere: a `(B,T,C)` buffer holds element `[b][t][c]` at `(b·T + t)·C + c`. Linear weights use
//! Hugging Face's `(out_features, in_features)` layout, so `y = x·Wᵀ + b`.
//!
//! ## Gradient convention
//! Backward functions take outputs first (`d<input>`), then saved state, then forward inputs, then dims.
//! **Parameter gradients accumulate** (`+=`), so a batch may be split into micro-batches; activation
//! gradients are overwritten unless a function says otherwise.

// Kernel-style signatures (outputs, saved state, inputs, weights, dims) are long by design.
#![allow(clippy::too_many_arguments)]

pub mod backend;
pub mod cli;
pub mod collective;
pub mod cpu;
pub mod cuda;
pub mod data;
pub mod eval;
pub mod kernel;
pub mod model;
pub mod ops;
pub mod optim;
pub mod rng;
pub mod tensor;
pub mod train;
pub mod util;

pub use ops::Backend;
pub use tensor::{DType, Tensor};

/// Everything needed to call ops as backend methods: `use bertqa::prelude::*;`.
pub mod prelude {
    pub use crate::backend::BackendCore;
    pub use crate::cpu::Cpu;
    pub use crate::cuda::Cuda;
    pub use crate::kernel::KernelConfig;
    pub use crate::ops::{
        AdamWOps, AttentionOps, Backend, DropoutOps, EmbeddingOps, GeluOps, LayerNormOps,
        LinearOps, SpanLossOps,
    };
    pub use crate::tensor::{DType, Tensor};
}
