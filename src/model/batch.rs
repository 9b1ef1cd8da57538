//! From windows (data::features) to a batch: N rows grouped into windows ([`SeqLayout`]), the token ids and
//! types of every row, and the span labels per window — on the host ([`HostBatch`]), then on the device in
//! the activation plan's views ([`Batch`], src/model/acts.rs).
//!
//! Three layouts of the same windows ([`Padding`]): `packed` — each window contributes its real tokens only,
//! no padding anywhere; `longest` — each window padded to the batch's longest window, rounded up to
//! [`LONGEST_ROUND`] (at most the full window length); `max` — each window padded to its full length
//! (`--max-seq-length`). Padding rows are masked everywhere (attention keys, the span softmax), so the real
//! tokens' results do not depend on the layout; the dropout stream does not either (src/rng.rs).
//!
//! A packed batch's row count changes with every batch. A backend that keeps per-shape state (cuBLASLt
//! algorithm choices; CUDA graphs) asks for it rounded up to a multiple ([`BackendCore::row_bucket`]): the
//! extra rows form a *filler* window after the real ones — one real token ([`FILLER_TOKEN`]) and padding,
//! its targets ignored — so it adds no loss and no gradient, and no real window sees it.

use crate::backend::BackendCore;
use crate::data::features::Feature;
use crate::ops::span_loss::clamp_positions;
use crate::ops::{SeqLayout, Seqs};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How windows are laid out in a batch (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// the real tokens only (the default)
    #[default]
    Packed,
    /// every window padded to the batch's longest, rounded up to 64
    Longest,
    /// every window padded to --max-seq-length
    Max,
}

impl Padding {
    pub fn parse(s: &str) -> Result<Padding> {
        Ok(match s {
            "packed" => Padding::Packed,
            "longest" => Padding::Longest,
            "max" => Padding::Max,
            other => bail!("--padding must be packed, longest or max (got {other:?})"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Padding::Packed => "packed",
            Padding::Longest => "longest",
            Padding::Max => "max",
        }
    }
}

/// `longest` pads to a multiple of this many rows (the attention kernels' tile).
pub const LONGEST_ROUND: usize = 64;

/// One batch of windows on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    pub layout: SeqLayout,
    /// (N) input_ids
    pub ids: Vec<i32>,
    /// (N) token_type_ids
    pub types: Vec<i32>,
    /// (B) start/end positions within each window, clamped to [0, rows] (HF: the window length = ignored)
    pub starts: Vec<i32>,
    pub ends: Vec<i32>,
    /// the last window is a filler (rows rounded up to the backend's bucket; see the module doc)
    pub filler: bool,
}

impl HostBatch {
    /// Windows (B).
    pub fn b(&self) -> usize {
        self.layout.b()
    }
    /// Rows (N).
    pub fn n(&self) -> usize {
        self.layout.n()
    }
    /// The windows of features (B without the filler).
    pub fn windows(&self) -> usize {
        self.b() - self.filler as usize
    }
    /// The real tokens of the windows of features (the filler's one token not counted).
    pub fn real_tokens(&self) -> usize {
        self.layout.real_tokens() - self.filler as usize
    }
    /// The rows a window of `real` tokens and `full` length takes in this padding mode, for a batch whose
    /// longest window has `longest` tokens.
    pub fn rows_for(padding: Padding, real: usize, longest: usize, full: usize) -> usize {
        match padding {
            Padding::Packed => real,
            Padding::Longest => longest
                .div_ceil(LONGEST_ROUND)
                .saturating_mul(LONGEST_ROUND)
                .min(full)
                .max(longest),
            Padding::Max => full,
        }
    }
    /// Whether the start (`end == false`) or end target of window `b` counts: inside the span softmax's range
    /// (the real tokens when `mask_padding`, else the whole window).
    pub fn target_counts(&self, b: usize, end: bool, mask_padding: bool) -> bool {
        let range = if mask_padding {
            self.layout.lens[b] as usize
        } else {
            self.layout.rows(b)
        };
        let t = if end { self.ends[b] } else { self.starts[b] };
        t >= 0 && (t as usize) < range
    }
}

/// The token id of a filler window's one real row (any id in the vocabulary would do: nothing of the filler
/// reaches the loss or a gradient).
pub const FILLER_TOKEN: i32 = 0;

/// Lay out `windows` in one batch, the first numbered `first_w` in the optimizer step's whole batch (the
/// dropout stream's window index). Labels are each window's `start_position`/`end_position` (inference
/// windows carry (0, 0): harmless, nothing reads the loss). The padded layouts' padding rows get token id 0
/// and type 0 (BERT's \[PAD\]; nothing of them reaches a real token's output or the loss).
pub fn pack(windows: &[&Feature], first_w: usize, padding: Padding) -> Result<HostBatch> {
    pack_bucketed(windows, first_w, padding, 1, usize::MAX)
}

/// [`pack`], a packed layout's rows rounded up to a multiple of `multiple` (at most `max_rows`) by a filler
/// window (see the module doc) no longer than the windows; `multiple` ≤ 1, a filler that would be longer,
/// and the padded layouts: as [`pack`].
pub fn pack_bucketed(
    windows: &[&Feature],
    first_w: usize,
    padding: Padding,
    multiple: usize,
    max_rows: usize,
) -> Result<HostBatch> {
    let Some(first) = windows.first() else {
        bail!("pack: a batch needs at least one window");
    };
    let full = first.max_len;
    let mut lens: Vec<usize> = windows.iter().map(|f| f.len()).collect();
    let longest = lens.iter().copied().max().unwrap_or(1);
    let mut rows = Vec::with_capacity(windows.len() + 1);
    for (f, &l) in windows.iter().zip(&lens) {
        if f.max_len != full {
            bail!(
                "pack: windows cut for {} and for {} tokens in one batch",
                full,
                f.max_len
            );
        }
        if l == 0 || l > full || f.token_type_ids.len() != l {
            bail!(
                "pack: window of example {} has {l} tokens and {} token types (1 to {full} of each \
                 expected)",
                f.example,
                f.token_type_ids.len()
            );
        }
        rows.push(HostBatch::rows_for(padding, l, longest, full));
    }
    let real_rows: usize = rows.iter().sum();
    let extra = if padding == Padding::Packed && multiple > 1 {
        real_rows
            .div_ceil(multiple)
            .saturating_mul(multiple)
            .min(max_rows)
            .saturating_sub(real_rows)
    } else {
        0
    };
    // the filler is a window like the others: no longer than the windows' length (so within the position
    // table); a bucket larger than that is not reached (exact rows instead)
    let extra = if extra > full { 0 } else { extra };
    if extra > 0 {
        lens.push(1);
        rows.push(extra);
    }
    let layout = SeqLayout::new(&lens, &rows, first_w)?;
    let n = layout.n();
    let (mut ids, mut types) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut starts, mut ends) = (Vec::with_capacity(windows.len()), vec![]);
    for (f, &r) in windows.iter().zip(&rows) {
        // the window's tokens, then (padded layouts) padding rows: id 0, type 0
        ids.extend_from_slice(&f.input_ids);
        ids.resize(ids.len() + (r - f.len()), 0);
        types.extend_from_slice(&f.token_type_ids);
        types.resize(types.len() + (r - f.len()), 0);
        starts.extend(clamp_positions(&[f.start_position], r));
        ends.extend(clamp_positions(&[f.end_position], r));
    }
    if extra > 0 {
        // the filler: one real token, then padding; targets at its row count (ignored)
        ids.push(FILLER_TOKEN);
        ids.extend(std::iter::repeat_n(0, extra - 1));
        types.extend(std::iter::repeat_n(0, extra));
        starts.push(extra as i32);
        ends.push(extra as i32);
    }
    Ok(HostBatch {
        layout,
        ids,
        types,
        starts,
        ends,
        filler: extra > 0,
    })
}

/// Split `windows` into consecutive batches of at most `max_windows` windows and `max_rows` rows each in
/// this padding mode (for `longest`, the batch's longest window decides every window's rows).
pub fn chunks_fitting<'a>(
    windows: &'a [&'a Feature],
    padding: Padding,
    max_windows: usize,
    max_rows: usize,
) -> Result<Vec<&'a [&'a Feature]>> {
    let mut out = vec![];
    let mut start = 0;
    while start < windows.len() {
        let (mut end, mut longest, mut real) = (start, 0usize, 0usize);
        while end < windows.len() && end - start < max_windows.max(1) {
            let f = windows[end];
            let l = longest.max(f.len());
            let k = end + 1 - start;
            let rows = match padding {
                Padding::Packed => real + f.len(),
                _ => k * HostBatch::rows_for(padding, 0, l, f.max_len).max(l),
            };
            if rows > max_rows {
                break;
            }
            longest = l;
            real += f.len();
            end += 1;
        }
        if end == start {
            let f = windows[start];
            bail!(
                "a window of {} tokens does not fit a batch of {max_rows} rows",
                match padding {
                    Padding::Packed => f.len(),
                    _ => f.max_len,
                }
            );
        }
        out.push(&windows[start..end]);
        start = end;
    }
    Ok(out)
}

/// A batch on the device: views into the activation plan (src/model/acts.rs), and the host copy the loss
/// needs.
pub struct Batch<B: BackendCore> {
    /// (N) i32 input_ids
    pub ids: Tensor<B>,
    /// (N) i32 token_type_ids
    pub types: Tensor<B>,
    /// the layout, with per-row positions and dropout keys
    pub seqs: Seqs<B>,
    /// (B) i32 start positions within the windows (see [`HostBatch::starts`])
    pub starts: Tensor<B>,
    /// (B) i32 end positions
    pub ends: Tensor<B>,
    pub host: HostBatch,
}

impl<B: BackendCore> Batch<B> {
    /// `hb` in fresh device tensors (tests and tools; training and evaluation use the activation plan).
    pub fn upload(be: &B, hb: &HostBatch) -> Result<Self> {
        let (n, b) = (hb.n(), hb.b());
        Ok(Batch {
            ids: Tensor::from_i32(be, &hb.ids, &[n])?,
            types: Tensor::from_i32(be, &hb.types, &[n])?,
            seqs: Seqs::upload(be, &hb.layout)?,
            starts: Tensor::from_i32(be, &hb.starts, &[b])?,
            ends: Tensor::from_i32(be, &hb.ends, &[b])?,
            host: hb.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(len: usize, t: usize, s: i64, e: i64) -> Feature {
        Feature {
            example: 0,
            input_ids: (0..len).map(|i| 100 + i as i32).collect(),
            token_type_ids: (0..len).map(|i| (i >= 3) as i32).collect(),
            offsets: vec![None; len],
            max_len: t,
            start_position: s,
            end_position: e,
            has_answer: true,
        }
    }

    #[test]
    fn the_three_layouts_of_the_same_windows() {
        let ws = [
            window(5, 200, 2, 3),
            window(70, 200, 60, 69),
            window(1, 200, 0, 0),
        ];
        let refs: Vec<&Feature> = ws.iter().collect();
        let p = pack(&refs, 7, Padding::Packed).unwrap();
        assert_eq!(p.layout.cu, vec![0, 5, 75, 76]);
        assert_eq!(p.layout.lens, vec![5, 70, 1]);
        assert_eq!(p.layout.wid, vec![7, 8, 9]);
        assert_eq!(p.ids.len(), 76);
        assert_eq!(&p.ids[5..8], &[100, 101, 102]);
        assert_eq!(
            (p.starts.clone(), p.ends.clone()),
            (vec![2, 60, 0], vec![3, 69, 0])
        );
        let l = pack(&refs, 0, Padding::Longest).unwrap();
        assert_eq!(l.layout.cu, vec![0, 128, 256, 384]); // longest 70 → 128 rows each
        assert_eq!(l.layout.lens, vec![5, 70, 1]);
        assert_eq!(l.ids[5], 0); // padding
        let m = pack(&refs, 0, Padding::Max).unwrap();
        assert_eq!(m.layout.cu, vec![0, 200, 400, 600]);
        assert_eq!(m.layout.pos()[200..203], [0, 1, 2]);
        // a label past the window is clamped to its rows: ignored
        let far = [window(5, 200, 150, 150)];
        let r: Vec<&Feature> = far.iter().collect();
        let p = pack(&r, 0, Padding::Packed).unwrap();
        assert_eq!(p.starts, vec![5]);
        assert!(!p.target_counts(0, false, true));
        assert!(pack(&[], 0, Padding::Packed).is_err());
    }

    #[test]
    fn a_packed_batch_rounded_up_to_its_bucket_by_a_filler_window() {
        let ws = [window(5, 200, 2, 3), window(70, 200, 60, 69)];
        let refs: Vec<&Feature> = ws.iter().collect();
        // 75 real rows → 128: a filler of 53 rows, one real token, targets ignored, numbered after the rest
        let p = pack_bucketed(&refs, 4, Padding::Packed, 64, 1000).unwrap();
        assert!(p.filler);
        assert_eq!(p.layout.cu, vec![0, 5, 75, 128]);
        assert_eq!(p.layout.lens, vec![5, 70, 1]);
        assert_eq!(p.layout.wid, vec![4, 5, 6]);
        assert_eq!(
            (p.b(), p.windows(), p.n(), p.real_tokens()),
            (3, 2, 128, 75)
        );
        assert_eq!((p.starts[2], p.ends[2]), (53, 53));
        assert!(!p.target_counts(2, false, true) && !p.target_counts(2, true, false));
        assert_eq!((p.ids.len(), p.types.len()), (128, 128));
        assert_eq!(p.ids[75], FILLER_TOKEN);
        // the plan's rows cap the bucket; an exact multiple needs no filler; padded layouts are not bucketed
        assert_eq!(
            pack_bucketed(&refs, 0, Padding::Packed, 64, 100)
                .unwrap()
                .n(),
            100
        );
        assert!(
            !pack_bucketed(&refs, 0, Padding::Packed, 64, 75)
                .unwrap()
                .filler
        );
        assert!(
            !pack_bucketed(&refs, 0, Padding::Packed, 25, 1000)
                .unwrap()
                .filler
        );
        let l = pack_bucketed(&refs, 0, Padding::Longest, 1000, 1000).unwrap();
        assert_eq!((l.filler, l.n()), (false, 256));
        assert_eq!(
            pack_bucketed(&refs, 0, Padding::Packed, 1, 1000).unwrap(),
            pack(&refs, 0, Padding::Packed).unwrap()
        );
    }

    #[test]
    fn chunks_respect_windows_and_rows() {
        let ws: Vec<Feature> = [10, 20, 30, 40, 50]
            .iter()
            .map(|&l| window(l, 64, 0, 0))
            .collect();
        let refs: Vec<&Feature> = ws.iter().collect();
        let c = chunks_fitting(&refs, Padding::Packed, 10, 60).unwrap();
        assert_eq!(c.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![3, 1, 1]);
        let c = chunks_fitting(&refs, Padding::Max, 10, 130).unwrap();
        assert_eq!(c.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
        let c = chunks_fitting(&refs, Padding::Packed, 2, 1000).unwrap();
        assert_eq!(c.len(), 3);
        assert!(chunks_fitting(&refs, Padding::Max, 10, 10).is_err());
    }
}
