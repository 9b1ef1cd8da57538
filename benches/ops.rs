#![allow(clippy::too_many_arguments)]
//! `cargo bench`: times every op forward and backward, and a whole training step, at all-MiniLM-L6-v2 and
//! BERT-base shapes. On a GPU (when one is found): batch 32, seq 384, bf16, timed with CUDA events after
//! warm-up; the roofline (device copy bandwidth, cuBLAS bf16 GEMM rate) is measured by the bench itself.
//! On the CPU: the CPU ops at MiniLM-L6 shapes (batch 8, seq 384, f32), and the GPU part is reported skipped.
//!
//! Columns: median µs over the timed runs; achieved GB/s (bytes moved: each input read once, each output
//! written once) or TFLOP/s (GEMM-like ops); % of the measured roofline for that kind of op.
//! Kernel variants not yet the default (attention v4, v5 and v6 in their block shapes, cuBLASLt, the vec
//! kernels, CUDA graphs) are timed beside the defaults by switching the backend's `KernelConfig` — one
//! section per kind of op; what cuBLASLt's tuning measured is printed per model.
//! Then training steps on real SQuAD windows in each batch layout (packed, longest, max).
//! Options (env, read here only): BENCH_ITERS (default 20 GPU / 3 CPU), BENCH_FILTER (substring of the
//! config name), BENCH_ONLY_PADDING (skip the per-op and synthetic-step sections: only the training steps on
//! real windows in each layout), BENCH_DEFAULTS_ONLY (time the default kernels only: scripts/gpu_check.sh sets it when an
//! opt-in path failed parity), BENCH_NO_WGMMA (leave out attention variants 5 and 6: set when the wgmma
//! probe or their parity failed), BENCH_NO_GRAPHS (leave out CUDA graphs: set when their check failed).

use bertqa::data::features::Feature;
use bertqa::kernel::{AttnKernel, GemmPath, KernelConfig, Tc4Shape};
use bertqa::model::{BertConfig, BertParams, Padding};
use bertqa::ops::adamw::AdamWHyper;
use bertqa::ops::attention::scratch_shape;
use bertqa::ops::embedding::{EmbGrads, EmbWeights};
use bertqa::ops::span_loss::SpanLossCfg;
use bertqa::ops::{SeqLayout, Seqs, STATS_LEN};
use bertqa::prelude::*;
use bertqa::rng::{Dropout, Rng};
use bertqa::train::{FeatureCfgSer, TrainConfig, Trainer};
use std::time::Instant;

/// A backend the bench can time and switch kernels on. CUDA events on the GPU, the host clock on the CPU;
/// on the GPU also the per-kernel profile of `reps` runs of a closure (src/cuda/mod.rs profiler).
trait Bench: Backend {
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64;
    fn profile(&self, _reps: usize, _f: &mut dyn FnMut()) -> Option<String> {
        None
    }
    /// Run with these kernels from now on (no-op on the CPU).
    fn use_kernels(&mut self, _k: KernelConfig) {}
    /// The kernel variants to time beside the defaults (none on the CPU or at f32).
    fn opt_in(&self, _dt: DType) -> bool {
        false
    }
    /// Whether Hopper's wgmma kernels (attention variants 5 and 6) run here: an sm_90 GPU.
    fn wgmma(&self) -> bool {
        false
    }
}
impl Bench for Cpu {
    fn time_ms(&self, f: &mut dyn FnMut()) -> f64 {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64() * 1e3
    }
}
impl Bench for Cuda {
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
        Cuda::time_ms(self, f).expect("CUDA event timing")
    }
    fn use_kernels(&mut self, k: KernelConfig) {
        self.set_kernels(k).expect("switching kernels");
    }
    fn opt_in(&self, dt: DType) -> bool {
        dt != DType::F32 && std::env::var_os("BENCH_DEFAULTS_ONLY").is_none()
    }
    fn wgmma(&self) -> bool {
        // BENCH_NO_WGMMA: set by scripts/gpu_check.sh when the wgmma probe or variants 5/6 failed parity
        self.has_wgmma() && std::env::var_os("BENCH_NO_WGMMA").is_none()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bench<B: Bench>(be: &B, iters: usize, f: &mut dyn FnMut()) -> f64 {
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

/// Where a config's rows go, and what they are measured against.
struct Table<'a> {
    roof: &'a Option<Roof>,
    iters: usize,
}
impl Table<'_> {
    fn add(&self, name: &str, shape: &str, ms: f64, bytes: f64, flops: f64) {
        let us = ms * 1e3;
        let (ach, pct) = if flops > 0.0 {
            let t = flops / (ms * 1e-3) / 1e12;
            (
                format!("{t:>8.2} TFLOP/s"),
                self.roof
                    .as_ref()
                    .map(|r| format!("{:>5.1}%", 100.0 * t / r.tflops))
                    .unwrap_or_default(),
            )
        } else {
            let g = bytes / (ms * 1e-3) / 1e9;
            (
                format!("{g:>8.1} GB/s   "),
                self.roof
                    .as_ref()
                    .map(|r| format!("{:>5.1}%", 100.0 * g / r.gbs))
                    .unwrap_or_default(),
            )
        };
        println!("{name:<40} {shape:<26} {us:>11.1} {ach} {pct}");
    }
}

fn rand_t<B: Backend>(be: &B, r: &mut Rng, shape: &[usize], dt: DType, s: f64) -> Tensor<B> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| (r.uniform() * 2.0 - 1.0) * s).collect();
    Tensor::from_f64(be, &v, shape, dt).unwrap()
}

/// The shapes of one benchmarked configuration.
struct Shape<'a> {
    cfg: &'a BertConfig,
    b: usize,
    t: usize,
    dt: DType,
}
impl Shape<'_> {
    fn n(&self) -> usize {
        self.b * self.t
    }
    /// statistics / parameter-gradient dtype
    fn sd(&self) -> DType {
        bertqa::ops::compute_dtype(self.dt)
    }
    fn es(&self) -> f64 {
        self.dt.size() as f64
    }
}

/// The batch of a shape as B full windows of T tokens.
fn full_layout<B: Backend>(be: &B, s: &Shape) -> Seqs<B> {
    Seqs::upload(be, &SeqLayout::packed(&vec![s.t; s.b], 0).unwrap()).unwrap()
}

/// `(label, config)` pairs: the defaults, then (when `opt_in`) each of `others`.
fn variants(
    opt_in: bool,
    others: &[(&'static str, KernelConfig)],
) -> Vec<(&'static str, KernelConfig)> {
    let mut v = vec![("", KernelConfig::default())];
    if opt_in {
        v.extend_from_slice(others);
    }
    v
}

fn lt() -> KernelConfig {
    KernelConfig {
        gemm: GemmPath::Lt { tune: true },
        ..KernelConfig::default()
    }
}
fn vec_on() -> KernelConfig {
    KernelConfig {
        vec: true,
        ..KernelConfig::default()
    }
}
fn attn(k: AttnKernel) -> KernelConfig {
    KernelConfig {
        attention: k,
        ..KernelConfig::default()
    }
}

/// The four linear layers of a BERT layer, forward (with and without the bias, and with cuBLASLt's bias
/// epilogue) and backward (cuBLAS and cuBLASLt; without the bias gradient, which the model takes in the
/// pass that produces each layer's output gradient, before its backward GEMMs: attention, dGELU, LayerNorm).
fn bench_linear<B: Bench>(be: &mut B, s: &Shape, tab: &Table, r: &mut Rng) {
    let (c, f, n, dt) = (s.cfg.hidden_size, s.cfg.intermediate_size, s.n(), s.dt);
    let opt_in = be.opt_in(dt);
    for (lname, ic, oc) in [
        ("linear qkv", c, 3 * c),
        ("linear attn-out", c, c),
        ("linear ffn-up", c, f),
        ("linear ffn-down", f, c),
    ] {
        let x = rand_t(be, r, &[n, ic], dt, 1.0);
        let w = rand_t(be, r, &[oc, ic], dt, 0.05);
        let bb = rand_t(be, r, &[oc], dt, 0.05);
        let mut y = Tensor::zeros(be, &[n, oc], dt).unwrap();
        let shape = format!("{n}x{ic}->{oc}");
        let fl = 2.0 * (n * ic * oc) as f64;
        for (label, k, bias) in [
            (" fwd", KernelConfig::default(), true),
            // the bare GEMM: the difference is what the bias_add pass costs
            (" fwd, no bias", KernelConfig::default(), false),
        ]
        .into_iter()
        .chain(opt_in.then_some((" fwd, cuBLASLt bias", lt(), true)))
        {
            be.use_kernels(k);
            let bref = bias.then_some(&bb);
            let ms = bench(be, tab.iters, &mut || {
                be.linear_forward(&mut y, &x, &w, bref).unwrap()
            });
            tab.add(&format!("{lname}{label}"), &shape, ms, 0.0, fl);
        }
        let mut dx = Tensor::zeros(be, &[n, ic], dt).unwrap();
        let mut dw = Tensor::zeros(be, &[oc, ic], s.sd()).unwrap();
        // as the model runs it: no bias gradient here — the QKV projection's comes with the attention
        // backward, the FFN up-projection's with dGELU (gelu_backward_bias), the attention output and FFN
        // down projections' with the residual LayerNorm backward after them (so the vec kernels change nothing
        // here)
        for (label, k) in variants(opt_in, &[(", cuBLASLt", lt())]) {
            be.use_kernels(k);
            let ms = bench(be, tab.iters, &mut || {
                be.linear_backward(Some(&mut dx), false, &mut dw, None, &y, &x, &w)
                    .unwrap()
            });
            tab.add(&format!("{lname} bwd{label}"), &shape, ms, 0.0, 2.0 * fl);
        }
    }
    be.use_kernels(KernelConfig::default());
}

/// The fused attention: variant 1 (CUDA cores) and, for bf16/f16 on a GPU, variant 3 (the default), 4 (its
/// backward shapes) and, on sm_90, 5 and 6 (wgmma, both block shapes), with and without attention dropout
/// (what the Philox stream costs).
fn bench_attention<B: Bench>(be: &mut B, s: &Shape, tab: &Table, r: &mut Rng) {
    let (b, t, dt) = (s.b, s.t, s.dt);
    let (c, nh) = (s.cfg.hidden_size, s.cfg.num_attention_heads);
    let n = s.n();
    let qkv = rand_t(be, r, &[n, 3 * c], dt, 1.0);
    let seqs = full_layout(be, s);
    let mut out = Tensor::zeros(be, &[n, c], dt).unwrap();
    let mut lse = Tensor::zeros(be, &[nh, n], s.sd()).unwrap();
    let mut dqkv = Tensor::zeros(be, &[n, 3 * c], dt).unwrap();
    let fl = 4.0 * (b * nh * t * t * (c / nh)) as f64;
    // (label, kernel, dropout p, time the forward too)
    let mut runs = vec![("v1", AttnKernel::V1, 0.1, true)];
    let gpu_lowp = !be.supports(DType::F64) && dt != DType::F32;
    if gpu_lowp {
        runs.extend([
            ("v3", AttnKernel::V3, 0.1, true),
            ("v3 p=0", AttnKernel::V3, 0.0, true),
        ]);
    }
    if be.opt_in(dt) {
        runs.extend([
            ("v4", AttnKernel::V4(Tc4Shape::W8B2), 0.1, true),
            ("v4 p=0", AttnKernel::V4(Tc4Shape::W8B2), 0.0, true),
            ("v4 w4", AttnKernel::V4(Tc4Shape::W4), 0.1, false),
            ("v4 w8", AttnKernel::V4(Tc4Shape::W8), 0.1, false),
        ]);
        if be.wgmma() {
            // variant 5: the wgmma forward (its backward is v4 w8b2's); variant 6: the wgmma backward too; each
            // wgmma kernel with two warpgroups per block (w8b2 runs their w8: 128 queries in the forward, 128
            // keys in the backward) or one (w4: 64)
            runs.extend([
                ("v5", AttnKernel::V5(Tc4Shape::W8B2), 0.1, true),
                ("v5 p=0", AttnKernel::V5(Tc4Shape::W8B2), 0.0, true),
                ("v6", AttnKernel::V6(Tc4Shape::W8B2), 0.1, false),
                ("v6 p=0", AttnKernel::V6(Tc4Shape::W8B2), 0.0, false),
                ("v6 w4", AttnKernel::V6(Tc4Shape::W4), 0.1, true),
                ("v6 w4 p=0", AttnKernel::V6(Tc4Shape::W4), 0.0, true),
            ]);
        }
    }
    let shape = format!("B{b} NH{nh} T{t} HS{}", c / nh);
    for (label, k, p, fwd) in runs {
        be.use_kernels(attn(k));
        let d = Dropout::new(p, 3);
        // the forward always runs once: the backward reads its lse
        let ms = bench(be, if fwd { tab.iters } else { 1 }, &mut || {
            be.attention_forward(&mut out, &mut lse, &qkv, &seqs, nh, d)
                .unwrap()
        });
        if fwd {
            tab.add(
                &format!("attention fwd (fused, {label})"),
                &shape,
                ms,
                0.0,
                fl,
            );
        }
        let mut scratch = Tensor::zeros(be, &scratch_shape(n, c, nh), s.sd()).unwrap();
        // with the QKV bias gradient, as the model runs it
        let mut dbias = Tensor::zeros(be, &[3 * c], s.sd()).unwrap();
        let ms = bench(be, tab.iters, &mut || {
            be.attention_backward(
                &mut dqkv,
                Some(&mut dbias),
                &out,
                &out,
                &lse,
                &qkv,
                &seqs,
                nh,
                d,
                &mut scratch,
            )
            .unwrap()
        });
        tab.add(
            &format!("attention bwd (fused, {label})"),
            &shape,
            ms,
            0.0,
            2.5 * fl,
        );
    }
    be.use_kernels(KernelConfig::default());
}

/// Residual + dropout + LayerNorm and GELU: the scalar kernels and, on a GPU at bf16/f16, the vec kernels.
fn bench_elementwise<B: Bench>(be: &mut B, s: &Shape, tab: &Table, r: &mut Rng) {
    let (c, f, n, dt, es) = (
        s.cfg.hidden_size,
        s.cfg.intermediate_size,
        s.n(),
        s.dt,
        s.es(),
    );
    let x = rand_t(be, r, &[n, c], dt, 1.0);
    let res = rand_t(be, r, &[n, c], dt, 1.0);
    let g = rand_t(be, r, &[c], dt, 1.0);
    let bb = rand_t(be, r, &[c], dt, 1.0);
    // the biases of the linear layers before, added here as the model does
    let lbias = rand_t(be, r, &[c], dt, 0.05);
    let gbias = rand_t(be, r, &[f], dt, 0.05);
    let (mut out, mut sum) = (
        Tensor::zeros(be, &[n, c], dt).unwrap(),
        Tensor::zeros(be, &[n, c], dt).unwrap(),
    );
    let (mut m, mut rs) = (
        Tensor::zeros(be, &[n], s.sd()).unwrap(),
        Tensor::zeros(be, &[n], s.sd()).unwrap(),
    );
    let (mut dx, mut dr) = (
        Tensor::zeros(be, &[n, c], dt).unwrap(),
        Tensor::zeros(be, &[n, c], dt).unwrap(),
    );
    let (mut dg, mut db, mut dbias) = (
        Tensor::zeros(be, &[c], s.sd()).unwrap(),
        Tensor::zeros(be, &[c], s.sd()).unwrap(),
        Tensor::zeros(be, &[c], s.sd()).unwrap(),
    );
    let gx = rand_t(be, r, &[n, f], dt, 2.0);
    let (mut gy, mut gdx) = (
        Tensor::zeros(be, &[n, f], dt).unwrap(),
        Tensor::zeros(be, &[n, f], dt).unwrap(),
    );
    let d = Dropout::new(0.1, 5);
    let seqs = full_layout(be, s);
    for (label, k) in variants(be.opt_in(dt), &[(", vec", vec_on())]) {
        be.use_kernels(k);
        let ms = bench(be, tab.iters, &mut || {
            be.residual_layernorm_forward(
                &mut out,
                &mut sum,
                &mut m,
                &mut rs,
                &x,
                Some(&lbias),
                &res,
                &g,
                &bb,
                1e-12,
                d,
                &seqs,
            )
            .unwrap()
        });
        let bytes = 4.0 * (n * c) as f64 * es;
        let sh = format!("{n}x{c}");
        tab.add(
            &format!("residual+dropout+layernorm fwd, +bias{label}"),
            &sh,
            ms,
            bytes,
            0.0,
        );
        let ms = bench(be, tab.iters, &mut || {
            be.residual_layernorm_backward(
                &mut dx,
                &mut dr,
                &mut dg,
                &mut db,
                Some(&mut dbias),
                &out,
                &sum,
                &m,
                &rs,
                &g,
                d,
                &seqs,
            )
            .unwrap()
        });
        tab.add(
            &format!("residual+dropout+layernorm bwd, +bias grad{label}"),
            &sh,
            ms,
            bytes,
            0.0,
        );
        let sh = format!("{n}x{f}");
        let ms = bench(be, tab.iters, &mut || {
            be.gelu_forward(&mut gy, &gx, Some(&gbias)).unwrap()
        });
        tab.add(
            &format!("gelu fwd, +bias{label}"),
            &sh,
            ms,
            2.0 * (n * f) as f64 * es,
            0.0,
        );
        let ms = bench(be, tab.iters, &mut || {
            be.gelu_backward(&mut gdx, &gy, &gx, Some(&gbias)).unwrap()
        });
        tab.add(
            &format!("gelu bwd, +bias{label}"),
            &sh,
            ms,
            3.0 * (n * f) as f64 * es,
            0.0,
        );
        // with the up-projection's bias gradient (vec: one fused pass; scalar: gelu bwd + bias_grad), as the
        // model runs it
        let mut gdb = Tensor::zeros(be, &[f], s.sd()).unwrap();
        let ms = bench(be, tab.iters, &mut || {
            be.gelu_backward_bias(&mut gdx, &mut gdb, &gy, &gx, Some(&gbias))
                .unwrap()
        });
        tab.add(
            &format!("gelu bwd, +bias, + bias grad{label}"),
            &sh,
            ms,
            3.0 * (n * f) as f64 * es,
            0.0,
        );
    }
    be.use_kernels(KernelConfig::default());
}

/// The embeddings (gather + LayerNorm + dropout) forward, and backward scalar and vec.
fn bench_embeddings<B: Bench>(be: &mut B, s: &Shape, tab: &Table, r: &mut Rng) {
    let (n, dt, es) = (s.n(), s.dt, s.es());
    let (c, v, p) = (
        s.cfg.hidden_size,
        s.cfg.vocab_size,
        s.cfg.max_position_embeddings,
    );
    let word = rand_t(be, r, &[v, c], dt, 1.0);
    let pos = rand_t(be, r, &[p, c], dt, 1.0);
    let ty = rand_t(be, r, &[2, c], dt, 1.0);
    let g = rand_t(be, r, &[c], dt, 1.0);
    let bb = rand_t(be, r, &[c], dt, 1.0);
    let ids: Vec<i32> = (0..n).map(|_| r.below(v) as i32).collect();
    let idt = Tensor::from_i32(be, &ids, &[n]).unwrap();
    let tyt = Tensor::from_i32(be, &vec![0; n], &[n]).unwrap();
    let seqs = full_layout(be, s);
    let mut out = Tensor::zeros(be, &[n, c], dt).unwrap();
    let (mut m, mut rs) = (
        Tensor::zeros(be, &[n], s.sd()).unwrap(),
        Tensor::zeros(be, &[n], s.sd()).unwrap(),
    );
    let ew = EmbWeights {
        word: &word,
        pos: &pos,
        ttype: &ty,
        gamma: &g,
        beta: &bb,
    };
    let d = Dropout::new(0.1, 7);
    let ms = bench(be, tab.iters, &mut || {
        be.embeddings_forward(&mut out, &mut m, &mut rs, &idt, &tyt, &seqs, &ew, 1e-12, d)
            .unwrap()
    });
    let sh = format!("{n}x{c}");
    tab.add(
        "embeddings+LN+dropout fwd",
        &sh,
        ms,
        4.0 * (n * c) as f64 * es,
        0.0,
    );
    let sd = s.sd();
    let (mut dw, mut dp, mut dty) = (
        Tensor::zeros(be, &[v, c], sd).unwrap(),
        Tensor::zeros(be, &[p, c], sd).unwrap(),
        Tensor::zeros(be, &[2, c], sd).unwrap(),
    );
    let (mut dg, mut db) = (
        Tensor::zeros(be, &[c], sd).unwrap(),
        Tensor::zeros(be, &[c], sd).unwrap(),
    );
    for (label, k) in variants(be.opt_in(dt), &[(", vec", vec_on())]) {
        be.use_kernels(k);
        let ms = bench(be, tab.iters, &mut || {
            let mut eg = EmbGrads {
                padding_idx: 0,
                word: &mut dw,
                pos: &mut dp,
                ttype: &mut dty,
                gamma: &mut dg,
                beta: &mut db,
            };
            be.embeddings_backward(&mut eg, &out, &m, &rs, &idt, &tyt, &seqs, &ew, d)
                .unwrap()
        });
        let bytes = (4.0 * es + 12.0) * (n * c) as f64;
        tab.add(
            &format!("embeddings+LN+dropout bwd{label}"),
            &sh,
            ms,
            bytes,
            0.0,
        );
    }
    be.use_kernels(KernelConfig::default());
}

/// The span loss (softmax cross-entropy over positions, forward and backward in one kernel).
fn bench_span_loss<B: Bench>(be: &mut B, s: &Shape, tab: &Table, r: &mut Rng) {
    let (b, t, n, dt) = (s.b, s.t, s.n(), s.dt);
    let logits = rand_t(be, r, &[n, 2], dt, 3.0);
    let st = Tensor::from_i32(be, &vec![5; b], &[b]).unwrap();
    let seqs = full_layout(be, s);
    let mut l = Tensor::zeros(be, &[b, 2], s.sd()).unwrap();
    let mut dl = Tensor::zeros(be, &[n, 2], dt).unwrap();
    let mut stats = Tensor::zeros(be, &[STATS_LEN], s.sd()).unwrap();
    let cfgl = SpanLossCfg { mask_padding: true };
    let scale = Tensor::from_f64(be, &[0.01, 0.01], &[2], s.sd()).unwrap();
    let ms = bench(be, tab.iters, &mut || {
        be.span_loss_forward_backward(
            &mut l, &mut dl, &mut stats, &logits, &st, &st, &seqs, &scale, cfgl,
        )
        .unwrap()
    });
    let bytes = (n * 2) as f64 * (2.0 * s.es() + 4.0);
    tab.add(
        "span softmax-CE fwd+bwd",
        &format!("B{b} T{t}"),
        ms,
        bytes,
        0.0,
    );
}

/// AdamW over the flat buffers (one launch) and the squared gradient norm (one reduction).
fn bench_adamw<B: Bench>(be: &mut B, s: &Shape, tab: &Table) {
    let sd = s.sd();
    let mut master = BertParams::zeros(be, s.cfg, sd).unwrap();
    let mut working = master.cast(be, s.dt).unwrap();
    let grads = BertParams::zeros(be, s.cfg, sd).unwrap();
    let (mut m, mut v) = (
        BertParams::zeros(be, s.cfg, sd).unwrap(),
        BertParams::zeros(be, s.cfg, sd).unwrap(),
    );
    let hp = AdamWHyper {
        lr: 1e-5,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        loss_scale: 1.0,
        max_grad_norm: 1.0,
    };
    let mut stats = Tensor::zeros(be, &[STATS_LEN], sd).unwrap();
    let n_decay = grads.layout().n_decay;
    let same = s.dt == sd;
    let ms = bench(be, tab.iters, &mut || {
        let w = if same { None } else { Some(working.flat_mut()) };
        be.adamw_step(
            master.flat_mut(),
            w,
            grads.flat(),
            m.flat_mut(),
            v.flat_mut(),
            n_decay,
            &stats,
            &hp,
        )
        .unwrap()
    });
    let np = grads.layout().total as f64;
    let sz = sd.size() as f64;
    // master, m, v read and written, grad read, the working copy written
    let bytes = np * (7.0 * sz + if same { 0.0 } else { s.es() });
    let shape = format!("{:.1}M params", np / 1e6);
    tab.add("adamw (flat, one launch)", &shape, ms, bytes, 0.0);
    let ms = bench(be, tab.iters, &mut || {
        be.grad_sq_norm(&mut stats, grads.flat()).unwrap();
    });
    tab.add("gradient squared norm (flat)", &shape, ms, np * sz, 0.0);
}

/// A training configuration for the step benchmark: dropout 0.1, weight decay, clipping, full windows.
fn step_train_config(b: usize, t: usize) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        learning_rate: 1e-5,
        batch_size: b,
        warmup_ratio: 0.0,
        seed: 1,
        save_total_limit: 0,
        padding: bertqa::model::Padding::Max,
        max_bad_steps: 3,
        eval_batch_size: b,
        features: FeatureCfgSer {
            max_seq_length: t,
            doc_stride: t / 3,
            max_query_length: 64,
        },
        ..TrainConfig::default()
    }
}

/// B full windows of random ids.
fn full_windows(cfg: &BertConfig, b: usize, t: usize, r: &mut Rng) -> Vec<Feature> {
    (0..b)
        .map(|i| Feature {
            example: i,
            input_ids: (0..t)
                .map(|_| 1 + r.below(cfg.vocab_size - 1) as i32)
                .collect(),
            token_type_ids: (0..t).map(|j| (j > 20) as i32).collect(),
            offsets: vec![None; t],
            max_len: t,
            start_position: 30,
            end_position: 35,
            has_answer: true,
        })
        .collect()
}

/// The whole training step through the real Trainer (host packing and upload, forward, loss, backward,
/// gradient norm, AdamW), with the default kernels and, on a GPU at bf16, each opt-in path and all together;
/// the per-kernel profile of the defaults and of everything together.
fn bench_step<B: Bench>(be: &mut B, s: &Shape, tab: &Table, r: &mut Rng) {
    let (b, t, dt) = (s.b, s.t, s.dt);
    let sd = s.sd();
    let feats = full_windows(s.cfg, b, t, r);
    let refs: Vec<&Feature> = feats.iter().collect();
    let all = KernelConfig {
        attention: AttnKernel::V4(Tc4Shape::W8B2),
        gemm: GemmPath::Lt { tune: true },
        vec: true,
        sync_launch: false,
        graphs: false,
    };
    let graphs = KernelConfig {
        graphs: true,
        ..KernelConfig::default()
    };
    let all_graphs = KernelConfig {
        graphs: true,
        ..all
    };
    // the graph rows last (a failure there loses no other row), and left out after a failed GPU check
    let mut others = vec![
        (", attention v4", attn(AttnKernel::V4(Tc4Shape::W8B2))),
        (", cuBLASLt", lt()),
        (", vec kernels", vec_on()),
        (", attention v4 + cuBLASLt + vec kernels", all),
    ];
    if be.wgmma() {
        // attention variants 5 and 6 (wgmma) in place of v4, everything else on
        for (label, a) in [
            (
                ", attention v5 + cuBLASLt + vec kernels",
                AttnKernel::V5(Tc4Shape::W8B2),
            ),
            (
                ", attention v6 + cuBLASLt + vec kernels",
                AttnKernel::V6(Tc4Shape::W8B2),
            ),
        ] {
            others.push((
                label,
                KernelConfig {
                    attention: a,
                    ..all
                },
            ));
        }
    }
    if std::env::var_os("BENCH_NO_GRAPHS").is_none() {
        others.push((", CUDA graphs", graphs));
        others.push((
            ", attention v4 + cuBLASLt + vec kernels + CUDA graphs",
            all_graphs,
        ));
    }
    for (label, k) in variants(be.opt_in(dt), &others) {
        be.use_kernels(k);
        let mut seed = Rng::new(5);
        let master = BertParams::from_host(&*be, s.cfg, sd, |name, shape| {
            let n: usize = shape.iter().product();
            let scale = if name.contains("LayerNorm.weight") {
                1.0
            } else {
                0.05
            };
            Ok((0..n)
                .map(|_| (seed.uniform() * 2.0 - 1.0) * scale)
                .collect())
        })
        .unwrap();
        let be = &*be;
        let mut tr = Trainer::new(be, s.cfg.clone(), master, dt, step_train_config(b, t)).unwrap();
        let host_ms = std::cell::Cell::new(0.0);
        let mut step = || {
            host_ms.set(tr.step(&refs, 1e-5).unwrap().host_ms);
            tr.state.global_step += 1;
        };
        let ms = bench(be, tab.iters.clamp(2, 10), &mut step);
        let host = host_ms.get();
        let profile = if label.is_empty() || k == all {
            be.profile(3, &mut step)
        } else {
            None
        };
        let flops = s.cfg.train_flops_per_seq(t) * b as f64;
        tab.add(
            &format!("TRAINING STEP{label}"),
            &format!("B{b} T{t}"),
            ms,
            0.0,
            flops,
        );
        let seqs = b as f64 / (ms * 1e-3);
        let mfu = tab
            .roof
            .as_ref()
            .map(|r| {
                format!(
                    "{:.1}% MFU vs measured GEMM peak",
                    100.0 * flops / (ms * 1e-3) / 1e12 / r.tflops
                )
            })
            .unwrap_or_default();
        let g = tr.graphs.stats;
        println!(
            "  => {seqs:.1} seq/s, {:.0} tokens/s, {mfu}; device memory peak {:.2} GiB; host {host:.2} ms of the \
             step before its synchronisation; micro-batches run {} / recorded {} / replayed {}",
            seqs * t as f64,
            be.memory_stats().peak_bytes as f64 / 1073741824.0,
            g.eager,
            g.recorded,
            g.replayed
        );
        if let Some(p) = profile {
            println!(
                "  per-kernel profile of the step{label} (3 steps, CUDA events around each launch):\n{p}"
            );
        }
    }
    // the rows after this one (the padding layouts) run the defaults
    be.use_kernels(KernelConfig::default());
}

/// Real SQuAD v1.1 training windows (384/128/64, all-MiniLM-L6-v2's WordPiece), shuffled with the training
/// loop's epoch order; None (and a printed reason) without the shared assets.
fn squad_windows() -> Option<Vec<Feature>> {
    let Some(a) = bertqa::util::assets_dir() else {
        println!("padding bench SKIPPED: no shared assets (SQuAD v1.1, all-MiniLM-L6-v2)");
        return None;
    };
    let ds = bertqa::data::squad::Dataset::load(&a.join("squad-v1.1/train-v1.1.json")).ok()?;
    let tok = bertqa::data::tokenizer::load(&a.join("all-MiniLM-L6-v2")).ok()?;
    let fc = bertqa::data::features::FeatureCfg::default();
    let feats = bertqa::train::training_features(&ds, &tok, &fc).ok()?;
    let order = bertqa::train::epoch_order(feats.len(), 42, 0);
    let mut shuffled: Vec<Option<Feature>> = feats.into_iter().map(Some).collect();
    Some(order.iter().filter_map(|&i| shuffled[i].take()).collect())
}

/// Training steps on real SQuAD windows in each batch layout (`--padding`): the same batches, timed;
/// windows/s, real and computed tokens/s, and the speed-up of each layout over `longest` (the padding-free
/// issue's check: packed ≥ 1.6× longest on the CPU at batch 8, ≥ 1.7× on a GPU at batch 32).
fn bench_padding<B: Bench>(be: &B, s: &Shape, windows: &[Feature], steps: usize) {
    let (b, dt) = (s.b, s.dt);
    let sd = s.sd();
    let batches = real_batches(windows, b, steps + 1);
    println!(
        "\n-- training steps on real SQuAD v1.1 windows (384/128), B={b}, {} timed steps after one warm-up, the \
         default kernels",
        steps
    );
    let mut rates = vec![];
    for padding in [Padding::Longest, Padding::Packed, Padding::Max] {
        let mut seed = Rng::new(5);
        let master = BertParams::from_host(be, s.cfg, sd, |name, shape| {
            let n: usize = shape.iter().product();
            let scale = if name.contains("LayerNorm.weight") {
                1.0
            } else {
                0.05
            };
            Ok((0..n)
                .map(|_| (seed.uniform() * 2.0 - 1.0) * scale)
                .collect())
        })
        .unwrap();
        let mut tc = step_train_config(b, 384);
        tc.padding = padding;
        let mut tr = Trainer::new(be, s.cfg.clone(), master, dt, tc).unwrap();
        tr.step(&batches[0], 1e-5).unwrap();
        be.synchronize().unwrap();
        let t0 = Instant::now();
        let (mut win, mut real, mut rows, mut host) = (0, 0, 0, 0.0);
        for (k, batch) in batches[1..].iter().enumerate() {
            tr.state.global_step = k + 1;
            let o = tr.step(batch, 1e-5).unwrap();
            win += o.windows;
            real += o.real_tokens;
            rows += o.rows;
            host += o.host_ms;
        }
        be.synchronize().unwrap();
        let secs = t0.elapsed().as_secs_f64();
        let w = win as f64 / secs;
        rates.push(w);
        println!(
            "  padding {:<8} {w:>9.1} windows/s {:>10.0} real tokens/s {:>10.0} computed tokens/s ({:.0}% of computed rows real){}",
            padding.name(),
            real as f64 / secs,
            rows as f64 / secs,
            100.0 * real as f64 / rows as f64,
            if padding == Padding::Longest {
                String::new()
            } else {
                format!(", {:.2}× longest", w / rates[0])
            }
        );
        let g = tr.graphs.stats;
        println!(
            "    host {:.2} of {:.2} ms per step before its synchronisation; micro-batches run {} / recorded {} / \
             replayed {}",
            host / steps as f64,
            secs * 1e3 / steps as f64,
            g.eager,
            g.recorded,
            g.replayed
        );
    }
}

fn run_config<B: Bench>(be: &mut B, name: &str, s: &Shape, tab: &Table) {
    let cfg = s.cfg;
    println!(
        "\n== {name}: L={} C={} NH={} F={}  B={} T={} {} on {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        s.b,
        s.t,
        s.dt,
        be.name()
    );
    println!(
        "{:<40} {:<26} {:>11} {:>16} % roof",
        "op", "shape", "median µs", "achieved"
    );
    if std::env::var_os("BENCH_ONLY_PADDING").is_none() {
        let mut r = Rng::new(1);
        bench_linear(be, s, tab, &mut r);
        bench_attention(be, s, tab, &mut r);
        bench_elementwise(be, s, tab, &mut r);
        bench_embeddings(be, s, tab, &mut r);
        bench_span_loss(be, s, tab, &mut r);
        bench_adamw(be, s, tab);
        bench_step(be, s, tab, &mut r);
    }
    if let Some(w) = squad_windows() {
        let steps = if be.supports(DType::F64) { 8 } else { 20 };
        bench_padding(&*be, s, &w, steps);
        // CUDA graphs where launches may matter: a small model on the GPU, real (varied) batches
        if be.opt_in(s.dt)
            && s.cfg.hidden_size <= 512
            && std::env::var_os("BENCH_NO_GRAPHS").is_none()
        {
            bench_graphs_real(be, s, &w, 100);
        }
        // last: the wgmma kernels' two block shapes on real packed batches, where short windows favour
        // smaller blocks (docs/perf-log.md, eighth session)
        if be.wgmma() && be.opt_in(s.dt) {
            bench_shapes_real(be, s, &w, 40);
        }
    }
}

/// Packed training steps on `n` real SQuAD batches with attention variant 6 in each block shape (w8: two
/// warpgroups per block, w4: one) and variant 4 for scale, cuBLASLt and the vec kernels on: two passes, the
/// second timed (the first plans each batch shape's GEMMs).
fn bench_shapes_real<B: Bench>(be: &mut B, s: &Shape, windows: &[Feature], n: usize) {
    let b = s.b;
    let batches = real_batches(windows, b, n);
    println!(
        "
-- attention block shapes on real SQuAD v1.1 windows, packed, B={b}, cuBLASLt + vec kernels: {} batches twice, \
the second timed",
        batches.len()
    );
    for (label, attention) in [
        ("v6 w8", AttnKernel::V6(Tc4Shape::W8B2)),
        ("v6 w4", AttnKernel::V6(Tc4Shape::W4)),
        ("v4 w8b2", AttnKernel::V4(Tc4Shape::W8B2)),
    ] {
        be.use_kernels(KernelConfig {
            attention,
            gemm: GemmPath::Lt { tune: true },
            vec: true,
            ..KernelConfig::default()
        });
        let bref = &*be;
        let mut tr = packed_trainer(bref, s);
        let mut step = 0;
        let mut pass = |tr: &mut Trainer<B>| {
            for batch in &batches {
                tr.state.global_step = step;
                step += 1;
                tr.step(batch, 1e-5).unwrap();
            }
        };
        pass(&mut tr);
        bref.synchronize().unwrap();
        let t0 = Instant::now();
        pass(&mut tr);
        bref.synchronize().unwrap();
        let ms = t0.elapsed().as_secs_f64() * 1e3 / batches.len() as f64;
        println!(
            "  {label:<8} {ms:>8.2} ms per step, {:>7.1} windows/s",
            b as f64 / (ms * 1e-3)
        );
    }
    be.use_kernels(KernelConfig::default());
}

/// The first `n` batches of `b` windows (fewer if the windows run out).
fn real_batches(windows: &[Feature], b: usize, n: usize) -> Vec<Vec<&Feature>> {
    windows
        .chunks(b)
        .take(n)
        .map(|c| c.iter().collect())
        .collect()
}

/// A trainer on random weights (uniform ±0.05, seed 5) taking packed batches of B windows of up to 384 tokens:
/// the bench sections on real SQuAD batches.
fn packed_trainer<'a, B: Bench>(be: &'a B, s: &Shape) -> Trainer<'a, B> {
    let mut seed = Rng::new(5);
    let master = BertParams::from_host(be, s.cfg, s.sd(), |_, shape| {
        let n: usize = shape.iter().product();
        Ok((0..n)
            .map(|_| (seed.uniform() * 2.0 - 1.0) * 0.05)
            .collect())
    })
    .unwrap();
    let mut tc = step_train_config(s.b, 384);
    tc.padding = Padding::Packed;
    Trainer::new(be, s.cfg.clone(), master, s.dt, tc).unwrap()
}

/// Packed training steps on `n` real SQuAD batches, three passes over them (every batch shape seen three
/// times: run, recorded, replayed), the third timed: with the default kernels without and with CUDA graphs.
fn bench_graphs_real<B: Bench>(be: &mut B, s: &Shape, windows: &[Feature], n: usize) {
    let b = s.b;
    let batches = real_batches(windows, b, n);
    println!(
        "
-- CUDA graphs on real SQuAD v1.1 windows, packed, B={b}: {} batches three times, the third timed",
        batches.len()
    );
    let mut base = None;
    for graphs in [false, true] {
        be.use_kernels(KernelConfig {
            graphs,
            ..KernelConfig::default()
        });
        let bref = &*be;
        let mut tr = packed_trainer(bref, s);
        let mut step = 0;
        let mut pass = |tr: &mut Trainer<B>| {
            let mut host = 0.0;
            for batch in &batches {
                tr.state.global_step = step;
                step += 1;
                host += tr.step(batch, 1e-5).unwrap().host_ms;
            }
            host
        };
        pass(&mut tr);
        pass(&mut tr);
        bref.synchronize().unwrap();
        let t0 = Instant::now();
        let host = pass(&mut tr);
        bref.synchronize().unwrap();
        let ms = t0.elapsed().as_secs_f64() * 1e3 / batches.len() as f64;
        let g = tr.graphs.stats;
        let speed = base
            .map(|b: f64| format!(", {:.2}× without", b / ms))
            .unwrap_or_default();
        base.get_or_insert(ms);
        println!(
            "  graphs {:<3} {ms:>8.2} ms per step{speed}; host {:.2} ms per step before its synchronisation; \
             micro-batches run {} / recorded {} / replayed {} / failed {}",
            if graphs { "on" } else { "off" },
            host / batches.len() as f64,
            g.eager,
            g.recorded,
            g.replayed,
            g.failed
        );
    }
    be.use_kernels(KernelConfig::default());
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

fn iters(default: usize) -> usize {
    std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let minilm = BertConfig::tiny(30522, 384, 6, 12, 1536, 512);
    let base = BertConfig::bert_base();
    match Cuda::new(0, KernelConfig::default()) {
        Ok(mut gpu) => {
            println!("GPU: {}", gpu.name());
            let roof = Some(gpu_roofline(&gpu));
            let tab = Table {
                roof: &roof,
                iters: iters(20),
            };
            // BERT-base first: its rows carry the throughput and attention targets, and a bench cut short by
            // its device call's limit (scripts/gpu_check.sh) keeps what it printed
            let mut tuned = 0;
            for (name, cfg) in [("BERT-base", &base), ("all-MiniLM-L6-v2", &minilm)] {
                if name.contains(&filter) {
                    let s = Shape {
                        cfg,
                        b: 32,
                        t: 384,
                        dt: DType::BF16,
                    };
                    run_config(&mut gpu, name, &s, &tab);
                    // what cuBLASLt's tuning found for this model's shapes: how far its heuristic's first
                    // choice is from the fastest of its candidates (whether a wider search would pay)
                    let lines = gpu.gemm_tuning_report();
                    if lines.len() > tuned {
                        println!(
                            "\n== {name}: cuBLASLt tuning, per GEMM shape (µs per launch, 3 timed)"
                        );
                        for l in &lines[tuned..] {
                            println!("  {l}");
                        }
                        tuned = lines.len();
                    }
                }
            }
            println!(
                "\narena: peak {:.2} GiB, {} cudaMallocs",
                gpu.memory_stats().peak_bytes as f64 / 1073741824.0,
                gpu.cuda_mallocs()
            );
        }
        Err(e) => {
            println!("GPU part SKIPPED: {e:#}");
            let tab = Table {
                roof: &None,
                iters: iters(3),
            };
            if "all-MiniLM-L6-v2".contains(&filter) {
                let s = Shape {
                    cfg: &minilm,
                    b: 8,
                    t: 384,
                    dt: DType::F32,
                };
                run_config(
                    &mut Cpu::new(),
                    "all-MiniLM-L6-v2 (CPU reference)",
                    &s,
                    &tab,
                );
            }
        }
    }
}
