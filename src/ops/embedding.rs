//! BERT embeddings fused with their LayerNorm and dropout:
//! `x = word[ids] + pos[t] + type[types]`, `out = dropout(LN(x))` (position ids are 0..T, as in HF).
//! Saves only `mean`/`rstd`: backward re-gathers `x` (cheaper than storing it).
//! Backward: `dy = dropout(dout)`, LayerNorm backward gives `dx`, `dgamma`, `dbeta`, and `dx` is scattered
//! (added) into the rows of `dword`, `dpos` and `dtype` that the forward gathered. All accumulate.

use crate::backend::BackendCore;
use crate::cpu::{ids, rd, wr, Cpu, Real};
use crate::cuda::{suffix, Cuda};
use crate::ops::dropout::dropout_ref;
use crate::ops::layernorm::{layernorm_bwd_ref, layernorm_fwd_ref};
use crate::ops::Launch;
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
    /// out (B,T,C), mean (B,T), rstd (B,T) ← ids (B,T) i32, types (B,T) i32, weights.
    #[allow(clippy::too_many_arguments)]
    fn embeddings_forward(
        &self,
        out: &mut Tensor<Self>,
        mean: &mut Tensor<Self>,
        rstd: &mut Tensor<Self>,
        ids: &Tensor<Self>,
        types: &Tensor<Self>,
        w: &EmbWeights<Self>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()>;

    /// grads (accumulated) ← dout (B,T,C), mean, rstd, ids, types, weights.
    #[allow(clippy::too_many_arguments)]
    fn embeddings_backward(
        &self,
        g: &mut EmbGrads<Self>,
        dout: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        ids: &Tensor<Self>,
        types: &Tensor<Self>,
        w: &EmbWeights<Self>,
        drop: Dropout,
    ) -> Result<()>;
}

/// (B, T, C, V, P, TV) after checking every shape.
fn dims<B: BackendCore>(
    op: &str,
    act: &Tensor<B>,
    mean: &Tensor<B>,
    rstd: &Tensor<B>,
    ids: &Tensor<B>,
    types: &Tensor<B>,
    w: &EmbWeights<B>,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    if act.shape.len() != 3 {
        bail!("{op}: activation must be (B,T,C), found {:?}", act.shape);
    }
    let (b, t, c) = (act.shape[0], act.shape[1], act.shape[2]);
    ids.expect(&format!("{op}: input_ids"), &[b, t])?;
    types.expect(&format!("{op}: token_type_ids"), &[b, t])?;
    ids.expect_dtype(&format!("{op}: input_ids"), &[DType::I32])?;
    types.expect_dtype(&format!("{op}: token_type_ids"), &[DType::I32])?;
    mean.expect(&format!("{op}: mean"), &[b, t])?;
    rstd.expect(&format!("{op}: rstd"), &[b, t])?;
    let v = w.word.shape[0];
    let p = w.pos.shape[0];
    let tv = w.ttype.shape[0];
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
    if t > p {
        bail!("{op}: sequence length {t} exceeds max_position_embeddings {p}");
    }
    Ok((b, t, c, v, p, tv))
}

fn check_ids(op: &str, ids: &[i32], limit: usize, what: &str) -> Result<()> {
    if let Some((i, &bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, &x)| x < 0 || x as usize >= limit)
    {
        bail!("{op}: {what}[{i}] = {bad} is outside 0..{limit}");
    }
    Ok(())
}

/// CPU reference gather: `x[(b,t)] = word[ids] + pos[t] + type[types]`.
pub fn gather_ref<T: Real>(
    x: &mut [T],
    ids: &[i32],
    types: &[i32],
    word: &[T],
    pos: &[T],
    ttype: &[T],
    t: usize,
    c: usize,
) {
    for (r, (&id, &ty)) in ids.iter().zip(types).enumerate() {
        let (id, ty, tt) = (id as usize, ty as usize, r % t);
        for i in 0..c {
            x[r * c + i] = word[id * c + i] + pos[tt * c + i] + ttype[ty * c + i];
        }
    }
}

impl EmbeddingOps for Cpu {
    fn embeddings_forward(
        &self,
        out: &mut Tensor<Cpu>,
        mean: &mut Tensor<Cpu>,
        rstd: &mut Tensor<Cpu>,
        idt: &Tensor<Cpu>,
        tyt: &Tensor<Cpu>,
        w: &EmbWeights<Cpu>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()> {
        let op = "embeddings_forward";
        let (_, t, c, v, _, tv) = dims(op, out, mean, rstd, idt, tyt, w)?;
        let (id, ty) = (ids(idt)?, ids(tyt)?);
        check_ids(op, id, v, "input_ids")?;
        check_ids(op, ty, tv, "token_type_ids")?;
        crate::cpu_compute!(out.dtype, T => {
            let mut x = vec![T::zero(); out.numel()];
            gather_ref(&mut x, id, ty, &rd::<T>(w.word), &rd::<T>(w.pos), &rd::<T>(w.ttype), t, c);
            let mut y = vec![T::zero(); x.len()];
            let (mut m, mut r) = (wr::<T>(mean, false), wr::<T>(rstd, false));
            layernorm_fwd_ref(&mut y, &mut m, &mut r, &x, &rd::<T>(w.gamma), &rd::<T>(w.beta), c, eps as f64);
            dropout_ref(&mut wr::<T>(out, false), &y, drop);
        });
        Ok(())
    }

    fn embeddings_backward(
        &self,
        g: &mut EmbGrads<Cpu>,
        dout: &Tensor<Cpu>,
        mean: &Tensor<Cpu>,
        rstd: &Tensor<Cpu>,
        idt: &Tensor<Cpu>,
        tyt: &Tensor<Cpu>,
        w: &EmbWeights<Cpu>,
        drop: Dropout,
    ) -> Result<()> {
        let op = "embeddings_backward";
        let (_, t, c, v, _, tv) = dims(op, dout, mean, rstd, idt, tyt, w)?;
        let (id, ty) = (ids(idt)?, ids(tyt)?);
        check_ids(op, id, v, "input_ids")?;
        check_ids(op, ty, tv, "token_type_ids")?;
        crate::cpu_compute!(dout.dtype, T => {
            let mut x = vec![T::zero(); dout.numel()];
            gather_ref(&mut x, id, ty, &rd::<T>(w.word), &rd::<T>(w.pos), &rd::<T>(w.ttype), t, c);
            let mut dy = vec![T::zero(); x.len()];
            dropout_ref(&mut dy, &rd::<T>(dout), drop);
            let mut dx = vec![T::zero(); x.len()];
            {
                let (mut dg, mut db) = (wr::<T>(g.gamma, true), wr::<T>(g.beta, true));
                layernorm_bwd_ref(&mut dx, &mut dg, &mut db, &dy, &x, &rd::<T>(mean), &rd::<T>(rstd), &rd::<T>(w.gamma), c);
            }
            let (mut dw, mut dp, mut dt) = (wr::<T>(g.word, true), wr::<T>(g.pos, true), wr::<T>(g.ttype, true));
            for (r, (&i, &y)) in id.iter().zip(ty).enumerate() {
                let skip_word = i == g.padding_idx;
                let (i, y, tt) = (i as usize, y as usize, r % t);
                for k in 0..c {
                    if !skip_word {
                        dw[i * c + k] += dx[r * c + k];
                    }
                    dp[tt * c + k] += dx[r * c + k];
                    dt[y * c + k] += dx[r * c + k];
                }
            }
        });
        Ok(())
    }
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
    pub seed: u64,
    pub n: i32,
    pub t: i32,
    pub c: i32,
    pub v: i32,
    pub tv: i32,
    pub eps: f32,
    pub p: f32,
    pub padding_idx: i32,
}

/// The forward's launch (activations in `dt`): one warp per row, 8 rows per block.
pub fn forward_launch(dt: DType, p: EmbParams) -> Result<Launch<EmbParams>> {
    Ok(Launch {
        module: "embedding",
        name: format!("embeddings_forward_{}", suffix(dt)?),
        grid: (super::blocks(p.n as usize, 8), 1, 1),
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
                grid: (super::blocks(n, 8).min((sm_count.max(1) * 2) as u32), 1, 1),
                block: (256, 1, 1),
                smem: ((2 + tv) * c * 4) as u32,
                params: p,
            });
        }
    }
    Ok(Launch {
        module: "embedding",
        name: format!("embeddings_backward_{sfx}"),
        grid: (super::blocks(n, 8), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}
unsafe impl cudarc::driver::DeviceRepr for EmbParams {}

impl EmbeddingOps for Cuda {
    fn embeddings_forward(
        &self,
        out: &mut Tensor<Cuda>,
        mean: &mut Tensor<Cuda>,
        rstd: &mut Tensor<Cuda>,
        idt: &Tensor<Cuda>,
        tyt: &Tensor<Cuda>,
        w: &EmbWeights<Cuda>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, c, v, _, tv) = dims("embeddings_forward", out, mean, rstd, idt, tyt, w)?;
        for d in [
            w.word.dtype,
            w.pos.dtype,
            w.ttype.dtype,
            w.gamma.dtype,
            w.beta.dtype,
        ] {
            if d != out.dtype {
                bail!(
                    "embeddings_forward: weights ({d}) and output ({}) must share a dtype",
                    out.dtype
                );
            }
        }
        let n = b * t;
        let p = EmbParams {
            out: out.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            ids: idt.buf.ptr,
            types: tyt.buf.ptr,
            word: w.word.buf.ptr,
            pos: w.pos.buf.ptr,
            ttype: w.ttype.buf.ptr,
            gamma: w.gamma.buf.ptr,
            beta: w.beta.buf.ptr,
            dword: 0,
            dpos: 0,
            dttype: 0,
            dgamma: 0,
            dbeta: 0,
            seed: drop.seed,
            n: n as i32,
            t: t as i32,
            c: c as i32,
            v: v as i32,
            tv: tv as i32,
            eps,
            p: drop.p,
            padding_idx: -1,
        };
        self.run(&forward_launch(out.dtype, p)?)
    }

    fn embeddings_backward(
        &self,
        g: &mut EmbGrads<Cuda>,
        dout: &Tensor<Cuda>,
        mean: &Tensor<Cuda>,
        rstd: &Tensor<Cuda>,
        idt: &Tensor<Cuda>,
        tyt: &Tensor<Cuda>,
        w: &EmbWeights<Cuda>,
        drop: Dropout,
    ) -> Result<()> {
        let (b, t, c, v, _, tv) = dims("embeddings_backward", dout, mean, rstd, idt, tyt, w)?;
        for d in [
            g.word.dtype,
            g.pos.dtype,
            g.ttype.dtype,
            g.gamma.dtype,
            g.beta.dtype,
        ] {
            if d != DType::F32 {
                bail!("embeddings_backward: parameter gradients must be f32 on CUDA, found {d}");
            }
        }
        let n = b * t;
        let p = EmbParams {
            out: dout.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            ids: idt.buf.ptr,
            types: tyt.buf.ptr,
            word: w.word.buf.ptr,
            pos: w.pos.buf.ptr,
            ttype: w.ttype.buf.ptr,
            gamma: w.gamma.buf.ptr,
            beta: w.beta.buf.ptr,
            dword: g.word.buf.ptr,
            dpos: g.pos.buf.ptr,
            dttype: g.ttype.buf.ptr,
            dgamma: g.gamma.buf.ptr,
            dbeta: g.beta.buf.ptr,
            seed: drop.seed,
            n: n as i32,
            t: t as i32,
            c: c as i32,
            v: v as i32,
            tv: tv as i32,
            eps: 0.0,
            p: drop.p,
            padding_idx: g.padding_idx,
        };
        self.run(&backward_launch(
            dout.dtype,
            p,
            crate::cuda::vec_kernels(),
            self.sm_count as usize,
        )?)
    }
}

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
