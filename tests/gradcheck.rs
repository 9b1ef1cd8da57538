//! Finite-difference gradient checks (central differences, f64) for every op's backward and for the whole
//! model + span loss on a tiny config with padding, with and without dropout. Each check prints the max
//! normalised error per tensor; the bound is 1e-6.

mod common;
use bertqa::cpu::Cpu;
use bertqa::data::features::Feature;
use bertqa::model::batch::{pack, HostBatch, Padding};
use bertqa::model::{ActPlan, BertConfig, BertParams, BertQa, DropoutCfg};
use bertqa::ops::attention::scratch_shape;
use bertqa::ops::embedding::{EmbGrads, EmbWeights};
use bertqa::ops::span_loss::SpanLossCfg;
use bertqa::ops::{SeqLayout, Seqs, STATS_LEN, STAT_LOSS_END, STAT_LOSS_START};
use bertqa::prelude::*;
use bertqa::rng::{Dropout, Rng};
use bertqa::tensor::{DType, Tensor};
use common::*;

const F64: DType = DType::F64;
const BOUND: f64 = 1e-6;

/// Central difference of `f` w.r.t. element i of the tensor at `get(..)`.
fn fd<S>(
    state: &mut S,
    get: &dyn Fn(&mut S) -> &mut Tensor<Cpu>,
    f: &dyn Fn(&S) -> f64,
    idx: &[usize],
) -> Vec<f64> {
    let be = Cpu::new();
    let mut out = Vec::with_capacity(idx.len());
    for &i in idx {
        let mut v = get(state).to_f64_vec(&be).unwrap();
        let x = v[i];
        let h = 1e-6 * x.abs().max(1.0);
        v[i] = x + h;
        get(state).copy_from_f64(&be, &v).unwrap();
        let fp = f(state);
        v[i] = x - h;
        get(state).copy_from_f64(&be, &v).unwrap();
        let fm = f(state);
        v[i] = x;
        get(state).copy_from_f64(&be, &v).unwrap();
        out.push((fp - fm) / (2.0 * h));
    }
    out
}

/// Indices to check: all of a small tensor, a fixed random sample of a large one.
fn sample(n: usize, max: usize, rng: &mut Rng) -> Vec<usize> {
    if n <= max {
        (0..n).collect()
    } else {
        (0..max).map(|_| rng.below(n)).collect()
    }
}

/// Error normalised by the tensor's largest numeric gradient, floored at 1e-3: central differences of an
/// O(1) loss with h = 1e-6 carry ~1e-10 of round-off, so a tensor whose true gradient is ~0 (e.g. the last
/// LayerNorm bias, to which the softmax over positions is invariant) is judged on absolute error ≤ 1e-9.
fn report(op: &str, name: &str, analytic: &[f64], numeric: &[f64]) {
    let e = rel_err(analytic, numeric, 1e-3);
    println!("{op:>28} {name:<44} max rel err {e:.2e}");
    assert!(
        e < BOUND,
        "{op}: gradient of {name} off by {e:.3e} (analytic {:?} vs numeric {:?})",
        &analytic[..analytic.len().min(6)],
        &numeric[..numeric.len().min(6)]
    );
}

fn dot(a: &Tensor<Cpu>, w: &[f64]) -> f64 {
    a.to_f64_vec(&Cpu::new())
        .unwrap()
        .iter()
        .zip(w)
        .map(|(x, y)| x * y)
        .sum()
}

#[test]
fn linear_backward_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(1);
    let (n, ic, oc) = (7, 5, 3);
    struct S {
        x: Tensor<Cpu>,
        w: Tensor<Cpu>,
        b: Tensor<Cpu>,
        gw: Vec<f64>,
    }
    let mut s = S {
        x: rand_tensor(&be, &mut rng, &[n, ic], F64, 1.0),
        w: rand_tensor(&be, &mut rng, &[oc, ic], F64, 1.0),
        b: rand_tensor(&be, &mut rng, &[oc], F64, 1.0),
        gw: rand_vec(&mut rng, n * oc, 1.0),
    };
    let f = |s: &S| {
        let mut out = Tensor::zeros(&Cpu::new(), &[n, oc], F64).unwrap();
        Cpu::new()
            .linear_forward(&mut out, &s.x, &s.w, Some(&s.b))
            .unwrap();
        dot(&out, &s.gw)
    };
    let dout = Tensor::from_f64(&be, &s.gw, &[n, oc], F64).unwrap();
    let mut dx = rand_tensor(&be, &mut rng, &[n, ic], F64, 1.0); // overwritten
    let mut dw = Tensor::zeros(&be, &[oc, ic], F64).unwrap();
    let mut db = Tensor::zeros(&be, &[oc], F64).unwrap();
    be.linear_backward(
        Some(&mut dx),
        false,
        &mut dw,
        Some(&mut db),
        &dout,
        &s.x,
        &s.w,
    )
    .unwrap();
    let all = |k| (0..k).collect::<Vec<_>>();
    report(
        "linear",
        "dinp",
        &dx.to_f64_vec(&be).unwrap(),
        &fd(&mut s, &|s| &mut s.x, &f, &all(n * ic)),
    );
    report(
        "linear",
        "dweight",
        &dw.to_f64_vec(&be).unwrap(),
        &fd(&mut s, &|s| &mut s.w, &f, &all(oc * ic)),
    );
    report(
        "linear",
        "dbias",
        &db.to_f64_vec(&be).unwrap(),
        &fd(&mut s, &|s| &mut s.b, &f, &all(oc)),
    );
    // accumulation: a second backward adds the same again
    let before = dw.to_f64_vec(&be).unwrap();
    let dx0 = dx.to_f64_vec(&be).unwrap();
    be.linear_backward(
        Some(&mut dx),
        true,
        &mut dw,
        Some(&mut db),
        &dout,
        &s.x,
        &s.w,
    )
    .unwrap();
    let after = dw.to_f64_vec(&be).unwrap();
    for (a, b) in after.iter().zip(&before) {
        assert!((a - 2.0 * b).abs() < 1e-12, "dweight must accumulate");
    }
    for (a, b) in dx.to_f64_vec(&be).unwrap().iter().zip(&dx0) {
        assert!(
            (a - 2.0 * b).abs() < 1e-12,
            "dinp must accumulate when asked"
        );
    }
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(2);
    let n = 41;
    struct S {
        x: Tensor<Cpu>,
        g: Vec<f64>,
    }
    let mut s = S {
        x: rand_tensor(&be, &mut rng, &[n], F64, 4.0),
        g: rand_vec(&mut rng, n, 1.0),
    };
    let f = |s: &S| {
        let mut out = Tensor::zeros(&Cpu::new(), &[n], F64).unwrap();
        Cpu::new().gelu_forward(&mut out, &s.x, None).unwrap();
        dot(&out, &s.g)
    };
    let dout = Tensor::from_f64(&be, &s.g, &[n], F64).unwrap();
    let mut dx = Tensor::zeros(&be, &[n], F64).unwrap();
    be.gelu_backward(&mut dx, &dout, &s.x, None).unwrap();
    report(
        "gelu",
        "dinp",
        &dx.to_f64_vec(&be).unwrap(),
        &fd(&mut s, &|s| &mut s.x, &f, &(0..n).collect::<Vec<_>>()),
    );
    // golden values: torch.nn.functional.gelu(x) (erf form, float64, torch 2.x) at x = -1, 0.5, 2
    let x = Tensor::from_f64(&be, &[-1.0, 0.5, 2.0], &[3], F64).unwrap();
    let mut y = Tensor::zeros(&be, &[3], F64).unwrap();
    be.gelu_forward(&mut y, &x, None).unwrap();
    let y = y.to_f64_vec(&be).unwrap();
    for (a, b) in y.iter().zip([
        -0.15865525393145702,
        0.34573123063700656,
        1.9544997361036416,
    ]) {
        assert!((a - b).abs() < 1e-12, "gelu {a} vs {b}");
    }
}

/// GELU with the FFN up-projection's bias added to its input (as the model runs it): gelu_backward_bias's
/// dinp and dbias against finite differences through x and through the bias.
#[test]
fn gelu_with_bias_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(12);
    let (rows, c) = (7, 6);
    struct S {
        x: Tensor<Cpu>,
        bias: Tensor<Cpu>,
        g: Vec<f64>,
    }
    let mut s = S {
        x: rand_tensor(&be, &mut rng, &[rows, c], F64, 3.0),
        bias: rand_tensor(&be, &mut rng, &[c], F64, 1.0),
        g: rand_vec(&mut rng, rows * c, 1.0),
    };
    let f = |s: &S| {
        let mut out = Tensor::zeros(&Cpu::new(), &[rows, c], F64).unwrap();
        Cpu::new()
            .gelu_forward(&mut out, &s.x, Some(&s.bias))
            .unwrap();
        dot(&out, &s.g)
    };
    let dout = Tensor::from_f64(&be, &s.g, &[rows, c], F64).unwrap();
    let mut dx = Tensor::zeros(&be, &[rows, c], F64).unwrap();
    let mut db = Tensor::zeros(&be, &[c], F64).unwrap();
    be.gelu_backward_bias(&mut dx, &mut db, &dout, &s.x, Some(&s.bias))
        .unwrap();
    report(
        "gelu + bias",
        "dinp",
        &dx.to_f64_vec(&be).unwrap(),
        &fd(
            &mut s,
            &|s| &mut s.x,
            &f,
            &(0..rows * c).collect::<Vec<_>>(),
        ),
    );
    report(
        "gelu + bias",
        "dbias",
        &db.to_f64_vec(&be).unwrap(),
        &fd(&mut s, &|s| &mut s.bias, &f, &(0..c).collect::<Vec<_>>()),
    );
}

#[test]
fn residual_layernorm_backward_matches_finite_differences() {
    for p in [0.0f32, 0.3] {
        let be = Cpu::new();
        let mut rng = Rng::new(3);
        let (n, c) = (5, 13);
        let drop = Dropout::new(p, 77);
        // the op's own `bias` (the linear layer's, added to inp): the backward's dbias is its gradient
        struct S {
            x: Tensor<Cpu>,
            bias: Tensor<Cpu>,
            r: Tensor<Cpu>,
            g: Tensor<Cpu>,
            b: Tensor<Cpu>,
            w: Vec<f64>,
        }
        let mut s = S {
            x: rand_tensor(&be, &mut rng, &[n, c], F64, 2.0),
            bias: rand_tensor(&be, &mut rng, &[c], F64, 1.0),
            r: rand_tensor(&be, &mut rng, &[n, c], F64, 2.0),
            g: rand_tensor(&be, &mut rng, &[c], F64, 1.5),
            b: rand_tensor(&be, &mut rng, &[c], F64, 1.0),
            w: rand_vec(&mut rng, n * c, 1.0),
        };
        let seqs = Seqs::upload(&be, &common::parity::rows_layout(n)).unwrap();
        // the forward on the CPU reference: (out, sum, mean, rstd)
        let z = |sh: &[usize]| Tensor::zeros(&Cpu::new(), sh, F64).unwrap();
        let fwd = |s: &S| {
            let (mut out, mut sum, mut m, mut rs) = (z(&[n, c]), z(&[n, c]), z(&[n]), z(&[n]));
            Cpu::new()
                .residual_layernorm_forward(
                    &mut out,
                    &mut sum,
                    &mut m,
                    &mut rs,
                    &s.x,
                    Some(&s.bias),
                    &s.r,
                    &s.g,
                    &s.b,
                    1e-5,
                    drop,
                    &seqs,
                )
                .unwrap();
            (out, sum, m, rs)
        };
        let f = |s: &S| dot(&fwd(s).0, &s.w);
        let (_, sum, m, rs) = fwd(&s);
        let dout = Tensor::from_f64(&be, &s.w, &[n, c], F64).unwrap();
        let (mut dx, mut dr, mut dg, mut db) = (z(&[n, c]), z(&[n, c]), z(&[c]), z(&[c]));
        // dbias accumulates: it starts at 0.5 and FD sees the gradient alone
        let mut dbias = Tensor::from_f64(&be, &vec![0.5; c], &[c], F64).unwrap();
        be.residual_layernorm_backward(
            &mut dx,
            &mut dr,
            &mut dg,
            &mut db,
            Some(&mut dbias),
            &dout,
            &sum,
            &m,
            &rs,
            &s.g,
            drop,
            &seqs,
        )
        .unwrap();
        let dbias: Vec<f64> = dbias
            .to_f64_vec(&be)
            .unwrap()
            .iter()
            .map(|v| v - 0.5)
            .collect();
        let all = |k| (0..k).collect::<Vec<_>>();
        let op = format!("residual_layernorm p={p}");
        report(
            &op,
            "dinp",
            &dx.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.x, &f, &all(n * c)),
        );
        report(
            &op,
            "dresid",
            &dr.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.r, &f, &all(n * c)),
        );
        report(
            &op,
            "dgamma",
            &dg.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.g, &f, &all(c)),
        );
        report(
            &op,
            "dbeta",
            &db.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.b, &f, &all(c)),
        );
        report(
            &op,
            "dbias",
            &dbias,
            &fd(&mut s, &|s| &mut s.bias, &f, &all(c)),
        );
    }
}

#[test]
fn dropout_backward_matches_finite_differences() {
    let be = Cpu::new();
    let mut rng = Rng::new(4);
    let (rows, c) = (7, 9);
    let n = rows * c;
    let d = Dropout::new(0.4, 9);
    let seqs = Seqs::upload(&be, &common::parity::rows_layout(rows)).unwrap();
    struct S {
        x: Tensor<Cpu>,
        w: Vec<f64>,
    }
    let mut s = S {
        x: rand_tensor(&be, &mut rng, &[rows, c], F64, 1.0),
        w: rand_vec(&mut rng, n, 1.0),
    };
    let f = |s: &S| {
        let mut out = Tensor::zeros(&Cpu::new(), &[rows, c], F64).unwrap();
        Cpu::new()
            .dropout_forward(&mut out, &s.x, d, &seqs)
            .unwrap();
        dot(&out, &s.w)
    };
    let dout = Tensor::from_f64(&be, &s.w, &[rows, c], F64).unwrap();
    let mut dx = Tensor::zeros(&be, &[rows, c], F64).unwrap();
    be.dropout_backward(&mut dx, &dout, d, &seqs).unwrap();
    let dxv = dx.to_f64_vec(&be).unwrap();
    assert!(
        dxv.contains(&0.0) && dxv.iter().any(|&v| v != 0.0),
        "mask should drop some, keep some"
    );
    report(
        "dropout p=0.4",
        "dinp",
        &dxv,
        &fd(&mut s, &|s| &mut s.x, &f, &(0..n).collect::<Vec<_>>()),
    );
}

#[test]
fn embeddings_backward_matches_finite_differences() {
    for p in [0.0f32, 0.25] {
        let be = Cpu::new();
        let mut rng = Rng::new(5);
        let (b, t, c, v, pp, tv) = (2, 6, 7, 11, 9, 2);
        // two windows padded to 6 rows (positions 0..6 each)
        let (ids, types, _) = padded_batch(&mut rng, b, t, v, &[6, 4]);
        let seqs = Seqs::upload(&be, &SeqLayout::padded(&[6, 4], t, 3).unwrap()).unwrap();
        let drop = Dropout::new(p, 123);
        struct S {
            word: Tensor<Cpu>,
            pos: Tensor<Cpu>,
            ty: Tensor<Cpu>,
            g: Tensor<Cpu>,
            bb: Tensor<Cpu>,
            ids: Tensor<Cpu>,
            types: Tensor<Cpu>,
            w: Vec<f64>,
        }
        let mut s = S {
            word: rand_tensor(&be, &mut rng, &[v, c], F64, 1.0),
            pos: rand_tensor(&be, &mut rng, &[pp, c], F64, 1.0),
            ty: rand_tensor(&be, &mut rng, &[tv, c], F64, 1.0),
            g: rand_tensor(&be, &mut rng, &[c], F64, 1.5),
            bb: rand_tensor(&be, &mut rng, &[c], F64, 1.0),
            ids: Tensor::from_i32(&be, &ids, &[b * t]).unwrap(),
            types: Tensor::from_i32(&be, &types, &[b * t]).unwrap(),
            w: rand_vec(&mut rng, b * t * c, 1.0),
        };
        let f = |s: &S| {
            let z = |sh: &[usize]| Tensor::zeros(&Cpu::new(), sh, F64).unwrap();
            let (mut out, mut m, mut r) = (z(&[b * t, c]), z(&[b * t]), z(&[b * t]));
            let ew = EmbWeights {
                word: &s.word,
                pos: &s.pos,
                ttype: &s.ty,
                gamma: &s.g,
                beta: &s.bb,
            };
            Cpu::new()
                .embeddings_forward(
                    &mut out, &mut m, &mut r, &s.ids, &s.types, &seqs, &ew, 1e-12, drop,
                )
                .unwrap();
            dot(&out, &s.w)
        };
        let z = |sh: &[usize]| Tensor::zeros(&be, sh, F64).unwrap();
        let (mut out, mut m, mut r) = (z(&[b * t, c]), z(&[b * t]), z(&[b * t]));
        let ew = EmbWeights {
            word: &s.word,
            pos: &s.pos,
            ttype: &s.ty,
            gamma: &s.g,
            beta: &s.bb,
        };
        be.embeddings_forward(
            &mut out, &mut m, &mut r, &s.ids, &s.types, &seqs, &ew, 1e-12, drop,
        )
        .unwrap();
        let dout = Tensor::from_f64(&be, &s.w, &[b * t, c], F64).unwrap();
        let (mut dw, mut dp, mut dt, mut dg, mut db) =
            (z(&[v, c]), z(&[pp, c]), z(&[tv, c]), z(&[c]), z(&[c]));
        let mut eg = EmbGrads {
            padding_idx: -1,
            word: &mut dw,
            pos: &mut dp,
            ttype: &mut dt,
            gamma: &mut dg,
            beta: &mut db,
        };
        be.embeddings_backward(&mut eg, &dout, &m, &r, &s.ids, &s.types, &seqs, &ew, drop)
            .unwrap();
        let all = |k| (0..k).collect::<Vec<_>>();
        let op = format!("embeddings p={p}");
        report(
            &op,
            "word_embeddings",
            &dw.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.word, &f, &all(v * c)),
        );
        report(
            &op,
            "position_embeddings",
            &dp.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.pos, &f, &all(pp * c)),
        );
        report(
            &op,
            "token_type_embeddings",
            &dt.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.ty, &f, &all(tv * c)),
        );
        report(
            &op,
            "LayerNorm.weight",
            &dg.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.g, &f, &all(c)),
        );
        report(
            &op,
            "LayerNorm.bias",
            &db.to_f64_vec(&be).unwrap(),
            &fd(&mut s, &|s| &mut s.bb, &f, &all(c)),
        );
    }
}

/// The variable-length attention, packed and padded layouts (windows of 7, 4 and 1 real tokens; the padded
/// one pads them to 7 rows), with and without dropout: every element of dqkv.
#[test]
fn attention_backward_matches_finite_differences() {
    for (layout, p) in [
        (SeqLayout::packed(&[7, 4, 1], 0).unwrap(), 0.0f32),
        (SeqLayout::packed(&[7, 4, 1], 0).unwrap(), 0.2),
        (SeqLayout::padded(&[7, 4, 1], 7, 5).unwrap(), 0.2),
    ] {
        let be = Cpu::new();
        let mut rng = Rng::new(6);
        let (nh, hs) = (2, 3);
        let (c, n) = (nh * hs, layout.n());
        let seqs = Seqs::upload(&be, &layout).unwrap();
        let drop = Dropout::new(p, 55);
        // the attention reads qkv + bias (the QKV projection's output with its bias broadcast over the rows):
        // the backward's dbias is that bias's gradient
        struct S {
            qkv: Tensor<Cpu>,
            bias: Tensor<Cpu>,
            w: Vec<f64>,
        }
        let mut s = S {
            qkv: rand_tensor(&be, &mut rng, &[n, 3 * c], F64, 1.5),
            bias: rand_tensor(&be, &mut rng, &[3 * c], F64, 0.5),
            w: rand_vec(&mut rng, n * c, 1.0),
        };
        let biased = |s: &S| {
            let (x, b) = (
                s.qkv.to_f64_vec(&be).unwrap(),
                s.bias.to_f64_vec(&be).unwrap(),
            );
            let v: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(i, v)| v + b[i % (3 * c)])
                .collect();
            Tensor::from_f64(&Cpu::new(), &v, &[n, 3 * c], F64).unwrap()
        };
        let f = |s: &S| {
            let mut out = Tensor::zeros(&Cpu::new(), &[n, c], F64).unwrap();
            let mut lse = Tensor::zeros(&Cpu::new(), &[nh, n], F64).unwrap();
            Cpu::new()
                .attention_forward(&mut out, &mut lse, &biased(s), &seqs, nh, drop)
                .unwrap();
            dot(&out, &s.w)
        };
        let qkv = biased(&s);
        let mut out = Tensor::zeros(&be, &[n, c], F64).unwrap();
        let mut lse = Tensor::zeros(&be, &[nh, n], F64).unwrap();
        be.attention_forward(&mut out, &mut lse, &qkv, &seqs, nh, drop)
            .unwrap();
        let dout = Tensor::from_f64(&be, &s.w, &[n, c], F64).unwrap();
        let mut dqkv = rand_tensor(&be, &mut rng, &[n, 3 * c], F64, 1.0);
        let mut scratch = Tensor::zeros(&be, &scratch_shape(n, c, nh), F64).unwrap();
        // dbias accumulates: it starts at 0.25 and FD sees the gradient alone
        let mut dbias = Tensor::from_f64(&be, &vec![0.25; 3 * c], &[3 * c], F64).unwrap();
        be.attention_backward(
            &mut dqkv,
            Some(&mut dbias),
            &dout,
            &out,
            &lse,
            &qkv,
            &seqs,
            nh,
            drop,
            &mut scratch,
        )
        .unwrap();
        let an = dqkv.to_f64_vec(&be).unwrap();
        let num = fd(
            &mut s,
            &|s| &mut s.qkv,
            &f,
            &(0..n * 3 * c).collect::<Vec<_>>(),
        );
        // padding rows are no one's keys: exactly zero K/V gradient
        for b in 0..layout.b() {
            for i in layout.lens[b] as usize..layout.rows(b) {
                let r = layout.cu[b] as usize + i;
                assert!(an[r * 3 * c + c..(r + 1) * 3 * c].iter().all(|&x| x == 0.0));
            }
        }
        let kind = if layout.is_packed() {
            "packed"
        } else {
            "padded"
        };
        report(&format!("attention {kind} p={p}"), "dqkv", &an, &num);
        let db: Vec<f64> = dbias
            .to_f64_vec(&be)
            .unwrap()
            .iter()
            .map(|v| v - 0.25)
            .collect();
        let num = fd(
            &mut s,
            &|s| &mut s.bias,
            &f,
            &(0..3 * c).collect::<Vec<_>>(),
        );
        report(&format!("attention {kind} p={p}"), "dbias", &db, &num);
        // its K third is zero (a bias on every key shifts each query's scores by a constant), which the
        // tensor-core kernels rely on (they add nothing there)
        let k_max = db[c..2 * c].iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let v_max = db[2 * c..].iter().fold(0.0f64, |m, x| m.max(x.abs()));
        assert!(
            k_max < 1e-12 * v_max,
            "attention {kind} p={p}: K bias gradient {k_max:e}, not 0 (V: {v_max:e})"
        );
    }
}

#[test]
fn span_loss_gradient_matches_finite_differences() {
    for mask_padding in [false, true] {
        let be = Cpu::new();
        let mut rng = Rng::new(7);
        let (b, t) = (4, 6);
        let lens = [6usize, 3, 6, 3];
        let layout = SeqLayout::padded(&lens, t, 0).unwrap();
        let seqs = Seqs::upload(&be, &layout).unwrap();
        // window 2's end target is T (ignored); window 3's start is 0 ([CLS]); window 1's end is in padding
        let starts = vec![2, 1, 4, 0];
        let ends = vec![3, 4, t as i32, 1];
        struct S {
            logits: Tensor<Cpu>,
        }
        let st = Tensor::from_i32(&be, &starts, &[b]).unwrap();
        let en = Tensor::from_i32(&be, &ends, &[b]).unwrap();
        let valid = |tg: i32, bi: usize| (tg as usize) < if mask_padding { lens[bi] } else { t };
        let ns = (0..b).filter(|&i| valid(starts[i], i)).count();
        let ne = (0..b).filter(|&i| valid(ends[i], i)).count();
        let cfg = SpanLossCfg { mask_padding };
        let scale = Tensor::from_f64(
            &be,
            &[1.0 / (2.0 * ns as f64), 1.0 / (2.0 * ne as f64)],
            &[2],
            F64,
        )
        .unwrap();
        let f = |s: &S| {
            let mut l = Tensor::zeros(&Cpu::new(), &[b, 2], F64).unwrap();
            let mut d = Tensor::zeros(&Cpu::new(), &[b * t, 2], F64).unwrap();
            // the loss from the sums the op adds to the step's statistics
            let mut sums = Tensor::zeros(&Cpu::new(), &[STATS_LEN], F64).unwrap();
            Cpu::new()
                .span_loss_forward_backward(
                    &mut l, &mut d, &mut sums, &s.logits, &st, &en, &seqs, &scale, cfg,
                )
                .unwrap();
            let sums = sums.to_f64_vec(&Cpu::new()).unwrap();
            (sums[STAT_LOSS_START] / ns as f64 + sums[STAT_LOSS_END] / ne as f64) / 2.0
        };
        let mut s = S {
            logits: rand_tensor(&be, &mut rng, &[b * t, 2], F64, 3.0),
        };
        let mut l = Tensor::zeros(&be, &[b, 2], F64).unwrap();
        let mut d = Tensor::zeros(&be, &[b * t, 2], F64).unwrap();
        let mut sums = Tensor::zeros(&be, &[STATS_LEN], F64).unwrap();
        be.span_loss_forward_backward(
            &mut l, &mut d, &mut sums, &s.logits, &st, &en, &seqs, &scale, cfg,
        )
        .unwrap();
        // the span head's bias has no gradient, which the model relies on (it computes none): each column of
        // dlogits sums to 0 within every window (softmax shift invariance), so over the batch too
        let dl = d.to_f64_vec(&be).unwrap();
        for w in 0..2 {
            let sum: f64 = dl.iter().skip(w).step_by(2).sum();
            assert!(
                sum.abs() < 1e-14,
                "span_loss: Σ dlogits[.., {w}] = {sum:e}, not 0"
            );
        }
        report(
            &format!("span_loss mask_padding={mask_padding}"),
            "dlogits",
            &d.to_f64_vec(&be).unwrap(),
            &fd(
                &mut s,
                &|s| &mut s.logits,
                &f,
                &(0..b * t * 2).collect::<Vec<_>>(),
            ),
        );
    }
}

/// The whole model + span loss on a tiny config: every parameter tensor and the gradient w.r.t. the
/// embeddings output, for three windows of 8, 5 and 6 real tokens (window length 8) laid out as `padding`.
fn whole_model_check(drop_p: f32, padding: Padding) {
    let be = Cpu::new();
    let mut cfg = BertConfig::tiny(23, 12, 2, 3, 20, 10);
    cfg.pad_token_id = None; // every embedding row trainable, so finite differences see all of them
    let (b, t) = (3, 8);
    let mut rng = Rng::new(8);
    let (ids, types, mask) = padded_batch(&mut rng, b, t, cfg.vocab_size, &[8, 5, 6]);
    let feats = feature_windows(&ids, &types, &mask, t, &[3, 0, 2], &[5, 0, 4]);
    let refs: Vec<&Feature> = feats.iter().collect();
    let mut hb = pack(&refs, 0, padding).unwrap();
    hb.layout.step_seed = 2024;
    let drop = DropoutCfg {
        hidden: drop_p,
        attn: drop_p,
    };
    let plan_for =
        |hb: &HostBatch| ActPlan::new(&Cpu::new(), &cfg, hb.n(), hb.b(), F64, true).unwrap();
    let mut model = BertQa::new(cfg.clone(), rand_params(&be, &cfg, F64, 9));
    let loss_of = |m: &BertQa<Cpu>| {
        let mut plan = plan_for(&hb);
        let (batch, acts) = plan.load(&Cpu::new(), &hb).unwrap();
        m.forward(&Cpu::new(), acts, batch, drop).unwrap();
        m.loss_mean(&Cpu::new(), acts, batch, 1.0).unwrap()
    };
    let mut plan = plan_for(&hb);
    let (batch, acts) = plan.load(&be, &hb).unwrap();
    model.forward(&be, acts, batch, drop).unwrap();
    let lo = model.loss_mean(&be, acts, batch, 1.0).unwrap();
    assert!(lo.is_finite() && lo > 0.0);
    let mut grads = BertParams::zeros(&be, &cfg, F64).unwrap();
    model.backward(&be, &mut grads, acts, batch, drop).unwrap();
    // the gradient w.r.t. the embeddings output (layer 0's input), left in the scratch's dx by backward
    let dx0 = acts.grad.as_ref().unwrap().dx.to_f64_vec(&be).unwrap();
    let emb0 = acts.emb.to_f64_vec(&be).unwrap();
    let mut srng0 = Rng::new(11);
    let idx0 = sample(emb0.len(), 64, &mut srng0);
    let mut num0 = Vec::new();
    for &i in &idx0 {
        let h = 1e-6 * emb0[i].abs().max(1.0);
        let f = |x: f64| {
            let mut p = plan_for(&hb);
            let (bt, a) = p.load(&Cpu::new(), &hb).unwrap();
            let mut v = emb0.clone();
            v[i] = x;
            a.emb.copy_from_f64(&Cpu::new(), &v).unwrap();
            model.forward_encoder(&Cpu::new(), a, bt, drop).unwrap();
            model.loss_mean(&Cpu::new(), a, bt, 1.0).unwrap()
        };
        num0.push((f(emb0[i] + h) - f(emb0[i] - h)) / (2.0 * h));
    }
    let an0: Vec<f64> = idx0.iter().map(|&i| dx0[i]).collect();
    let op = format!("whole model {} p={drop_p}", padding.name());
    report(&op, "d(embeddings output)", &an0, &num0);
    let names: Vec<String> = bertqa::model::params::param_specs(&cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let analytic: Vec<Vec<f64>> = grads
        .tensors()
        .iter()
        .map(|g| g.to_f64_vec(&be).unwrap())
        .collect();
    let mut srng = Rng::new(10);
    for (k, name) in names.iter().enumerate() {
        let n = analytic[k].len();
        let idx = sample(n, 48, &mut srng);
        let mut num = Vec::new();
        for &i in &idx {
            let orig = model.params.tensors()[k].to_f64_vec(&be).unwrap();
            let x = orig[i];
            let h = 1e-6 * x.abs().max(1.0);
            let mut v = orig.clone();
            v[i] = x + h;
            model.params.tensors_mut()[k]
                .copy_from_f64(&be, &v)
                .unwrap();
            let fp = loss_of(&model);
            v[i] = x - h;
            model.params.tensors_mut()[k]
                .copy_from_f64(&be, &v)
                .unwrap();
            let fm = loss_of(&model);
            model.params.tensors_mut()[k]
                .copy_from_f64(&be, &orig)
                .unwrap();
            num.push((fp - fm) / (2.0 * h));
        }
        let an: Vec<f64> = idx.iter().map(|&i| analytic[k][i]).collect();
        report(&op, name, &an, &num);
    }
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    whole_model_check(0.0, Padding::Max);
}

#[test]
fn whole_model_gradients_match_finite_differences_with_dropout() {
    whole_model_check(0.15, Padding::Max);
}

#[test]
fn whole_model_gradients_match_finite_differences_packed_with_dropout() {
    whole_model_check(0.15, Padding::Packed);
}
