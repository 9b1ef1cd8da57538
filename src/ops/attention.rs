//! Multi-head self-attention with a key padding mask and attention-probability dropout.
//!
//! Per batch b and head h, with q, k, v the head's slices of `qkv (B,T,3C)` (Q at column 0, K at C, V at 2C,
//! head h at h·HS):
//!   `s_ij = q_i·k_j / √HS` (−∞ where `mask[b,j] == 0`), `lse_i = log Σ_j e^{s_ij}`, `P_ij = e^{s_ij − lse_i}`,
//!   `out_i = Σ_j P_ij·f_ij·v_j` with `f_ij` = [`Dropout::attn_factor`]`(b·NH + h, i, j, T)`.
//! Saved for backward: `lse (B,NH,T)` only (f32; f64 in the f64 reference).
//! Backward: `D_i = dO_i·O_i`, `dP_ij = (dO_i·v_j)·f_ij`, `dS_ij = P_ij (dP_ij − D_i)`,
//!   `dv_j = Σ_i P_ij f_ij dO_i`, `dq_i = Σ_j dS_ij k_j / √HS`, `dk_j = Σ_i dS_ij q_i / √HS`.
//! Padded query rows are computed like any other (their keys are the real ones), exactly as HF does.

use crate::backend::BackendCore;
use crate::cpu::{gemm, ids, rd, wr, Cpu, Real};
use crate::cuda::{suffix, Cuda};
use crate::ops::Launch;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use rayon::prelude::*;

pub trait AttentionOps: BackendCore {
    /// out (B,T,C), lse (B,NH,T) ← qkv (B,T,3C), mask (B,T) i32.
    fn attention_forward(
        &self,
        out: &mut Tensor<Self>,
        lse: &mut Tensor<Self>,
        qkv: &Tensor<Self>,
        mask: &Tensor<Self>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()>;

    /// dqkv (B,T,3C) (overwritten) ← dout (B,T,C), out (B,T,C), lse (B,NH,T), qkv, mask.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        out: &Tensor<Self>,
        lse: &Tensor<Self>,
        qkv: &Tensor<Self>,
        mask: &Tensor<Self>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()>;
}

/// (B, T, C, HS) after shape checks.
fn dims<B: BackendCore>(
    op: &str,
    out: &Tensor<B>,
    lse: &Tensor<B>,
    qkv: &Tensor<B>,
    mask: &Tensor<B>,
    nh: usize,
) -> Result<(usize, usize, usize, usize)> {
    if out.shape.len() != 3 {
        bail!("{op}: out must be (B,T,C), found {:?}", out.shape);
    }
    let (b, t, c) = (out.shape[0], out.shape[1], out.shape[2]);
    if nh == 0 || c % nh != 0 {
        bail!("{op}: hidden size {c} is not divisible by {nh} heads");
    }
    qkv.expect(&format!("{op}: qkv"), &[b, t, 3 * c])?;
    lse.expect(&format!("{op}: lse"), &[b, nh, t])?;
    mask.expect(&format!("{op}: attention_mask"), &[b, t])?;
    mask.expect_dtype(&format!("{op}: attention_mask"), &[DType::I32])?;
    Ok((b, t, c, c / nh))
}

/// Copy head `h` of part `part` (0 Q, 1 K, 2 V) of batch row `bi` into a contiguous (T, HS) matrix.
fn head<T: Real>(
    qkv: &[T],
    bi: usize,
    t: usize,
    c: usize,
    hs: usize,
    h: usize,
    part: usize,
) -> Vec<T> {
    let mut m = vec![T::zero(); t * hs];
    for i in 0..t {
        let base = (bi * t + i) * 3 * c + part * c + h * hs;
        m[i * hs..(i + 1) * hs].copy_from_slice(&qkv[base..base + hs]);
    }
    m
}

/// The scaled, masked scores and probabilities of one (b, h): returns (P (T,T), lse (T)).
fn probs<T: Real>(q: &[T], k: &[T], mask: &[i32], t: usize, hs: usize) -> (Vec<T>, Vec<T>) {
    let scale = T::one() / T::of(hs as f64).sqrt();
    let mut s = vec![T::zero(); t * t];
    gemm(t, hs, t, scale, q, false, k, true, T::zero(), &mut s);
    let mut lse = vec![T::zero(); t];
    for i in 0..t {
        let row = &mut s[i * t..(i + 1) * t];
        let mut m = T::neg_infinity();
        for j in 0..t {
            if mask[j] != 0 {
                m = m.max(row[j]);
            }
        }
        // one exp per score: e_j = exp(s_j - m), l = Σ e_j, P_j = e_j / l, lse = m + ln l
        let mut l = T::zero();
        for j in 0..t {
            row[j] = if mask[j] != 0 {
                (row[j] - m).exp()
            } else {
                T::zero()
            };
            l += row[j];
        }
        lse[i] = m + l.ln();
        let inv = T::one() / l;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
    (s, lse)
}

impl AttentionOps for Cpu {
    fn attention_forward(
        &self,
        out: &mut Tensor<Cpu>,
        lse: &mut Tensor<Cpu>,
        qkv: &Tensor<Cpu>,
        mask: &Tensor<Cpu>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, c, hs) = dims("attention_forward", out, lse, qkv, mask, nh)?;
        let mk = ids(mask)?;
        crate::cpu_compute!(out.dtype, T => {
            let x = rd::<T>(qkv);
            // every (b, h) is independent: compute them in parallel, then scatter into (B,T,C) and (B,NH,T)
            let per_head: Vec<(Vec<T>, Vec<T>)> = (0..b * nh)
                .into_par_iter()
                .map(|bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let (q, k, v) = (head(&x, bi, t, c, hs, h, 0), head(&x, bi, t, c, hs, h, 1), head(&x, bi, t, c, hs, h, 2));
                    let (mut p, l) = probs(&q, &k, &mk[bi * t..(bi + 1) * t], t, hs);
                    if drop.active() {
                        // f_ij = drop.attn_factor(bh, i, j, t), computed for the whole (T,T) block at once
                        for (pij, f) in p.iter_mut().zip(drop.attn_factors(bh as u64, t)) {
                            *pij *= T::of(f);
                        }
                    }
                    let mut oh = vec![T::zero(); t * hs];
                    gemm(t, t, hs, T::one(), &p, false, &v, false, T::zero(), &mut oh);
                    (oh, l)
                })
                .collect();
            let mut o = wr::<T>(out, false);
            let mut ls = wr::<T>(lse, false);
            for (bh, (oh, l)) in per_head.iter().enumerate() {
                let (bi, h) = (bh / nh, bh % nh);
                ls[bh * t..(bh + 1) * t].copy_from_slice(l);
                for i in 0..t {
                    let dst = (bi * t + i) * c + h * hs;
                    o[dst..dst + hs].copy_from_slice(&oh[i * hs..(i + 1) * hs]);
                }
            }
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Tensor<Cpu>,
        dout: &Tensor<Cpu>,
        out: &Tensor<Cpu>,
        lse: &Tensor<Cpu>,
        qkv: &Tensor<Cpu>,
        mask: &Tensor<Cpu>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, c, hs) = dims("attention_backward", out, lse, qkv, mask, nh)?;
        dout.expect("attention_backward: dout", &out.shape)?;
        dqkv.expect("attention_backward: dqkv", &qkv.shape)?;
        let mk = ids(mask)?;
        crate::cpu_compute!(dout.dtype, T => {
            let (x, dy, y) = (rd::<T>(qkv), rd::<T>(dout), rd::<T>(out));
            let scale = T::one() / T::of(hs as f64).sqrt();
            // per (b, h) in parallel: (dq, dk, dv), each (T, HS)
            let per_head: Vec<[Vec<T>; 3]> = (0..b * nh)
                .into_par_iter()
                .map(|bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let (q, k, v) = (head(&x, bi, t, c, hs, h, 0), head(&x, bi, t, c, hs, h, 1), head(&x, bi, t, c, hs, h, 2));
                    let (p, _) = probs(&q, &k, &mk[bi * t..(bi + 1) * t], t, hs);
                    // dO and O of this head, contiguous (T, HS)
                    let mut d_o = vec![T::zero(); t * hs];
                    let mut o = vec![T::zero(); t * hs];
                    for i in 0..t {
                        let src = (bi * t + i) * c + h * hs;
                        d_o[i * hs..(i + 1) * hs].copy_from_slice(&dy[src..src + hs]);
                        o[i * hs..(i + 1) * hs].copy_from_slice(&y[src..src + hs]);
                    }
                    let fm = drop.attn_factors(bh as u64, t); // (T,T): f_ij = drop.attn_factor(bh, i, j, t)
                    let f = |i: usize, j: usize| T::of(fm[i * t + j]);
                    // dPd = dO·Vᵀ (T,T); Pd = P∘f
                    let mut dpd = vec![T::zero(); t * t];
                    gemm(t, hs, t, T::one(), &d_o, false, &v, true, T::zero(), &mut dpd);
                    let mut pd = p.clone();
                    let mut ds = vec![T::zero(); t * t];
                    for i in 0..t {
                        let di: T = (0..hs).map(|d| d_o[i * hs + d] * o[i * hs + d]).sum();
                        for j in 0..t {
                            let fij = f(i, j);
                            pd[i * t + j] = p[i * t + j] * fij;
                            ds[i * t + j] = p[i * t + j] * (dpd[i * t + j] * fij - di);
                        }
                    }
                    let (mut dq, mut dk, mut dv) = (vec![T::zero(); t * hs], vec![T::zero(); t * hs], vec![T::zero(); t * hs]);
                    gemm(t, t, hs, T::one(), &pd, true, &d_o, false, T::zero(), &mut dv);
                    gemm(t, t, hs, scale, &ds, false, &k, false, T::zero(), &mut dq);
                    gemm(t, t, hs, scale, &ds, true, &q, false, T::zero(), &mut dk);
                    [dq, dk, dv]
                })
                .collect();
            let mut dx = wr::<T>(dqkv, false);
            for (bh, [dq, dk, dv]) in per_head.iter().enumerate() {
                let (bi, h) = (bh / nh, bh % nh);
                for i in 0..t {
                    let dst = (bi * t + i) * 3 * c + h * hs;
                    dx[dst..dst + hs].copy_from_slice(&dq[i * hs..(i + 1) * hs]);
                    dx[dst + c..dst + c + hs].copy_from_slice(&dk[i * hs..(i + 1) * hs]);
                    dx[dst + 2 * c..dst + 2 * c + hs].copy_from_slice(&dv[i * hs..(i + 1) * hs]);
                }
            }
        });
        Ok(())
    }
}

/// The parameter struct of every attention kernel (kernels/attention.cu, attention_tc.cu `AttnParams`).
/// Pointers are device addresses (0: unused by the launch). [`AttnPlan`] fills everything but the pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnParams {
    /// (B,T,C) activation dtype
    pub out: u64,
    /// (B,NH,T) f32
    pub lse: u64,
    /// (B,T,3C)
    pub qkv: u64,
    /// (B,T) i32
    pub mask: u64,
    /// (B,T,C) backward only
    pub dout: u64,
    /// (B,T,3C) backward only
    pub dqkv: u64,
    /// (B,NH,T) f32 scratch, backward only
    pub dsum: u64,
    /// (B,T,C) f32 scratch, zero on entry, backward of variant 4 only
    pub dqacc: u64,
    pub seed: u64,
    pub b: i32,
    pub t: i32,
    pub nh: i32,
    pub hs: i32,
    pub p: f32,
    pub scale: f32,
}
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

/// Head sizes the fused kernel is instantiated for.
pub const CUDA_HEAD_SIZES: [usize; 4] = [16, 32, 64, 128];

/// Head sizes of the tensor-core variant (kernels/attention_tc.cu; bf16/f16 only).
pub const CUDA_TC_HEAD_SIZES: [usize; 3] = [32, 64, 128];

/// The tensor-core variant bf16/f16 run by default: 3 until variant 4 has passed the GPU parity suite and
/// the bench shows it faster (docs/perf-log.md).
pub const TC_VARIANT_DEFAULT: u32 = 3;

/// Which CUDA attention variant runs. bf16/f16 at a supported head size: `BERTQA_ATTN=v1` (CUDA cores), `v3`
/// (tensor cores, kernels/attention_tc.cu), `v4` (pipelined forward with fewer instructions per score,
/// one-pass backward with dQ reductions), unset: [`TC_VARIANT_DEFAULT`]. Everything else (f32, other head
/// sizes) runs variant 1. (Variant 2, an earlier tensor-core version, was retired: docs/perf-log.md.)
pub fn cuda_variant(dtype: DType, hs: usize) -> u32 {
    let tc = matches!(dtype, DType::BF16 | DType::F16) && CUDA_TC_HEAD_SIZES.contains(&hs);
    match std::env::var("BERTQA_ATTN").as_deref() {
        _ if !tc => 1,
        Ok("v1") => 1,
        Ok("v3") => 3,
        Ok("v4") => 4,
        _ => TC_VARIANT_DEFAULT,
    }
}

/// Variant 4's backward shape from `BERTQA_ATTN4` (`w4`, `w8`, `w8b2`; default `w8b2`): (name, warps).
/// Each warp owns 16 keys; kernels/attention_tc.cu lists the register budgets.
pub fn tc4_config() -> Result<(&'static str, usize)> {
    match std::env::var("BERTQA_ATTN4").as_deref() {
        Ok("w4") => Ok(("w4", 4)),
        Ok("w8") => Ok(("w8", 8)),
        Ok("w8b2") | Err(_) => Ok(("w8b2", 8)),
        Ok(other) => bail!("BERTQA_ATTN4={other:?}: expected w4, w8 or w8b2"),
    }
}

/// Name of a tensor-core kernel in kernels/attention_tc.cu: `attention_{kind}_{dtype}_hs{HS}`.
fn tc_kernel(kind: &str, dtype: &str, hs: usize) -> String {
    format!("attention_{kind}_{dtype}_hs{hs}")
}

/// Every entry point the tensor-core launchers can ask kernels/attention_tc.cu for (tests/kernels_compile.rs
/// checks each is in the compiled PTX, so a name typo fails on a machine without a GPU).
pub fn tc_entry_points() -> Vec<String> {
    let mut names = Vec::new();
    for dt in ["bf16", "f16"] {
        for hs in CUDA_TC_HEAD_SIZES {
            for kind in [
                "tc3_forward",
                "tc3_backward_kv",
                "tc3_backward_q",
                "tc4_forward",
                "tc4_dsum",
            ] {
                names.push(tc_kernel(kind, dt, hs));
            }
            for cfg in ["w4", "w8", "w8b2"] {
                names.push(tc_kernel(&format!("tc4_backward_{cfg}"), dt, hs));
            }
        }
        names.push(format!("attention_tc4_dq_store_{dt}"));
    }
    names
}

/// Dynamic shared memory (bytes) of the tensor-core kernels: (forward, backward dK/dV, backward dQ):
/// 192 padded rows of HS+8 bf16 elements each, plus the key mask or the per-query lse and D.
fn tc_smem(hs: usize) -> (u32, u32, u32) {
    let rows = 192 * (hs + 8) * 2;
    (
        (rows + 64 * 4) as u32,
        (rows + 32 * 8) as u32,
        (rows + 32 * 4) as u32,
    )
}

/// Dynamic shared memory (bytes) of variant 4's forward: Q (64 rows), two buffers each of K, V (64 rows) and
/// the key mask.
fn tc4_forward_smem(hs: usize) -> u32 {
    ((64 + 4 * 64) * (hs + 8) * 2 + 2 * 64 * 4) as u32
}

/// Dynamic shared memory (bytes) of variant 4's backward with `nw` warps: K and V for 16·nw keys, two
/// buffers each of Q and dO (32 queries), the dS tile (32 × (16·nw + 8)), two buffers each of lse and D.
fn tc4_smem(hs: usize, nw: usize) -> u32 {
    let (keys, bq, ld) = (16 * nw, 32, hs + 8);
    (2 * keys * ld * 2 + 4 * bq * ld * 2 + bq * (keys + 8) * 2 + 4 * bq * 4) as u32
}

fn cuda_checks(op: &str, act: DType, others: &[DType], lse: DType, hs: usize) -> Result<()> {
    if !CUDA_HEAD_SIZES.contains(&hs) {
        bail!("{op}: head size {hs} has no CUDA kernel (supported: {CUDA_HEAD_SIZES:?})");
    }
    for d in others {
        if *d != act {
            bail!("{op}: activations must share one dtype ({act}), found {d}");
        }
    }
    if lse != DType::F32 {
        bail!("{op}: lse must be f32 on CUDA, found {lse}");
    }
    Ok(())
}

/// The shape and settings of one CUDA attention call: `act` the activation dtype, `variant` from
/// [`cuda_variant`], `tc4` variant 4's backward shape from [`tc4_config`].
#[derive(Clone, Copy, Debug)]
pub struct AttnPlan {
    pub act: DType,
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub hs: usize,
    pub drop: Dropout,
    pub variant: u32,
    pub tc4: (&'static str, usize),
}

impl AttnPlan {
    /// The plan the CUDA backend runs: variant and backward shape from `BERTQA_ATTN` / `BERTQA_ATTN4`.
    pub fn from_env(
        act: DType,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        drop: Dropout,
    ) -> Result<AttnPlan> {
        Ok(AttnPlan {
            act,
            b,
            t,
            nh,
            hs,
            drop,
            variant: cuda_variant(act, hs),
            tc4: tc4_config()?,
        })
    }

    /// `ptr`'s pointers with this call's shape and dropout
    fn params(&self, ptr: AttnParams) -> AttnParams {
        AttnParams {
            seed: self.drop.seed,
            b: self.b as i32,
            t: self.t as i32,
            nh: self.nh as i32,
            hs: self.hs as i32,
            p: self.drop.p,
            scale: 1.0 / (self.hs as f32).sqrt(),
            ..ptr
        }
    }

    /// The forward's launches: one kernel writing out and lse.
    pub fn forward(&self, ptr: AttnParams) -> Result<Vec<Launch<AttnParams>>> {
        let AttnPlan { b, t, nh, hs, .. } = *self;
        let p = self.params(ptr);
        let dt = suffix(self.act)?;
        let one = |module, name, grid, smem| Launch {
            module,
            name,
            grid,
            block: (128, 1, 1),
            smem,
            params: p,
        };
        Ok(vec![match self.variant {
            4 => one(
                "attention_tc",
                tc_kernel("tc4_forward", dt, hs),
                (super::blocks(t, 64), nh as u32, b as u32),
                tc4_forward_smem(hs),
            ),
            3 => one(
                "attention_tc",
                tc_kernel("tc3_forward", dt, hs),
                (super::blocks(t, 64), nh as u32, b as u32),
                tc_smem(hs).0,
            ),
            _ => one(
                "attention",
                format!("attention_forward_{dt}_hs{hs}"),
                (super::blocks(t, 32), nh as u32, b as u32),
                0,
            ),
        }])
    }

    /// The backward's launches: D = dO·O into dsum, then dQ/dK/dV (variant 4: dQ through dqacc, which must be
    /// zero on entry, and a final store).
    pub fn backward(&self, ptr: AttnParams) -> Result<Vec<Launch<AttnParams>>> {
        let AttnPlan { b, t, nh, hs, .. } = *self;
        let p = self.params(ptr);
        let dt = suffix(self.act)?;
        let at = |module, name: String, grid, block, smem| Launch {
            module,
            name,
            grid,
            block,
            smem,
            params: p,
        };
        let mut v = vec![];
        if self.variant == 4 {
            if ptr.dqacc == 0 {
                bail!("attention_backward: variant 4 needs the f32 dQ accumulator (B,T,C)");
            }
            // D with 16-byte loads: HS/8 (bf16/f16) threads per (row, head)
            let threads = b * t * nh * (hs * self.act.size() / 16);
            v.push(at(
                "attention_tc",
                tc_kernel("tc4_dsum", dt, hs),
                (super::blocks(threads, 256), 1, 1),
                (256, 1, 1),
                0,
            ));
            let (cfg, nw) = self.tc4;
            v.push(at(
                "attention_tc",
                tc_kernel(&format!("tc4_backward_{cfg}"), dt, hs),
                (super::blocks(t, 16 * nw), nh as u32, b as u32),
                ((32 * nw) as u32, 1, 1),
                tc4_smem(hs, nw),
            ));
            let c = nh * hs;
            v.push(at(
                "attention_tc",
                format!("attention_tc4_dq_store_{dt}"),
                (super::blocks(b * t * c / 2, 256).min(65535 * 16), 1, 1),
                (256, 1, 1),
                0,
            ));
            return Ok(v);
        }
        v.push(at(
            "attention",
            format!("attention_dsum_{dt}_hs{hs}"),
            (super::blocks(b * nh * t, 128), 1, 1),
            (128, 1, 1),
            0,
        ));
        if self.variant == 3 {
            let grid = (super::blocks(t, 64), nh as u32, b as u32);
            let (_, kv, q) = tc_smem(hs);
            v.push(at(
                "attention_tc",
                tc_kernel("tc3_backward_kv", dt, hs),
                grid,
                (128, 1, 1),
                kv,
            ));
            v.push(at(
                "attention_tc",
                tc_kernel("tc3_backward_q", dt, hs),
                grid,
                (128, 1, 1),
                q,
            ));
            return Ok(v);
        }
        let grid = (super::blocks(t, 32), nh as u32, b as u32);
        for kind in ["kv", "q"] {
            v.push(at(
                "attention",
                format!("attention_backward_{kind}_{dt}_hs{hs}"),
                grid,
                (128, 1, 1),
                0,
            ));
        }
        Ok(v)
    }
}

impl AttentionOps for Cuda {
    fn attention_forward(
        &self,
        out: &mut Tensor<Cuda>,
        lse: &mut Tensor<Cuda>,
        qkv: &Tensor<Cuda>,
        mask: &Tensor<Cuda>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, _, hs) = dims("attention_forward", out, lse, qkv, mask, nh)?;
        cuda_checks("attention_forward", out.dtype, &[qkv.dtype], lse.dtype, hs)?;
        let plan = AttnPlan::from_env(out.dtype, b, t, nh, hs, drop)?;
        let ptr = AttnParams {
            out: out.buf.ptr,
            lse: lse.buf.ptr,
            qkv: qkv.buf.ptr,
            mask: mask.buf.ptr,
            ..bytemuck::Zeroable::zeroed()
        };
        for l in plan.forward(ptr)? {
            self.run(&l)?;
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        out: &Tensor<Cuda>,
        lse: &Tensor<Cuda>,
        qkv: &Tensor<Cuda>,
        mask: &Tensor<Cuda>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, _, hs) = dims("attention_backward", out, lse, qkv, mask, nh)?;
        dout.expect("attention_backward: dout", &out.shape)?;
        dqkv.expect("attention_backward: dqkv", &qkv.shape)?;
        cuda_checks(
            "attention_backward",
            out.dtype,
            &[qkv.dtype, dout.dtype, dqkv.dtype],
            lse.dtype,
            hs,
        )?;
        let plan = AttnPlan::from_env(out.dtype, b, t, nh, hs, drop)?;
        let dsum = Tensor::<Cuda>::zeros(self, &[b, nh, t], DType::F32)?; // (B,NH,T), from the arena
                                                                          // (B,T,C) f32 dQ accumulator of variant 4, zeroed
        let dq = if plan.variant == 4 {
            Some(Tensor::<Cuda>::zeros(self, &[b, t, nh * hs], DType::F32)?)
        } else {
            None
        };
        let ptr = AttnParams {
            out: out.buf.ptr,
            lse: lse.buf.ptr,
            qkv: qkv.buf.ptr,
            mask: mask.buf.ptr,
            dout: dout.buf.ptr,
            dqkv: dqkv.buf.ptr,
            dsum: dsum.buf.ptr,
            dqacc: dq.as_ref().map_or(0, |d| d.buf.ptr),
            ..bytemuck::Zeroable::zeroed()
        };
        for l in plan.backward(ptr)? {
            self.run(&l)?;
        }
        Ok(())
    }
}
