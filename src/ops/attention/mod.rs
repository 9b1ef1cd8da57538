//! Multi-head self-attention over a variable-length batch: each window attends only within itself, to its
//! real tokens (keys past `lens[b]` — padding, in padded layouts — get probability 0), with
//! attention-probability dropout.
//!
//! Per window b (rows `s0 = cu[b] .. cu[b+1]`, R rows, L = `lens[b]` real keys — here L is not the legend's
//! layer count) and head h, with q, k, v the
//! head's slices of `qkv (N,3C)` (Q at column 0, K at C, V at 2C, head h at h·HS), query i < R, key j < L:
//!   `s_ij = q_i·k_j / √HS`, `lse_i = log Σ_j e^{s_ij}`, `P_ij = e^{s_ij − lse_i}`,
//!   `out_i = Σ_j P_ij·f_ij·v_j` with `f_ij` = [`crate::rng::DropoutMask::attn_factor`]`(wid[b], h, i, j)` — the dropout
//!   stream, keyed by window, head and positions (src/rng.rs), whatever the layout.
//! Saved for backward: `lse (NH,N)` only (f32; f64 in the f64 reference): row `s0+i` of head h at h·N + s0+i.
//! Backward: `D_i = dO_i·O_i`, `dP_ij = (dO_i·v_j)·f_ij`, `dS_ij = P_ij (dP_ij − D_i)`,
//!   `dv_j = Σ_i P_ij f_ij dO_i`, `dq_i = Σ_j dS_ij k_j / √HS`, `dk_j = Σ_i dS_ij q_i / √HS`; padding rows'
//!   dk, dv are 0 (nothing attends to them).
//! Padded query rows are computed like any other (their keys are the window's real ones), exactly as HF does.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, suffix, AttnKernel, KernelConfig, Launch, Tc4Shape};
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub trait AttentionOps: BackendCore {
    /// out (N,C), lse (NH,N) ← qkv (N,3C), the batch layout `seqs`.
    fn attention_forward(
        &self,
        out: &mut Tensor<Self>,
        lse: &mut Tensor<Self>,
        qkv: &Tensor<Self>,
        seqs: &Seqs<Self>,
        nh: usize,
        drop: Dropout,
    ) -> Result<()>;

    /// dqkv (N,3C) (overwritten) ← dout (N,C), out (N,C), lse (NH,N), qkv, seqs; `scratch` (N, C+NH) in
    /// lse's dtype is the kernels' working memory (contents undefined before and after: D = dO·O and a dQ
    /// accumulator on CUDA, unused by the CPU reference) — the caller's, so that a training step allocates
    /// nothing and its kernels read and write the same addresses at every step (CUDA graphs).
    ///
    /// `dbias` (3C), when given, accumulates the column sums of dqkv: the QKV projection's bias gradient,
    /// which the tensor-core kernels take from their dQ and dV registers as they store them (one pass over
    /// dqkv fewer; the other kernels run the bias-gradient pass after). Its K third is zero up to rounding
    /// (a bias on every key shifts each query's scores by a constant, which the softmax ignores); the
    /// tensor-core kernels add exactly 0 there.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Tensor<Self>,
        dbias: Option<&mut Tensor<Self>>,
        dout: &Tensor<Self>,
        out: &Tensor<Self>,
        lse: &Tensor<Self>,
        qkv: &Tensor<Self>,
        seqs: &Seqs<Self>,
        nh: usize,
        drop: Dropout,
        scratch: &mut Tensor<Self>,
    ) -> Result<()>;
}

/// (N, C, HS) after shape checks.
pub(crate) fn dims<B: BackendCore>(
    op: &str,
    out: &Tensor<B>,
    lse: &Tensor<B>,
    qkv: &Tensor<B>,
    seqs: &Seqs<B>,
    nh: usize,
) -> Result<(usize, usize, usize)> {
    if out.shape().len() != 2 {
        bail!("{op}: out must be (N,C), found {:?}", out.shape());
    }
    let (n, c) = (out.shape()[0], out.shape()[1]);
    if nh == 0 || c % nh != 0 {
        bail!("{op}: hidden size {c} is not divisible by {nh} heads");
    }
    seqs.expect_rows(op, n)?;
    qkv.expect(&format!("{op}: qkv"), &[n, 3 * c])?;
    lse.expect(&format!("{op}: lse"), &[nh, n])?;
    Ok((n, c, c / nh))
}

/// The shape of [`AttentionOps::attention_backward`]'s scratch for N rows, hidden size C and NH heads.
pub fn scratch_shape(n: usize, c: usize, nh: usize) -> [usize; 2] {
    [n, c + nh]
}

/// Error unless `scratch` is the backward's scratch for these shapes, in lse's dtype.
pub(crate) fn check_scratch<B: BackendCore>(
    scratch: &Tensor<B>,
    lse: &Tensor<B>,
    n: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    scratch.expect("attention_backward: scratch", &scratch_shape(n, c, nh))?;
    scratch.expect_dtype("attention_backward: scratch", &[lse.dtype()])
}

/// The parameter struct of every attention kernel (kernels/common.cuh `AttnParams`, used by attention.cu,
/// attention_tc.cu and attention_wg.cu).
/// Pointers are device addresses (0: unused by the launch). [`AttnPlan`] fills everything but the pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnParams {
    /// (N,C) activation dtype
    pub out: u64,
    /// (NH,N) f32
    pub lse: u64,
    /// (N,3C)
    pub qkv: u64,
    /// (B+1) i32 window row offsets
    pub cu: u64,
    /// (B) i32 real keys per window
    pub lens: u64,
    /// (B) i32 window index in the step's batch (dropout key)
    pub wid: u64,
    /// (N,C) backward only
    pub dout: u64,
    /// (N,3C) backward only
    pub dqkv: u64,
    /// (NH,N) f32 scratch, backward only
    pub dsum: u64,
    /// (N,C) f32 scratch, backward of variant 4 only (zeroed by its first kernel, tc4_dsum)
    pub dqacc: u64,
    /// the dropout site's key ([`crate::rng::Dropout::site`]); the kernel combines it with the step seed
    pub site: u64,
    /// windows
    pub b: i32,
    /// rows
    pub n: i32,
    pub nh: i32,
    pub hs: i32,
    pub p: f32,
    pub scale: f32,
    /// device address of the step's dropout seed (a u64: [`crate::ops::Seqs::step`])
    pub step: u64,
    /// (3C) f32, 8-byte aligned, += the column sums of dqkv (the K third: exactly 0), or 0: none (backward of
    /// the tensor-core variants only: [`AttnPlan::fuses_bias_grad`])
    pub dbias: u64,
}
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

/// Head sizes the fused kernel is instantiated for.
pub const CUDA_HEAD_SIZES: [usize; 4] = [16, 32, 64, 128];

/// Head sizes of the tensor-core variant (kernels/attention_tc.cu; bf16/f16 only).
pub const CUDA_TC_HEAD_SIZES: [usize; 3] = [32, 64, 128];

/// The attention kernel that runs for `act` activations at head size `hs` under the configuration `k`: its
/// tensor-core variant for bf16/f16 at a tensor-core head size, variant 1 (CUDA cores) for everything else
/// (f32, other head sizes). (Variant 2, an earlier tensor-core version, was retired: docs/perf-log.md.)
pub fn kernel_for(k: &KernelConfig, act: DType, hs: usize) -> AttnKernel {
    let tc = matches!(act, DType::BF16 | DType::F16) && CUDA_TC_HEAD_SIZES.contains(&hs);
    if tc {
        k.attention
    } else {
        AttnKernel::V1
    }
}

/// Name of a tensor-core kernel in kernels/attention_tc.cu (or attention_wg.cu): `attention_{kind}_{dtype}_hs{HS}`.
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
                "tc4_forward_p0",
                "tc4_dsum",
            ] {
                names.push(tc_kernel(kind, dt, hs));
            }
            for shape in Tc4Shape::ALL {
                for p0 in ["", "_p0"] {
                    names.push(tc_kernel(
                        &format!("tc4_backward_{}{p0}", shape.tag().0),
                        dt,
                        hs,
                    ));
                }
            }
        }
        names.push(format!("attention_tc4_dq_store_{dt}"));
    }
    names
}

/// Dynamic shared memory (bytes) of the tensor-core kernels: (forward, backward dK/dV, backward dQ):
/// 192 padded rows of HS+8 bf16 elements each, plus (dK/dV) the per-query lse and D.
fn tc_smem(hs: usize) -> (u32, u32, u32) {
    let rows = 192 * (hs + 8) * 2;
    (rows as u32, (rows + 32 * 8) as u32, rows as u32)
}

/// Dynamic shared memory (bytes) of variant 4's forward: Q (64 rows), two buffers each of K and V (64 rows).
fn tc4_forward_smem(hs: usize) -> u32 {
    ((64 + 4 * 64) * (hs + 8) * 2) as u32
}

/// Every entry point the launchers can ask kernels/attention_wg.cu for (variant 5's forward, variant 6's
/// backward).
pub fn wg_entry_points() -> Vec<String> {
    let mut names = Vec::new();
    for dt in ["bf16", "f16"] {
        for hs in TC5_HEAD_SIZES {
            for kind in [
                "tc5_forward_w4",
                "tc5_forward_w4_p0",
                "tc5_forward_w8",
                "tc5_forward_w8_p0",
                "tc6_backward_w4",
                "tc6_backward_w4_p0",
                "tc6_backward_w8",
                "tc6_backward_w8_p0",
            ] {
                names.push(tc_kernel(kind, dt, hs));
            }
        }
    }
    names
}

/// Head sizes the wgmma kernels (variant 5's forward, 6's backward) exist for; at the others variants 5 and 6
/// run variant 4's.
pub const TC5_HEAD_SIZES: [usize; 2] = [32, 64];

/// Dynamic shared memory (bytes) of variant 5's forward with `nwg` warpgroups: 1024 bytes to align the tiles to
/// the 128-byte swizzle's pattern, then a Q tile per warpgroup and two buffers each of K and V, 64 rows × HS
/// (16-bit) each, unpadded.
fn tc5_forward_smem(hs: usize, nwg: usize) -> u32 {
    (1024 + (nwg + 4) * 64 * hs * 2) as u32
}

/// The wgmma kernels' shape from the backward shape setting: (kernel-name tag, warpgroups per block), for
/// variant 5's forward (and so 6's) and variant 6's backward. w4 is one warpgroup per block (64 queries in the
/// forward, 64 keys in the backward); w8 (and w8b2, whose register budget does not apply) two (128).
fn wg_shape(shape: Tc4Shape) -> (&'static str, usize) {
    match shape {
        Tc4Shape::W4 => ("w4", 1),
        Tc4Shape::W8 | Tc4Shape::W8B2 => ("w8", 2),
    }
}

/// Dynamic shared memory (bytes) of variant 6's backward with `nwg` warpgroups: 1024 bytes of alignment, K and
/// V per warpgroup and two buffers each of Q and dO (64 rows × HS, 16-bit), a dSᵀ tile (64 × 64) per
/// warpgroup, two buffers each of lse and D (64 f32), and with two warpgroups the traded dQ halves (64 × HS f32).
fn tc6_backward_smem(hs: usize, nwg: usize) -> u32 {
    let traded = if nwg == 2 { 64 * hs * 4 } else { 0 };
    (1024 + (2 * nwg + 4) * 64 * hs * 2 + nwg * 64 * 64 * 2 + 4 * 64 * 4 + traded) as u32
}

/// Dynamic shared memory (bytes) of variant 4's backward with `nw` warps: K and V for 16·nw keys, two
/// buffers each of Q and dO (32 queries), the dS tile transposed (16·nw keys × (32 + 8)), two buffers each of
/// lse and D.
fn tc4_smem(hs: usize, nw: usize) -> u32 {
    let (keys, bq, ld) = (16 * nw, 32, hs + 8);
    (2 * keys * ld * 2 + 4 * bq * ld * 2 + keys * (bq + 8) * 2 + 4 * bq * 4) as u32
}

/// The shape and settings of one CUDA attention call: `act` the activation dtype, `b` windows of at most
/// `max_rows` rows, `n` rows in all, `kernel` the variant that runs ([`kernel_for`]).
#[derive(Clone, Copy, Debug)]
pub struct AttnPlan {
    pub act: DType,
    pub b: usize,
    pub n: usize,
    pub max_rows: usize,
    pub nh: usize,
    pub hs: usize,
    pub drop: Dropout,
    pub kernel: AttnKernel,
}

impl AttnPlan {
    /// The plan for the configuration `k`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        k: &KernelConfig,
        act: DType,
        b: usize,
        n: usize,
        max_rows: usize,
        nh: usize,
        hs: usize,
        drop: Dropout,
    ) -> AttnPlan {
        AttnPlan {
            act,
            b,
            n,
            max_rows,
            nh,
            hs,
            drop,
            kernel: kernel_for(k, act, hs),
        }
    }

    /// `ptr`'s pointers with this call's shape and dropout
    fn params(&self, ptr: AttnParams) -> AttnParams {
        AttnParams {
            site: self.drop.site,
            b: self.b as i32,
            n: self.n as i32,
            nh: self.nh as i32,
            hs: self.hs as i32,
            p: self.drop.p,
            scale: 1.0 / (self.hs as f32).sqrt(),
            ..ptr
        }
    }

    /// The forward's launches: one kernel writing out and lse.
    pub fn forward(&self, ptr: AttnParams) -> Result<Vec<Launch<AttnParams>>> {
        let AttnPlan {
            b,
            max_rows: t,
            nh,
            hs,
            ..
        } = *self;
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
        Ok(vec![match self.kernel {
            AttnKernel::V5(shape) | AttnKernel::V6(shape) if TC5_HEAD_SIZES.contains(&hs) => {
                let (tag, nwg) = wg_shape(shape);
                Launch {
                    block: ((128 * nwg) as u32, 1, 1),
                    ..one(
                        "attention_wg",
                        tc_kernel(&format!("tc5_forward_{tag}{}", self.p0_suffix()), dt, hs),
                        (blocks(t, 64 * nwg), nh as u32, b as u32),
                        tc5_forward_smem(hs, nwg),
                    )
                }
            }
            AttnKernel::V4(_) | AttnKernel::V5(_) | AttnKernel::V6(_) => one(
                "attention_tc",
                tc_kernel(&format!("tc4_forward{}", self.p0_suffix()), dt, hs),
                (blocks(t, 64), nh as u32, b as u32),
                tc4_forward_smem(hs),
            ),
            AttnKernel::V3 => one(
                "attention_tc",
                tc_kernel("tc3_forward", dt, hs),
                (blocks(t, 64), nh as u32, b as u32),
                tc_smem(hs).0,
            ),
            AttnKernel::V1 => one(
                "attention",
                format!("attention_forward_{dt}_hs{hs}"),
                (blocks(t, 32), nh as u32, b as u32),
                0,
            ),
        }])
    }

    /// The backward's launches: D = dO·O into dsum (every element), then dQ/dK/dV (variant 4: the first kernel
    /// also zeroes dqacc, through which dQ accumulates, and a final store).
    pub fn backward(&self, ptr: AttnParams) -> Result<Vec<Launch<AttnParams>>> {
        let AttnPlan {
            b,
            n,
            max_rows: t,
            nh,
            hs,
            ..
        } = *self;
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
        if let Some(shape) = self.kernel.tc4_shape() {
            if ptr.dqacc == 0 {
                bail!("attention_backward: variant 4 needs the f32 dQ accumulator (N,C)");
            }
            // D with 16-byte loads: HS/8 (bf16/f16) threads per (row, head)
            let threads = n * nh * (hs * self.act.size() / 16);
            v.push(at(
                "attention_tc",
                tc_kernel("tc4_dsum", dt, hs),
                (blocks(threads, 256), 1, 1),
                (256, 1, 1),
                0,
            ));
            let (cfg, nw) = shape.tag();
            if matches!(self.kernel, AttnKernel::V6(_)) && TC5_HEAD_SIZES.contains(&hs) {
                let (tag, nwg) = wg_shape(shape);
                v.push(at(
                    "attention_wg",
                    tc_kernel(&format!("tc6_backward_{tag}{}", self.p0_suffix()), dt, hs),
                    (blocks(t, 64 * nwg), nh as u32, b as u32),
                    ((128 * nwg) as u32, 1, 1),
                    tc6_backward_smem(hs, nwg),
                ));
            } else {
                v.push(at(
                    "attention_tc",
                    tc_kernel(&format!("tc4_backward_{cfg}{}", self.p0_suffix()), dt, hs),
                    (blocks(t, 16 * nw), nh as u32, b as u32),
                    ((32 * nw) as u32, 1, 1),
                    tc4_smem(hs, nw),
                ));
            }
            // blocks of 32 column pairs × 8 row lanes (the bias gradient's column sums), at most 64 rows of blocks
            let c = nh * hs;
            v.push(at(
                "attention_tc",
                format!("attention_tc4_dq_store_{dt}"),
                (blocks(c / 2, 32), blocks(n, 8).min(64), 1),
                (32, 8, 1),
                0,
            ));
            return Ok(v);
        }
        v.push(at(
            "attention",
            format!("attention_dsum_{dt}_hs{hs}"),
            (blocks(n * nh, 128), 1, 1),
            (128, 1, 1),
            0,
        ));
        if self.kernel == AttnKernel::V3 {
            let grid = (blocks(t, 64), nh as u32, b as u32);
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
        let grid = (blocks(t, 32), nh as u32, b as u32);
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

impl AttnPlan {
    /// Whether the backward needs the f32 dQ accumulator `dqacc` (N,C) (variant 4; its first kernel zeroes it).
    pub fn needs_dq_accumulator(&self) -> bool {
        self.kernel.tc4_shape().is_some()
    }

    /// Whether the backward's kernels add the QKV bias gradient (`AttnParams::dbias`) themselves: the
    /// tensor-core variants; after variant 1 the launcher runs the bias-gradient kernel over dqkv.
    pub fn fuses_bias_grad(&self) -> bool {
        self.kernel != AttnKernel::V1
    }

    /// Variant 4's kernels come with dropout and, suffixed `_p0`, without (no Philox calls, no keep tests):
    /// the suffix for this call's dropout.
    fn p0_suffix(&self) -> &'static str {
        if self.drop.p > 0.0 {
            ""
        } else {
            "_p0"
        }
    }
}

/// The parameter layout (checked against kernels/common.cuh's `AttnParams` by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(AttnParams {
        out,
        lse,
        qkv,
        cu,
        lens,
        wid,
        dout,
        dqkv,
        dsum,
        dqacc,
        site,
        b,
        n,
        nh,
        hs,
        p,
        scale,
        step,
        dbias
    })]
}
