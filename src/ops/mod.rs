//! The ops, one folder each (dfdx-style), arrows pointing one way:
//! - `ops/<op>/mod.rs`: the contract — the backend trait (what the op computes, shapes, argument order),
//!   shape and dtype checks, the kernels' `#[repr(C)]` parameter structs and the launch plan as a pure
//!   function of shapes and the [`KernelConfig`](crate::kernel::KernelConfig);
//! - `ops/<op>/cpu.rs`: the CPU reference loops (the oracle);
//! - `ops/<op>/cuda.rs`: the CUDA launcher (the plan with device addresses, run on the backend).
//!
//! The backends (src/cpu, src/cuda) know no op; the ops build on them, and the model builds on the ops
//! through [`Backend`]. Argument order: outputs, saved state, inputs, weights, dims. Parameter gradients
//! accumulate (`+=`); activation gradients are overwritten unless stated.

pub mod adamw;
pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod linear;
pub mod span_loss;

use crate::backend::BackendCore;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub use adamw::AdamWOps;
pub use attention::AttentionOps;
pub use dropout::DropoutOps;
pub use embedding::EmbeddingOps;
pub use gelu::GeluOps;
pub use layernorm::LayerNormOps;
pub use linear::LinearOps;
pub use span_loss::SpanLossOps;

/// The training step's statistics stay on the device, so that a steady-state step reads the host once (after
/// the AdamW launch): a `(STATS_LEN)` tensor in the stat dtype, zeroed when a step starts, holding
/// - `[STAT_LOSS_START]`, `[STAT_LOSS_END]`: Σ of the counted windows' start / end NLL (the span loss adds
///   each batch's sums, in window order);
/// - `[STAT_GRAD_SQ]`: Σ g² of the step's gradient (added by `grad_sq_norm`).
///
/// `adamw_step` reads them: any non-finite one means no update; otherwise they give the clip coefficient.
pub const STAT_LOSS_START: usize = 0;
pub const STAT_LOSS_END: usize = 1;
pub const STAT_GRAD_SQ: usize = 2;
pub const STATS_LEN: usize = 3;

/// Everything the model, the optimiser and the training loop need from a device: storage plus every op.
pub trait Backend:
    BackendCore
    + EmbeddingOps
    + LinearOps
    + LayerNormOps
    + GeluOps
    + AttentionOps
    + DropoutOps
    + SpanLossOps
    + AdamWOps
{
}

impl<B> Backend for B where
    B: BackendCore
        + EmbeddingOps
        + LinearOps
        + LayerNormOps
        + GeluOps
        + AttentionOps
        + DropoutOps
        + SpanLossOps
        + AdamWOps
{
}

/// How the N rows of a batch are grouped into windows, on the host: FlashAttention's variable-length
/// convention, plus the dropout stream's keys (src/rng.rs). Window `b` owns rows `cu[b]..cu[b+1]`; its first
/// `lens[b]` rows are real tokens (the keys attention attends to), the rest padding (in padded layouts only;
/// a packed layout has none). `wid[b]` is the window's index in the optimizer step's whole batch. A row's
/// position is its offset in its window.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct SeqLayout {
    /// (B+1) row offsets, `cu[0] = 0`, non-decreasing
    pub cu: Vec<i32>,
    /// (B) real rows per window, `1 ≤ lens[b] ≤ cu[b+1] − cu[b]`
    pub lens: Vec<i32>,
    /// (B) window index in the optimizer step's whole batch
    pub wid: Vec<i32>,
    /// the optimizer step's dropout seed ([`crate::rng::step_seed`]; 0 outside training): with the window
    /// indices, the step's part of every dropout key. It goes to the device with the batch, and the kernels
    /// read it there ([`crate::rng::Dropout`]).
    pub step_seed: u64,
}

impl SeqLayout {
    /// Windows of `lens[b]` real rows each, padded to `rows[b]` rows, numbered from `first_w`.
    pub fn new(lens: &[usize], rows: &[usize], first_w: usize) -> Result<SeqLayout> {
        if lens.len() != rows.len() {
            bail!(
                "SeqLayout: {} lengths for {} windows",
                lens.len(),
                rows.len()
            );
        }
        let mut cu = vec![0i32];
        for (&l, &r) in lens.iter().zip(rows) {
            if l == 0 || l > r {
                bail!("SeqLayout: a window of {r} rows cannot hold {l} real tokens");
            }
            cu.push(cu.last().copied().unwrap_or(0) + r as i32);
        }
        Ok(SeqLayout {
            cu,
            lens: lens.iter().map(|&l| l as i32).collect(),
            wid: (0..lens.len()).map(|i| (first_w + i) as i32).collect(),
            step_seed: 0,
        })
    }
    /// The step's dropout seed as the two i32 words (little-endian) the device holds it in.
    pub fn step_words(&self) -> [i32; 2] {
        [
            self.step_seed as u32 as i32,
            (self.step_seed >> 32) as u32 as i32,
        ]
    }
    /// Windows of `lens[b]` rows, no padding, numbered from `first_w`.
    pub fn packed(lens: &[usize], first_w: usize) -> Result<SeqLayout> {
        Self::new(lens, lens, first_w)
    }
    /// Windows of `lens[b]` real rows, each padded to `t` rows, numbered from `first_w`.
    pub fn padded(lens: &[usize], t: usize, first_w: usize) -> Result<SeqLayout> {
        Self::new(lens, &vec![t; lens.len()], first_w)
    }
    /// Windows (B).
    pub fn b(&self) -> usize {
        self.lens.len()
    }
    /// Rows (N).
    pub fn n(&self) -> usize {
        self.cu.last().copied().unwrap_or(0) as usize
    }
    /// Rows of window `b`.
    pub fn rows(&self, b: usize) -> usize {
        (self.cu[b + 1] - self.cu[b]) as usize
    }
    /// The most rows of any window.
    pub fn max_rows(&self) -> usize {
        (0..self.b()).map(|b| self.rows(b)).max().unwrap_or(0)
    }
    /// [`SeqLayout::max_rows`] rounded up to [`GRID_ROWS`]: the rows the attention kernels' grids cover
    /// (blocks past a window's rows exit at once), so that batches whose longest windows differ a little
    /// launch the same grids (CUDA graphs are recorded per grid).
    pub fn grid_rows(&self) -> usize {
        grid_rows(self.max_rows())
    }
    /// (N) each row's position in its window.
    pub fn pos(&self) -> Vec<i32> {
        (0..self.b()).flat_map(|b| 0..self.rows(b) as i32).collect()
    }
    /// (N) each row's window index in the step's whole batch.
    pub fn row_w(&self) -> Vec<i32> {
        (0..self.b())
            .flat_map(|b| std::iter::repeat_n(self.wid[b], self.rows(b)))
            .collect()
    }
    /// Whether no window has padding.
    pub fn is_packed(&self) -> bool {
        (0..self.b()).all(|b| self.rows(b) == self.lens[b] as usize)
    }
    /// Real tokens (Σ lens).
    pub fn real_tokens(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).sum()
    }
}

/// The multiple the attention kernels' grid rows are rounded up to ([`SeqLayout::grid_rows`]): every
/// attention tile (16 to 128 rows) divides it.
pub const GRID_ROWS: usize = 128;

/// `max_rows` rounded up to [`GRID_ROWS`].
fn grid_rows(max_rows: usize) -> usize {
    max_rows.div_ceil(GRID_ROWS) * GRID_ROWS
}

/// A [`SeqLayout`] on a device, with the per-row keys the kernels need, and its sizes on the host.
pub struct Seqs<B: BackendCore> {
    /// (B+1) i32
    pub cu: Tensor<B>,
    /// (B) i32
    pub lens: Tensor<B>,
    /// (B) i32
    pub wid: Tensor<B>,
    /// (N) i32 position of each row in its window (also its position-embedding row)
    pub pos: Tensor<B>,
    /// (N) i32 window index (in the step's whole batch) of each row
    pub row_w: Tensor<B>,
    /// (2) i32: the step's dropout seed, a little-endian u64 ([`SeqLayout::step_seed`])
    pub step: Tensor<B>,
    n: usize,
    b: usize,
    max_rows: usize,
}

impl<B: BackendCore> Seqs<B> {
    /// `l` in fresh device tensors.
    pub fn upload(be: &B, l: &SeqLayout) -> Result<Self> {
        let (n, b) = (l.n(), l.b());
        Ok(Seqs {
            cu: Tensor::from_i32(be, &l.cu, &[b + 1])?,
            lens: Tensor::from_i32(be, &l.lens, &[b])?,
            wid: Tensor::from_i32(be, &l.wid, &[b])?,
            pos: Tensor::from_i32(be, &l.pos(), &[n])?,
            row_w: Tensor::from_i32(be, &l.row_w(), &[n])?,
            step: Tensor::from_i32(be, &l.step_words(), &[2])?,
            n,
            b,
            max_rows: l.max_rows(),
        })
    }
    /// The layout `l` over tensors that already hold it (views of an activation plan, written by its
    /// loader).
    pub(crate) fn from_views(
        l: &SeqLayout,
        cu: Tensor<B>,
        lens: Tensor<B>,
        wid: Tensor<B>,
        pos: Tensor<B>,
        row_w: Tensor<B>,
        step: Tensor<B>,
    ) -> Self {
        Seqs {
            cu,
            lens,
            wid,
            pos,
            row_w,
            step,
            n: l.n(),
            b: l.b(),
            max_rows: l.max_rows(),
        }
    }
    /// Rows (N).
    pub fn n(&self) -> usize {
        self.n
    }
    /// The step's dropout seed, read back from the device (the CPU reference's way to it; kernels read
    /// [`Seqs::step`] themselves).
    pub fn step_seed(&self, be: &B) -> Result<u64> {
        let w = self.step.to_host::<i32>(be)?;
        match w[..] {
            [lo, hi] => Ok(lo as u32 as u64 | ((hi as u32 as u64) << 32)),
            _ => bail!("Seqs: the step seed holds {} words, not 2", w.len()),
        }
    }
    /// Windows (B).
    pub fn b(&self) -> usize {
        self.b
    }
    /// The most rows of any window.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    /// The attention kernels' grid rows ([`SeqLayout::grid_rows`]).
    pub fn grid_rows(&self) -> usize {
        grid_rows(self.max_rows)
    }
    /// Error unless `n` rows match this layout (`what` names the tensor).
    pub fn expect_rows(&self, what: &str, n: usize) -> Result<()> {
        if n != self.n {
            bail!("{what}: {n} rows, but the batch layout has {} rows", self.n);
        }
        Ok(())
    }
}

/// The dtype the CPU reference computes in for a given activation dtype: f64 stays f64, all else f32.
pub fn compute_dtype(act: DType) -> DType {
    if act == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// (module, kernel) for every entry point a kernel configuration can select (attention variants, vec
/// kernels), so that tests/kernels_compile.rs can check the names against the compiled PTX on a machine
/// without a GPU.
pub fn variant_entry_points() -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = Vec::new();
    v.extend(
        attention::tc_entry_points()
            .into_iter()
            .map(|n| ("attention_tc", n)),
    );
    v.extend(
        attention::wg_entry_points()
            .into_iter()
            .map(|n| ("attention_wg", n)),
    );
    v.extend(
        layernorm::vec_entry_points()
            .into_iter()
            .map(|n| ("layernorm", n)),
    );
    v.extend(gelu::vec_entry_points().into_iter().map(|n| ("gelu", n)));
    v.extend(
        linear::vec_entry_points()
            .into_iter()
            .map(|n| ("reduce", n)),
    );
    v.extend(
        embedding::vec_entry_points()
            .into_iter()
            .map(|n| ("embedding", n)),
    );
    v
}

/// The byte layout of every kernel parameter struct (tests/kernels_compile.rs checks each against the
/// CHECK_FIELD assertions of its .cu file, which NVRTC and the emulator's compiler enforce).
pub fn param_layouts() -> Vec<crate::kernel::ParamLayout> {
    let mut v = Vec::new();
    v.extend(attention::layouts());
    v.extend(layernorm::layouts());
    v.extend(embedding::layouts());
    v.extend(gelu::layouts());
    v.extend(linear::layouts());
    v.extend(dropout::layouts());
    v.extend(span_loss::layouts());
    v.extend(adamw::layouts());
    v.extend(crate::cuda::cast::layouts());
    v.extend(crate::cuda::wgmma_probe::layouts());
    v
}
