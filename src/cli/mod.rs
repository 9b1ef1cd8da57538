//! The `bertqa` command line: `train`, `eval`, `predict`, `score`, `init-random`, `convert`, `kernels`.

pub mod eval;
pub mod init;
pub mod kernels;
pub mod score;
pub mod train;

use crate::kernel::{KernelChoice, KernelConfig};
use crate::ops::Backend;
use crate::tensor::DType;
use anyhow::{bail, Result};
use clap::Args;

/// The CUDA kernel choices (`KernelConfig`), shared by train, eval and predict. Each flag left out falls back
/// to its environment variable (BERTQA_ATTN, BERTQA_ATTN4, BERTQA_GEMM, BERTQA_GEMM_TUNE, BERTQA_VEC,
/// BERTQA_GRAPHS, BERTQA_SYNC_LAUNCH), strictly checked, then to the default — the GPU-verified paths.
#[derive(Args, Debug, Clone, Default)]
pub struct KernelArgs {
    /// attention kernel for bf16/f16 on CUDA: v1 (CUDA cores), v3 (tensor cores; default), v4 (pipelined
    /// forward, one-pass backward), v5 (v4 with the forward's products on Hopper's wgmma; sm_90 GPUs only),
    /// v6 (v5 with the backward's products on wgmma too); v4-v6 emulator-checked, not yet GPU-verified
    #[arg(long, value_parser = ["v1", "v3", "v4", "v5", "v6"])]
    pub attention_kernel: Option<String>,
    /// attention variant 4's backward shape: w4, w8, w8b2 (default); the wgmma kernels' (variant 5's forward,
    /// variant 6's forward and backward): w4 (one warpgroup per block) or w8/w8b2 (two)
    #[arg(long, value_parser = ["w4", "w8", "w8b2"])]
    pub attention_v4_shape: Option<String>,
    /// GEMM path for bf16/f16 on CUDA: ex (cublasGemmEx; default) or lt (cuBLASLt with bias epilogues)
    #[arg(long, value_parser = ["ex", "lt"])]
    pub gemm: Option<String>,
    /// with --gemm lt: time cuBLASLt's 8 best algorithms per shape once (on; default) or take its first (off)
    #[arg(long, value_parser = ["on", "off"])]
    pub gemm_tune: Option<String>,
    /// 16-byte-vector LayerNorm, GELU, bias-gradient and embeddings kernels: on or off (default)
    #[arg(long, value_parser = ["on", "off"])]
    pub vec_kernels: Option<String>,
    /// capture each training micro-batch (forward, loss, backward) in a CUDA graph per batch shape and replay
    /// it: on or off (default; not yet GPU-verified)
    #[arg(long, value_parser = ["on", "off"])]
    pub cuda_graphs: Option<String>,
    /// synchronise after every kernel launch (debugging: the error names the kernel that faulted)
    #[arg(long)]
    pub sync_launch: bool,
}

impl KernelArgs {
    /// The kernel configuration: these flags, then the environment, then the defaults.
    pub fn config(&self) -> Result<KernelConfig> {
        KernelConfig::from_choice_and_env(&KernelChoice {
            attention: self.attention_kernel.clone(),
            attention_v4_shape: self.attention_v4_shape.clone(),
            gemm: self.gemm.clone(),
            gemm_tune: self.gemm_tune.clone(),
            vec: self.vec_kernels.clone(),
            sync_launch: self.sync_launch,
            graphs: self.cuda_graphs.clone(),
        })
    }
}

/// Run `f` on the backend chosen by `--device` (auto: CUDA if usable, else CPU with a message), CUDA with the
/// kernels of `kernels`.
pub fn on_device<R>(device: &str, kernels: &KernelArgs, f: impl DeviceFn<R>) -> Result<R> {
    let k = kernels.config()?;
    match crate::cuda::open_for_flag(device, k)? {
        Some(gpu) => {
            crate::say!(
                "bertqa: device {} ({})",
                crate::backend::BackendCore::name(&gpu),
                k.describe()
            );
            f.call(&gpu)
        }
        None => {
            crate::say!("bertqa: device cpu");
            f.call(&crate::cpu::Cpu::new())
        }
    }
}

/// A function generic over the backend (closures cannot be generic in Rust).
pub trait DeviceFn<R> {
    fn call<B: Backend>(self, be: &B) -> Result<R>;
}

/// `--precision` → the working dtype; "auto" is bf16 on a GPU and f32 on the CPU.
pub fn precision_dtype<B: Backend>(be: &B, flag: &str) -> Result<DType> {
    let is_gpu = !be.supports(DType::F64);
    Ok(match flag {
        "auto" => {
            if is_gpu {
                DType::BF16
            } else {
                DType::F32
            }
        }
        "fp32" | "f32" => DType::F32,
        "bf16" => DType::BF16,
        "fp16" | "f16" => DType::F16,
        other => bail!("--precision must be auto, fp32, bf16 or fp16 (got {other:?})"),
    })
}
