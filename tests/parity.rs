//! Backend parity (src/parity.rs). On a GPU machine: every CUDA kernel and a whole training step against the
//! CPU reference, f32 and bf16. Everywhere: the same harness CPU-against-CPU, so its plumbing is tested.

use bertqa::cpu::Cpu;
use bertqa::cuda::Cuda;
mod common;
use bertqa::parity::{compare, rel_l2, suite, AttentionCase};
use bertqa::tensor::DType;
use common::check_rows;

/// GPU tests hold this while they run: one of them sets BERTQA_ATTN/BERTQA_ATTN4, which the others read.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cuda_or_skip() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("SKIPPED (no GPU): {e:#}");
            None
        }
    }
}

#[test]
fn harness_cpu_against_cpu_f32_and_bf16() {
    for dt in [DType::F32, DType::BF16] {
        let rows = suite(&Cpu, dt, &[16, 32]).unwrap();
        assert!(
            rows.len() > 40,
            "suite should compare many tensors, got {}",
            rows.len()
        );
        for case in [
            "linear",
            "gelu",
            "dropout",
            "residual_layernorm",
            "embeddings",
            "attention",
            "span_loss",
            "adamw",
            "train step",
        ] {
            assert!(
                rows.iter().any(|r| r.case.starts_with(case)),
                "no rows for {case}"
            );
        }
        check_rows(&rows);
        if dt == DType::BF16 {
            // bf16 storage must actually lose precision compared with f64, or the reference is not bf16
            assert!(
                rows.iter().any(|r| r.err_cpu > 1e-4),
                "bf16 reference shows no rounding error"
            );
        }
    }
}

#[test]
fn rel_l2_flags_wrong_and_non_finite_results() {
    assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    assert!(rel_l2(&[1.0, 2.1], &[1.0, 2.0]) > 0.04);
    assert!(rel_l2(&[f64::NAN, 2.0], &[1.0, 2.0]).is_infinite());
}

#[test]
fn gpu_parity_f32() {
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = cuda_or_skip() else { return };
    println!("device: {}", bertqa::backend::BackendCore::name(&gpu));
    check_rows(&suite(&gpu, DType::F32, &bertqa::ops::attention::CUDA_HEAD_SIZES).unwrap());
}

#[test]
fn gpu_parity_bf16() {
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = cuda_or_skip() else { return };
    check_rows(&suite(&gpu, DType::BF16, &bertqa::ops::attention::CUDA_HEAD_SIZES).unwrap());
}

/// Every tensor-core attention variant and backward shape against the f64 CPU reference (bf16 bounds), at
/// an odd T with padding and dropout: T=37 fits one key block, T=203 spans several key blocks and query tiles.
#[test]
fn gpu_attention_variants_bf16() {
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = cuda_or_skip() else { return };
    let mut rows = vec![];
    for (v, shape) in [("v3", ""), ("v4", "w4"), ("v4", "w8"), ("v4", "w8b2")] {
        // SAFETY (edition 2021): the GPU lock keeps the other tests that read these from running
        std::env::set_var("BERTQA_ATTN", v);
        std::env::set_var(
            "BERTQA_ATTN4",
            if shape.is_empty() { "w8b2" } else { shape },
        );
        for hs in bertqa::ops::attention::CUDA_TC_HEAD_SIZES {
            for (b, t) in [(2, 37), (2, 203)] {
                let case = AttentionCase {
                    b,
                    t,
                    nh: 2,
                    hs,
                    p: 0.1,
                };
                let got = compare(&gpu, DType::BF16, &case)
                    .unwrap_or_else(|e| panic!("BERTQA_ATTN={v} {shape} HS={hs} T={t}: {e:#}"));
                for mut row in got {
                    row.case = format!("{v} {shape} {}", row.case);
                    rows.push(row);
                }
            }
        }
    }
    std::env::remove_var("BERTQA_ATTN");
    std::env::remove_var("BERTQA_ATTN4");
    check_rows(&rows);
}

#[test]
fn gpu_missing_driver_gives_clear_error() {
    if bertqa::cuda::driver_present() {
        println!("SKIPPED: a CUDA driver is present here");
        return;
    }
    let err = format!("{:#}", Cuda::new(0).err().expect("no driver → error"));
    assert!(
        err.contains("--device cpu"),
        "error should suggest --device cpu: {err}"
    );
}

/// Variant 4's integer keep test (kernels/attention_tc.cu `keep_threshold`/`kept`: `(w >> 8) >= ceil(p·2^24)`)
/// keeps exactly the elements the float test of the stream keeps (`(w >> 8)·2^-24 >= p`, common.cuh
/// `keep_factor`, src/rng.rs), including the words on either side of each threshold.
#[test]
fn attention_v4_integer_keep_test_matches_the_float_one() {
    let mut r = bertqa::rng::Rng::new(9);
    for p in [
        0.1f32,
        0.25,
        1.0 / 3.0,
        0.5,
        0.9,
        1e-7,
        0.999_999,
        0.123_456_79,
    ] {
        let thr = (p * 16_777_216.0).ceil() as u32;
        let mut words: Vec<u32> = (0..10_000).map(|_| (r.next_u64() >> 32) as u32).collect();
        for d in [-1i64, 0, 1] {
            let w = ((thr as i64 + d).clamp(0, (1 << 24) - 1) as u32) << 8;
            words.extend([w, w | 0xff]);
        }
        for w in words {
            let float_keep = (w >> 8) as f32 * (1.0 / 16_777_216.0) >= p;
            assert_eq!((w >> 8) >= thr, float_keep, "p={p} word={w:#x}");
        }
    }
}
