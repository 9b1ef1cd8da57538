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

/// One kernel launch as data: what a CUDA op's launcher hands to `Cuda::run`, and what tests/emu_kernels.rs
/// runs on the CPU through the kernel emulator (tests/emu) — so those tests check the launch configuration
/// (grid, block, dynamic shared memory) as well as the kernel.
#[derive(Clone, Debug)]
pub struct Launch<P> {
    /// kernel module (src/cuda/nvrtc.rs MODULES)
    pub module: &'static str,
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// dynamic shared memory, bytes
    pub smem: u32,
    /// the kernel's parameter struct (`#[repr(C)]`, mirrored in the .cu)
    pub params: P,
}

/// (module, kernel) for every entry point chosen by a variant switch (BERTQA_ATTN, BERTQA_VEC), so that
/// tests/kernels_compile.rs can check the names against the compiled PTX on a machine without a GPU.
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
    v
}
