//! BERT embeddings fused with their LayerNorm and dropout, over the N rows of a batch:
//! `x[r] = word[ids[r]] + pos[t] + type[types[r]]` with `t = seqs.pos[r]`, the row's position in its window
//! (0.., as HF's position ids), `out = dropout(LN(x))` (row r keyed by its window and position).
//! Saves only `mean`/`rstd`: backward re-gathers `x` (cheaper than storing it).
//! Backward: `dy = dropout(dout)`, LayerNorm backward gives `dx`, `dgamma`, `dbeta`, and `dx` is scattered
//! (added) into the rows of `dword`, `dpos` and `dtype` that the forward gathered. All accumulate.

pub mod cpu;
pub mod cuda;

use crate::backend::BackendCore;
use crate::kernel::{blocks, suffix, Launch};
use crate::ops::Seqs;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

/// Embedding tables and LayerNorm parameters, borrowed.
pub struct EmbWeights<'a, B: BackendCore> {
    pub word: &'a Tensor<B>,  // (V, C)
    pub pos: &'a Tensor<B>,   // (P, C)
    pub ttype: &'a Tensor<B>, // (TV, C)
    pub gamma: &'a Tensor<B>, // (C)
    pub beta: &'a Tensor<B>,  // (C)
}

/// Their gradients, borrowed mutably (accumulated). `padding_idx`: rows of this token id get no
/// word-embedding gradient (torch.nn.Embedding's `padding_idx`, which HF sets to `pad_token_id`); -1 for none.
pub struct EmbGrads<'a, B: BackendCore> {
    pub padding_idx: i32,
    pub word: &'a mut Tensor<B>,  // (V, C)
    pub pos: &'a mut Tensor<B>,   // (P, C)
    pub ttype: &'a mut Tensor<B>, // (TV, C)
    pub gamma: &'a mut Tensor<B>, // (C)
    pub beta: &'a mut Tensor<B>,  // (C)
}

pub trait EmbeddingOps: BackendCore {
    /// out (N,C), mean (N), rstd (N) ← ids (N) i32, types (N) i32, positions and dropout keys (seqs), weights.
    #[allow(clippy::too_many_arguments)]
    fn embeddings_forward(
        &self,
        out: &mut Tensor<Self>,
        mean: &mut Tensor<Self>,
        rstd: &mut Tensor<Self>,
        ids: &Tensor<Self>,
        types: &Tensor<Self>,
        seqs: &Seqs<Self>,
        w: &EmbWeights<Self>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()>;

    /// grads (accumulated) ← dout (N,C), mean, rstd, ids, types, seqs, weights.
    #[allow(clippy::too_many_arguments)]
    fn embeddings_backward(
        &self,
        g: &mut EmbGrads<Self>,
        dout: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        ids: &Tensor<Self>,
        types: &Tensor<Self>,
        seqs: &Seqs<Self>,
        w: &EmbWeights<Self>,
        drop: Dropout,
    ) -> Result<()>;
}

/// (N, C, V, P, TV) after checking every shape.
pub(crate) fn dims<B: BackendCore>(
    op: &str,
    act: &Tensor<B>,
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
    ids: &Tensor<B>,
    types: &Tensor<B>,
    seqs: &Seqs<B>,
    w: &EmbWeights<B>,
) -> Result<(usize, usize, usize, usize, usize)> {
    if act.shape().len() != 2 {
        bail!("{op}: activation must be (N,C), found {:?}", act.shape());
    }
    let (n, c) = (act.shape()[0], act.shape()[1]);
    seqs.expect_rows(op, n)?;
    ids.expect(&format!("{op}: input_ids"), &[n])?;
    types.expect(&format!("{op}: token_type_ids"), &[n])?;
    ids.expect_dtype(&format!("{op}: input_ids"), &[DType::I32])?;
    types.expect_dtype(&format!("{op}: token_type_ids"), &[DType::I32])?;
    mean.expect(&format!("{op}: mean"), &[n])?;
    rstd.expect(&format!("{op}: rstd"), &[n])?;
    let v = w.word.shape()[0];
    let p = w.pos.shape()[0];
    let tv = w.ttype.shape()[0];
    w.word
        .expect(&format!("{op}: embeddings.word_embeddings.weight"), &[v, c])?;
    w.pos.expect(
        &format!("{op}: embeddings.position_embeddings.weight"),
        &[p, c],
    )?;
    w.ttype.expect(
        &format!("{op}: embeddings.token_type_embeddings.weight"),
        &[tv, c],
    )?;
    w.gamma
        .expect(&format!("{op}: embeddings.LayerNorm.weight"), &[c])?;
    w.beta
        .expect(&format!("{op}: embeddings.LayerNorm.bias"), &[c])?;
    if seqs.max_rows() > p {
        bail!(
            "{op}: a window of {} rows exceeds max_position_embeddings {p}",
            seqs.max_rows()
        );
    }
    Ok((n, c, v, p, tv))
}

/// kernels/embedding.cu `EmbParams`: pointers are device addresses; the d* gradients accumulate (f32).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EmbParams {
    /// forward: out; backward: dout
    pub out: u64,
    pub mean: u64,
    pub rstd: u64,
    pub ids: u64,
    pub types: u64,
    /// (N) i32 positions (the position-embedding rows), (N) i32 window indices (dropout keys)
    pub posid: u64,
    pub roww: u64,
    pub word: u64,
    pub pos: u64,
    pub ttype: u64,
    pub gamma: u64,
    pub beta: u64,
    pub dword: u64,
    pub dpos: u64,
    pub dttype: u64,
    pub dgamma: u64,
    pub dbeta: u64,
    /// the dropout site's key ([`crate::rng::Dropout::site`]); the kernel combines it with the step seed
    pub site: u64,
    pub n: i32,
    pub c: i32,
    pub v: i32,
    pub tv: i32,
    pub eps: f32,
    pub p: f32,
    pub padding_idx: i32,
    pub _pad: i32,
    /// device address of the step's dropout seed (a u64: [`crate::ops::Seqs::step`])
    pub step: u64,
}

/// The forward's launch (activations in `dt`): one warp per row, 8 rows per block.
pub fn forward_launch(dt: DType, p: EmbParams) -> Result<Launch<EmbParams>> {
    Ok(Launch {
        module: "embedding",
        name: format!("embeddings_forward_{}", suffix(dt)?),
        grid: (blocks(p.n as usize, 8), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}

/// The backward's launch: the vec kernel when `vec` and it applies (16-byte-aligned buffers, C a multiple of
/// the vector width and at most 4 chunks per lane, at most 2 token types) — blocks striding over rows, two per
/// SM of `sm_count`, dγ, dβ and the token-type rows reduced per block in (2 + TV)·C floats of shared memory —
/// else the scalar kernel, one warp per row.
pub fn backward_launch(
    dt: DType,
    p: EmbParams,
    vec: bool,
    sm_count: usize,
) -> Result<Launch<EmbParams>> {
    let (n, c, tv) = (p.n as usize, p.c as usize, p.tv as usize);
    let sfx = suffix(dt)?;
    let ptrs = [p.out, p.word, p.pos, p.ttype, p.gamma];
    if let Some(nv) = crate::cuda::vec_width(dt, &ptrs) {
        let ch = c.div_ceil(32 * nv);
        if vec && c.is_multiple_of(nv) && (1..=4).contains(&ch) && tv <= 2 {
            return Ok(Launch {
                module: "embedding",
                name: emb_vec_kernel(ch, sfx),
                grid: (blocks(n, 8).min((sm_count.max(1) * 2) as u32), 1, 1),
                block: (256, 1, 1),
                smem: ((2 + tv) * c * 4) as u32,
                params: p,
            });
        }
    }
    Ok(Launch {
        module: "embedding",
        name: format!("embeddings_backward_{sfx}"),
        grid: (blocks(n, 8), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}

unsafe impl cudarc::driver::DeviceRepr for EmbParams {}

fn emb_vec_kernel(ch: usize, sfx: &str) -> String {
    format!("embeddings_backward_vec{ch}_{sfx}")
}

/// Every vec kernel name the launchers can ask kernels/embedding.cu for (checked by tests/kernels_compile.rs).
pub fn vec_entry_points() -> Vec<String> {
    let mut v = Vec::new();
    for sfx in ["f32", "bf16", "f16"] {
        for ch in 1..=4 {
            v.push(emb_vec_kernel(ch, sfx));
        }
    }
    v
}

/// The parameter layout (checked against kernels/embedding.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(EmbParams {
        out,
        mean,
        rstd,
        ids,
        types,
        posid,
        roww,
        word,
        pos,
        ttype,
        gamma,
        beta,
        dword,
        dpos,
        dttype,
        dgamma,
        dbeta,
        site,
        n,
        c,
        v,
        tv,
        eps,
        p,
        padding_idx,
        _pad,
        step
    })]
}
