//! Backend parity harness: every op (forward and backward) and a whole training step, run on a device
//! backend and on the CPU reference from the same random host inputs, compared tensor by tensor.
//!
//! Error measure: `‖x − ref‖₂ / ‖ref‖₂` against the CPU reference computed in f64 from the same (rounded)
//! inputs. Bounds:
//! - f32 on the device: ≤ 1e-5 (f32 arithmetic with another summation order lands near 1e-7..1e-6).
//! - bf16/f16 on the device: ≤ 2 × the error of the CPU reference run with the same storage dtype (f32
//!   arithmetic, rounding on every store — the mixed-precision policy), plus 1e-6; i.e. the device may not be
//!   more than twice as inexact as an honest bf16 implementation of the same computation.
//!
//! A tensor also passes when its RMS absolute error is under 1e-7 (f32) or twice the bf16 reference's plus
//! 1e-7: gradients the loss is invariant to (the last LayerNorm bias, the span-head bias) are ~1e-17 in f64
//! and pure rounding noise elsewhere, so their relative error means nothing.
//!
//! The harness runs CUDA-against-CPU in tests/parity.rs on a GPU machine, and the kernel emulator's outputs
//! against the CPU in tests/emu_kernels.rs everywhere. It lives with the tests, not in the library.

use anyhow::Result;
use bertqa::cpu::Cpu;
use bertqa::data::features::Feature;
use bertqa::model::BertConfig;
use bertqa::ops::adamw::AdamWHyper;
use bertqa::ops::attention::scratch_shape;
use bertqa::ops::embedding::{EmbGrads, EmbWeights};
use bertqa::ops::span_loss::SpanLossCfg;
use bertqa::ops::{Backend, SeqLayout, Seqs, STATS_LEN, STAT_GRAD_SQ};
use bertqa::rng::{Dropout, Rng};
use bertqa::tensor::{DType, Tensor};
use bertqa::train::{FeatureCfgSer, PostCfgSer, TrainConfig, Trainer};

/// Named outputs of one case, as host f64 vectors.
pub type Outputs = Vec<(String, Vec<f64>)>;

#[derive(Clone, Debug)]
pub struct Row {
    pub case: String,
    pub tensor: String,
    pub n: usize,
    /// error of the device result vs the f64 reference
    pub err_dev: f64,
    /// error of the CPU reference at the device's dtype vs the f64 reference
    pub err_cpu: f64,
    pub bound: f64,
    /// RMS absolute error of the device result (for tensors whose reference is ~0, e.g. gradients the loss is
    /// invariant to, where a relative error is meaningless)
    pub abs_dev: f64,
    pub abs_bound: f64,
    pub pass: bool,
}

pub fn rms_abs(x: &[f64], r: &[f64]) -> f64 {
    if x.iter().any(|v| !v.is_finite()) || x.is_empty() {
        return if x.is_empty() { 0.0 } else { f64::INFINITY };
    }
    (x.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / x.len() as f64).sqrt()
}

pub fn rel_l2(x: &[f64], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len(), "rel_l2: lengths differ");
    if x.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = x
        .iter()
        .zip(r)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let den: f64 = r.iter().map(|b| b * b).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

use super::rand_vec as rv;

fn up<B: Backend>(be: &B, v: &[f64], shape: &[usize], dt: DType) -> Result<Tensor<B>> {
    Tensor::from_f64(be, v, shape, dt)
}

fn stat(dt: DType) -> DType {
    bertqa::ops::compute_dtype(dt)
}

/// Real lengths of `b` windows of at most `t` tokens: the first full, the others random (at least 1).
pub fn padded_lens(rng: &mut Rng, b: usize, t: usize) -> Vec<usize> {
    (0..b)
        .map(|bi| if bi == 0 { t } else { 1 + rng.below(t) })
        .collect()
}

/// The step seed of every case's layout: both 32-bit halves nonzero and different, so a kernel that reads
/// the step seed's words in the wrong order, or not at all, draws other masks than the CPU reference.
pub const CASE_STEP_SEED: u64 = 0x0123_4567_89AB_CDEF;

/// `l` with the cases' step seed.
pub fn with_step(mut l: SeqLayout) -> SeqLayout {
    l.step_seed = CASE_STEP_SEED;
    l
}

/// N rows as windows of at most 13 (the last shorter), numbered from 3: the dropout keys of an op without a
/// window structure of its own (LayerNorm, dropout), varied across rows.
pub fn rows_layout(n: usize) -> SeqLayout {
    let lens: Vec<usize> = (0..n.div_ceil(13)).map(|i| (n - 13 * i).min(13)).collect();
    with_step(SeqLayout::packed(&lens, 3).expect("layout"))
}

/// A parity case: given a backend and a dtype, produce named outputs. Same seed → same inputs.
pub trait Case {
    fn name(&self) -> String;
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs>;
}

pub struct LinearCase {
    pub n: usize,
    pub ic: usize,
    pub oc: usize,
}
impl Case for LinearCase {
    fn name(&self) -> String {
        format!("linear N={} IC={} OC={}", self.n, self.ic, self.oc)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (n, ic, oc) = (self.n, self.ic, self.oc);
        let mut r = Rng::new(11);
        let x = up(be, &rv(&mut r, n * ic, 1.0), &[n, ic], dt)?;
        let w = up(be, &rv(&mut r, oc * ic, 0.5), &[oc, ic], dt)?;
        let b = up(be, &rv(&mut r, oc, 0.5), &[oc], dt)?;
        let dy = up(be, &rv(&mut r, n * oc, 1.0), &[n, oc], dt)?;
        let g = stat(dt);
        let mut y = Tensor::zeros(be, &[n, oc], dt)?;
        be.linear_forward(&mut y, &x, &w, Some(&b))?;
        let mut dx = Tensor::zeros(be, &[n, ic], dt)?;
        let mut dw = up(be, &rv(&mut r, oc * ic, 0.1), &[oc, ic], g)?; // accumulates onto existing values
        let mut db = up(be, &rv(&mut r, oc, 0.1), &[oc], g)?;
        be.linear_backward(Some(&mut dx), false, &mut dw, Some(&mut db), &dy, &x, &w)?;
        Ok(vec![
            ("out".into(), y.to_f64_vec(be)?),
            ("dinp".into(), dx.to_f64_vec(be)?),
            ("dweight".into(), dw.to_f64_vec(be)?),
            ("dbias".into(), db.to_f64_vec(be)?),
        ])
    }
}

/// GELU forward and backward over n elements; with `c` > 0 as (n/c, c) with a bias (c) added to the input
/// (the FFN up-projection's, as the model adds it).
pub struct GeluCase {
    pub n: usize,
    pub c: usize,
}
impl GeluCase {
    /// (x, dy, bias), host values before rounding
    pub fn inputs(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut r = Rng::new(12);
        let x = rv(&mut r, self.n, 4.0);
        let dy = rv(&mut r, self.n, 1.0);
        (x, dy, rv(&mut r, self.c, 1.0))
    }
    /// the input's shape
    pub fn shape(&self) -> Vec<usize> {
        match self.n.checked_div(self.c) {
            Some(rows) => vec![rows, self.c],
            None => vec![self.n],
        }
    }
}
impl Case for GeluCase {
    fn name(&self) -> String {
        format!("gelu n={} bias C={}", self.n, self.c)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (x, dy, b) = self.inputs();
        let sh = self.shape();
        let x = up(be, &x, &sh, dt)?;
        let dy = up(be, &dy, &sh, dt)?;
        let b = up(be, &b, &[self.c], dt)?;
        let bias = (self.c > 0).then_some(&b);
        let mut y = Tensor::zeros(be, &sh, dt)?;
        be.gelu_forward(&mut y, &x, bias)?;
        let mut dx = Tensor::zeros(be, &sh, dt)?;
        be.gelu_backward(&mut dx, &dy, &x, bias)?;
        Ok(vec![
            ("out".into(), y.to_f64_vec(be)?),
            ("dinp".into(), dx.to_f64_vec(be)?),
        ])
    }
}

/// GELU backward over (rows, C) with the bias gradient of the layer before it (`gelu_backward_bias`): dinp,
/// and dbias accumulated onto a nonzero start (it adds).
pub struct GeluBiasCase {
    pub rows: usize,
    pub c: usize,
    /// the derivative taken at x + the forward's bias (as the model runs it), not at x
    pub bias: bool,
}
impl GeluBiasCase {
    /// (x, dy, dbias before, the forward's bias), host values before rounding
    pub fn inputs(&self) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let mut r = Rng::new(13);
        let n = self.rows * self.c;
        let x = rv(&mut r, n, 4.0);
        let dy = rv(&mut r, n, 1.0);
        let b0 = rv(&mut r, self.c, 1.0);
        (x, dy, b0, rv(&mut r, self.c, 1.0))
    }
}
impl Case for GeluBiasCase {
    fn name(&self) -> String {
        let b = if self.bias { " at x+bias" } else { "" };
        format!("gelu_backward_bias rows={} C={}{b}", self.rows, self.c)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (x, dy, b0, bias) = self.inputs();
        let shape = [self.rows, self.c];
        let x = up(be, &x, &shape, dt)?;
        let dy = up(be, &dy, &shape, dt)?;
        let bias = up(be, &bias, &[self.c], dt)?;
        let mut db = up(be, &b0, &[self.c], stat(dt))?; // accumulates onto existing values
        let mut dx = Tensor::zeros(be, &shape, dt)?;
        be.gelu_backward_bias(&mut dx, &mut db, &dy, &x, self.bias.then_some(&bias))?;
        Ok(vec![
            ("dinp".into(), dx.to_f64_vec(be)?),
            ("dbias".into(), db.to_f64_vec(be)?),
        ])
    }
}

pub struct DropoutCase {
    pub rows: usize,
    pub c: usize,
    pub p: f32,
}
impl DropoutCase {
    /// (x (rows,C), dropout), host values before rounding, and the rows' layout (dropout keys)
    pub fn inputs(&self) -> (Vec<f64>, Dropout, SeqLayout) {
        let x = rv(&mut Rng::new(13), self.rows * self.c, 1.0);
        (
            x,
            Dropout::new(self.p, 0xDEAD_BEEF_1234),
            rows_layout(self.rows),
        )
    }
}
impl Case for DropoutCase {
    fn name(&self) -> String {
        format!("dropout N={} C={} p={}", self.rows, self.c, self.p)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (x, d, l) = self.inputs();
        let shape = [self.rows, self.c];
        let x = up(be, &x, &shape, dt)?;
        let seqs = Seqs::upload(be, &l)?;
        let mut y = Tensor::zeros(be, &shape, dt)?;
        be.dropout_forward(&mut y, &x, d, &seqs)?;
        Ok(vec![("out".into(), y.to_f64_vec(be)?)])
    }
}

pub struct LayerNormCase {
    pub n: usize,
    pub c: usize,
    pub p: f32,
    /// the linear layer before has a bias: added to inp in the forward (`bias`), its gradient added in the
    /// backward (dbias += Σ dinp, starting from `dbias0`)
    pub linear_bias: bool,
}
/// The host inputs of a [`LayerNormCase`] (before rounding to the run's dtype).
pub struct LayerNormInputs {
    /// (N,C) the input that is dropped out and added to the residual
    pub x: Vec<f64>,
    /// (N,C)
    pub res: Vec<f64>,
    /// (C)
    pub gamma: Vec<f64>,
    /// (C)
    pub beta: Vec<f64>,
    /// (N,C) the output gradient
    pub dy: Vec<f64>,
    /// (C) the bias gradient's value before the backward adds to it
    pub dbias0: Vec<f64>,
    /// (C) the linear layer's bias, added to inp
    pub bias: Vec<f64>,
    pub drop: Dropout,
    /// the rows' layout (dropout keys)
    pub layout: SeqLayout,
}
impl LayerNormCase {
    pub fn inputs(&self) -> LayerNormInputs {
        let (n, c) = (self.n, self.c);
        let mut r = Rng::new(14);
        LayerNormInputs {
            x: rv(&mut r, n * c, 1.0),
            res: rv(&mut r, n * c, 2.0),
            gamma: rv(&mut r, c, 0.3).iter().map(|v| v + 1.0).collect(),
            beta: rv(&mut r, c, 0.5),
            dy: rv(&mut r, n * c, 1.0),
            dbias0: rv(&mut r, c, 1.0),
            bias: rv(&mut r, c, 0.5),
            drop: Dropout::new(self.p, 99),
            layout: rows_layout(n),
        }
    }
}
impl Case for LayerNormCase {
    fn name(&self) -> String {
        let bg = if self.linear_bias { " +bias" } else { "" };
        format!(
            "residual_layernorm N={} C={} p={}{bg}",
            self.n, self.c, self.p
        )
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (n, c) = (self.n, self.c);
        let i = self.inputs();
        let d = i.drop;
        let x = up(be, &i.x, &[n, c], dt)?;
        let res = up(be, &i.res, &[n, c], dt)?;
        let gamma = up(be, &i.gamma, &[c], dt)?;
        let beta = up(be, &i.beta, &[c], dt)?;
        let dy = up(be, &i.dy, &[n, c], dt)?;
        let seqs = Seqs::upload(be, &i.layout)?;
        let s = stat(dt);
        let (mut out, mut sum) = (
            Tensor::zeros(be, &[n, c], dt)?,
            Tensor::zeros(be, &[n, c], dt)?,
        );
        let (mut mean, mut rstd) = (Tensor::zeros(be, &[n], s)?, Tensor::zeros(be, &[n], s)?);
        let bias = up(be, &i.bias, &[c], dt)?;
        be.residual_layernorm_forward(
            &mut out,
            &mut sum,
            &mut mean,
            &mut rstd,
            &x,
            self.linear_bias.then_some(&bias),
            &res,
            &gamma,
            &beta,
            1e-12,
            d,
            &seqs,
        )?;
        let (mut dx, mut dr) = (
            Tensor::zeros(be, &[n, c], dt)?,
            Tensor::zeros(be, &[n, c], dt)?,
        );
        let (mut dg, mut db) = (Tensor::zeros(be, &[c], s)?, Tensor::zeros(be, &[c], s)?);
        let mut dbias = Tensor::from_f64(be, &i.dbias0, &[c], s)?;
        be.residual_layernorm_backward(
            &mut dx,
            &mut dr,
            &mut dg,
            &mut db,
            self.linear_bias.then_some(&mut dbias),
            &dy,
            &sum,
            &mean,
            &rstd,
            &gamma,
            d,
            &seqs,
        )?;
        let mut o: Outputs = vec![
            ("out".into(), out.to_f64_vec(be)?),
            ("mean".into(), mean.to_f64_vec(be)?),
            ("rstd".into(), rstd.to_f64_vec(be)?),
            ("dinp".into(), dx.to_f64_vec(be)?),
            ("dresid".into(), dr.to_f64_vec(be)?),
            ("dgamma".into(), dg.to_f64_vec(be)?),
            ("dbeta".into(), db.to_f64_vec(be)?),
        ];
        if self.linear_bias {
            o.push(("dbias".into(), dbias.to_f64_vec(be)?));
        }
        Ok(o)
    }
}

/// The embeddings over `b` packed windows of random lengths up to `t` (positions 0.. in each window).
pub struct EmbeddingCase {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub v: usize,
    pub p: f32,
}
/// The host inputs of an [`EmbeddingCase`] (before rounding to the run's dtype); P = T + 3 positions, TV = 2
/// token types; the backward's padding index is 0.
pub struct EmbeddingInputs {
    /// the windows (packed, random lengths, numbered from 5)
    pub layout: SeqLayout,
    /// (N)
    pub ids: Vec<i32>,
    /// (N) 0 in the first half of each window, 1 in the second
    pub types: Vec<i32>,
    /// (V,C)
    pub word: Vec<f64>,
    /// (P,C)
    pub pos: Vec<f64>,
    /// (TV,C)
    pub ttype: Vec<f64>,
    /// (C)
    pub gamma: Vec<f64>,
    /// (C)
    pub beta: Vec<f64>,
    /// (N,C) the output gradient
    pub dy: Vec<f64>,
    pub drop: Dropout,
}
impl EmbeddingCase {
    /// (positions P, token types TV)
    pub fn tables(&self) -> (usize, usize) {
        (self.t + 3, 2)
    }
    pub fn inputs(&self) -> EmbeddingInputs {
        let (b, t, c, v) = (self.b, self.t, self.c, self.v);
        let (pp, tv) = self.tables();
        let mut r = Rng::new(15);
        let layout = with_step(SeqLayout::packed(&padded_lens(&mut r, b, t), 5).expect("layout"));
        let n = layout.n();
        let ids = (0..n).map(|_| r.below(v) as i32).collect();
        let types = (0..b)
            .flat_map(|w| {
                let rows = layout.rows(w);
                (0..rows).map(move |i| (i >= rows / 2) as i32)
            })
            .collect();
        EmbeddingInputs {
            layout,
            ids,
            types,
            word: rv(&mut r, v * c, 1.0),
            pos: rv(&mut r, pp * c, 1.0),
            ttype: rv(&mut r, tv * c, 1.0),
            gamma: rv(&mut r, c, 0.3).iter().map(|x| x + 1.0).collect(),
            beta: rv(&mut r, c, 0.5),
            dy: rv(&mut r, n * c, 1.0),
            drop: Dropout::new(self.p, 4242),
        }
    }
}
impl Case for EmbeddingCase {
    fn name(&self) -> String {
        format!(
            "embeddings B={} T={} C={} V={} p={}",
            self.b, self.t, self.c, self.v, self.p
        )
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (c, v) = (self.c, self.v);
        let (pp, tv) = self.tables();
        let i = self.inputs();
        let n = i.layout.n();
        let d = i.drop;
        let word = up(be, &i.word, &[v, c], dt)?;
        let pos = up(be, &i.pos, &[pp, c], dt)?;
        let ty = up(be, &i.ttype, &[tv, c], dt)?;
        let gamma = up(be, &i.gamma, &[c], dt)?;
        let beta = up(be, &i.beta, &[c], dt)?;
        let dy = up(be, &i.dy, &[n, c], dt)?;
        let idt = Tensor::from_i32(be, &i.ids, &[n])?;
        let tyt = Tensor::from_i32(be, &i.types, &[n])?;
        let seqs = Seqs::upload(be, &i.layout)?;
        let s = stat(dt);
        let mut out = Tensor::zeros(be, &[n, c], dt)?;
        let (mut mean, mut rstd) = (Tensor::zeros(be, &[n], s)?, Tensor::zeros(be, &[n], s)?);
        let ew = EmbWeights {
            word: &word,
            pos: &pos,
            ttype: &ty,
            gamma: &gamma,
            beta: &beta,
        };
        be.embeddings_forward(
            &mut out, &mut mean, &mut rstd, &idt, &tyt, &seqs, &ew, 1e-12, d,
        )?;
        let (mut dw, mut dp, mut dtt) = (
            Tensor::zeros(be, &[v, c], s)?,
            Tensor::zeros(be, &[pp, c], s)?,
            Tensor::zeros(be, &[tv, c], s)?,
        );
        let (mut dg, mut db) = (Tensor::zeros(be, &[c], s)?, Tensor::zeros(be, &[c], s)?);
        let mut eg = EmbGrads {
            padding_idx: 0,
            word: &mut dw,
            pos: &mut dp,
            ttype: &mut dtt,
            gamma: &mut dg,
            beta: &mut db,
        };
        be.embeddings_backward(&mut eg, &dy, &mean, &rstd, &idt, &tyt, &seqs, &ew, d)?;
        Ok(vec![
            ("out".into(), out.to_f64_vec(be)?),
            ("dword".into(), dw.to_f64_vec(be)?),
            ("dpos".into(), dp.to_f64_vec(be)?),
            ("dtype".into(), dtt.to_f64_vec(be)?),
            ("dgamma".into(), dg.to_f64_vec(be)?),
            ("dbeta".into(), db.to_f64_vec(be)?),
        ])
    }
}

/// The attention over windows of `lens[b]` real tokens in `rows[b]` rows (rows > lens: padding).
pub struct AttentionCase {
    pub lens: Vec<usize>,
    pub rows: Vec<usize>,
    pub nh: usize,
    pub hs: usize,
    pub p: f32,
    /// keys scaled up along each window (`rising`)
    pub rising: bool,
    /// the backward also adds the QKV bias gradient (all cases but those made `without_bias_grad`)
    pub bias_grad: bool,
}
/// The host inputs of an [`AttentionCase`] (before rounding to the run's dtype).
pub struct AttentionInputs {
    /// windows numbered from 2
    pub layout: SeqLayout,
    /// (N,3C)
    pub qkv: Vec<f64>,
    /// (N,C) the output gradient
    pub dy: Vec<f64>,
    /// (3C) the QKV bias gradient before the backward adds to it
    pub dbias0: Vec<f64>,
    pub drop: Dropout,
}
impl AttentionCase {
    /// `b` windows padded to `t` rows: the first full, the others of random real lengths.
    pub fn padded(b: usize, t: usize, nh: usize, hs: usize, p: f32) -> Self {
        let lens = padded_lens(&mut Rng::new(16), b, t);
        AttentionCase {
            lens,
            rows: vec![t; b],
            nh,
            hs,
            p,
            rising: false,
            bias_grad: true,
        }
    }
    /// Windows of these lengths, packed (no padding).
    pub fn packed(lens: &[usize], nh: usize, hs: usize, p: f32) -> Self {
        AttentionCase {
            lens: lens.to_vec(),
            rows: lens.to_vec(),
            nh,
            hs,
            p,
            rising: false,
            bias_grad: true,
        }
    }
    /// The keys of position t of each window scaled by 1 + 3t/64, so that on the full 64-key tiles the row
    /// maxima of the scores keep rising, some row of each warp past the forward's rebasing gap (2^8 in the
    /// exponent; kernels/attention_tc.cu tc4_forward): the online softmax must rescale mid-way, not only at
    /// its first tile (and still keeps a stale base on some tiles).
    pub fn rising(mut self) -> Self {
        self.rising = true;
        self
    }
    /// The backward without the QKV bias gradient (the kernels must then leave it alone).
    pub fn without_bias_grad(mut self) -> Self {
        self.bias_grad = false;
        self
    }
    /// Windows of these lengths, packed, then a filler window rounding the rows up to a multiple of
    /// `multiple` (one real token and padding: src/model/batch.rs `pack_bucketed`).
    pub fn bucketed(lens: &[usize], multiple: usize, nh: usize, hs: usize, p: f32) -> Self {
        let n: usize = lens.iter().sum();
        let extra = n.div_ceil(multiple) * multiple - n;
        assert!(extra > 0, "the case needs a filler");
        let mut c = Self::packed(lens, nh, hs, p);
        c.lens.push(1);
        c.rows.push(extra);
        c
    }
    pub fn layout(&self) -> SeqLayout {
        with_step(SeqLayout::new(&self.lens, &self.rows, 2).expect("layout"))
    }
    pub fn inputs(&self) -> AttentionInputs {
        let layout = self.layout();
        let (n, c) = (layout.n(), self.nh * self.hs);
        let mut r = Rng::new(17);
        let mut qkv = rv(&mut r, n * 3 * c, 1.5);
        if self.rising {
            for (b, &s0) in layout.cu[..layout.b()].iter().enumerate() {
                for t in 0..self.rows[b] {
                    let row = &mut qkv[(s0 as usize + t) * 3 * c..][..3 * c];
                    row[c..2 * c]
                        .iter_mut()
                        .for_each(|x| *x *= 1.0 + 3.0 * t as f64 / 64.0);
                }
            }
        }
        let dy = rv(&mut r, n * c, 1.0);
        AttentionInputs {
            qkv,
            dy,
            dbias0: rv(&mut r, 3 * c, 1.0),
            drop: Dropout::new(self.p, 777),
            layout,
        }
    }
    /// "padded B=2 T=37" or "packed lens=[1, 17, …]"
    pub fn shape_name(&self) -> String {
        let s = self.layout_name();
        let s = if self.rising {
            format!("{s} rising")
        } else {
            s
        };
        if self.bias_grad {
            s
        } else {
            format!("{s} no-dbias")
        }
    }
    fn layout_name(&self) -> String {
        if self.lens == self.rows {
            format!("packed lens={:?}", self.lens)
        } else if self.rows.iter().all(|&r| r == self.rows[0]) {
            format!(
                "padded B={} T={}",
                self.rows.len(),
                self.rows.iter().max().unwrap_or(&0)
            )
        } else {
            format!("lens={:?} rows={:?}", self.lens, self.rows)
        }
    }
}
impl Case for AttentionCase {
    fn name(&self) -> String {
        format!(
            "attention {} NH={} HS={} p={}",
            self.shape_name(),
            self.nh,
            self.hs,
            self.p
        )
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let (nh, hs) = (self.nh, self.hs);
        let c = nh * hs;
        let AttentionInputs {
            layout,
            qkv,
            dy,
            dbias0,
            drop: d,
        } = self.inputs();
        let n = layout.n();
        let seqs = Seqs::upload(be, &layout)?;
        let qkv = up(be, &qkv, &[n, 3 * c], dt)?;
        let dy = up(be, &dy, &[n, c], dt)?;
        let mut out = Tensor::zeros(be, &[n, c], dt)?;
        let mut lse = Tensor::zeros(be, &[nh, n], stat(dt))?;
        be.attention_forward(&mut out, &mut lse, &qkv, &seqs, nh, d)?;
        let mut dqkv = Tensor::zeros(be, &[n, 3 * c], dt)?;
        let mut scratch = Tensor::zeros(be, &scratch_shape(n, c, nh), stat(dt))?;
        let mut dbias = Tensor::from_f64(be, &dbias0, &[3 * c], stat(dt))?;
        be.attention_backward(
            &mut dqkv,
            self.bias_grad.then_some(&mut dbias),
            &dy,
            &out,
            &lse,
            &qkv,
            &seqs,
            nh,
            d,
            &mut scratch,
        )?;
        Ok(attention_outputs(
            out.to_f64_vec(be)?,
            lse.to_f64_vec(be)?,
            dqkv.to_f64_vec(be)?,
            Some(dbias.to_f64_vec(be)?),
            c,
        ))
    }
}

/// The named outputs of an attention case from out (N,C), lse (NH,N), dqkv (N,3C) and the QKV bias gradient
/// (3C, when there is one): dQ, dK and dV compared one by one, so that a kernel that gets one of them wrong
/// says which.
pub fn attention_outputs(
    out: Vec<f64>,
    lse: Vec<f64>,
    dqkv: Vec<f64>,
    dbias: Option<Vec<f64>>,
    c: usize,
) -> Outputs {
    let part = |k: usize| -> Vec<f64> {
        dqkv.chunks(3 * c)
            .flat_map(|row| row[k * c..(k + 1) * c].iter().copied())
            .collect()
    };
    vec![
        ("out".into(), out),
        ("lse".into(), lse),
        ("dq".into(), part(0)),
        ("dk".into(), part(1)),
        ("dv".into(), part(2)),
    ]
    .into_iter()
    .chain(dbias.map(|d| ("dbias".into(), d)))
    .collect()
}

/// The span loss over `b` windows padded to `t` rows (real lengths random, the first full).
pub struct SpanLossCase {
    pub b: usize,
    pub t: usize,
}
/// The host inputs of a [`SpanLossCase`]: the layout, (N,2) logits before rounding, (B) start and end
/// targets (the last window's start is out of range: ignored).
pub struct SpanLossInputs {
    pub layout: SeqLayout,
    pub logits: Vec<f64>,
    pub starts: Vec<i32>,
    pub ends: Vec<i32>,
}
impl SpanLossCase {
    /// The step statistics before the batch's loss sums are added.
    pub const STATS0: [f64; STATS_LEN] = [0.25, -0.5, 3.0];
    /// The gradient scales of the start and end halves (two different values: a kernel that reads them
    /// swapped fails).
    pub const SCALE: [f64; 2] = [0.1, 0.07];
    /// The loss settings the case runs, each of them.
    pub fn configs(&self) -> [SpanLossCfg; 2] {
        [true, false].map(|mask_padding| SpanLossCfg { mask_padding })
    }
    pub fn inputs(&self) -> SpanLossInputs {
        let (b, t) = (self.b, self.t);
        let mut r = Rng::new(18);
        let lens = padded_lens(&mut r, b, t);
        let layout = SeqLayout::padded(&lens, t, 0).expect("layout");
        let logits = rv(&mut r, layout.n() * 2, 4.0);
        let mut st: Vec<i32> = lens.iter().map(|&l| r.below(l) as i32).collect();
        let en: Vec<i32> = st.clone();
        st[b - 1] = t as i32; // ignored
        SpanLossInputs {
            layout,
            logits,
            starts: st,
            ends: en,
        }
    }
}
impl Case for SpanLossCase {
    fn name(&self) -> String {
        format!("span_loss B={} T={}", self.b, self.t)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let b = self.b;
        let SpanLossInputs {
            layout,
            logits,
            starts: st,
            ends: en,
        } = self.inputs();
        let n = layout.n();
        let seqs = Seqs::upload(be, &layout)?;
        let logits = up(be, &logits, &[n, 2], dt)?;
        let mut out = vec![];
        for cfg in self.configs() {
            let mask_padding = cfg.mask_padding;
            let mut l = Tensor::zeros(be, &[b, 2], stat(dt))?;
            let mut dl = Tensor::zeros(be, &[n, 2], dt)?;
            // the loss sums are added to what the step's statistics already hold
            let mut stats = up(be, &SpanLossCase::STATS0, &[STATS_LEN], stat(dt))?;
            be.span_loss_forward_backward(
                &mut l,
                &mut dl,
                &mut stats,
                &logits,
                &Tensor::from_i32(be, &st, &[b])?,
                &Tensor::from_i32(be, &en, &[b])?,
                &seqs,
                &up(be, &SpanLossCase::SCALE, &[2], stat(dt))?,
                cfg,
            )?;
            out.push((format!("losses mask={mask_padding}"), l.to_f64_vec(be)?));
            out.push((format!("dlogits mask={mask_padding}"), dl.to_f64_vec(be)?));
            out.push((format!("stats mask={mask_padding}"), stats.to_f64_vec(be)?));
        }
        Ok(out)
    }
}

pub struct AdamWCase {
    pub sizes: Vec<usize>,
    /// the step's loss sums are non-finite: the step must change nothing
    pub nonfinite: bool,
}
impl AdamWCase {
    /// The step statistics before `grad_sq_norm` adds Σ g² (the loss sums; NaN in the non-finite case).
    pub fn stats0(&self) -> [f64; STATS_LEN] {
        [1.5, if self.nonfinite { f64::NAN } else { 2.5 }, 0.0]
    }
    /// Per tensor (master, grad, m, v) as host values; tensor i decays when i is even.
    #[allow(clippy::type_complexity)]
    pub fn inputs(&self) -> Vec<(Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)> {
        let mut r = Rng::new(18);
        self.sizes
            .iter()
            .map(|&n| {
                let master = rv(&mut r, n, 1.0);
                let grad = rv(&mut r, n, 0.1);
                let m = rv(&mut r, n, 0.01);
                let v = rv(&mut r, n, 0.001).iter().map(|x| x.abs()).collect();
                (master, grad, m, v)
            })
            .collect()
    }
    pub fn hyper(&self) -> AdamWHyper {
        AdamWHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step: 3,
            // with the case's gradients, norm = √Σg² / 2 ≈ 2 > 1: clipping is exercised
            loss_scale: 2.0,
            max_grad_norm: 1.0,
        }
    }
}
impl Case for AdamWCase {
    fn name(&self) -> String {
        format!("adamw sizes={:?} nonfinite={}", self.sizes, self.nonfinite)
    }
    /// The tensors laid end to end in one flat buffer, as the trainer's are (tensor i decays when i is even;
    /// the decayed ones first, so the boundary is where the first non-decayed tensor starts).
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let g = stat(dt);
        let inputs = self.inputs();
        let order: Vec<usize> = (0..inputs.len())
            .filter(|i| i % 2 == 0)
            .chain((0..inputs.len()).filter(|i| i % 2 == 1))
            .collect();
        let (mut master, mut grad, mut m, mut v) = (vec![], vec![], vec![], vec![]);
        for &i in &order {
            let (p, gr, mm, vv) = &inputs[i];
            master.extend_from_slice(p);
            grad.extend_from_slice(gr);
            m.extend_from_slice(mm);
            v.extend_from_slice(vv);
        }
        let n = master.len();
        let n_decay: usize = order
            .iter()
            .filter(|i| *i % 2 == 0)
            .map(|&i| inputs[i].0.len())
            .sum();
        let mut master = up(be, &master, &[n], g)?;
        let mut working = master.cast(be, dt)?;
        let grad = up(be, &grad, &[n], g)?;
        let mut m = up(be, &m, &[n], g)?;
        let mut v = up(be, &v, &[n], g)?;
        let mut stats = up(be, &self.stats0(), &[STATS_LEN], g)?;
        be.grad_sq_norm(&mut stats, &grad)?;
        let w = if dt == g { None } else { Some(&mut working) };
        be.adamw_step(
            &mut master,
            w,
            &grad,
            &mut m,
            &mut v,
            n_decay,
            &stats,
            &self.hyper(),
        )?;
        // back to per-tensor outputs, in the order of the inputs
        let (p, wk, m, v) = (
            master.to_f64_vec(be)?,
            if dt == g {
                master.to_f64_vec(be)?
            } else {
                working.to_f64_vec(be)?
            },
            m.to_f64_vec(be)?,
            v.to_f64_vec(be)?,
        );
        let mut starts = vec![0; inputs.len()];
        let mut at = 0;
        for &i in &order {
            starts[i] = at;
            at += inputs[i].0.len();
        }
        // Σ g² (the loss sums pass through; one is NaN in the non-finite case)
        let sq = stats.to_f64_vec(be)?[STAT_GRAD_SQ];
        let mut out = vec![("stats: grad_sq".to_string(), vec![sq])];
        for (i, inp) in inputs.iter().enumerate() {
            let r = starts[i]..starts[i] + inp.0.len();
            out.push((format!("param[{i}]"), p[r.clone()].to_vec()));
            // the working copy: refreshed by AdamW when it is a separate lower-precision tensor
            out.push((format!("working[{i}]"), wk[r.clone()].to_vec()));
            out.push((format!("m[{i}]"), m[r.clone()].to_vec()));
            out.push((format!("v[{i}]"), v[r].to_vec()));
        }
        Ok(out)
    }
}

/// Whole training steps of a small BERT through the real [`Trainer`] (padded batch, dropout on, weight decay,
/// bf16/f16 working weights with f32 master weights where the run's dtype asks): the loss of each of
/// `steps + 1` optimizer steps and every gradient of the first. (Not the weights after AdamW: Adam's m/√v
/// turns the rounding noise of gradients the loss is invariant to into ±lr steps; the losses that follow
/// show whether the updates are right.)
pub struct StepCase {
    pub cfg: BertConfig,
    pub b: usize,
    pub t: usize,
    pub steps: usize,
}

/// A training configuration for the parity step: dropout 0.1, no clipping, no warmup (lr given per step).
pub fn step_train_config(t: usize) -> TrainConfig {
    TrainConfig {
        epochs: 1,
        learning_rate: 1e-3,
        batch_size: 64,
        warmup_ratio: 0.0,
        max_grad_norm: 0.0,
        seed: 1000,
        save_total_limit: 0,
        padding: bertqa::model::Padding::Max,
        max_bad_steps: 3,
        eval_batch_size: 8,
        features: FeatureCfgSer {
            max_seq_length: t,
            doc_stride: t / 2,
            max_query_length: 4,
        },
        post: PostCfgSer {
            n_best_size: 5,
            max_answer_length: 8,
            version_2: false,
            null_score_diff_threshold: 0.0,
        },
        ..TrainConfig::default()
    }
}

impl StepCase {
    /// The batch as training windows (random ids, padded at random lengths, labels inside each window).
    pub fn features(&self) -> Vec<Feature> {
        self.features_from(19)
    }
    /// [`StepCase::features`] drawn from seed `seed`.
    pub fn features_from(&self, seed: u64) -> Vec<Feature> {
        let (cfg, b, t) = (&self.cfg, self.b, self.t);
        let mut r = Rng::new(seed);
        let lens = padded_lens(&mut r, b, t);
        (0..b)
            .map(|bi| {
                let len = lens[bi];
                let m: Vec<i32> = (0..t).map(|j| (j < len) as i32).collect();
                let ids: Vec<i32> = (0..t)
                    .map(|j| {
                        if m[j] != 0 {
                            1 + r.below(cfg.vocab_size - 1) as i32
                        } else {
                            0
                        }
                    })
                    .collect();
                let types: Vec<i32> = (0..t).map(|j| (m[j] != 0 && j > 3) as i32).collect();
                let s = r.below(len) as i64;
                Feature::from_padded(bi, &ids, &types, &m, (s, (s + 1).min(len as i64 - 1)))
                    .unwrap()
            })
            .collect()
    }
}

impl Case for StepCase {
    fn name(&self) -> String {
        format!(
            "train step L={} C={} NH={} B={} T={} (+{} AdamW steps)",
            self.cfg.num_hidden_layers,
            self.cfg.hidden_size,
            self.cfg.num_attention_heads,
            self.b,
            self.t,
            self.steps
        )
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> Result<Outputs> {
        let cfg = &self.cfg;
        let g = stat(dt);
        // random weights from the host, identical on both backends
        let mut r = Rng::new(23);
        let master = bertqa::model::BertParams::from_host(be, cfg, g, |name, shape| {
            let n: usize = shape.iter().product();
            Ok(if name.contains("LayerNorm.weight") {
                rv(&mut r, n, 0.2).iter().map(|x| x + 1.0).collect()
            } else {
                rv(&mut r, n, 0.1)
            })
        })?;
        let mut tr = Trainer::new(be, cfg.clone(), master, dt, step_train_config(self.t))?;
        let feats = self.features();
        let refs: Vec<&Feature> = feats.iter().collect();
        let mut out: Outputs = vec![];
        let mut losses = vec![];
        for step in 0..=self.steps {
            let st = tr.step(&refs, 1e-3)?;
            let (loss, applied) = (st.loss, st.applied);
            anyhow::ensure!(applied, "step {step} was not applied (non-finite?)");
            tr.state.global_step += 1;
            losses.push(loss);
            if step == 0 {
                for (e, gt) in tr
                    .grads
                    .layout()
                    .entries
                    .clone()
                    .iter()
                    .zip(tr.grads.tensors())
                {
                    out.push((format!("grad {}", e.name), gt.to_f64_vec(be)?));
                }
            }
        }
        out.insert(0, ("loss trajectory".into(), losses));
        Ok(out)
    }
}

/// Run `case` on `dev` at `dt` and on the CPU (f64 reference, and `dt` storage), and compare.
pub fn compare<B: Backend, C: Case>(dev: &B, dt: DType, case: &C) -> Result<Vec<Row>> {
    let devo = case.run(dev, dt)?;
    compare_outputs(dt, case, &devo)
}

/// Compare a device's outputs of `case` at `dt`, however they were produced (a backend, or the kernel
/// emulator of tests/emu), with the CPU reference runs (f64, and `dt` storage).
pub fn compare_outputs<C: Case>(dt: DType, case: &C, devo: &Outputs) -> Result<Vec<Row>> {
    let reference = case.run(&Cpu::new(), DType::F64)?;
    let cpu_same = case.run(&Cpu::new(), dt)?;
    let mut rows = vec![];
    let find = |o: &Outputs, name: &str, who: &str| -> Result<Vec<f64>> {
        o.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("{}: {who} run has no output {name:?}", case.name()))
    };
    if reference.len() != devo.len() || reference.len() != cpu_same.len() {
        anyhow::bail!(
            "{}: runs produced {} / {} / {} outputs",
            case.name(),
            reference.len(),
            cpu_same.len(),
            devo.len()
        );
    }
    for (name, r) in reference.iter() {
        let (c, d) = (find(&cpu_same, name, "cpu")?, find(devo, name, "device")?);
        let (c, d) = (&c, &d);
        if r.len() != d.len() || r.len() != c.len() {
            anyhow::bail!(
                "{}: {name} has {} / {} / {} elements",
                case.name(),
                r.len(),
                c.len(),
                d.len()
            );
        }
        let err_dev = rel_l2(d, r);
        let err_cpu = rel_l2(c, r);
        let (bound, abs_bound) = match dt {
            DType::F32 => (1e-5, 1e-7),
            DType::F64 => (1e-12, 1e-14),
            _ => (2.0 * err_cpu + 1e-6, 2.0 * rms_abs(c, r) + 1e-7),
        };
        let abs_dev = rms_abs(d, r);
        let pass = err_dev <= bound || abs_dev <= abs_bound;
        rows.push(Row {
            case: case.name(),
            tensor: name.clone(),
            n: r.len(),
            err_dev,
            err_cpu,
            bound,
            abs_dev,
            abs_bound,
            pass,
        });
    }
    Ok(rows)
}

/// The standard suite: odd sizes, padded batches, every CUDA head size, dropout on.
pub fn suite<B: Backend>(dev: &B, dt: DType, head_sizes: &[usize]) -> Result<Vec<Row>> {
    let mut rows = vec![];
    rows.extend(compare(
        dev,
        dt,
        &LinearCase {
            n: 37,
            ic: 29,
            oc: 23,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &LinearCase {
            n: 130,
            ic: 64,
            oc: 192,
        },
    )?);
    rows.extend(compare(dev, dt, &GeluCase { n: 1001, c: 0 })?);
    rows.extend(compare(
        dev,
        dt,
        &GeluCase {
            n: 97 * 3072,
            c: 3072,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &GeluCase {
            n: 33 * 100,
            c: 100,
        },
    )?);
    for bias in [false, true] {
        rows.extend(compare(
            dev,
            dt,
            &GeluBiasCase {
                rows: 97,
                c: 3072,
                bias,
            },
        )?);
    }
    rows.extend(compare(
        dev,
        dt,
        &GeluBiasCase {
            rows: 33,
            c: 100,
            bias: true,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &DropoutCase {
            rows: 29,
            c: 37,
            p: 0.1,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &LayerNormCase {
            n: 37,
            c: 96,
            p: 0.1,
            linear_bias: true,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &LayerNormCase {
            n: 64,
            c: 768,
            p: 0.0,
            linear_bias: false,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &LayerNormCase {
            n: 50,
            c: 768,
            p: 0.1,
            linear_bias: true,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &EmbeddingCase {
            b: 3,
            t: 17,
            c: 64,
            v: 101,
            p: 0.1,
        },
    )?);
    for &hs in head_sizes {
        rows.extend(compare(dev, dt, &AttentionCase::padded(2, 37, 3, hs, 0.1))?);
        rows.extend(compare(
            dev,
            dt,
            &AttentionCase::packed(&[1, 17, 64, 65, 90], 2, hs, 0.1),
        )?);
    }
    rows.extend(compare(dev, dt, &AttentionCase::padded(2, 70, 2, 32, 0.0))?);
    rows.extend(compare(dev, dt, &SpanLossCase { b: 5, t: 29 })?);
    rows.extend(compare(
        dev,
        dt,
        &AdamWCase {
            sizes: vec![1, 257, 4099],
            nonfinite: false,
        },
    )?);
    rows.extend(compare(
        dev,
        dt,
        &AdamWCase {
            sizes: vec![1, 257],
            nonfinite: true,
        },
    )?);
    let cfg = BertConfig::tiny(211, 64, 2, 2, 128, 64);
    rows.extend(compare(
        dev,
        dt,
        &StepCase {
            cfg,
            b: 3,
            t: 29,
            steps: 10,
        },
    )?);
    Ok(rows)
}

pub fn print_rows(rows: &[Row]) {
    println!(
        "{:<52} {:<48} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10} ok",
        "case", "tensor", "n", "err_dev", "err_cpu", "bound", "abs_dev", "abs_bound"
    );
    for r in rows {
        println!(
            "{:<52} {:<48} {:>8} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {:>10.2e} {}",
            r.case,
            r.tensor,
            r.n,
            r.err_dev,
            r.err_cpu,
            r.bound,
            r.abs_dev,
            r.abs_bound,
            if r.pass { "ok" } else { "FAIL" }
        );
    }
}
