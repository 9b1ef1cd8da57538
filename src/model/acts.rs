//! One activation plan: every activation the forward saves, the backward's scratch and the batch's inputs,
//! in three allocations (activation dtype, statistics dtype, i32) sized once for the largest batch — `n_max`
//! rows in at most `b_max` windows — with views taken for each batch's (N, B). Training and evaluation
//! allocate nothing per batch, whatever the mix of shapes (padding-free batches change N every step).
//!
//! Saved for backward per layer and row: qkv 3C, the attention output C, the two residual sums 2C, LN1's
//! output h C, the layer output C, pre-GELU F and GELU output F in the activation dtype (8C + 2F), and
//! 4 + NH statistics (LayerNorm mean/rstd twice, the attention log-sum-exp per head). BERT-base in bf16:
//! 24 KiB per row and layer, 288 KiB per row for 12 layers — 3.4 GiB at B=32, T=384; a packed batch of
//! SQuAD windows (172 real tokens on average) needs 45% of that. [`ActPlan::bytes`] gives the exact figure.

use crate::backend::BackendCore;
use crate::model::batch::{Batch, HostBatch};
use crate::model::config::BertConfig;
use crate::ops::{compute_dtype, Seqs};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Context, Result};

/// Views start at multiples of this many elements (16-byte vectors at any dtype; 128-byte rows for bf16).
const ALIGN: usize = 64;

/// Saved activations of one layer (views with N rows).
pub struct LayerActs<B: BackendCore> {
    pub qkv: Tensor<B>,   // (N,3C)
    pub att: Tensor<B>,   // (N,C)
    pub lse: Tensor<B>,   // (NH,N) stat dtype
    pub sum1: Tensor<B>,  // (N,C)  x + dropout(ao + bo)
    pub h: Tensor<B>,     // (N,C)  LN1 output
    pub mean1: Tensor<B>, // (N)
    pub rstd1: Tensor<B>, // (N)
    pub pre: Tensor<B>,   // (N,F)  h·W1ᵀ, before GELU (without b1, which the GELU adds)
    pub f: Tensor<B>,     // (N,F)  after GELU
    pub sum2: Tensor<B>,  // (N,C)  h + dropout(fo + b2)
    pub out: Tensor<B>,   // (N,C)  LN2 output = next layer's input
    pub mean2: Tensor<B>, // (N)
    pub rstd2: Tensor<B>, // (N)
}

/// Everything forward saves, plus the sub-layer output scratch and backward's scratch: views with N rows.
pub struct Acts<B: BackendCore> {
    pub emb: Tensor<B>,      // (N,C)  embeddings output = layer 0 input
    pub emb_mean: Tensor<B>, // (N)
    pub emb_rstd: Tensor<B>, // (N)
    pub layers: Vec<LayerActs<B>>,
    /// (N,C) the attention-output and feed-forward-output linears write here; the LayerNorm after each reads
    /// it at once (backward does not need it)
    pub sub: Tensor<B>,
    pub logits: Tensor<B>, // (N,2)
    pub losses: Tensor<B>, // (B,2) stat dtype
    /// backward scratch (None in a forward-only plan)
    pub grad: Option<GradScratch<B>>,
}

/// The backward's activation gradients.
pub struct GradScratch<B: BackendCore> {
    pub dlogits: Tensor<B>, // (N,2)
    pub dx: Tensor<B>,      // (N,C)  gradient of the residual stream
    pub dh: Tensor<B>,      // (N,C)
    pub dsub: Tensor<B>,    // (N,C)  d(ao) or d(fo)
    pub datt: Tensor<B>,    // (N,C)
    pub dqkv: Tensor<B>,    // (N,3C)
    pub df: Tensor<B>,      // (N,F)
    pub dpre: Tensor<B>,    // (N,F)
    /// (N,C+NH) stat dtype: the attention backward's working memory (AttentionOps::attention_backward)
    pub attn: Tensor<B>,
}

/// Where each view lives: (arena, element offset, per-row width or a fixed size).
#[derive(Clone, Copy, Debug)]
enum Arena {
    Act,
    Stat,
    Int,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    arena: Arena,
    offset: usize,
}

/// The plan: the three allocations, where each view goes, and the views of the current batch.
pub struct ActPlan<B: BackendCore> {
    cfg: BertConfig,
    dtype: DType,
    n_max: usize,
    b_max: usize,
    backward: bool,
    act: Tensor<B>,
    stat: Tensor<B>,
    int: Tensor<B>,
    /// slots in the order `views` takes them
    slots: Vec<Slot>,
    acts: Option<Acts<B>>,
    batch: Option<Batch<B>>,
}

/// The views of one batch: (name for errors, arena, shape as a function of (N, B)).
fn shapes(cfg: &BertConfig, backward: bool, n: usize, b: usize) -> Vec<(Arena, Vec<usize>)> {
    let (c, f, nh) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let mut v = vec![
        (Arena::Act, vec![n, c]),
        (Arena::Stat, vec![n]),
        (Arena::Stat, vec![n]),
    ];
    for _ in 0..cfg.num_hidden_layers {
        v.extend([
            (Arena::Act, vec![n, 3 * c]),
            (Arena::Act, vec![n, c]),
            (Arena::Stat, vec![nh, n]),
            (Arena::Act, vec![n, c]),
            (Arena::Act, vec![n, c]),
            (Arena::Stat, vec![n]),
            (Arena::Stat, vec![n]),
            (Arena::Act, vec![n, f]),
            (Arena::Act, vec![n, f]),
            (Arena::Act, vec![n, c]),
            (Arena::Act, vec![n, c]),
            (Arena::Stat, vec![n]),
            (Arena::Stat, vec![n]),
        ]);
    }
    v.extend([
        (Arena::Act, vec![n, c]),
        (Arena::Act, vec![n, 2]),
        (Arena::Stat, vec![b, 2]),
    ]);
    if backward {
        v.extend([
            (Arena::Act, vec![n, 2]),
            (Arena::Act, vec![n, c]),
            (Arena::Act, vec![n, c]),
            (Arena::Act, vec![n, c]),
            (Arena::Act, vec![n, c]),
            (Arena::Act, vec![n, 3 * c]),
            (Arena::Act, vec![n, f]),
            (Arena::Act, vec![n, f]),
            (Arena::Stat, vec![n, c + nh]),
        ]);
    }
    // the batch: ids, types, positions, row windows (N); cu (B+1); lens, wid, starts, ends (B); the step's
    // dropout seed (2)
    v.extend([
        (Arena::Int, vec![n]),
        (Arena::Int, vec![n]),
        (Arena::Int, vec![n]),
        (Arena::Int, vec![n]),
        (Arena::Int, vec![b + 1]),
        (Arena::Int, vec![b]),
        (Arena::Int, vec![b]),
        (Arena::Int, vec![b]),
        (Arena::Int, vec![b]),
        (Arena::Int, vec![2]),
    ]);
    v
}

impl<B: BackendCore> ActPlan<B> {
    /// A plan for batches of at most `n_max` rows in at most `b_max` windows of model `cfg`, activations in
    /// `dtype`; `backward`: with the backward's scratch (training).
    pub fn new(
        be: &B,
        cfg: &BertConfig,
        n_max: usize,
        b_max: usize,
        dtype: DType,
        backward: bool,
    ) -> Result<Self> {
        if n_max == 0 || b_max == 0 {
            bail!("activation plan: {n_max} rows in {b_max} windows");
        }
        let too_large = || {
            anyhow::anyhow!(
                "activation plan for batches of {b_max} windows ({n_max} rows): too large to allocate; lower \
                 --batch-size (or --eval-batch-size)"
            )
        };
        let mut used = [0usize; 3];
        let mut slots = vec![];
        // one window more than asked: a packed batch's filler (src/model/batch.rs)
        for (arena, shape) in shapes(
            cfg,
            backward,
            n_max,
            b_max.checked_add(1).ok_or_else(too_large)?,
        ) {
            let k = arena as usize;
            slots.push(Slot {
                arena,
                offset: used[k],
            });
            let n = shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .and_then(|n| n.checked_next_multiple_of(ALIGN))
                .ok_or_else(too_large)?;
            used[k] = used[k].checked_add(n).ok_or_else(too_large)?;
        }
        let sd = compute_dtype(dtype);
        let gib = (used[0] as f64 * dtype.size() as f64
            + used[1] as f64 * sd.size() as f64
            + used[2] as f64 * 4.0)
            / 1073741824.0;
        let alloc = |n: usize, dt: DType| {
            Tensor::zeros(be, &[n.max(1)], dt).with_context(|| {
                format!(
                    "activation plan for batches of {b_max} windows ({n_max} rows, {gib:.2} GiB): lower \
                     --batch-size (or --eval-batch-size)"
                )
            })
        };
        Ok(ActPlan {
            cfg: cfg.clone(),
            dtype,
            n_max,
            b_max,
            backward,
            act: alloc(used[0], dtype)?,
            stat: alloc(used[1], sd)?,
            int: alloc(used[2], DType::I32)?,
            slots,
            acts: None,
            batch: None,
        })
    }

    /// Rows the plan holds at most.
    pub fn max_rows(&self) -> usize {
        self.n_max
    }
    /// Windows the plan holds at most.
    pub fn max_windows(&self) -> usize {
        self.b_max
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes of the plan's three allocations.
    pub fn bytes(&self) -> usize {
        self.act.bytes() + self.stat.bytes() + self.int.bytes()
    }

    /// Upload `hb` and shape every view for its (N, B): the batch and its activations. Views of the previous
    /// batch are dropped first (nothing of it is read again).
    pub fn load(&mut self, be: &B, hb: &HostBatch) -> Result<(&Batch<B>, &mut Acts<B>)> {
        let (n, b) = (hb.n(), hb.b());
        if n > self.n_max || hb.windows() > self.b_max {
            bail!(
                "a batch of {n} rows in {b} windows exceeds the activation plan ({} rows, {} windows)",
                self.n_max,
                self.b_max
            );
        }
        self.acts = None;
        self.batch = None;
        let mut views = Vec::with_capacity(self.slots.len());
        for ((arena, shape), slot) in shapes(&self.cfg, self.backward, n, b)
            .into_iter()
            .zip(&self.slots)
        {
            debug_assert!(matches!(
                (arena, slot.arena),
                (Arena::Act, Arena::Act) | (Arena::Stat, Arena::Stat) | (Arena::Int, Arena::Int)
            ));
            let src = match slot.arena {
                Arena::Act => &self.act,
                Arena::Stat => &self.stat,
                Arena::Int => &self.int,
            };
            views.push(src.view(be, slot.offset, &shape)?);
        }
        let mut it = views.into_iter();
        let mut next = || it.next().expect("one view per slot");
        let emb = next();
        let emb_mean = next();
        let emb_rstd = next();
        let mut layers = Vec::with_capacity(self.cfg.num_hidden_layers);
        for _ in 0..self.cfg.num_hidden_layers {
            layers.push(LayerActs {
                qkv: next(),
                att: next(),
                lse: next(),
                sum1: next(),
                h: next(),
                mean1: next(),
                rstd1: next(),
                pre: next(),
                f: next(),
                sum2: next(),
                out: next(),
                mean2: next(),
                rstd2: next(),
            });
        }
        let sub = next();
        let logits = next();
        let losses = next();
        let grad = if self.backward {
            Some(GradScratch {
                dlogits: next(),
                dx: next(),
                dh: next(),
                dsub: next(),
                datt: next(),
                dqkv: next(),
                df: next(),
                dpre: next(),
                attn: next(),
            })
        } else {
            None
        };
        let (ids, types) = (next(), next());
        let (pos, roww, cu, lens, wid) = (next(), next(), next(), next(), next());
        let (starts, ends, step) = (next(), next(), next());
        // the batch's integers (the int arena holds nothing else) in one host-to-device copy: one
        // synchronisation per batch instead of one per array
        let l = &hb.layout;
        let ints: [&[i32]; 10] = [
            &hb.ids,
            &hb.types,
            &l.pos(),
            &l.row_w(),
            &l.cu,
            &l.lens,
            &l.wid,
            &hb.starts,
            &hb.ends,
            &l.step_words(),
        ];
        let int_slots = self.slots.iter().filter(|s| matches!(s.arena, Arena::Int));
        let mut host = vec![0i32; self.int.numel()];
        let mut end = 0;
        for (slot, v) in int_slots.zip(ints) {
            host[slot.offset..slot.offset + v.len()].copy_from_slice(v);
            end = end.max(slot.offset + v.len());
        }
        let mut head = self.int.view(be, 0, &[end])?;
        head.copy_from_i32(be, &host[..end])?;
        let seqs = Seqs::from_views(l, cu, lens, wid, pos, roww, step);
        self.acts = Some(Acts {
            emb,
            emb_mean,
            emb_rstd,
            layers,
            sub,
            logits,
            losses,
            grad,
        });
        self.batch = Some(Batch {
            ids,
            types,
            seqs,
            starts,
            ends,
            host: hb.clone(),
        });
        match (&self.batch, &mut self.acts) {
            (Some(b), Some(a)) => Ok((b, a)),
            _ => bail!("activation plan: views not set"),
        }
    }
}
