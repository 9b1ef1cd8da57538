//! The `bertqa` command line: `train`, `eval`, `predict`, `score`.

pub mod eval;
pub mod init;
pub mod score;
pub mod train;

use crate::backend::Backend;
use crate::tensor::DType;
use anyhow::{bail, Result};

/// Run `f` on the backend chosen by `--device` (auto: CUDA if usable, else CPU with a message).
pub fn on_device<R>(device: &str, f: impl DeviceFn<R>) -> Result<R> {
    match crate::cuda::open_for_flag(device)? {
        Some(gpu) => {
            eprintln!("bertqa: device {}", crate::backend::BackendCore::name(&gpu));
            f.call(&gpu)
        }
        None => {
            eprintln!("bertqa: device cpu");
            f.call(&crate::cpu::Cpu)
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
