#![allow(clippy::too_many_arguments)]
//! `cargo bench`: times every op forward and backward, and a whole training step, at all-MiniLM-L6-v2 and
//! BERT-base shapes. On a GPU (when one is found): batch 32, seq 384, bf16, timed with CUDA events after
//! warm-up; the roofline (device copy bandwidth, cuBLAS bf16 GEMM rate) is measured by the bench itself.
//! On the CPU: the CPU ops at MiniLM-L6 shapes (batch 8, seq 384, f32), and the GPU part is reported skipped.
//!
//! Columns: median µs over the timed runs; achieved GB/s (bytes moved: each input read once, each output
//! written once) or TFLOP/s (GEMM-like ops); % of the measured roofline for that kind of op.
//! Options (env): BENCH_ITERS (default 20 GPU / 3 CPU), BENCH_FILTER (substring of the config name).

use bertqa::model::bert::{Acts, Batch, BertQa, DropoutCfg};
use bertqa::model::{BertConfig, BertParams};
use bertqa::ops::adamw::{AdamWHyper, AdamWSlot};
use bertqa::ops::embedding::{EmbGrads, EmbWeights};
use bertqa::ops::span_loss::SpanLossCfg;
use bertqa::prelude::*;
use bertqa::rng::{Dropout, Rng};
use std::time::Instant;

/// Times a closure on a backend: CUDA events on the GPU, the host clock (after a sync) on the CPU.
/// On the GPU also the per-kernel profile of `reps` runs of a closure (src/cuda/mod.rs profiler).
trait Timing: Backend {
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64;
    fn profile(&self, _reps: usize, _f: &mut dyn FnMut()) -> Option<String> {
        None
    }
}
impl Timing for Cpu {
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64 {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64() * 1e3
    }
}
impl Timing for Cuda {
    fn profile(&self, reps: usize, f: &mut dyn FnMut()) -> Option<String> {
        self.set_profiling(true);
        for _ in 0..reps {
            f();
        }
        let report = self.profile_report(reps).expect("profile report");
        self.set_profiling(false);
        report
    }
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64 {
        let start = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .expect("event");
        let end = self
            .ctx
            .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .expect("event");
        start.record(&self.stream).expect("record");
        f();
        end.record(&self.stream).expect("record");
        end.synchronize().expect("sync");
        start.elapsed_ms(&end).expect("elapsed") as f64
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bench<B: Timing>(be: &B, iters: usize, f: &mut dyn FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    be.synchronize().unwrap();
    median((0..iters).map(|_| be.time_ms(f)).collect())
}

struct Roof {
    gbs: f64,
    tflops: f64,
}

struct Table {
    rows: Vec<String>,
}
impl Table {
    fn add(
        &mut self,
        name: &str,
        shape: &str,
        ms: f64,
        bytes: f64,
        flops: f64,
        roof: &Option<Roof>,
    ) {
        let us = ms * 1e3;
        let (ach, pct) = if flops > 0.0 {
            let t = flops / (ms * 1e-3) / 1e12;
            (
                format!("{t:>8.2} TFLOP/s"),
                roof.as_ref()
                    .map(|r| format!("{:>5.1}%", 100.0 * t / r.tflops))
                    .unwrap_or_default(),
            )
        } else {
            let g = bytes / (ms * 1e-3) / 1e9;
            (
                format!("{g:>8.1} GB/s   "),
                roof.as_ref()
                    .map(|r| format!("{:>5.1}%", 100.0 * g / r.gbs))
                    .unwrap_or_default(),
            )
        };
        let line = format!("{name:<34} {shape:<26} {us:>11.1} {ach} {pct}");
        println!("{line}");
        self.rows.push(line);
    }
}

fn rand_t<B: Backend>(be: &B, r: &mut Rng, shape: &[usize], dt: DType, s: f64) -> Tensor<B> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| (r.uniform() * 2.0 - 1.0) * s).collect();
    Tensor::from_f64(be, &v, shape, dt).unwrap()
}

fn run_config<B: Timing>(
    be: &B,
    name: &str,
    cfg: &BertConfig,
    b: usize,
    t: usize,
    dt: DType,
    iters: usize,
    roof: &Option<Roof>,
    tab: &mut Table,
) {
    // a GPU at bf16/f16: where the tensor-core attention and the cuBLASLt variants exist
    let gpu_lowp = !(be.supports(DType::F64) || dt == DType::F32);
    // ... and the opt-in paths (README), unless BENCH_DEFAULTS_ONLY is set (gpu_check.sh sets it when one of
    // them failed parity: a broken kernel is not timed)
    let opt_in = gpu_lowp && std::env::var_os("BENCH_DEFAULTS_ONLY").is_none();
    println!(
        "\n== {name}: L={} C={} NH={} F={}  B={b} T={t} {dt} on {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        be.name()
    );
    println!(
        "{:<34} {:<26} {:>11} {:>16} % roof",
        "op", "shape", "median µs", "achieved"
    );
    let (c, f, nh) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let n = b * t;
    let es = dt.size() as f64;
    let mut r = Rng::new(1);
    let sd = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    // linear layers
    for (lname, ic, oc) in [
        ("linear qkv", c, 3 * c),
        ("linear attn-out", c, c),
        ("linear ffn-up", c, f),
        ("linear ffn-down", f, c),
    ] {
        let x = rand_t(be, &mut r, &[n, ic], dt, 1.0);
        let w = rand_t(be, &mut r, &[oc, ic], dt, 0.05);
        let bb = rand_t(be, &mut r, &[oc], dt, 0.05);
        let mut y = Tensor::zeros(be, &[n, oc], dt).unwrap();
        let ms = bench(be, iters, &mut || {
            be.linear_forward(&mut y, &x, &w, Some(&bb)).unwrap()
        });
        tab.add(
            &format!("{lname} fwd"),
            &format!("{n}x{ic}->{oc}"),
            ms,
            0.0,
            2.0 * (n * ic * oc) as f64,
            roof,
        );
        // the same GEMM without the bias (the difference is what the bias_add pass costs) and, on a GPU,
        // with the bias in a cuBLASLt epilogue
        let ms = bench(be, iters, &mut || {
            be.linear_forward(&mut y, &x, &w, None).unwrap()
        });
        tab.add(
            &format!("{lname} fwd, no bias"),
            &format!("{n}x{ic}->{oc}"),
            ms,
            0.0,
            2.0 * (n * ic * oc) as f64,
            roof,
        );
        if opt_in {
            // SAFETY (edition 2021): single-threaded benchmark; the launcher reads it per call
            std::env::set_var("BERTQA_GEMM", "lt");
            let ms = bench(be, iters, &mut || {
                be.linear_forward(&mut y, &x, &w, Some(&bb)).unwrap()
            });
            std::env::remove_var("BERTQA_GEMM");
            tab.add(
                &format!("{lname} fwd, cuBLASLt bias"),
                &format!("{n}x{ic}->{oc}"),
                ms,
                0.0,
                2.0 * (n * ic * oc) as f64,
                roof,
            );
        }
        let mut dx = Tensor::zeros(be, &[n, ic], dt).unwrap();
        let mut dw = Tensor::zeros(be, &[oc, ic], sd).unwrap();
        let mut db = Tensor::zeros(be, &[oc], sd).unwrap();
        // backward as is and, on a GPU, with the vec bias-gradient kernel, and through cuBLASLt
        let bwd_variants: &[(&str, &str, &str)] = if opt_in {
            &[
                ("", "", ""),
                (", vec", "BERTQA_VEC", "1"),
                (", cuBLASLt", "BERTQA_GEMM", "lt"),
            ]
        } else {
            &[("", "", "")]
        };
        for (label, var, val) in bwd_variants {
            if !var.is_empty() {
                // SAFETY (edition 2021): single-threaded benchmark; the launchers read it per call
                std::env::set_var(var, val);
            }
            let ms = bench(be, iters, &mut || {
                be.linear_backward(Some(&mut dx), false, &mut dw, Some(&mut db), &y, &x, &w)
                    .unwrap()
            });
            if !var.is_empty() {
                std::env::remove_var(var);
            }
            tab.add(
                &format!("{lname} bwd{label}"),
                &format!("{n}x{ic}->{oc}"),
                ms,
                0.0,
                4.0 * (n * ic * oc) as f64,
                roof,
            );
        }
    }
    // attention
    {
        let qkv = rand_t(be, &mut r, &[b, t, 3 * c], dt, 1.0);
        let mask = Tensor::from_i32(be, &vec![1; b * t], &[b, t]).unwrap();
        let mut out = Tensor::zeros(be, &[b, t, c], dt).unwrap();
        let mut lse = Tensor::zeros(be, &[b, nh, t], sd).unwrap();
        let fl = 4.0 * (b * nh * t * t * (c / nh)) as f64;
        // (label, BERTQA_ATTN, BERTQA_ATTN4, dropout p, time forward too): variant 1 (CUDA cores) and, for
        // bf16/f16 on a GPU, variants 3 (tensor cores, the default) and 4, with and without attention dropout
        // (what the Philox stream costs), and variant 4's backward in its three shapes (w8b2 is its default).
        let mut variants = vec![("v1", "v1", "", 0.1, true)];
        if gpu_lowp {
            variants.extend([("v3", "v3", "", 0.1, true), ("v3 p=0", "v3", "", 0.0, true)]);
        }
        if opt_in {
            variants.extend([
                ("v4", "v4", "w8b2", 0.1, true),
                ("v4 p=0", "v4", "w8b2", 0.0, true),
                ("v4 w4", "v4", "w4", 0.1, false),
                ("v4 w8", "v4", "w8", 0.1, false),
            ]);
        }
        let mut dqkv = Tensor::zeros(be, &[b, t, 3 * c], dt).unwrap();
        for (label, v, v4, p, fwd) in variants {
            // SAFETY (edition 2021): single-threaded benchmark; the launcher reads the variables per call
            std::env::set_var("BERTQA_ATTN", v);
            std::env::set_var("BERTQA_ATTN4", if v4.is_empty() { "w8b2" } else { v4 });
            let d = Dropout::new(p, 3);
            let shape = format!("B{b} NH{nh} T{t} HS{}", c / nh);
            // forward always runs once: backward reads its lse
            let ms = bench(be, if fwd { iters } else { 1 }, &mut || {
                be.attention_forward(&mut out, &mut lse, &qkv, &mask, nh, d)
                    .unwrap()
            });
            if fwd {
                tab.add(
                    &format!("attention fwd (fused, {label})"),
                    &shape,
                    ms,
                    0.0,
                    fl,
                    roof,
                );
            }
            let ms = bench(be, iters, &mut || {
                be.attention_backward(&mut dqkv, &out, &out, &lse, &qkv, &mask, nh, d)
                    .unwrap()
            });
            tab.add(
                &format!("attention bwd (fused, {label})"),
                &shape,
                ms,
                0.0,
                2.5 * fl,
                roof,
            );
        }
        std::env::remove_var("BERTQA_ATTN4");
        std::env::remove_var("BERTQA_ATTN");
    }
    // residual + dropout + layernorm, and GELU: the scalar kernels and, on a GPU at bf16/f16, the vec kernels
    let vec_variants: &[&str] = if opt_in { &["", ", vec"] } else { &[""] };
    for label in vec_variants {
        if !label.is_empty() {
            // SAFETY (edition 2021): single-threaded benchmark; the launchers read it per call
            std::env::set_var("BERTQA_VEC", "1");
        }
        {
            let x = rand_t(be, &mut r, &[n, c], dt, 1.0);
            let res = rand_t(be, &mut r, &[n, c], dt, 1.0);
            let g = rand_t(be, &mut r, &[c], dt, 1.0);
            let bb = rand_t(be, &mut r, &[c], dt, 1.0);
            let (mut out, mut sum) = (
                Tensor::zeros(be, &[n, c], dt).unwrap(),
                Tensor::zeros(be, &[n, c], dt).unwrap(),
            );
            let (mut m, mut rs) = (
                Tensor::zeros(be, &[n], sd).unwrap(),
                Tensor::zeros(be, &[n], sd).unwrap(),
            );
            let d = Dropout::new(0.1, 5);
            let ms = bench(be, iters, &mut || {
                be.residual_layernorm_forward(
                    &mut out, &mut sum, &mut m, &mut rs, &x, &res, &g, &bb, 1e-12, d,
                )
                .unwrap()
            });
            tab.add(
                &format!("residual+dropout+layernorm fwd{label}"),
                &format!("{n}x{c}"),
                ms,
                4.0 * (n * c) as f64 * es,
                0.0,
                roof,
            );
            let (mut dx, mut dr) = (
                Tensor::zeros(be, &[n, c], dt).unwrap(),
                Tensor::zeros(be, &[n, c], dt).unwrap(),
            );
            let (mut dg, mut db) = (
                Tensor::zeros(be, &[c], sd).unwrap(),
                Tensor::zeros(be, &[c], sd).unwrap(),
            );
            let ms = bench(be, iters, &mut || {
                be.residual_layernorm_backward(
                    &mut dx, &mut dr, &mut dg, &mut db, &out, &sum, &m, &rs, &g, d,
                )
                .unwrap()
            });
            tab.add(
                &format!("residual+dropout+layernorm bwd{label}"),
                &format!("{n}x{c}"),
                ms,
                4.0 * (n * c) as f64 * es,
                0.0,
                roof,
            );
        }
        // gelu
        {
            let x = rand_t(be, &mut r, &[n, f], dt, 2.0);
            let mut y = Tensor::zeros(be, &[n, f], dt).unwrap();
            let ms = bench(be, iters, &mut || be.gelu_forward(&mut y, &x).unwrap());
            tab.add(
                &format!("gelu fwd{label}"),
                &format!("{n}x{f}"),
                ms,
                2.0 * (n * f) as f64 * es,
                0.0,
                roof,
            );
            let mut dx = Tensor::zeros(be, &[n, f], dt).unwrap();
            let ms = bench(be, iters, &mut || {
                be.gelu_backward(&mut dx, &y, &x).unwrap()
            });
            tab.add(
                &format!("gelu bwd{label}"),
                &format!("{n}x{f}"),
                ms,
                3.0 * (n * f) as f64 * es,
                0.0,
                roof,
            );
        }
        std::env::remove_var("BERTQA_VEC");
    }
    // embeddings
    {
        let v = cfg.vocab_size;
        let word = rand_t(be, &mut r, &[v, c], dt, 1.0);
        let pos = rand_t(be, &mut r, &[cfg.max_position_embeddings, c], dt, 1.0);
        let ty = rand_t(be, &mut r, &[2, c], dt, 1.0);
        let g = rand_t(be, &mut r, &[c], dt, 1.0);
        let bb = rand_t(be, &mut r, &[c], dt, 1.0);
        let ids: Vec<i32> = (0..n).map(|_| r.below(v) as i32).collect();
        let idt = Tensor::from_i32(be, &ids, &[b, t]).unwrap();
        let tyt = Tensor::from_i32(be, &vec![0; n], &[b, t]).unwrap();
        let mut out = Tensor::zeros(be, &[b, t, c], dt).unwrap();
        let (mut m, mut rs) = (
            Tensor::zeros(be, &[b, t], sd).unwrap(),
            Tensor::zeros(be, &[b, t], sd).unwrap(),
        );
        let ew = EmbWeights {
            word: &word,
            pos: &pos,
            ttype: &ty,
            gamma: &g,
            beta: &bb,
        };
        let d = Dropout::new(0.1, 7);
        let ms = bench(be, iters, &mut || {
            be.embeddings_forward(&mut out, &mut m, &mut rs, &idt, &tyt, &ew, 1e-12, d)
                .unwrap()
        });
        tab.add(
            "embeddings+LN+dropout fwd",
            &format!("{n}x{c}"),
            ms,
            4.0 * (n * c) as f64 * es,
            0.0,
            roof,
        );
        let (mut dw, mut dp, mut dty) = (
            Tensor::zeros(be, &[v, c], sd).unwrap(),
            Tensor::zeros(be, &[cfg.max_position_embeddings, c], sd).unwrap(),
            Tensor::zeros(be, &[2, c], sd).unwrap(),
        );
        let (mut dg, mut db) = (
            Tensor::zeros(be, &[c], sd).unwrap(),
            Tensor::zeros(be, &[c], sd).unwrap(),
        );
        for label in if opt_in {
            &["", ", vec"][..]
        } else {
            &[""][..]
        } {
            if !label.is_empty() {
                // SAFETY (edition 2021): single-threaded benchmark; the launcher reads it per call
                std::env::set_var("BERTQA_VEC", "1");
            }
            let ms = bench(be, iters, &mut || {
                let mut eg = EmbGrads {
                    padding_idx: 0,
                    word: &mut dw,
                    pos: &mut dp,
                    ttype: &mut dty,
                    gamma: &mut dg,
                    beta: &mut db,
                };
                be.embeddings_backward(&mut eg, &out, &m, &rs, &idt, &tyt, &ew, d)
                    .unwrap()
            });
            std::env::remove_var("BERTQA_VEC");
            tab.add(
                &format!("embeddings+LN+dropout bwd{label}"),
                &format!("{n}x{c}"),
                ms,
                (4.0 * es + 12.0) * (n * c) as f64,
                0.0,
                roof,
            );
        }
    }
    // span loss
    {
        let logits = rand_t(be, &mut r, &[b, t, 2], dt, 3.0);
        let st = Tensor::from_i32(be, &vec![5; b], &[b]).unwrap();
        let mask = Tensor::from_i32(be, &vec![1; b * t], &[b, t]).unwrap();
        let mut l = Tensor::zeros(be, &[b, 2], sd).unwrap();
        let mut dl = Tensor::zeros(be, &[b, t, 2], dt).unwrap();
        let cfgl = SpanLossCfg {
            mask_padding: true,
            scale_start: 0.01,
            scale_end: 0.01,
        };
        let ms = bench(be, iters, &mut || {
            be.span_loss_forward_backward(&mut l, &mut dl, &logits, &st, &st, &mask, cfgl)
                .unwrap()
        });
        tab.add(
            "span softmax-CE fwd+bwd",
            &format!("B{b} T{t}"),
            ms,
            (n * 2) as f64 * (2.0 * es + 4.0),
            0.0,
            roof,
        );
    }
    // whole training step
    {
        let specs = bertqa::model::params::param_specs(cfg);
        let mut master = BertParams::from_vec(
            cfg,
            specs
                .iter()
                .map(|(nm, s)| {
                    rand_t(
                        be,
                        &mut r,
                        s,
                        sd,
                        if nm.contains("LayerNorm.weight") {
                            1.0
                        } else {
                            0.05
                        },
                    )
                })
                .collect(),
        );
        let mut model = BertQa::new(cfg.clone(), master.cast(be, dt).unwrap());
        let mut grads = BertParams::zeros(be, cfg, sd).unwrap();
        let mut m1 = BertParams::zeros(be, cfg, sd).unwrap();
        let mut m2 = BertParams::zeros(be, cfg, sd).unwrap();
        let ids: Vec<i32> = (0..n)
            .map(|_| 1 + r.below(cfg.vocab_size - 1) as i32)
            .collect();
        let batch = Batch::new(
            be,
            b,
            t,
            &ids,
            &vec![0; n],
            &vec![1; n],
            &vec![3; b],
            &vec![7; b],
        )
        .unwrap();
        let mut acts = Acts::new(be, cfg, b, t, dt).unwrap();
        let names: Vec<String> = specs.iter().map(|(n, _)| n.clone()).collect();
        let mut step = 0u64;
        let same = dt == sd;
        let mut adam_ms = 0.0;
        // On a GPU in bf16, the step also with the variants not yet on by default (each label sets them).
        let step_variants: &[(&str, &[(&str, &str)])] = if !opt_in {
            &[("", &[])]
        } else {
            &[
                ("", &[]),
                (", attention v4", &[("BERTQA_ATTN", "v4")]),
                (", cuBLASLt", &[("BERTQA_GEMM", "lt")]),
                (", vec kernels", &[("BERTQA_VEC", "1")]),
                (
                    ", attention v4 + cuBLASLt + vec kernels",
                    &[
                        ("BERTQA_ATTN", "v4"),
                        ("BERTQA_GEMM", "lt"),
                        ("BERTQA_VEC", "1"),
                    ],
                ),
            ]
        };
        for (label, vars) in step_variants {
            for (k, v) in vars.iter() {
                // SAFETY (edition 2021): single-threaded benchmark
                std::env::set_var(k, v);
            }
            let mut train_step = || {
                step += 1;
                let drop = DropoutCfg {
                    hidden: 0.1,
                    attn: 0.1,
                    seed: step,
                };
                grads.zero_(be).unwrap();
                model.forward(be, &mut acts, &batch, drop).unwrap();
                model.loss(be, &mut acts, &batch, 1.0).unwrap();
                model
                    .backward(be, &mut grads, &mut acts, &batch, drop)
                    .unwrap();
                let gn = be.grad_sq_norm(&grads.tensors()).unwrap().sqrt();
                let hp = AdamWHyper {
                    lr: 1e-5,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.01,
                    step,
                    grad_scale: if gn > 1.0 { 1.0 / gn } else { 1.0 },
                };
                let mut work = model.params.tensors_mut().into_iter();
                let mut slots: Vec<AdamWSlot<B>> = Vec::new();
                for ((((p, g), a), v), nm) in master
                    .tensors_mut()
                    .into_iter()
                    .zip(grads.tensors())
                    .zip(m1.tensors_mut())
                    .zip(m2.tensors_mut())
                    .zip(&names)
                {
                    let w = work.next().unwrap();
                    slots.push(AdamWSlot {
                        master: p,
                        working: if same { None } else { Some(w) },
                        grad: g,
                        m: a,
                        v,
                        decay: bertqa::model::params::decays(nm),
                    });
                }
                let t0 = Instant::now();
                be.adamw_step(&mut slots, &hp).unwrap();
                be.synchronize().unwrap();
                adam_ms = t0.elapsed().as_secs_f64() * 1e3;
            };
            let ms = bench(be, iters.clamp(2, 10), &mut train_step);
            // where the step's time goes, kernel by kernel: the defaults and everything opt-in together
            let profile = if label.is_empty() || vars.len() > 2 {
                be.profile(3, &mut train_step)
            } else {
                None
            };
            for (k, _) in vars.iter() {
                std::env::remove_var(k);
            }
            let np = cfg.num_params() as f64;
            tab.add(
                &format!("adamw (all params, host-timed{label})"),
                &format!("{:.1}M params", np / 1e6),
                adam_ms,
                np * (4.0 * 4.0 + 3.0 * 4.0 + es),
                0.0,
                roof,
            );
            let flops = cfg.train_flops_per_seq(t) * b as f64;
            tab.add(
                &format!("TRAINING STEP fwd+bwd+adamw{label}"),
                &format!("B{b} T{t}"),
                ms,
                0.0,
                flops,
                roof,
            );
            let seqs = b as f64 / (ms * 1e-3);
            let mfu = roof
                .as_ref()
                .map(|r| {
                    format!(
                        "{:.1}% MFU vs measured GEMM peak",
                        100.0 * flops / (ms * 1e-3) / 1e12 / r.tflops
                    )
                })
                .unwrap_or_default();
            let line = format!(
                "  => {seqs:.1} seq/s, {:.0} tokens/s, {mfu}; activations {:.2} GiB",
                seqs * t as f64,
                acts.bytes() as f64 / 1073741824.0
            );
            println!("{line}");
            tab.rows.push(line);
            if let Some(p) = profile {
                println!("  per-kernel profile of the step{label} (3 steps, CUDA events around each launch):\n{p}");
            }
        }
    }
}

fn gpu_roofline(gpu: &Cuda) -> Roof {
    // device copy: a 1 GiB f32→f32 cast reads and writes every byte once
    let n = 256 << 20;
    let src = Tensor::<Cuda>::zeros(gpu, &[n], DType::F32).unwrap();
    let mut dst = Tensor::<Cuda>::zeros(gpu, &[n], DType::F32).unwrap();
    let ms = bench(gpu, 10, &mut || dst.assign(gpu, &src).unwrap());
    let gbs = 2.0 * 4.0 * n as f64 / (ms * 1e-3) / 1e9;
    // cuBLAS bf16 GEMM 8192³ on random data
    let k = 8192;
    let mut r = Rng::new(2);
    let a = rand_t(gpu, &mut r, &[k, k], DType::BF16, 1.0);
    let bm = rand_t(gpu, &mut r, &[k, k], DType::BF16, 1.0);
    let mut c = Tensor::<Cuda>::zeros(gpu, &[k, k], DType::BF16).unwrap();
    let ms = bench(gpu, 10, &mut || {
        gpu.gemm(k, k, k, 1.0, &a, false, &bm, true, 0.0, &mut c)
            .unwrap()
    });
    let tflops = 2.0 * (k as f64).powi(3) / (ms * 1e-3) / 1e12;
    println!("roofline (measured): device copy {gbs:.0} GB/s (read+write), cuBLAS bf16 GEMM 8192³ {tflops:.0} TFLOP/s");
    Roof { gbs, tflops }
}

fn main() {
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let minilm = BertConfig::tiny(30522, 384, 6, 12, 1536, 512);
    let base = BertConfig::bert_base();
    let mut tab = Table { rows: vec![] };
    match Cuda::new(0) {
        Ok(gpu) => {
            let iters = std::env::var("BENCH_ITERS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(20);
            println!("GPU: {}", gpu.name());
            let roof = Some(gpu_roofline(&gpu));
            for (name, cfg) in [("all-MiniLM-L6-v2", &minilm), ("BERT-base", &base)] {
                if name.contains(&filter) {
                    run_config(
                        &gpu,
                        name,
                        cfg,
                        32,
                        384,
                        DType::BF16,
                        iters,
                        &roof,
                        &mut tab,
                    );
                }
            }
            println!(
                "\narena: peak {:.2} GiB, {} cudaMallocs",
                gpu.arena
                    .peak_bytes
                    .load(std::sync::atomic::Ordering::Relaxed) as f64
                    / 1073741824.0,
                gpu.arena
                    .cuda_mallocs
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        Err(e) => {
            println!("GPU part SKIPPED: {e:#}");
            let iters = std::env::var("BENCH_ITERS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3);
            if "all-MiniLM-L6-v2".contains(&filter) {
                run_config(
                    &Cpu,
                    "all-MiniLM-L6-v2 (CPU reference)",
                    &minilm,
                    8,
                    384,
                    DType::F32,
                    iters,
                    &None,
                    &mut tab,
                );
            }
        }
    }
}
