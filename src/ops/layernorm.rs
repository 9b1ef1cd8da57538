//! Residual add + dropout + LayerNorm, fused: BERT's `LN(resid + dropout(inp))` after each sub-layer.
//!
//! Forward:  `sum = resid + dropout(inp)`, `out = (sum - mean)·rstd·gamma + beta`, rstd = 1/sqrt(var + eps),
//!           biased variance as in torch.nn.LayerNorm. Saves `sum`, `mean`, `rstd`.
//! Backward: `x̂ = (sum - mean)·rstd`, `g = dout·gamma`,
//!           `dsum = rstd·(g - mean(g) - x̂·mean(g·x̂))`, `dgamma += Σ dout·x̂`, `dbeta += Σ dout`,
//!           `dresid = dsum` (overwrite), `dinp = dropout(dsum)` (overwrite, same mask).

use crate::backend::BackendCore;
use crate::cpu::{rd, wr, Cpu, Real};
use crate::cuda::{suffix, Cuda};
use crate::ops::dropout::dropout_ref;
use crate::ops::Launch;
use crate::rng::Dropout;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub trait LayerNormOps: BackendCore {
    /// out (N,C), sum (N,C), mean (N), rstd (N) ← inp (N,C), resid (N,C), gamma (C), beta (C).
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        out: &mut Tensor<Self>,
        sum: &mut Tensor<Self>,
        mean: &mut Tensor<Self>,
        rstd: &mut Tensor<Self>,
        inp: &Tensor<Self>,
        resid: &Tensor<Self>,
        gamma: &Tensor<Self>,
        beta: &Tensor<Self>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()>;

    /// dinp (N,C), dresid (N,C) overwritten; dgamma (C), dbeta (C) accumulated.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_backward(
        &self,
        dinp: &mut Tensor<Self>,
        dresid: &mut Tensor<Self>,
        dgamma: &mut Tensor<Self>,
        dbeta: &mut Tensor<Self>,
        dout: &Tensor<Self>,
        sum: &Tensor<Self>,
        mean: &Tensor<Self>,
        rstd: &Tensor<Self>,
        gamma: &Tensor<Self>,
        drop: Dropout,
    ) -> Result<()>;
}

/// (N, C) from a (…, C) activation, checking the companions.
fn dims<B: BackendCore>(
    op: &str,
    x: &Tensor<B>,
    stats: &[&Tensor<B>],
    same: &[&Tensor<B>],
    vecs: &[&Tensor<B>],
) -> Result<(usize, usize)> {
    let c = *x.shape.last().unwrap_or(&0);
    let n = x.numel() / c.max(1);
    for t in same {
        if t.shape != x.shape {
            bail!("{op}: shapes {:?} and {:?} must match", x.shape, t.shape);
        }
    }
    for t in stats {
        if t.numel() != n {
            bail!(
                "{op}: statistics tensor {:?} must have N={n} elements (activation {:?})",
                t.shape,
                x.shape
            );
        }
    }
    for t in vecs {
        if t.numel() != c {
            bail!(
                "{op}: parameter {:?} must have C={c} elements (activation {:?})",
                t.shape,
                x.shape
            );
        }
    }
    Ok((n, c))
}

/// CPU reference LayerNorm forward over rows of length c.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_fwd_ref<T: Real>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    c: usize,
    eps: f64,
) {
    let n = x.len() / c;
    for r in 0..n {
        let row = &x[r * c..(r + 1) * c];
        let mu = row.iter().copied().sum::<T>() / T::of(c as f64);
        let var = row.iter().map(|&v| (v - mu) * (v - mu)).sum::<T>() / T::of(c as f64);
        let rs = T::one() / (var + T::of(eps)).sqrt();
        for i in 0..c {
            out[r * c + i] = (row[i] - mu) * rs * gamma[i] + beta[i];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/// CPU reference LayerNorm backward: dx overwritten, dgamma/dbeta accumulated.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_bwd_ref<T: Real>(
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    dout: &[T],
    x: &[T],
    mean: &[T],
    rstd: &[T],
    gamma: &[T],
    c: usize,
) {
    let n = x.len() / c;
    for r in 0..n {
        let (mu, rs) = (mean[r], rstd[r]);
        let xhat = |i: usize| (x[r * c + i] - mu) * rs;
        let mut mean_g = T::zero();
        let mut mean_gx = T::zero();
        for i in 0..c {
            let g = dout[r * c + i] * gamma[i];
            mean_g += g;
            mean_gx += g * xhat(i);
        }
        mean_g /= T::of(c as f64);
        mean_gx /= T::of(c as f64);
        for i in 0..c {
            let g = dout[r * c + i] * gamma[i];
            dx[r * c + i] = rs * (g - mean_g - xhat(i) * mean_gx);
            dgamma[i] += dout[r * c + i] * xhat(i);
            dbeta[i] += dout[r * c + i];
        }
    }
}

impl LayerNormOps for Cpu {
    fn residual_layernorm_forward(
        &self,
        out: &mut Tensor<Cpu>,
        sum: &mut Tensor<Cpu>,
        mean: &mut Tensor<Cpu>,
        rstd: &mut Tensor<Cpu>,
        inp: &Tensor<Cpu>,
        resid: &Tensor<Cpu>,
        gamma: &Tensor<Cpu>,
        beta: &Tensor<Cpu>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()> {
        let (_, c) = dims(
            "residual_layernorm_forward",
            inp,
            &[mean, rstd],
            &[resid, out, sum],
            &[gamma, beta],
        )?;
        let sum_dtype = sum.dtype;
        crate::cpu_compute!(out.dtype, T => {
            let (x, r, g, b) = (rd::<T>(inp), rd::<T>(resid), rd::<T>(gamma), rd::<T>(beta));
            let mut dropped = vec![T::zero(); x.len()];
            dropout_ref(&mut dropped, &x, drop);
            let mut s = wr::<T>(sum, false);
            for i in 0..s.len() {
                s[i] = r[i] + dropped[i];
            }
            // Normalise the sum as stored (rounded to its dtype), exactly what backward will read back.
            crate::cpu::round_slice(&mut s, sum_dtype);
            let (mut o, mut m, mut rs) = (wr::<T>(out, false), wr::<T>(mean, false), wr::<T>(rstd, false));
            layernorm_fwd_ref(&mut o, &mut m, &mut rs, &s, &g, &b, c, eps as f64);
        });
        Ok(())
    }

    fn residual_layernorm_backward(
        &self,
        dinp: &mut Tensor<Cpu>,
        dresid: &mut Tensor<Cpu>,
        dgamma: &mut Tensor<Cpu>,
        dbeta: &mut Tensor<Cpu>,
        dout: &Tensor<Cpu>,
        sum: &Tensor<Cpu>,
        mean: &Tensor<Cpu>,
        rstd: &Tensor<Cpu>,
        gamma: &Tensor<Cpu>,
        drop: Dropout,
    ) -> Result<()> {
        let (_, c) = dims(
            "residual_layernorm_backward",
            dout,
            &[mean, rstd],
            &[sum, dinp, dresid],
            &[gamma, dgamma, dbeta],
        )?;
        crate::cpu_compute!(dout.dtype, T => {
            let (dy, x, m, rs, g) = (rd::<T>(dout), rd::<T>(sum), rd::<T>(mean), rd::<T>(rstd), rd::<T>(gamma));
            let mut dsum = vec![T::zero(); x.len()];
            {
                let (mut dg, mut db) = (wr::<T>(dgamma, true), wr::<T>(dbeta, true));
                layernorm_bwd_ref(&mut dsum, &mut dg, &mut db, &dy, &x, &m, &rs, &g, c);
            }
            wr::<T>(dresid, false).copy_from_slice(&dsum);
            let mut di = wr::<T>(dinp, false);
            dropout_ref(&mut di, &dsum, drop);
        });
        Ok(())
    }
}

/// kernels/layernorm.cu `LnFwdParams`: pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LnFwdParams {
    pub out: u64,
    pub sum: u64,
    pub mean: u64,
    pub rstd: u64,
    pub inp: u64,
    pub resid: u64,
    pub gamma: u64,
    pub beta: u64,
    pub seed: u64,
    pub n: i32,
    pub c: i32,
    pub eps: f32,
    pub p: f32,
}
unsafe impl cudarc::driver::DeviceRepr for LnFwdParams {}

/// kernels/layernorm.cu `LnBwdParams`: pointers are device addresses; dgamma/dbeta accumulate.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LnBwdParams {
    pub dinp: u64,
    pub dresid: u64,
    pub dgamma: u64,
    pub dbeta: u64,
    pub dout: u64,
    pub sum: u64,
    pub mean: u64,
    pub rstd: u64,
    pub gamma: u64,
    pub seed: u64,
    pub n: i32,
    pub c: i32,
    pub p: f32,
    pub _pad: i32,
}

/// The forward's launch for `act` activations of N rows × C: one warp per row, 8 rows per block; the vec
/// kernel when `vec` and it applies (`ln_kernel`).
pub fn forward_launch(act: DType, p: LnFwdParams, vec: bool) -> Result<Launch<LnFwdParams>> {
    let (n, c) = (p.n as usize, p.c as usize);
    let ptrs = [p.out, p.sum, p.inp, p.resid, p.gamma, p.beta];
    Ok(Launch {
        module: "layernorm",
        name: ln_kernel("forward", act, c, &ptrs, vec)?,
        grid: (super::blocks(n, 8), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    })
}

/// The backward's launch: grid-stride over rows (at most 2 blocks per SM of `sm_count`); each block reduces
/// dgamma/dbeta in shared memory (2·C floats), then one atomicAdd per column.
pub fn backward_launch(
    act: DType,
    p: LnBwdParams,
    vec: bool,
    sm_count: usize,
) -> Result<Launch<LnBwdParams>> {
    let (n, c) = (p.n as usize, p.c as usize);
    let ptrs = [p.dinp, p.dresid, p.dout, p.sum, p.gamma];
    Ok(Launch {
        module: "layernorm",
        name: ln_kernel("backward", act, c, &ptrs, vec)?,
        grid: (super::blocks(n, 8).min((sm_count.max(1) * 2) as u32), 1, 1),
        block: (256, 1, 1),
        smem: (2 * c * 4) as u32,
        params: p,
    })
}
unsafe impl cudarc::driver::DeviceRepr for LnBwdParams {}

fn cuda_dtypes(op: &str, act: DType, all_act: &[DType], f32s: &[DType]) -> Result<()> {
    for d in all_act {
        if *d != act {
            bail!("{op}: activations must share one dtype ({act}), found {d}");
        }
    }
    for d in f32s {
        if *d != DType::F32 {
            bail!("{op}: statistics and parameter gradients must be f32 on CUDA, found {d}");
        }
    }
    Ok(())
}

/// `residual_layernorm_{dir}_vec{CH}_{dtype}` when `BERTQA_VEC=1` and C splits into 16-byte chunks, CH ≤ 4
/// of them per lane (C ≤ 1024 in bf16/f16, ≤ 512 in f32), else the scalar kernel.
fn ln_kernel(dir: &str, dt: DType, c: usize, ptrs: &[u64], vec: bool) -> Result<String> {
    let sfx = suffix(dt)?;
    if vec {
        if let Some(n) = crate::cuda::vec_width(dt, ptrs) {
            let ch = c.div_ceil(32 * n);
            if c.is_multiple_of(n) && (1..=4).contains(&ch) {
                return Ok(ln_vec_kernel(dir, ch, sfx));
            }
        }
    }
    Ok(format!("residual_layernorm_{dir}_{sfx}"))
}

fn ln_vec_kernel(dir: &str, ch: usize, sfx: &str) -> String {
    format!("residual_layernorm_{dir}_vec{ch}_{sfx}")
}

/// Every vec kernel name the launchers can ask kernels/layernorm.cu for (checked by tests/kernels_compile.rs).
pub fn vec_entry_points() -> Vec<String> {
    let mut v = Vec::new();
    for sfx in ["f32", "bf16", "f16"] {
        for ch in 1..=4 {
            for dir in ["forward", "backward"] {
                v.push(ln_vec_kernel(dir, ch, sfx));
            }
        }
    }
    v
}

impl LayerNormOps for Cuda {
    fn residual_layernorm_forward(
        &self,
        out: &mut Tensor<Cuda>,
        sum: &mut Tensor<Cuda>,
        mean: &mut Tensor<Cuda>,
        rstd: &mut Tensor<Cuda>,
        inp: &Tensor<Cuda>,
        resid: &Tensor<Cuda>,
        gamma: &Tensor<Cuda>,
        beta: &Tensor<Cuda>,
        eps: f32,
        drop: Dropout,
    ) -> Result<()> {
        let op = "residual_layernorm_forward";
        let (n, c) = dims(op, inp, &[mean, rstd], &[resid, out, sum], &[gamma, beta])?;
        cuda_dtypes(
            op,
            out.dtype,
            &[sum.dtype, inp.dtype, resid.dtype, gamma.dtype, beta.dtype],
            &[mean.dtype, rstd.dtype],
        )?;
        let p = LnFwdParams {
            out: out.buf.ptr,
            sum: sum.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            inp: inp.buf.ptr,
            resid: resid.buf.ptr,
            gamma: gamma.buf.ptr,
            beta: beta.buf.ptr,
            seed: drop.seed,
            n: n as i32,
            c: c as i32,
            eps,
            p: drop.p,
        };
        self.run(&forward_launch(out.dtype, p, crate::cuda::vec_kernels())?)
    }

    fn residual_layernorm_backward(
        &self,
        dinp: &mut Tensor<Cuda>,
        dresid: &mut Tensor<Cuda>,
        dgamma: &mut Tensor<Cuda>,
        dbeta: &mut Tensor<Cuda>,
        dout: &Tensor<Cuda>,
        sum: &Tensor<Cuda>,
        mean: &Tensor<Cuda>,
        rstd: &Tensor<Cuda>,
        gamma: &Tensor<Cuda>,
        drop: Dropout,
    ) -> Result<()> {
        let op = "residual_layernorm_backward";
        let (n, c) = dims(
            op,
            dout,
            &[mean, rstd],
            &[sum, dinp, dresid],
            &[gamma, dgamma, dbeta],
        )?;
        cuda_dtypes(
            op,
            dout.dtype,
            &[dinp.dtype, dresid.dtype, sum.dtype, gamma.dtype],
            &[mean.dtype, rstd.dtype, dgamma.dtype, dbeta.dtype],
        )?;
        let p = LnBwdParams {
            dinp: dinp.buf.ptr,
            dresid: dresid.buf.ptr,
            dgamma: dgamma.buf.ptr,
            dbeta: dbeta.buf.ptr,
            dout: dout.buf.ptr,
            sum: sum.buf.ptr,
            mean: mean.buf.ptr,
            rstd: rstd.buf.ptr,
            gamma: gamma.buf.ptr,
            seed: drop.seed,
            n: n as i32,
            c: c as i32,
            p: drop.p,
            _pad: 0,
        };
        self.run(&backward_launch(
            dout.dtype,
            p,
            crate::cuda::vec_kernels(),
            self.sm_count as usize,
        )?)
    }
}
