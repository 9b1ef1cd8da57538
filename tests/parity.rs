//! Backend parity (src/parity.rs). On a GPU machine: every CUDA kernel and a whole training step against the
//! CPU reference, f32 and bf16. Everywhere: the same harness CPU-against-CPU, so its plumbing is tested.

use bertqa::cpu::Cpu;
use bertqa::cuda::Cuda;
use bertqa::parity::{print_rows, rel_l2, suite};
use bertqa::tensor::DType;

fn cuda_or_skip() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("SKIPPED (no GPU): {e:#}");
            None
        }
    }
}

fn check(rows: &[bertqa::parity::Row]) {
    print_rows(rows);
    let bad: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
    assert!(
        bad.is_empty(),
        "{} tensors out of bounds: {:?}",
        bad.len(),
        bad.iter()
            .map(|r| format!("{} / {}", r.case, r.tensor))
            .collect::<Vec<_>>()
    );
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
        check(&rows);
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
    let Some(gpu) = cuda_or_skip() else { return };
    println!("device: {}", bertqa::backend::BackendCore::name(&gpu));
    check(&suite(&gpu, DType::F32, &bertqa::ops::attention::CUDA_HEAD_SIZES).unwrap());
}

#[test]
fn gpu_parity_bf16() {
    let Some(gpu) = cuda_or_skip() else { return };
    check(&suite(&gpu, DType::BF16, &bertqa::ops::attention::CUDA_HEAD_SIZES).unwrap());
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
