//! Backend parity (tests/common/parity.rs). On a GPU machine: every CUDA kernel and whole training steps
//! through the real Trainer against the CPU reference, f32 and bf16, with the kernels the environment selects
//! (BERTQA_ATTN, BERTQA_GEMM, BERTQA_VEC, …, strictly parsed — scripts/gpu_check.sh runs the opt-in paths
//! this way). Everywhere: the harness itself, on computations that differ (f32 against the f64 reference)
//! and on deliberately wrong results, which it must reject.

use bertqa::cpu::Cpu;
use bertqa::cuda::Cuda;
use bertqa::kernel::{AttnKernel, KernelChoice, KernelConfig, Tc4Shape};
mod common;
use bertqa::tensor::DType;
use common::check_rows;
use common::parity::{compare, compare_outputs, rel_l2, suite, AttentionCase, Case, StepCase};

/// GPU tests hold this while they run (one suite at a time keeps their logs apart).
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The GPU with the kernels of `k`, or the environment's when None; None (and a printed reason) without one.
fn cuda_or_skip(k: Option<KernelConfig>) -> Option<Cuda> {
    let k = match k {
        Some(k) => k,
        None => KernelConfig::from_choice_and_env(&KernelChoice::default())
            .expect("BERTQA_* kernel variables"),
    };
    match Cuda::new(0, k) {
        Ok(c) => Some(c),
        // a GPU that cannot run the chosen kernels (BERTQA_ATTN=v5 off sm_90) is a failure, not a skip
        Err(e)
            if e.downcast_ref::<bertqa::cuda::KernelsUnsupported>()
                .is_some() =>
        {
            panic!("{e:#}")
        }
        Err(e) => {
            println!("SKIPPED (no GPU): {e:#}");
            None
        }
    }
}

/// The harness on two computations that really differ: the f32 CPU path against the f64 reference, every
/// case of the suite within the f32 bound (1e-5 relative), and the cases all present.
#[test]
fn harness_cpu_f32_against_the_f64_reference() {
    let rows = suite(&Cpu::new(), DType::F32, &[16, 32]).unwrap();
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
    // f32 really differs from f64 somewhere (else the comparison would be vacuous)
    assert!(rows.iter().any(|r| r.err_dev > 1e-9), "f32 equals f64?");
    check_rows(&rows);
}

/// The harness rejects results an honest bf16 computation would not give: the loss trajectory with one loss
/// 1% off, a gradient 3% off everywhere, or a non-finite value; the honest run passes. (The bf16 bounds are
/// twice the CPU-bf16 reference's own error, which for this step's gradients is itself ~1–4%: a smaller
/// systematic error, say 1%, passes at bf16 — the f32 runs, bound 1e-5, are what catch it.)
#[test]
fn harness_rejects_a_slightly_wrong_bf16_result() {
    let case = StepCase {
        cfg: bertqa::model::BertConfig::tiny(97, 32, 1, 2, 64, 32),
        b: 2,
        t: 13,
        steps: 1,
    };
    let honest = case.run(&Cpu::new(), DType::BF16).unwrap();
    assert!(compare_outputs(DType::BF16, &case, &honest)
        .unwrap()
        .iter()
        .all(|r| r.pass));
    let grad = "grad encoder.layer.0.attention.self.qkv.weight";
    for (what, everywhere, factor) in [("loss trajectory", false, 1.01), (grad, true, 1.03)] {
        let mut bad = honest.clone();
        let t = bad.iter_mut().find(|(n, _)| n == what).unwrap();
        if everywhere {
            t.1.iter_mut().for_each(|x| *x *= factor);
        } else {
            t.1[0] *= factor;
        }
        let rows = compare_outputs(DType::BF16, &case, &bad).unwrap();
        let failed: Vec<_> = rows.iter().filter(|r| !r.pass).map(|r| &r.tensor).collect();
        assert_eq!(failed, vec![what], "{what} scaled by {factor}");
    }
    let mut nan = honest.clone();
    nan[1].1[0] = f64::NAN;
    let rows = compare_outputs(DType::BF16, &case, &nan).unwrap();
    assert!(!rows[1].pass);
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
    let Some(gpu) = cuda_or_skip(None) else {
        return;
    };
    println!(
        "device: {} ({})",
        bertqa::backend::BackendCore::name(&gpu),
        gpu.kernels().describe()
    );
    check_rows(&suite(&gpu, DType::F32, &bertqa::ops::attention::CUDA_HEAD_SIZES).unwrap());
    lt_ran(&gpu, DType::F32);
}

/// With `--gemm lt` (BERTQA_GEMM=lt), what cuBLASLt ran of the suite: at bf16 it must have run GEMMs, the
/// bias epilogue among them — else the suite passed on cublasGemmEx's results, having checked nothing of
/// cuBLASLt (it hands a shape it has no algorithm for to cublasGemmEx silently) — and given up no shape. At
/// f32 it runs nothing (f32 GEMMs are cublasGemmEx's, the parity path).
fn lt_ran(gpu: &Cuda, dt: DType) {
    if !gpu.kernels().gemm_lt() {
        return;
    }
    let c = gpu.gemm_lt_counts().unwrap_or_default();
    println!(
        "cuBLASLt: {} GEMMs ({} with the bias epilogue), {} without a bias left to cublasGemmEx, {} bias \
         epilogues declined, {} shapes given up",
        c.lt, c.lt_bias, c.fallback, c.bias_declined, c.failed
    );
    // a shape given up (none of its algorithms ran, or the chosen one refused to launch) is a cuBLASLt
    // problem at any dtype
    assert_eq!(
        c.failed, 0,
        "--gemm lt: cuBLASLt gave up shapes (warnings above): {c:?}"
    );
    if dt != DType::F32 {
        assert!(
            c.lt > 0 && c.lt_bias > 0,
            "--gemm lt: cuBLASLt ran {} GEMMs, {} with the bias epilogue: the suite did not check it ({c:?})",
            c.lt,
            c.lt_bias,
        );
    }
}

#[test]
fn gpu_parity_bf16() {
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = cuda_or_skip(None) else {
        return;
    };
    println!("kernels: {}", gpu.kernels().describe());
    check_rows(&suite(&gpu, DType::BF16, &bertqa::ops::attention::CUDA_HEAD_SIZES).unwrap());
    lt_ran(&gpu, DType::BF16);
}

/// The tensor-core attention variants `kernels` against the f64 CPU reference (bf16 bounds), every head size:
/// padded windows of T=37 (one key block) and T=203 (several key blocks and query tiles), packed windows of 1,
/// 17, 64, 65, 383 and 384 tokens in one batch, a bucketed batch, without dropout, and rising row maxima.
fn attention_variants_bf16(gpu: &mut Cuda, kernels: &[AttnKernel]) {
    let mut rows = vec![];
    for &kernel in kernels {
        gpu.set_kernels(KernelConfig {
            attention: kernel,
            ..KernelConfig::default()
        })
        .expect("switching kernels");
        for hs in bertqa::ops::attention::CUDA_TC_HEAD_SIZES {
            for case in [
                AttentionCase::padded(2, 37, 2, hs, 0.1),
                AttentionCase::padded(2, 203, 2, hs, 0.1),
                AttentionCase::packed(&[1, 17, 64, 65, 383, 384], 2, hs, 0.1),
                // a packed batch rounded up to 128 rows by a filler window (src/model/batch.rs)
                AttentionCase::bucketed(&[17, 90], 128, 2, hs, 0.1),
                // without dropout (variant 4's _p0 kernels)
                AttentionCase::packed(&[1, 17, 64, 65, 383, 384], 2, hs, 0.0),
                // row maxima rising tile after tile (the forward rebases mid-way), with and without dropout
                AttentionCase::packed(&[203, 384], 2, hs, 0.1).rising(),
                AttentionCase::packed(&[384], 2, hs, 0.0).rising(),
            ] {
                let got = compare(gpu, DType::BF16, &case)
                    .unwrap_or_else(|e| panic!("{kernel:?} {}: {e:#}", case.name()));
                for mut row in got {
                    row.case = format!("{kernel:?} {}", row.case);
                    rows.push(row);
                }
            }
        }
    }
    check_rows(&rows);
}

/// Variant 3 and variant 4 in each backward shape (attention_variants_bf16).
#[test]
fn gpu_attention_variants_bf16() {
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut gpu) = cuda_or_skip(Some(KernelConfig::default())) else {
        return;
    };
    let variants: Vec<AttnKernel> = [AttnKernel::V3]
        .into_iter()
        .chain(Tc4Shape::ALL.into_iter().map(AttnKernel::V4))
        .collect();
    attention_variants_bf16(&mut gpu, &variants);
}

/// The wgmma variants, 5 (forward) and 6 (forward and backward), the same way: on an sm_90 GPU only. A test of
/// its own, so that a failure here (e.g. the emulator's wgmma misread, which gpu_wgmma_probe would show) leaves
/// variants 3 and 4's verdict alone.
#[test]
fn gpu_attention_wgmma_bf16() {
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut gpu) = cuda_or_skip(Some(KernelConfig::default())) else {
        return;
    };
    if !gpu.has_wgmma() {
        println!(
            "SKIPPED: variants 5 and 6 need an sm_90 GPU, this is {}",
            gpu.arch()
        );
        return;
    }
    attention_variants_bf16(
        &mut gpu,
        &[
            AttnKernel::V5(Tc4Shape::W8B2),
            AttnKernel::V6(Tc4Shape::W8B2),
            AttnKernel::V6(Tc4Shape::W4),
        ],
    );
}

/// wgmma on the hardware against the emulator's reading of the PTX ISA (tests/emu_kernels.rs
/// `emu_wgmma_probe`, the same cases and reference): every probe bit for bit. On an sm_90 GPU only (the
/// instruction exists nowhere else); elsewhere it says why it skips.
#[test]
fn gpu_wgmma_probe() {
    use bertqa::cuda::wgmma_probe::{run, WgmmaProbeCase};
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gpu) = cuda_or_skip(Some(KernelConfig::default())) else {
        return;
    };
    if !gpu.has_wgmma() {
        println!("SKIPPED: wgmma needs an sm_90 GPU, this is {}", gpu.arch());
        return;
    }
    let cases = WgmmaProbeCase::sweep();
    let mut bad = vec![];
    for (i, case) in cases.iter().enumerate() {
        let (a, b, c) = case.inputs(i as u64 + 1);
        let got = run(&gpu, case, &a, &b, &c).unwrap_or_else(|e| panic!("{}: {e:#}", case.name()));
        let want = case.reference(&a, &b, &c);
        let wrong = (0..got.len())
            .filter(|&e| got[e].to_bits() != want[e].to_bits())
            .count();
        if let Some(e) = (0..got.len()).find(|&e| got[e].to_bits() != want[e].to_bits()) {
            bad.push(format!(
                "{}: {wrong} of {} differ, first D[{}][{}] = {} (want {})",
                case.name(),
                got.len(),
                e / case.n,
                e % case.n,
                got[e],
                want[e]
            ));
        }
    }
    println!(
        "wgmma probe: {} of {} cases bit-exact on {}",
        cases.len() - bad.len(),
        cases.len(),
        gpu.arch()
    );
    assert!(
        bad.is_empty(),
        "{} of {} wgmma probes differ on the GPU:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}

/// CUDA graphs (`--cuda-graphs on`) replay what running the ops does. Two trainers on one backend (so the
/// same stream, cuBLAS workspace and row bucket), from the same weights, one recording and replaying each
/// micro-batch shape and one running every micro-batch directly, take the same 16 steps (two micro-batches
/// each: gradient accumulation), dropout on (its masks change every step: the step seed is read from device
/// memory at replay). The batches: F, four full windows of 29 tokens (its two micro-batches differ only in
/// where the gradient goes, the step's sum or the accumulation scratch: two shapes); S and S', six windows of
/// the same lengths but other tokens and targets — one of S' start targets past its window, so the loss
/// scales differ — which share their shapes; L and M, longer windows (row buckets, other attention grids).
/// The order makes S' replay graphs recorded with S, and checks where each micro-batch ran, was recorded or
/// replayed. With the learning rate 0 the weights never change, so each step's loss depends only on the
/// batch and its masks — the forward has no atomics — and must agree bit for bit; the gradients (some
/// reductions are float atomics) within 1e-5; a third trainer with other masks shows the loss check sees them.
#[test]
fn gpu_cuda_graphs_replay_what_runs() {
    use bertqa::data::features::Feature;
    use bertqa::model::{BertConfig, BertParams};
    use bertqa::train::graphs::GraphStats;
    use bertqa::train::Trainer;
    use common::parity::{step_train_config, StepCase};
    let _one = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let mut k = KernelConfig {
        graphs: true,
        ..KernelConfig::from_choice_and_env(&KernelChoice::default())
            .expect("BERTQA_* kernel variables")
    };
    // variant 4's default backward shape: with at most two dQ partial sums per element here (128 keys per
    // block, windows ≤ 200), its f32 reductions are order-independent; w4 would need a looser bound
    if let AttnKernel::V4(_) = k.attention {
        k.attention = AttnKernel::V4(Tc4Shape::W8B2);
    }
    let Some(gpu) = cuda_or_skip(Some(k)) else {
        return;
    };
    println!("kernels: {}", gpu.kernels().describe());
    let cfg = BertConfig::tiny(211, 64, 2, 2, 128, 256);
    let shape = |b: usize, t: usize| StepCase {
        cfg: cfg.clone(),
        b,
        t,
        steps: 0,
    };
    // F: every window full (29 real tokens)
    let mut full = shape(4, 29).features();
    for (bi, f) in full.iter_mut().enumerate() {
        f.input_ids.resize(29, 0);
        f.token_type_ids.resize(29, 0);
        f.offsets.resize(29, None);
        for j in 0..29 {
            if f.input_ids[j] == 0 {
                f.input_ids[j] = 1 + ((7 * j + 3 * bi) % 200) as i32;
            }
        }
    }
    // S, and S': S's windows with other tokens (same real lengths) and targets
    let s = shape(6, 29).features();
    let mut s2 = s.clone();
    let mut r = bertqa::rng::Rng::new(77);
    for f in s2.iter_mut() {
        let len = f.len();
        for j in 0..len {
            f.input_ids[j] = 1 + r.below(cfg.vocab_size - 1) as i32;
        }
        f.start_position = r.below(len) as i64;
        f.end_position = f.start_position;
    }
    s2[2].start_position = 40; // past its window: ignored, one counted start target fewer
    let sets = [
        full,
        s,
        s2,
        shape(3, 200).features(),
        shape(5, 120).features(),
    ];
    let (f_, s_, s2_, l_, m_) = (0, 1, 2, 3, 4);
    // (batch, what its two micro-batches must do: ran directly, recorded, replayed — None: not checked)
    type Did = Option<(usize, usize, usize)>;
    let order: [(usize, Did); 16] = [
        (f_, Some((2, 0, 0))), // two new shapes: a gradient target missing from the key would record here
        (f_, Some((0, 2, 0))),
        (f_, Some((0, 0, 2))),
        (s_, Some((2, 0, 0))),
        (s_, Some((0, 2, 0))),
        (s2_, Some((0, 0, 2))), // S' replays S's graphs with its own tokens, targets and loss scales
        (l_, None),
        (m_, None),
        (s2_, Some((0, 0, 2))),
        (l_, None),
        (m_, None),
        (s_, Some((0, 0, 2))),
        (l_, None),
        (f_, Some((0, 0, 2))),
        (m_, None),
        (s2_, Some((0, 0, 2))),
    ];
    fn trainer<'a>(be: &'a Cuda, cfg: &BertConfig, seed: u64) -> Trainer<'a, Cuda> {
        let mut r = bertqa::rng::Rng::new(23);
        let master = BertParams::from_host(be, cfg, DType::F32, |name, shp| {
            let n: usize = shp.iter().product();
            Ok(common::rand_vec(&mut r, n, 0.1)
                .iter()
                .map(|x| {
                    if name.contains("LayerNorm.weight") {
                        x + 1.0
                    } else {
                        *x
                    }
                })
                .collect())
        })
        .unwrap();
        let mut tc = step_train_config(256);
        tc.padding = bertqa::model::Padding::Packed;
        tc.grad_accum_steps = 2;
        tc.batch_size = 6;
        tc.seed = seed;
        Trainer::new(be, cfg.clone(), master, DType::BF16, tc).unwrap()
    }
    let (mut a, mut b) = (trainer(&gpu, &cfg, 1000), trainer(&gpu, &cfg, 1000));
    // the control: the same steps with other dropout masks (another run seed), directly
    let mut c = trainer(&gpu, &cfg, 1001);
    a.graphs.enabled = false;
    c.graphs.enabled = false;
    let mut differ_from_other_masks = 0;
    for (step, &(set, expect)) in order.iter().enumerate() {
        let refs: Vec<&Feature> = sets[set].iter().collect();
        let before = b.graphs.stats;
        let (x, y, z) = (
            a.step(&refs, 0.0).unwrap(),
            b.step(&refs, 0.0).unwrap(),
            c.step(&refs, 0.0).unwrap(),
        );
        let after = b.graphs.stats;
        if let Some((eager, recorded, replayed)) = expect {
            let did = (
                after.eager - before.eager,
                after.recorded - before.recorded,
                after.replayed - before.replayed,
            );
            assert_eq!(
                did,
                (eager, recorded, replayed),
                "step {step} (batch {set}): (run directly, recorded, replayed)"
            );
        }
        assert_eq!(
            x.loss.to_bits(),
            y.loss.to_bits(),
            "step {step} (batch {set}): loss {} run directly, {} with graphs",
            x.loss,
            y.loss
        );
        differ_from_other_masks += (x.loss.to_bits() != z.loss.to_bits()) as usize;
        let (ga, gb) = (
            a.grads.flat().to_f64_vec(&gpu).unwrap(),
            b.grads.flat().to_f64_vec(&gpu).unwrap(),
        );
        let e = rel_l2(&gb, &ga);
        assert!(
            e <= 1e-5,
            "step {step} (batch {set}): gradients differ by {e:.2e} (relative L2)"
        );
        for t in [&mut a, &mut b, &mut c] {
            t.state.global_step += 1;
        }
    }
    // the bit-for-bit loss check sees the masks: other masks give other losses (nearly) every step
    assert!(
        differ_from_other_masks >= order.len() - 1,
        "only {differ_from_other_masks} of {} losses changed with the dropout masks",
        order.len()
    );
    let g: GraphStats = b.graphs.stats;
    println!(
        "CUDA graphs: {} micro-batches run, {} recorded, {} replayed, {} failed; {} shapes recorded",
        g.eager,
        g.recorded,
        g.replayed,
        g.failed,
        b.graphs.recorded()
    );
    assert!(
        g.failed == 0 && g.recorded >= 6 && g.replayed >= 12,
        "recordings: {g:?}"
    );
    assert_eq!(a.graphs.stats.recorded, 0);
}

#[test]
fn gpu_missing_driver_gives_clear_error() {
    if bertqa::cuda::driver_present() {
        println!("SKIPPED: a CUDA driver is present here");
        return;
    }
    let err = format!(
        "{:#}",
        Cuda::new(0, KernelConfig::default())
            .err()
            .expect("no driver → error")
    );
    assert!(
        err.contains("--device cpu"),
        "error should suggest --device cpu: {err}"
    );
}

/// The tensor-core kernels' integer keep test of an attention-dropout draw (kernels/common.cuh
/// `attn_threshold`/`attn_kept`: `draw >= ceil(p·2^16)`) keeps exactly the draws the stream's float test keeps
/// (`draw·2^-16 >= p`: src/rng.rs `half_uniform`, and variant 1's `attn_dropout`), for every 16-bit draw.
#[test]
fn attention_integer_keep_test_matches_the_float_one() {
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
        let thr = (p * 65_536.0).ceil() as u32;
        for draw in 0..=0xffffu32 {
            let float_keep = bertqa::rng::half_uniform(draw) >= p;
            assert_eq!(draw >= thr, float_keep, "p={p} draw={draw:#x}");
        }
    }
}
