//! The CUDA kernels run on the CPU through the kernel emulator (tests/emu), against the CPU reference, with
//! the launch configurations the CUDA backend uses (src/ops/*/mod.rs launch plans). These run everywhere `cargo
//! test` does — they are how kernels are checked between the rare sessions with a GPU. What they cannot see:
//! timing, and races finer than a barrier (threads switch only at barriers and warp collectives); the GPU
//! parity suite (tests/parity.rs) remains the last word.

mod common;
mod emu;

use common::rand_vec;

use bertqa::kernel::{dtype_code, AttnKernel, Tc4Shape};
use bertqa::ops::attention::{AttnParams, AttnPlan};
use bertqa::ops::{Backend, STAT_GRAD_SQ};
use bertqa::rng::Rng;
use bertqa::tensor::{DType, Tensor};
use common::parity::{
    attention_outputs, compare_outputs, AdamWCase, AttentionCase, Case, DropoutCase, EmbeddingCase,
    GeluBiasCase, GeluCase, LayerNormCase, Outputs, SpanLossCase,
};
use emu::{addr, Emus, Mode};

/// Host values rounded and laid out as `dt` storage, as the CPU backend rounds them on upload.
fn encode(v: &[f64], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x as f32).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x as f32).to_bits().to_le_bytes())
            .collect(),
        other => panic!("encode: {other} is not a float storage dtype"),
    }
}

fn decode(b: &[u8], dt: DType) -> Vec<f64> {
    match dt {
        DType::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        DType::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
            .collect(),
        other => panic!("decode: {other} is not a float storage dtype"),
    }
}

/// `BERTQA_EMU_ONLY=text` runs only the cases whose name contains text (e.g. "v4 w8 HS=64 T=203 bf16").
fn selected(name: &str) -> bool {
    std::env::var("BERTQA_EMU_ONLY").map_or(true, |f| name.contains(&f))
}

/// [`common::check_rows`] for a test's cases, which must not be none: a test whose cases all fell to
/// `BERTQA_EMU_ONLY` says so (SKIPPED), and one that ran no case without a filter fails (an empty sweep
/// checks nothing).
fn check(rows: &[common::parity::Row]) {
    if rows.is_empty() {
        match std::env::var("BERTQA_EMU_ONLY") {
            Ok(f) => println!("SKIPPED: BERTQA_EMU_ONLY={f:?} matches none of this test's cases"),
            Err(_) => panic!("no case ran: the test checked nothing"),
        }
        return;
    }
    common::check_rows(rows);
}

/// Forward then backward of one attention case through the emulator, as the CUDA backend launches them;
/// outputs named as AttentionCase names them.
fn run_attention(
    emu: &mut Emus,
    case: &AttentionCase,
    dt: DType,
    kernel: AttnKernel,
    mode: Mode,
) -> Option<Outputs> {
    let (nh, hs) = (case.nh, case.hs);
    let c = nh * hs;
    let inp = case.inputs();
    let l = &inp.layout;
    let n = l.n();
    let plan = AttnPlan {
        act: dt,
        b: l.b(),
        n,
        max_rows: l.grid_rows(),
        nh,
        hs,
        drop: inp.drop,
        kernel,
    };
    let es = dt.size();
    let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // buffers: 0 out, 1 lse, 2 qkv, 3 cu, 4 lens, 5 wid, 6 dout, 7 dqkv, 8 dsum, 9 dqacc, 10 step seed, 11 the QKV
    // bias gradient (the tensor-core kernels add to it; after variant 1 the launcher runs the bias-gradient
    // kernel over dqkv, and so does this)
    let bufs = vec![
        vec![0xffu8; n * c * es],
        vec![0xffu8; nh * n * 4],
        encode(&inp.qkv, dt),
        ints(&l.cu),
        ints(&l.lens),
        ints(&l.wid),
        encode(&inp.dy, dt),
        vec![0xffu8; n * 3 * c * es],
        // D and the dQ accumulator poisoned (NaN): the backward's first kernel must write every element of both
        vec![0xffu8; nh * n * 4],
        vec![0xffu8; n * c * 4],
        ints(&l.step_words()),
        encode(&inp.dbias0, DType::F32),
    ];
    let fused = plan.fuses_bias_grad() && case.bias_grad;
    let ptr = AttnParams {
        out: addr(0),
        lse: addr(1),
        qkv: addr(2),
        cu: addr(3),
        lens: addr(4),
        wid: addr(5),
        dout: addr(6),
        dqkv: addr(7),
        dsum: addr(8),
        dqacc: if plan.needs_dq_accumulator() {
            addr(9)
        } else {
            0
        },
        step: addr(10),
        dbias: if fused { addr(11) } else { 0 },
        ..bytemuck::Zeroable::zeroed()
    };
    let mut launches = plan.forward(ptr).unwrap();
    launches.extend(plan.backward(ptr).unwrap());
    let mut got = emu
        .run(&bufs, &launches, mode)
        .unwrap_or_else(|e| panic!("{}: {e}", case_name(case, kernel)))?;
    if case.bias_grad && !fused {
        use bertqa::ops::linear::{bias_grad_launch, BiasParams};
        let p = BiasParams {
            out: addr(7),
            bias: addr(11),
            n: n as i32,
            oc: 3 * c as i32,
            out_dt: dtype_code(dt),
            bias_dt: 0,
        };
        let l = bias_grad_launch(dt, p, false, 132).unwrap();
        got = emu
            .run(&got, &[l], mode)
            .unwrap_or_else(|e| panic!("{} bias_grad: {e}", case_name(case, kernel)))?;
    }
    Some(attention_outputs(
        decode(&got[0], dt),
        decode(&got[1], DType::F32),
        decode(&got[7], dt),
        Some(decode(&got[11], DType::F32)),
        c,
    ))
}

fn case_name(case: &AttentionCase, kernel: AttnKernel) -> String {
    let k = match kernel {
        AttnKernel::V1 => "v1 ".to_string(),
        AttnKernel::V3 => "v3 ".to_string(),
        AttnKernel::V4(s) => format!("v4 {}", s.tag().0),
        AttnKernel::V5(s) => format!("v5 {}", s.tag().0),
        AttnKernel::V6(s) => format!("v6 {}", s.tag().0),
    };
    format!("{k} HS={} {}", case.hs, case.shape_name())
}

/// Attention `kernel` in `dtypes` on `cases` (with the cases' dropout), in `modes`: the emulated kernels against the CPU
/// reference under the GPU parity bounds (tests/common/parity.rs).
fn attention_sweep(kernel: AttnKernel, dtypes: &[DType], cases: &[AttentionCase], modes: &[Mode]) {
    let mut emu = Emus::default();
    let mut rows = vec![];
    for &mode in modes {
        for &dt in dtypes {
            for case in cases {
                let name = format!("{} {dt}", case_name(case, kernel));
                if !selected(&name) {
                    continue;
                }
                let Some(out) = run_attention(&mut emu, case, dt, kernel, mode) else {
                    return;
                };
                for mut row in compare_outputs(dt, case, &out).unwrap() {
                    row.case = format!(
                        "{name} {}/{} {}",
                        mode.sched,
                        if mode.eager_cp { "eager" } else { "wait" },
                        row.case
                    );
                    rows.push(row);
                }
            }
        }
    }
    check(&rows);
}

/// Every tensor-core head size at a one-tile and a multi-tile window length, with padding (two windows of 37
/// rows, the second shorter) and without (one window of 203 tokens: 4 key tiles of the forward, 2 key blocks
/// of w8's backward, 7 query tiles; odd, so the last tiles are partial); at HS=64 also 128 (whole tiles only)
/// and a packed batch of windows of 1, 17, 64, 65, 383 and 384 tokens (tile edges on both sides), and a
/// packed batch rounded up to 128 rows by a filler window (1 key, 21 query rows); dropout 0.1, two cases
/// without dropout, one at 0.5, one where nothing can be kept, two whose row maxima rise from tile to tile, and
/// one without the QKV bias gradient.
fn sizes() -> Vec<AttentionCase> {
    let mut v = vec![];
    for hs in [32, 64, 128] {
        v.push(AttentionCase::padded(2, 37, 2, hs, 0.1));
        v.push(AttentionCase::packed(&[203], 2, hs, 0.1));
    }
    v.push(AttentionCase::packed(&[128], 2, 64, 0.1));
    v.push(AttentionCase::packed(&VARLEN, 2, 64, 0.1));
    v.push(AttentionCase::bucketed(&[17, 90], 128, 2, 64, 0.1));
    // without dropout (variant 4's _p0 kernels)
    v.push(AttentionCase::packed(&VARLEN, 2, 64, 0.0));
    v.push(AttentionCase::padded(2, 37, 2, 32, 0.0));
    // half of the probabilities dropped; and p > 1 − 2^-16, where no 16-bit draw reaches the threshold 2^16
    // (common.cuh attn_threshold's edge: nothing is kept and the output and gradients are zero)
    v.push(AttentionCase::padded(2, 37, 2, 64, 0.5));
    v.push(AttentionCase::padded(2, 37, 2, 32, 0.999_995));
    // row maxima rising tile after tile: the forward's online softmax rescales mid-way (its other cases
    // rebase only at the first tile)
    v.push(AttentionCase::packed(&[203], 2, 64, 0.1).rising());
    v.push(AttentionCase::packed(&[203], 2, 32, 0.0).rising());
    // without the QKV bias gradient (dbias must keep its start)
    v.push(AttentionCase::padded(2, 37, 2, 64, 0.1).without_bias_grad());
    v
}

/// The variable-length batch of the padding-free issue: tile edges (64, 65), a single token, full windows.
const VARLEN: [usize; 6] = [1, 17, 64, 65, 383, 384];

/// The tensor-core variants' dtypes.
const TC: &[DType] = &[DType::BF16, DType::F16];

/// Variant 1 (CUDA cores): the f32 path, and bf16/f16 at the head sizes without a tensor-core kernel.
#[test]
fn emu_attention_v1() {
    let cases = [
        AttentionCase::padded(2, 37, 2, 16, 0.1),
        AttentionCase::packed(&[203], 2, 32, 0.1),
        AttentionCase::padded(2, 37, 2, 64, 0.1),
        AttentionCase::packed(&VARLEN, 2, 64, 0.1),
        AttentionCase::bucketed(&[17, 90], 128, 2, 64, 0.1),
        AttentionCase::padded(2, 37, 2, 32, 0.999_995),
    ];
    attention_sweep(
        AttnKernel::V1,
        &[DType::F32, DType::BF16],
        &cases,
        &[Mode::DEFAULT],
    );
}

#[test]
fn emu_attention_v3() {
    attention_sweep(AttnKernel::V3, TC, &sizes(), &[Mode::DEFAULT]);
}

#[test]
fn emu_attention_v4_w4() {
    attention_sweep(AttnKernel::V4(Tc4Shape::W4), TC, &sizes(), &[Mode::DEFAULT]);
}

#[test]
fn emu_attention_v4_w8() {
    attention_sweep(AttnKernel::V4(Tc4Shape::W8), TC, &sizes(), &[Mode::DEFAULT]);
}

#[test]
fn emu_attention_v4_w8b2() {
    attention_sweep(
        AttnKernel::V4(Tc4Shape::W8B2),
        TC,
        &sizes(),
        &[Mode::DEFAULT],
    );
}

/// Variant 5: the wgmma forward (HS 32 and 64; variant 4's at 128; in the w8 shape, two warpgroups per block —
/// emu_attention_v6 runs the w4 one) with variant 4's backward, every case; and
/// under the other interleavings (warps in reverse order with copies landing and wgmma reading its operands at
/// issue, and warps in lockstep) on a multi-tile case of each of its head sizes.
#[test]
fn emu_attention_v5() {
    attention_sweep(
        AttnKernel::V5(Tc4Shape::W8B2),
        TC,
        &sizes(),
        &[Mode::DEFAULT],
    );
    attention_sweep(
        AttnKernel::V5(Tc4Shape::W8B2),
        &[DType::BF16],
        &[
            AttentionCase::padded(3, 203, 2, 64, 0.1),
            AttentionCase::packed(&[203], 2, 32, 0.1).rising(),
        ],
        &Mode::STRESS,
    );
}

/// Variant 6: variant 5's forward and the wgmma backward (HS 32 and 64; variant 4's at 128) in both its shapes
/// (w8b2: two warpgroups and 128 keys per block; w4: one and 64), every case; and the other interleavings on a
/// multi-tile case of each of its head sizes.
#[test]
fn emu_attention_v6() {
    for shape in [Tc4Shape::W8B2, Tc4Shape::W4] {
        attention_sweep(AttnKernel::V6(shape), TC, &sizes(), &[Mode::DEFAULT]);
        attention_sweep(
            AttnKernel::V6(shape),
            &[DType::BF16],
            &[
                AttentionCase::padded(3, 203, 2, 64, 0.1),
                AttentionCase::packed(&[203], 2, 32, 0.1).rising(),
            ],
            &Mode::STRESS,
        );
    }
}

/// The BERT-base shape of one (batch, head pair): T=384, HS=64, the default backward shape and variant 3.
#[test]
fn emu_attention_bert_base_shape() {
    attention_sweep(
        AttnKernel::V4(Tc4Shape::W8B2),
        &[DType::BF16],
        &[AttentionCase::packed(&[384], 2, 64, 0.1)],
        &[Mode::DEFAULT],
    );
    attention_sweep(
        AttnKernel::V3,
        &[DType::BF16],
        &[AttentionCase::packed(&[384], 2, 64, 0.1)],
        &[Mode::DEFAULT],
    );
}

/// The pipelined kernels (variant 4's cp.async double buffers) under the other interleavings: warps in
/// reverse order with copies landing at issue, and warps in lockstep.
#[test]
fn emu_attention_v4_interleavings() {
    for shape in [Tc4Shape::W4, Tc4Shape::W8B2] {
        attention_sweep(
            AttnKernel::V4(shape),
            TC,
            &[AttentionCase::padded(3, 203, 2, 64, 0.1)],
            &Mode::STRESS,
        );
    }
}

// ---- LayerNorm and GELU: the scalar kernels and the 16-byte "vec" kernels (BERTQA_VEC=1) -----------------

/// The case through the emulator with the CUDA backend's launches; also returns the kernel names.
fn ln_on_emu(
    emu: &mut Emus,
    case: &LayerNormCase,
    dt: DType,
    vec: bool,
    sm_count: usize,
) -> Option<(Outputs, String)> {
    use bertqa::ops::layernorm::{backward_launch, forward_launch, LnBwdParams, LnFwdParams};
    let (n, c) = (case.n, case.c);
    let i = case.inputs();
    let es = dt.size();
    let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    // 0 out, 1 sum, 2 mean, 3 rstd, 4 inp, 5 resid, 6 gamma, 7 beta, 8 dinp, 9 dresid, 10 dgamma, 11 dbeta, 12 dout,
    // 13 positions, 14 row windows, 15 step seed, 16 dbias, 17 the linear bias added to inp
    let bufs = vec![
        vec![0xffu8; n * c * es],
        vec![0xffu8; n * c * es],
        vec![0xffu8; n * 4],
        vec![0xffu8; n * 4],
        encode(&i.x, dt),
        encode(&i.res, dt),
        encode(&i.gamma, dt),
        encode(&i.beta, dt),
        vec![0xffu8; n * c * es],
        vec![0xffu8; n * c * es],
        vec![0u8; c * 4],
        vec![0u8; c * 4],
        encode(&i.dy, dt),
        ints(&i.layout.pos()),
        ints(&i.layout.row_w()),
        ints(&i.layout.step_words()),
        encode(&i.dbias0, DType::F32),
        encode(&i.bias, dt),
    ];
    let f = LnFwdParams {
        out: addr(0),
        pos: addr(13),
        roww: addr(14),
        sum: addr(1),
        mean: addr(2),
        rstd: addr(3),
        inp: addr(4),
        resid: addr(5),
        gamma: addr(6),
        beta: addr(7),
        site: i.drop.site,
        n: n as i32,
        c: c as i32,
        eps: 1e-12,
        p: i.drop.p,
        step: addr(15),
        bias: if case.linear_bias { addr(17) } else { 0 },
    };
    let b = LnBwdParams {
        dinp: addr(8),
        pos: addr(13),
        roww: addr(14),
        dresid: addr(9),
        dgamma: addr(10),
        dbeta: addr(11),
        dout: addr(12),
        sum: addr(1),
        mean: addr(2),
        rstd: addr(3),
        gamma: addr(6),
        site: i.drop.site,
        n: n as i32,
        c: c as i32,
        p: i.drop.p,
        _pad: 0,
        step: addr(15),
        dbias: if case.linear_bias { addr(16) } else { 0 },
    };
    let (fl, bl) = (
        forward_launch(dt, f, vec).unwrap(),
        backward_launch(dt, b, vec, sm_count).unwrap(),
    );
    let names = format!("{} + {}", fl.name, bl.name);
    let got = emu
        .run(&bufs, &[fl], Mode::DEFAULT)
        .unwrap_or_else(|e| panic!("{e}"))?;
    let got = emu
        .run(&got, &[bl], Mode::DEFAULT)
        .unwrap_or_else(|e| panic!("{e}"))?;
    let f32s = |k: usize| decode(&got[k], DType::F32);
    Some((
        vec![
            ("out".into(), decode(&got[0], dt)),
            ("mean".into(), f32s(2)),
            ("rstd".into(), f32s(3)),
            ("dinp".into(), decode(&got[8], dt)),
            ("dresid".into(), decode(&got[9], dt)),
            ("dgamma".into(), f32s(10)),
            ("dbeta".into(), f32s(11)),
        ]
        .into_iter()
        .chain(case.linear_bias.then(|| ("dbias".into(), f32s(16))))
        .collect(),
        names,
    ))
}

/// Residual LayerNorm, scalar and vec kernels, f32/bf16/f16: C = 384 (MiniLM), 768 (BERT-base: three 16-byte
/// chunks per lane in bf16), 1000 (four, a partial last one), 200 (lanes without a chunk), 37 (no vec kernel:
/// the scalar fallback);
/// 19 rows, dropout on; the backward with 1 SM (2 blocks striding over the rows) and with 132; with the bias
/// and gradient of the linear layer before, except at C = 384 on 132 SMs.
#[test]
fn emu_layernorm_scalar_and_vec() {
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for c in [384, 768, 1000, 200, 37] {
            for vec in [false, true] {
                for sm in [1, 132] {
                    // the linear bias (forward) and its gradient everywhere (every vec CH) but C = 384 on 132
                    // SMs, where the kernels must do without and leave dbias alone
                    let case = LayerNormCase {
                        n: 19,
                        c,
                        p: 0.1,
                        linear_bias: !(c == 384 && sm == 132),
                    };
                    let Some((out, names)) = ln_on_emu(&mut emu, &case, dt, vec, sm) else {
                        return;
                    };
                    if !selected(&names) {
                        continue;
                    }
                    for mut row in compare_outputs(dt, &case, &out).unwrap() {
                        row.case = format!("{names} sm={sm} {}", row.case);
                        rows.push(row);
                    }
                }
            }
        }
    }
    check(&rows);
}

/// GELU, scalar and vec kernels, f32/bf16/f16, a length with a tail past the last whole vector; and with the
/// input 4 bytes past a 16-byte boundary, where the launcher must fall back to the scalar kernels.
#[test]
fn emu_gelu_scalar_and_vec() {
    use bertqa::ops::gelu::{launch, GeluParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        // (n, C of the bias or 0): a tail past the last whole vector without a bias; with the FFN's bias over
        // 40 columns (whole vectors per row) and over 37 (scalar kernels only)
        for (n, c) in [(4099, 0), (97 * 40, 40), (50 * 37, 37)] {
            for (vec, skew) in [(false, 0), (true, 0), (true, 4)] {
                let case = GeluCase { n, c };
                let (x, dy, b) = case.inputs();
                let es = dt.size();
                // 0 out, 1 inp (from byte `skew`), 2 dinp, 3 dout, 4 bias
                let bufs = vec![
                    vec![0xffu8; n * es],
                    [vec![0u8; skew], encode(&x, dt)].concat(),
                    vec![0xffu8; n * es],
                    encode(&dy, dt),
                    encode(&b, dt),
                ];
                let code = dtype_code(dt);
                let bias = if c > 0 { addr(4) } else { 0 };
                let fwd = GeluParams {
                    out: addr(0),
                    dout: 0,
                    inp: addr(1) + skew as u64,
                    n: n as u64,
                    dt: code,
                    c: c as i32,
                    bias,
                };
                let bwd = GeluParams {
                    out: addr(2),
                    dout: addr(3),
                    inp: addr(1) + skew as u64,
                    n: n as u64,
                    dt: code,
                    c: c as i32,
                    bias,
                };
                let mut ls = [
                    launch(dt, fwd, false, vec).unwrap(),
                    launch(dt, bwd, true, vec).unwrap(),
                ];
                let names = format!("{} + {} skew={skew}", ls[0].name, ls[1].name);
                let vec_ok = vec && skew == 0 && c % (16 / es) == 0;
                assert_eq!(
                    names.contains("vec"),
                    vec_ok,
                    "{names}: the vec kernels need aligned buffers and whole vectors per row"
                );
                // the launch's grid (one element or vector per thread at these sizes), and with a bias also one
                // block, so that each thread strides over several rows' columns (ColStep's wrap-around), in
                // the vec kernels too (485 bf16 vectors for 256 threads)
                for small in [false, true] {
                    if small {
                        if c == 0 {
                            continue;
                        }
                        ls.iter_mut().for_each(|l| l.grid = (1, 1, 1));
                    }
                    let Some(got) = emu
                        .run(&bufs, &ls, Mode::DEFAULT)
                        .unwrap_or_else(|e| panic!("{e}"))
                    else {
                        return;
                    };
                    let out = vec![
                        ("out".into(), decode(&got[0], dt)),
                        ("dinp".into(), decode(&got[2], dt)),
                    ];
                    for mut row in compare_outputs(dt, &case, &out).unwrap() {
                        row.case = format!("{names} one-block={small} {}", row.case);
                        rows.push(row);
                    }
                }
            }
        }
    }
    check(&rows);
}

/// GELU backward with the bias gradient in the same pass (`gelu_backward_bias_vec`), f32/bf16/f16: C = 768
/// (whole 32-group blocks), 200 (a partial block), 300 rows (several row slices), with 1 and 132 SMs; the
/// bias gradient accumulates onto nonzero values. C = 37 has no fused launch (the backend then runs the
/// unfused kernels, tested above and in emu_bias_grad_scalar_and_vec).
#[test]
fn emu_gelu_backward_bias() {
    use bertqa::ops::gelu::{backward_bias_launch, GeluBiasParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        // with the derivative at x + the forward's bias (as the model runs it) or at x: C = 200 both ways (its
        // last block has column groups past C, whose bias loads must not happen)
        for (c, bias) in [(768, true), (200, true), (200, false), (37, true)] {
            for sm in [1, 132] {
                let case = GeluBiasCase { rows: 300, c, bias };
                let (x, dy, b0, bias) = case.inputs();
                let n = case.rows * c;
                // 0 dinp, 1 dout, 2 inp, 3 dbias (f32), 4 the forward's bias
                let bufs = vec![
                    vec![0xffu8; n * dt.size()],
                    encode(&dy, dt),
                    encode(&x, dt),
                    encode(&b0, DType::F32),
                    encode(&bias, dt),
                ];
                let p = GeluBiasParams {
                    out: addr(0),
                    dout: addr(1),
                    inp: addr(2),
                    dbias: addr(3),
                    n: case.rows as i32,
                    c: c as i32,
                    bias: if case.bias { addr(4) } else { 0 },
                };
                let Some(l) = backward_bias_launch(dt, p, true, sm).unwrap() else {
                    assert_eq!(c, 37, "C={c} {dt}: the fused kernel should take it");
                    continue;
                };
                assert!(
                    backward_bias_launch(dt, p, false, sm).unwrap().is_none(),
                    "vec off"
                );
                let name = format!("{} grid {:?} sm={sm}", l.name, l.grid);
                if !selected(&name) {
                    continue;
                }
                let Some(got) = emu
                    .run(&bufs, &[l], Mode::DEFAULT)
                    .unwrap_or_else(|e| panic!("{e}"))
                else {
                    return;
                };
                let out = vec![
                    ("dinp".into(), decode(&got[0], dt)),
                    ("dbias".into(), decode(&got[3], DType::F32)),
                ];
                for mut row in compare_outputs(dt, &case, &out).unwrap() {
                    row.case = format!("{name} {}", row.case);
                    rows.push(row);
                }
            }
        }
    }
    check(&rows);
}

/// Bias gradient db (OC, f32) += column sums of dout (N, OC). Reference: the CPU backend's linear_backward
/// (its bias gradient; the weight gradient of a 1-wide input is computed and dropped).
struct BiasGradCase {
    n: usize,
    oc: usize,
}
impl BiasGradCase {
    fn inputs(&self) -> Vec<f64> {
        rand_vec(&mut Rng::new(17), self.n * self.oc, 1.0)
    }
}
impl Case for BiasGradCase {
    fn name(&self) -> String {
        format!("bias_grad N={} OC={}", self.n, self.oc)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> anyhow::Result<Outputs> {
        let (n, oc) = (self.n, self.oc);
        let dout = Tensor::from_f64(be, &self.inputs(), &[n, oc], dt)?;
        let inp = Tensor::from_f64(be, &vec![1.0; n], &[n, 1], dt)?;
        let w = Tensor::from_f64(be, &vec![1.0; oc], &[oc, 1], dt)?;
        let s = bertqa::ops::compute_dtype(dt);
        let mut dw = Tensor::zeros(be, &[oc, 1], s)?;
        let mut db = Tensor::zeros(be, &[oc], s)?;
        be.linear_backward(None, false, &mut dw, Some(&mut db), &dout, &inp, &w)?;
        Ok(vec![("dbias".into(), db.to_f64_vec(be)?)])
    }
}

/// The bias gradient, scalar and vec kernels, f32/bf16/f16: OC = 768 (whole 32-group blocks), 200 (a partial
/// block), 37 (no vec kernel), 300 rows (more than one row slice), with 1 and 132 SMs.
#[test]
fn emu_bias_grad_scalar_and_vec() {
    use bertqa::ops::linear::{bias_grad_launch, BiasParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for oc in [768, 200, 37] {
            for vec in [false, true] {
                for sm in [1, 132] {
                    let case = BiasGradCase { n: 300, oc };
                    let bufs = vec![encode(&case.inputs(), dt), vec![0u8; oc * 4]];
                    let p = BiasParams {
                        out: addr(0),
                        bias: addr(1),
                        n: case.n as i32,
                        oc: oc as i32,
                        out_dt: dtype_code(dt),
                        bias_dt: 0,
                    };
                    let l = bias_grad_launch(dt, p, vec, sm).unwrap();
                    let name = format!("{} grid {:?} sm={sm}", l.name, l.grid);
                    if !selected(&name) {
                        continue;
                    }
                    let Some(got) = emu
                        .run(&bufs, &[l], Mode::DEFAULT)
                        .unwrap_or_else(|e| panic!("{e}"))
                    else {
                        return;
                    };
                    let out = vec![("dbias".into(), decode(&got[1], DType::F32))];
                    for mut row in compare_outputs(dt, &case, &out).unwrap() {
                        row.case = format!("{name} {}", row.case);
                        rows.push(row);
                    }
                }
            }
        }
    }
    check(&rows);
}

/// Embeddings forward, and backward through the scalar and the vec kernel, f32/bf16/f16: C = 384, 768, 200,
/// 37 (scalar only); padding index 0 skipped in dword; the vec backward with 1 SM (blocks striding over rows).
#[test]
fn emu_embeddings_scalar_and_vec() {
    use bertqa::ops::embedding::{backward_launch, forward_launch, EmbParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for c in [384, 768, 200, 37] {
            for vec in [false, true] {
                let case = EmbeddingCase {
                    b: 2,
                    t: 23,
                    c,
                    v: 50,
                    p: 0.1,
                };
                let (pp, tv) = case.tables();
                let i = case.inputs();
                let n = i.layout.n();
                let es = dt.size();
                let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
                // 0 out, 1 mean, 2 rstd, 3 ids, 4 types, 5 word, 6 pos, 7 ttype, 8 gamma, 9 beta,
                // 10 dword, 11 dpos, 12 dttype, 13 dgamma, 14 dbeta, 15 dout, 16 positions, 17 row windows,
                // 18 step seed
                let bufs = vec![
                    vec![0xffu8; n * c * es],
                    vec![0xffu8; n * 4],
                    vec![0xffu8; n * 4],
                    ints(&i.ids),
                    ints(&i.types),
                    encode(&i.word, dt),
                    encode(&i.pos, dt),
                    encode(&i.ttype, dt),
                    encode(&i.gamma, dt),
                    encode(&i.beta, dt),
                    vec![0u8; case.v * c * 4],
                    vec![0u8; pp * c * 4],
                    vec![0u8; tv * c * 4],
                    vec![0u8; c * 4],
                    vec![0u8; c * 4],
                    encode(&i.dy, dt),
                    ints(&i.layout.pos()),
                    ints(&i.layout.row_w()),
                    ints(&i.layout.step_words()),
                ];
                let base = EmbParams {
                    out: addr(0),
                    mean: addr(1),
                    rstd: addr(2),
                    ids: addr(3),
                    types: addr(4),
                    posid: addr(16),
                    roww: addr(17),
                    word: addr(5),
                    pos: addr(6),
                    ttype: addr(7),
                    gamma: addr(8),
                    beta: addr(9),
                    dword: 0,
                    dpos: 0,
                    dttype: 0,
                    dgamma: 0,
                    dbeta: 0,
                    site: i.drop.site,
                    n: n as i32,
                    c: c as i32,
                    v: case.v as i32,
                    tv: tv as i32,
                    eps: 1e-12,
                    p: i.drop.p,
                    padding_idx: -1,
                    _pad: 0,
                    step: addr(18),
                };
                let bwd = EmbParams {
                    out: addr(15),
                    dword: addr(10),
                    dpos: addr(11),
                    dttype: addr(12),
                    dgamma: addr(13),
                    dbeta: addr(14),
                    eps: 0.0,
                    padding_idx: 0,
                    ..base
                };
                let (fl, bl) = (
                    forward_launch(dt, base).unwrap(),
                    backward_launch(dt, bwd, vec, 1).unwrap(),
                );
                let name = format!("{} + {}", fl.name, bl.name);
                if !selected(&name) {
                    continue;
                }
                let Some(got) = emu
                    .run(&bufs, &[fl, bl], Mode::DEFAULT)
                    .unwrap_or_else(|e| panic!("{e}"))
                else {
                    return;
                };
                let f32s = |k: usize| decode(&got[k], DType::F32);
                let out = vec![
                    ("out".into(), decode(&got[0], dt)),
                    ("dword".into(), f32s(10)),
                    ("dpos".into(), f32s(11)),
                    ("dtype".into(), f32s(12)),
                    ("dgamma".into(), f32s(13)),
                    ("dbeta".into(), f32s(14)),
                ];
                for mut row in compare_outputs(dt, &case, &out).unwrap() {
                    row.case = format!("{name} {}", row.case);
                    rows.push(row);
                }
            }
        }
    }
    check(&rows);
}

// ---- the small kernels: dropout, span loss, AdamW and the squared gradient norm, cast, bias add ------------

/// Dropout alone (the stream the fused kernels share), f32/bf16/f16, a length that is not a multiple of 4.
#[test]
fn emu_dropout() {
    use bertqa::ops::dropout::{launch, DropoutParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let case = DropoutCase {
            rows: 79,
            c: 13,
            p: 0.3,
        };
        let (x, d, layout) = case.inputs();
        let code = dtype_code(dt);
        let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bufs = vec![
            vec![0xffu8; case.rows * case.c * dt.size()],
            encode(&x, dt),
            ints(&layout.pos()),
            ints(&layout.row_w()),
            ints(&layout.step_words()),
        ];
        let l = launch(DropoutParams {
            out: addr(0),
            inp: addr(1),
            pos: addr(2),
            roww: addr(3),
            site: d.site,
            n: case.rows as i32,
            c: case.c as i32,
            p: d.p,
            out_dt: code,
            inp_dt: code,
            _pad: 0,
            step: addr(4),
        });
        let Some(got) = emu
            .run(&bufs, &[l], Mode::DEFAULT)
            .unwrap_or_else(|e| panic!("{e}"))
        else {
            return;
        };
        let out = vec![("out".into(), decode(&got[0], dt))];
        rows.extend(compare_outputs(dt, &case, &out).unwrap());
    }
    check(&rows);
}

/// Span loss forward+backward, with and without masking the padding, f32/bf16/f16, padded batch, one target
/// out of range.
#[test]
fn emu_span_loss() {
    use bertqa::ops::span_loss::{launch, SpanParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let case = SpanLossCase { b: 3, t: 301 };
        let b = case.b;
        let i = case.inputs();
        let n = i.layout.n();
        let ints = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut out: Outputs = vec![];
        for cfg in case.configs() {
            // 0 losses, 1 dlogits, 2 logits, 3 starts, 4 ends, 5 cu, 6 lens, 7 stats, 8 scale
            let bufs = vec![
                vec![0xffu8; b * 2 * 4],
                vec![0xffu8; n * 2 * dt.size()],
                encode(&i.logits, dt),
                ints(&i.starts),
                ints(&i.ends),
                ints(&i.layout.cu),
                ints(&i.layout.lens),
                encode(&SpanLossCase::STATS0, DType::F32),
                encode(&SpanLossCase::SCALE, DType::F32),
            ];
            let l = launch(SpanParams {
                losses: addr(0),
                stats: addr(7),
                dlogits: addr(1),
                logits: addr(2),
                starts: addr(3),
                ends: addr(4),
                cu: addr(5),
                lens: addr(6),
                b: b as i32,
                mask_padding: cfg.mask_padding as i32,
                dt: dtype_code(dt),
                _pad: 0,
                scale: addr(8),
            });
            let Some(got) = emu
                .run(&bufs, &l, Mode::DEFAULT)
                .unwrap_or_else(|e| panic!("{e}"))
            else {
                return;
            };
            let m = cfg.mask_padding;
            out.push((format!("losses mask={m}"), decode(&got[0], DType::F32)));
            out.push((format!("dlogits mask={m}"), decode(&got[1], dt)));
            out.push((format!("stats mask={m}"), decode(&got[7], DType::F32)));
        }
        rows.extend(compare_outputs(dt, &case, &out).unwrap());
    }
    check(&rows);
}

/// The squared gradient norm, then the AdamW step over one flat buffer (decayed tensors first, as the trainer
/// lays them out) with the working copy refreshed (bf16) or absent (f32), tensors of odd sizes; the outputs
/// are cut back into tensors as the CPU case does.
#[test]
fn emu_adamw() {
    use bertqa::ops::adamw::{sq_norm_launch, step_launch, AdamWParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for (dt, nonfinite) in [
        (DType::F32, false),
        (DType::BF16, false),
        (DType::BF16, true),
    ] {
        let case = AdamWCase {
            sizes: vec![1, 1000, 4099, 37],
            nonfinite,
        };
        let inputs = case.inputs();
        let order: Vec<usize> = (0..inputs.len())
            .filter(|i| i % 2 == 0)
            .chain((0..inputs.len()).filter(|i| i % 2 == 1))
            .collect();
        let flat = |k: usize| -> Vec<f64> {
            order
                .iter()
                .flat_map(|&i| {
                    let t = &inputs[i];
                    [&t.0, &t.1, &t.2, &t.3][k].clone()
                })
                .collect()
        };
        let n = flat(0).len();
        let n_decay: usize = order
            .iter()
            .filter(|i| *i % 2 == 0)
            .map(|&i| inputs[i].0.len())
            .sum();
        let f32s = |v: &[f64]| encode(v, DType::F32);
        // 0 master, 1 working (NaN-filled: every element must be written; in the non-finite case, which
        // writes nothing, the master's values rounded, as the trainer keeps it), 2 grad, 3 m, 4 v, 5 the
        // step's statistics
        let bufs = vec![
            f32s(&flat(0)),
            if nonfinite {
                encode(&flat(0), dt)
            } else {
                vec![0xffu8; n * dt.size()]
            },
            f32s(&flat(1)),
            f32s(&flat(2)),
            f32s(&flat(3)),
            f32s(&case.stats0()),
        ];
        let working = dt != DType::F32;
        let p = AdamWParams {
            master: addr(0),
            working: if working { addr(1) } else { 0 },
            grad: addr(2),
            m: addr(3),
            v: addr(4),
            stats: addr(5),
            n: n as u64,
            n_decay: n_decay as u64,
            working_dt: dtype_code(dt),
            ..bytemuck::Zeroable::zeroed()
        };
        let ls = [
            sq_norm_launch(addr(2), addr(5), n),
            step_launch(p, &case.hyper()),
        ];
        let Some(got) = emu
            .run(&bufs, &ls, Mode::DEFAULT)
            .unwrap_or_else(|e| panic!("{e}"))
        else {
            return;
        };
        let sq = decode(&got[5], DType::F32)[STAT_GRAD_SQ];
        let mut out: Outputs = vec![("stats: grad_sq".into(), vec![sq])];
        let (param, m, v) = (
            decode(&got[0], DType::F32),
            decode(&got[3], DType::F32),
            decode(&got[4], DType::F32),
        );
        let work = if working {
            decode(&got[1], dt)
        } else {
            param.clone()
        };
        let mut start = vec![0; inputs.len()];
        let mut at = 0;
        for &i in &order {
            start[i] = at;
            at += inputs[i].0.len();
        }
        for (k, inp) in inputs.iter().enumerate() {
            let r = start[k]..start[k] + inp.0.len();
            out.push((format!("param[{k}]"), param[r.clone()].to_vec()));
            out.push((format!("working[{k}]"), work[r.clone()].to_vec()));
            out.push((format!("m[{k}]"), m[r.clone()].to_vec()));
            out.push((format!("v[{k}]"), v[r].to_vec()));
        }
        rows.extend(compare_outputs(dt, &case, &out).unwrap());
    }
    check(&rows);
}

/// An f32 tensor cast to the run's dtype (the CPU reference: `Tensor::cast`).
struct CastCase {
    n: usize,
}
impl CastCase {
    fn inputs(&self) -> Vec<f64> {
        rand_vec(&mut Rng::new(19), self.n, 3.0)
    }
}
impl Case for CastCase {
    fn name(&self) -> String {
        format!("cast f32 → dt, n={}", self.n)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> anyhow::Result<Outputs> {
        let x = Tensor::from_f64(be, &self.inputs(), &[self.n], DType::F32)?;
        Ok(vec![("out".into(), x.cast(be, dt)?.to_f64_vec(be)?)])
    }
}

/// out (N, OC) += bias (OC) in the storage dtype (the sum formed in f32, rounded on store).
struct BiasAddCase {
    n: usize,
    oc: usize,
}
impl BiasAddCase {
    fn inputs(&self) -> (Vec<f64>, Vec<f64>) {
        let mut r = Rng::new(20);
        let out = rand_vec(&mut r, self.n * self.oc, 2.0);
        (out, rand_vec(&mut r, self.oc, 1.0))
    }
}
impl Case for BiasAddCase {
    fn name(&self) -> String {
        format!("bias_add N={} OC={}", self.n, self.oc)
    }
    fn run<B: Backend>(&self, be: &B, dt: DType) -> anyhow::Result<Outputs> {
        let (o, b) = self.inputs();
        let o = Tensor::from_f64(be, &o, &[self.n, self.oc], dt)?.to_f64_vec(be)?;
        let b = Tensor::from_f64(be, &b, &[self.oc], dt)?.to_f64_vec(be)?;
        let sum: Vec<f64> = o
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let y = b[i % self.oc];
                if dt == DType::F64 {
                    x + y
                } else {
                    (x as f32 + y as f32) as f64
                }
            })
            .collect();
        Ok(vec![(
            "out".into(),
            Tensor::from_f64(be, &sum, &[self.n, self.oc], dt)?.to_f64_vec(be)?,
        )])
    }
}

#[test]
fn emu_cast_and_bias_add() {
    use bertqa::cuda::cast::{cast_launch, CastParams};
    use bertqa::ops::linear::{bias_add_launch, BiasParams};
    let mut emu = Emus::default();
    let mut rows = vec![];
    for dt in [DType::F32, DType::BF16, DType::F16] {
        let code = dtype_code(dt);
        let cast = CastCase { n: 1031 };
        let bufs = vec![
            vec![0xffu8; cast.n * dt.size()],
            encode(&cast.inputs(), DType::F32),
        ];
        let l = cast_launch(CastParams {
            dst: addr(0),
            src: addr(1),
            n: cast.n as u64,
            dst_dt: code,
            src_dt: dtype_code(DType::F32),
        });
        let Some(got) = emu
            .run(&bufs, &[l], Mode::DEFAULT)
            .unwrap_or_else(|e| panic!("{e}"))
        else {
            return;
        };
        rows.extend(
            compare_outputs(dt, &cast, &vec![("out".into(), decode(&got[0], dt))]).unwrap(),
        );

        let ba = BiasAddCase { n: 33, oc: 77 };
        let (o, b) = ba.inputs();
        let bufs = vec![encode(&o, dt), encode(&b, dt)];
        let l = bias_add_launch(BiasParams {
            out: addr(0),
            bias: addr(1),
            n: ba.n as i32,
            oc: ba.oc as i32,
            out_dt: code,
            bias_dt: code,
        });
        let Some(got) = emu
            .run(&bufs, &[l], Mode::DEFAULT)
            .unwrap_or_else(|e| panic!("{e}"))
        else {
            return;
        };
        rows.extend(compare_outputs(dt, &ba, &vec![("out".into(), decode(&got[0], dt))]).unwrap());
    }
    check(&rows);
}

/// wgmma (sm_90a), as the emulator reads the PTX ISA: every probe case (A from registers or shared memory,
/// either major-ness, every swizzle, chained k-steps, scale-d 0 and 1) bit for bit against the exact CPU
/// product, in the three interleavings (operands read at the wait, or at issue); then the emulator's protocol
/// checks, each on a kernel that breaks the protocol on purpose. The same cases run on a GPU in tests/parity.rs
/// `gpu_wgmma_probe`: that run is what says the emulator reads the layouts as the hardware does.
#[test]
fn emu_wgmma_probe() {
    use bertqa::cuda::wgmma_probe::WgmmaProbeCase;
    let mut emu = Emus::default();
    let run = |emu: &mut Emus, case: &WgmmaProbeCase, seed: u64, fault: i32, mode: Mode| {
        let (a, b, c) = case.inputs(seed);
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let bufs = vec![
            encode(&f64s(&a), case.dtype),
            encode(&f64s(&b), case.dtype),
            encode(&f64s(&c), DType::F32),
            vec![0xffu8; 64 * case.n * 4],
        ];
        let mut l = case.launch(addr(0), addr(1), addr(2), addr(3)).unwrap();
        l.params.fault = fault;
        let got = emu.run(&bufs, &[l], mode)?;
        Ok::<_, String>(got.map(|g| {
            let d: Vec<f32> = decode(&g[3], DType::F32)
                .iter()
                .map(|&x| x as f32)
                .collect();
            (d, case.reference(&a, &b, &c))
        }))
    };
    let cases = WgmmaProbeCase::sweep();
    assert!(cases.len() > 80, "{} cases", cases.len());
    let mut bad = vec![];
    for (i, case) in cases.iter().enumerate() {
        for mode in [Mode::DEFAULT, Mode::STRESS[0], Mode::STRESS[1]] {
            let Some((got, want)) = run(&mut emu, case, i as u64 + 1, 0, mode)
                .unwrap_or_else(|e| panic!("{}: {e}", case.name()))
            else {
                return;
            };
            if let Some(e) = (0..got.len()).find(|&e| got[e].to_bits() != want[e].to_bits()) {
                bad.push(format!(
                    "{} ({mode:?}): D[{}][{}] = {} (want {})",
                    case.name(),
                    e / case.n,
                    e % case.n,
                    got[e],
                    want[e]
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} wgmma probes differ:\n{}",
        bad.len(),
        3 * cases.len(),
        bad.join("\n")
    );
    // the protocol checks: each fault must be caught (wrong numbers, or the emulator's own error)
    let case = cases[0];
    let (got, _) = run(&mut emu, &case, 7, 1, Mode::DEFAULT).unwrap().unwrap();
    assert!(
        got.iter().all(|x| x.is_nan()),
        "tiles handed to wgmma without fence.proxy.async were read anyway"
    );
    let acc = *cases
        .iter()
        .find(|c| c.acc)
        .expect("a case accumulating onto C");
    let k48 = *cases
        .iter()
        .find(|c| c.k == 48)
        .expect("a case of three k-steps");
    for (fault, case, says) in [
        (2, case, "without a wgmma.fence"),
        (3, acc, "wrote its wgmma accumulator registers"),
        (4, k48, "wrote its wgmma accumulator registers"),
    ] {
        match run(&mut emu, &case, 7, fault, Mode::DEFAULT) {
            Err(e) => assert!(e.contains(says), "fault {fault}: {e}"),
            Ok(_) => panic!("fault {fault} ({says}) not caught"),
        }
    }
}
