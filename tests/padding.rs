//! Padding-free batches are exact: the same windows laid out packed, padded to the longest, or padded to the
//! full length — and split into micro-batches or not — give the same logits, loss and gradients (f64, within
//! reduction-order rounding, dropout on: the dropout stream is keyed by window, position and feature, not by
//! the layout), and the same f32 training trajectory. And one activation plan serves every shape: memory does
//! not grow with the mix of batch shapes.

mod common;
use bertqa::cpu::Cpu;
use bertqa::data::features::Feature;
use bertqa::model::{BertConfig, Padding};
use bertqa::prelude::*;
use bertqa::rng::Rng;
use bertqa::train::Trainer;
use common::parity::{rel_l2 as rel, step_train_config};

/// `n` windows of `t` tokens with random real lengths (some short, one full, one of a single token) and
/// labels inside them.
fn windows(cfg: &BertConfig, n: usize, t: usize, seed: u64) -> Vec<Feature> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = match i % 5 {
                0 => t,
                1 => 1,
                _ => 2 + r.below(t - 2),
            };
            let s = r.below(len);
            let e = (s + r.below(3)).min(len - 1);
            Feature {
                example: i,
                input_ids: (0..len)
                    .map(|_| 1 + r.below(cfg.vocab_size - 1) as i32)
                    .collect(),
                token_type_ids: (0..len).map(|j| (j > 2) as i32).collect(),
                offsets: vec![None; len],
                max_len: t,
                start_position: s as i64,
                end_position: e as i64,
                has_answer: true,
            }
        })
        .collect()
}

/// What one f64 step of a tiny model on `feats` gives: (loss, gradients per tensor, logits of the real
/// tokens per window (start then end)).
type StepResult = (f64, Vec<(String, Vec<f64>)>, Vec<Vec<f32>>);

fn f64_step(padding: Padding, accum: usize, bucket: usize, feats: &[Feature]) -> StepResult {
    // packed batches rounded up to `bucket` rows by a filler window (as on a GPU with cuBLASLt)
    let be = Cpu::with_row_bucket(bucket);
    let cfg = BertConfig::tiny(97, 16, 2, 2, 32, 64);
    let master = common::rand_params(&be, &cfg, DType::F64, 3);
    let mut tc = step_train_config(feats[0].max_len);
    tc.padding = padding;
    tc.grad_accum_steps = accum;
    tc.batch_size = feats.len();
    let mut tr = Trainer::new(&be, cfg, master, DType::F64, tc).unwrap();
    let refs: Vec<&Feature> = feats.iter().collect();
    // lr 0: AdamW leaves the weights as they are (the gradients are what is compared)
    let out = tr.step(&refs, 0.0).unwrap();
    let grads = tr
        .grads
        .layout()
        .entries
        .clone()
        .into_iter()
        .zip(tr.grads.tensors())
        .map(|(e, g)| (e.name, g.to_f64_vec(&be).unwrap()))
        .collect();
    let (s, e) = tr.logits(&refs).unwrap();
    let logits = feats
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let l = f.len();
            [&s[i][..l], &e[i][..l]].concat()
        })
        .collect();
    (out.loss, grads, logits)
}

#[test]
fn packed_padded_and_accumulated_steps_agree_in_f64_with_dropout() {
    let cfg = BertConfig::tiny(97, 16, 2, 2, 32, 64);
    let feats = windows(&cfg, 7, 40, 5);
    let (l0, g0, lg0) = f64_step(Padding::Packed, 1, 1, &feats);
    assert!(l0.is_finite() && l0 > 0.0);
    for (padding, accum, bucket) in [
        (Padding::Longest, 1, 1),
        (Padding::Max, 1, 1),
        (Padding::Packed, 2, 1),
        (Padding::Max, 3, 1),
        // fillers of up to 31 / 23 rows (windows of 40 tokens)
        (Padding::Packed, 1, 32),
        (Padding::Packed, 2, 24),
        // a filler would be longer than the windows (and the position table of 64): exact rows
        (Padding::Packed, 1, 128),
    ] {
        let (l, g, lg) = f64_step(padding, accum, bucket, &feats);
        let el = ((l - l0) / l0).abs();
        println!("{padding:?} accum {accum} row bucket {bucket}: loss rel. diff {el:.1e}");
        assert!(el < 1e-12, "{padding:?} accum {accum}: loss {l} vs {l0}");
        let norm = g0
            .iter()
            .flat_map(|(_, v)| v.iter())
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        for ((name, a), (_, b)) in g.iter().zip(&g0) {
            // the span head's bias and the last LayerNorm's bias have no true gradient (softmax ignores a
            // constant added to every position's logit). The model computes none for the first (exactly 0
            // here, src/model/bert.rs); the second, (Σ_rows dlogits)·W_qa, is rounding noise on both sides,
            // whose relative difference means nothing — checking that it is noise checks, in every layout
            // here, the identity Σ_rows dlogits = 0 that leaving out the first relies on
            if name == "qa_outputs.bias" || name == "encoder.layer.1.output.LayerNorm.bias" {
                let m = a.iter().chain(b).fold(0.0f64, |m, x| m.max(x.abs()));
                assert!(
                    m < 1e-12 * norm,
                    "{padding:?} accum {accum}: {name} = {m:.2e} is not zero"
                );
                continue;
            }
            let e = rel(a, b);
            assert!(
                e < 1e-12,
                "{padding:?} accum {accum}: gradient {name} differs by {e:.2e}"
            );
        }
        for (w, (a, b)) in lg.iter().zip(&lg0).enumerate() {
            // logits come back as f32
            let e = rel(
                &a.iter().map(|&x| x as f64).collect::<Vec<_>>(),
                &b.iter().map(|&x| x as f64).collect::<Vec<_>>(),
            );
            assert!(
                e < 1e-6,
                "{padding:?}: logits of window {w} differ by {e:.2e}"
            );
        }
    }
}

/// 20 f32 training steps (dropout on, AdamW, clipping) give the same per-step losses in every layout.
#[test]
fn f32_training_trajectories_agree_across_paddings() {
    let cfg = BertConfig::tiny(97, 32, 2, 2, 64, 64);
    let feats = windows(&cfg, 40, 48, 9);
    let run = |padding: Padding| -> Vec<f64> {
        let be = Cpu::new();
        let master = common::rand_params(&be, &cfg, DType::F32, 4);
        let mut tc = step_train_config(48);
        tc.padding = padding;
        tc.max_grad_norm = 1.0;
        tc.batch_size = 8;
        let mut tr = Trainer::new(&be, cfg.clone(), master, DType::F32, tc).unwrap();
        (0..20)
            .map(|step| {
                let batch: Vec<&Feature> = (0..8)
                    .map(|k| &feats[(step * 8 + k) % feats.len()])
                    .collect();
                let out = tr.step(&batch, 1e-3).unwrap();
                tr.state.global_step += 1;
                out.loss
            })
            .collect()
    };
    let packed = run(Padding::Packed);
    for padding in [Padding::Longest, Padding::Max] {
        let other = run(padding);
        for (step, (a, b)) in other.iter().zip(&packed).enumerate() {
            let e = ((a - b) / b).abs();
            assert!(
                e < 1e-5,
                "{padding:?} step {step}: loss {a} vs packed {b} ({e:.1e})"
            );
        }
    }
}

/// The activation plan: a run whose batches mix short and long windows holds no more memory than one of
/// full windows only (≤ 1.1×), training and evaluation both; the CPU backend counts its allocations.
#[test]
fn mixed_batch_shapes_allocate_no_more_than_the_largest() {
    let cfg = BertConfig::tiny(97, 32, 2, 2, 64, 128);
    let t = 128;
    let full: Vec<Feature> = windows(&cfg, 16, t, 1)
        .into_iter()
        .map(|mut f| {
            f.input_ids.resize(t, 0);
            f.token_type_ids.resize(t, 0);
            f.offsets.resize(t, None);
            f.input_ids.iter_mut().for_each(|x| *x = 1 + *x % 90);
            f
        })
        .collect();
    let mixed = windows(&cfg, 64, t, 2);
    let peak = |feats: &[Feature], padding: Padding| -> usize {
        let be = Cpu::new();
        let master = common::rand_params(&be, &cfg, DType::F32, 4);
        let mut tc = step_train_config(t);
        tc.padding = padding;
        tc.batch_size = 8;
        tc.eval_batch_size = 8;
        let mut tr = Trainer::new(&be, cfg.clone(), master, DType::F32, tc).unwrap();
        for (step, batch) in feats.chunks(8).enumerate() {
            let refs: Vec<&Feature> = batch.iter().collect();
            tr.step(&refs, 1e-3).unwrap();
            tr.state.global_step = step + 1;
        }
        let refs: Vec<&Feature> = feats.iter().collect();
        tr.logits(&refs).unwrap();
        be.memory_stats().peak_bytes
    };
    let base = peak(&full, Padding::Max);
    for padding in [Padding::Packed, Padding::Longest, Padding::Max] {
        let p = peak(&mixed, padding);
        println!("{padding:?}: peak {p} bytes vs {base} at full windows");
        assert!(
            p as f64 <= 1.1 * base as f64,
            "{padding:?}: {p} > 1.1 × {base}"
        );
    }
}

/// After its first step, a training step allocates nothing — whatever the batch's shape, with gradient
/// accumulation and dropout — so that a micro-batch's forward, loss and backward can be recorded as a CUDA
/// graph (src/train/graphs.rs; the CUDA backend refuses allocations while recording, which only a GPU run
/// would show). This checks the model and trainer code on the CPU backend, which shares it.
#[test]
fn training_steps_allocate_nothing_after_the_first() {
    let cfg = BertConfig::tiny(97, 16, 2, 2, 32, 64);
    let t = 64;
    let feats = windows(&cfg, 40, t, 5);
    let be = Cpu::with_row_bucket(32);
    let master = common::rand_params(&be, &cfg, DType::F32, 4);
    let mut tc = step_train_config(t);
    tc.padding = Padding::Packed;
    tc.batch_size = 8;
    tc.grad_accum_steps = 2;
    let mut tr = Trainer::new(&be, cfg.clone(), master, DType::F32, tc).unwrap();
    let mut after_first = None;
    // batches of 8, 5, 3 and 8 windows of random lengths: other row counts, windows and filler windows
    for (step, batch) in [&feats[0..8], &feats[8..13], &feats[13..16], &feats[16..24]]
        .iter()
        .enumerate()
    {
        let refs: Vec<&Feature> = batch.iter().collect();
        tr.step(&refs, 1e-3).unwrap();
        tr.state.global_step = step + 1;
        let made = be.allocations();
        match after_first {
            None => after_first = Some(made),
            Some(n) => assert_eq!(made, n, "step {step} allocated {} times", made - n),
        }
    }
}

/// Evaluation takes memory for the windows a file has, not for the `--batch-size` asked: a batch size of
/// 100,000 (a plan of 4 million rows before) over 3 windows holds what a batch size of 3 holds, a larger
/// batch later grows the plan to its size (the old one freed first), and the logits do not depend on the
/// batch size.
#[test]
fn evaluation_memory_follows_the_windows_not_the_batch_size() {
    use bertqa::eval::run::WindowForward;
    use bertqa::model::BertQa;
    let cfg = BertConfig::tiny(97, 16, 2, 2, 32, 64);
    let feats = windows(&cfg, 7, 40, 5);
    let refs: Vec<&Feature> = feats.iter().collect();
    // (peak bytes after the first batch of 3, after a second of all 7, the logits of the second)
    let run = |batch_size: usize, first: usize| {
        let be = Cpu::new();
        let model = BertQa::new(cfg.clone(), common::rand_params(&be, &cfg, DType::F32, 3));
        let mut fwd = WindowForward::new(&model, batch_size, 40, Padding::Packed).unwrap();
        fwd.logits(&be, &refs[..first]).unwrap();
        let p1 = be.memory_stats().peak_bytes;
        let lg = fwd.logits(&be, &refs).unwrap();
        (p1, be.memory_stats().peak_bytes, lg)
    };
    // a plan of 3 windows runs the 7 as batches of 3, 3 and 1
    let (p3, _, lg3) = run(3, 3);
    let (_, p7, lg7) = run(7, 7);
    let (q1, q2, lg) = run(100_000, 3);
    println!(
        "peak bytes: batch 3 {p3}, batch 7 {p7}; batch 100000: {q1} after 3 windows, {q2} after 7"
    );
    assert_eq!(q1, p3, "the first batch's windows size the plan");
    assert!(
        q2 <= p7,
        "grown to {q2} bytes, more than a plan of 7 windows ({p7})"
    );
    assert!(p3 < p7);
    assert_eq!(lg3, lg7, "logits depend on the batch size");
    assert_eq!(lg, lg7, "logits depend on the plan's growth");
}
