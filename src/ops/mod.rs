//! One file per op family: the backend trait, shape checks, the CPU reference loops and the CUDA launcher,
//! forward and backward side by side. Argument order: outputs, saved state, inputs, weights, dims.
//! Parameter gradients accumulate (`+=`); activation gradients are overwritten unless stated.

pub mod adamw;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod span_loss;

use crate::tensor::DType;

/// The dtype the CPU reference computes in for a given activation dtype: f64 stays f64, all else f32.
pub fn compute_dtype(act: DType) -> DType {
    if act == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Grid size helper: blocks of `block` threads covering `n` items.
pub fn blocks(n: usize, block: usize) -> u32 {
    n.div_ceil(block).max(1) as u32
}
