//! Helpers shared by the integration tests; `parity` is the backend-parity harness.
#![allow(dead_code)]

pub mod parity;

use bertqa::model::{BertConfig, BertParams};
use bertqa::ops::Backend;
use bertqa::rng::Rng;
use bertqa::tensor::{DType, Tensor};

/// Random values in [-scale, scale] (never zeros: they hide unwritten outputs).
pub fn rand_vec(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.uniform() * 2.0 - 1.0) * scale)
        .collect()
}

pub fn rand_tensor<B: Backend>(
    be: &B,
    rng: &mut Rng,
    shape: &[usize],
    dtype: DType,
    scale: f64,
) -> Tensor<B> {
    let n = shape.iter().product();
    Tensor::from_f64(be, &rand_vec(rng, n, scale), shape, dtype).unwrap()
}

/// Random parameters shaped like BERT: matrices ~N(0, 0.2²)-ish uniform, LayerNorm gamma around 1.
pub fn rand_params<B: Backend>(be: &B, cfg: &BertConfig, dtype: DType, seed: u64) -> BertParams<B> {
    let mut rng = Rng::new(seed);
    BertParams::from_host(be, cfg, dtype, |name, shape| {
        let n: usize = shape.iter().product();
        Ok(if name.contains("LayerNorm.weight") {
            (0..n).map(|_| 1.0 + (rng.uniform() - 0.5) * 0.4).collect()
        } else {
            rand_vec(&mut rng, n, 0.3)
        })
    })
    .unwrap()
}

/// max |a-b| / max(max|b|, floor): a per-tensor normalised error.
pub fn rel_err(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(floor);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A padded batch: lengths per row, ids in 1..v, types 0 then 1, padding id 0.
pub fn padded_batch(
    rng: &mut Rng,
    b: usize,
    t: usize,
    v: usize,
    lens: &[usize],
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let (mut ids, mut types, mut mask) = (vec![0; b * t], vec![0; b * t], vec![0; b * t]);
    for bi in 0..b {
        let len = lens[bi % lens.len()].min(t);
        for j in 0..len {
            ids[bi * t + j] = 1 + rng.below(v - 1) as i32;
            types[bi * t + j] = if j >= len / 2 { 1 } else { 0 };
            mask[bi * t + j] = 1;
        }
    }
    (ids, types, mask)
}

/// Windows of `t` tokens from row-major (B,T) ids, types and mask, with these start/end labels.
pub fn feature_windows(
    ids: &[i32],
    types: &[i32],
    mask: &[i32],
    t: usize,
    starts: &[i64],
    ends: &[i64],
) -> Vec<bertqa::data::features::Feature> {
    (0..ids.len() / t)
        .map(|b| {
            let w = b * t..(b + 1) * t;
            bertqa::data::features::Feature::from_padded(
                b,
                &ids[w.clone()],
                &types[w.clone()],
                &mask[w],
                (starts[b], ends[b]),
            )
            .unwrap()
        })
        .collect()
}

/// Print parity rows (tests/common/parity.rs) and fail naming every tensor out of its bound.
pub fn check_rows(rows: &[parity::Row]) {
    parity::print_rows(rows);
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| format!("{} / {}", r.case, r.tensor))
        .collect();
    assert!(
        bad.is_empty(),
        "{} tensors out of bounds: {bad:?}",
        bad.len()
    );
}
