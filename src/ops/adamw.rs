//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW` semantics) as one multi-tensor step, the global
//! gradient norm, and dtype casts.
//!
//! For each parameter element, with `g = grad·grad_scale` (`grad_scale` folds loss-scale removal and
//! gradient clipping into one multiplier) and step `t ≥ 1`:
//! ```text
//! p ← p·(1 − lr·wd)            (only where decay: not biases or LayerNorm weights)
//! m ← β1·m + (1−β1)·g
//! v ← β2·v + (1−β2)·g²
//! p ← p − lr · (m / (1−β1ᵗ)) / (sqrt(v / (1−β2ᵗ)) + eps)
//! working ← round(p)           (the bf16/f16 copy the forward pass uses, when there is one)
//! ```
//! Master weights, moments and gradients are f32 (f64 in the CPU gradient-check world).

use crate::backend::BackendCore;
use crate::cpu::{rd, wr, Cpu, Real};
use crate::cuda::{dtype_code, Cuda};
use crate::ops::Launch;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step number (for bias correction).
    pub step: u64,
    /// Multiplier applied to every gradient before use (1/loss_scale × clip coefficient).
    pub grad_scale: f64,
}

/// One parameter tensor under optimisation.
pub struct AdamWSlot<'a, B: BackendCore> {
    /// The weights being optimised (f32, or f64 on the CPU).
    pub master: &'a mut Tensor<B>,
    /// A lower-precision working copy to refresh after the update, if the model computes in bf16/f16.
    pub working: Option<&'a mut Tensor<B>>,
    pub grad: &'a Tensor<B>,
    pub m: &'a mut Tensor<B>,
    pub v: &'a mut Tensor<B>,
    /// Apply weight decay (false for biases and LayerNorm weights).
    pub decay: bool,
}

pub trait AdamWOps: BackendCore {
    fn adamw_step(&self, slots: &mut [AdamWSlot<Self>], hp: &AdamWHyper) -> Result<()>;
    /// Σ g² over all the tensors (f64 on the host). NaN/inf in any gradient makes the result non-finite.
    fn grad_sq_norm(&self, grads: &[&Tensor<Self>]) -> Result<f64>;
}

fn check<B: BackendCore>(s: &AdamWSlot<B>) -> Result<()> {
    let n = s.master.numel();
    for (what, t) in [("grad", s.grad), ("m", &*s.m), ("v", &*s.v)] {
        if t.numel() != n {
            bail!(
                "adamw_step: {what} {:?} does not match parameter {:?}",
                t.shape,
                s.master.shape
            );
        }
    }
    if let Some(w) = &s.working {
        if w.numel() != n {
            bail!(
                "adamw_step: working copy {:?} does not match parameter {:?}",
                w.shape,
                s.master.shape
            );
        }
    }
    Ok(())
}

/// The per-element update (reference), shared by the CPU backend and the unit tests.
#[allow(clippy::too_many_arguments)]
pub fn adamw_ref<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamWHyper,
    decay: bool,
) {
    let (b1, b2) = (T::of(hp.beta1), T::of(hp.beta2));
    let bc1 = T::one() - T::of(hp.beta1.powi(hp.step as i32));
    let bc2 = T::one() - T::of(hp.beta2.powi(hp.step as i32));
    let lr = T::of(hp.lr);
    let wd = if decay {
        T::of(hp.lr * hp.weight_decay)
    } else {
        T::zero()
    };
    let gs = T::of(hp.grad_scale);
    let eps = T::of(hp.eps);
    for i in 0..p.len() {
        let gi = g[i] * gs;
        p[i] = p[i] - wd * p[i];
        m[i] = b1 * m[i] + (T::one() - b1) * gi;
        v[i] = b2 * v[i] + (T::one() - b2) * gi * gi;
        let mhat = m[i] / bc1;
        let vhat = v[i] / bc2;
        p[i] -= lr * mhat / (vhat.sqrt() + eps);
    }
}

impl AdamWOps for Cpu {
    fn adamw_step(&self, slots: &mut [AdamWSlot<Cpu>], hp: &AdamWHyper) -> Result<()> {
        for s in slots.iter_mut() {
            check(s)?;
            crate::cpu_compute!(s.master.dtype, T => {
                let g = rd::<T>(s.grad);
                let (mut m, mut v) = (wr::<T>(s.m, true), wr::<T>(s.v, true));
                let mut p = wr::<T>(s.master, true);
                adamw_ref(&mut p, &g, &mut m, &mut v, hp, s.decay);
                if let Some(w) = s.working.as_mut() {
                    wr::<T>(w, false).copy_from_slice(&p);
                }
            });
        }
        Ok(())
    }
    fn grad_sq_norm(&self, grads: &[&Tensor<Cpu>]) -> Result<f64> {
        let mut s = 0.0f64;
        for g in grads {
            s += rd::<f64>(g).iter().map(|x| x * x).sum::<f64>();
        }
        Ok(s)
    }
}

/// One tensor of the multi-tensor AdamW / squared-norm kernels (kernels/adamw.cu `AdamWEntry`), in a table
/// in device memory: device addresses (working 0: none), element count, weight decay on/off, the working
/// copy's `dtype_code`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWEntry {
    pub master: u64,
    pub working: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    pub n: u64,
    pub decay: i32,
    pub working_dt: i32,
}

/// kernels/adamw.cu `AdamWParams`: the entry table's device address, the hyperparameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWParams {
    pub table: u64,
    /// grad_sq_norm: the f32 accumulator (zero on entry)
    pub out: u64,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub wd: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub grad_scale: f32,
}

/// A launch of `name` over the tensors of `entries`: blockIdx.y picks the tensor, blocks of 256 threads
/// (each `per_thread` elements of the largest tensor, at most `max_blocks` of them) stride over its elements.
fn table_launch(
    name: &str,
    entries: &[AdamWEntry],
    per_thread: usize,
    max_blocks: u32,
    params: AdamWParams,
) -> Launch<AdamWParams> {
    let maxn = entries.iter().map(|e| e.n as usize).max().unwrap_or(0);
    let gx = super::blocks(maxn, 256 * per_thread).min(max_blocks);
    Launch {
        module: "adamw",
        name: name.into(),
        grid: (gx, entries.len() as u32, 1),
        block: (256, 1, 1),
        smem: 0,
        params,
    }
}

/// The AdamW step's launch over `entries` (uploaded at `table`).
pub fn step_launch(table: u64, entries: &[AdamWEntry], hp: &AdamWHyper) -> Launch<AdamWParams> {
    let p = AdamWParams {
        table,
        out: 0,
        lr: hp.lr as f32,
        beta1: hp.beta1 as f32,
        beta2: hp.beta2 as f32,
        eps: hp.eps as f32,
        wd: (hp.lr * hp.weight_decay) as f32,
        bc1: (1.0 - hp.beta1.powi(hp.step as i32)) as f32,
        bc2: (1.0 - hp.beta2.powi(hp.step as i32)) as f32,
        grad_scale: hp.grad_scale as f32,
    };
    table_launch("adamw_step", entries, 4, 256, p)
}

/// The squared gradient norm's launch over `entries` (uploaded at `table`) into the f32 at `out`.
pub fn sq_norm_launch(table: u64, out: u64, entries: &[AdamWEntry]) -> Launch<AdamWParams> {
    let p = AdamWParams {
        table,
        out,
        ..bytemuck::Zeroable::zeroed()
    };
    table_launch("grad_sq_norm", entries, 8, 128, p)
}
unsafe impl cudarc::driver::DeviceRepr for AdamWParams {}

/// kernels/reduce.cu `CastParams`: device addresses, element count, `dtype_code`s.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CastParams {
    pub dst: u64,
    pub src: u64,
    pub n: u64,
    pub dst_dt: i32,
    pub src_dt: i32,
}

/// The cast kernel's launch: grid-stride over the n elements.
pub fn cast_launch(p: CastParams) -> Launch<CastParams> {
    Launch {
        module: "reduce",
        name: "cast".into(),
        grid: (super::blocks(p.n as usize, 256).min(1 << 16), 1, 1),
        block: (256, 1, 1),
        smem: 0,
        params: p,
    }
}
unsafe impl cudarc::driver::DeviceRepr for CastParams {}

/// Upload a table of entries as i32 words (the arena buffer keeps it alive for the kernel).
fn upload_table(be: &Cuda, entries: &[AdamWEntry]) -> Result<Tensor<Cuda>> {
    let words: &[i32] = bytemuck::cast_slice(entries); // Pod: 6×8 + 2×4 = 56 bytes, no padding
    Tensor::from_i32(be, words, &[words.len()])
}

pub(crate) fn cuda_cast(
    be: &Cuda,
    dst: u64,
    dd: DType,
    src: u64,
    sd: DType,
    n: usize,
) -> Result<()> {
    if !dd.is_float() || !sd.is_float() {
        bail!("cast: only float dtypes ({sd} -> {dd})");
    }
    let p = CastParams {
        dst,
        src,
        n: n as u64,
        dst_dt: dtype_code(dd),
        src_dt: dtype_code(sd),
    };
    be.run(&cast_launch(p))
}

impl AdamWOps for Cuda {
    fn adamw_step(&self, slots: &mut [AdamWSlot<Cuda>], hp: &AdamWHyper) -> Result<()> {
        let mut table = Vec::with_capacity(slots.len());
        for s in slots.iter() {
            check(s)?;
            for t in [&*s.master, s.grad, &*s.m, &*s.v] {
                if t.dtype != DType::F32 {
                    bail!("adamw_step: master weights, gradients and moments must be f32 on CUDA, found {}", t.dtype);
                }
            }
            table.push(AdamWEntry {
                master: s.master.buf.ptr,
                working: s.working.as_ref().map(|w| w.buf.ptr).unwrap_or(0),
                grad: s.grad.buf.ptr,
                m: s.m.buf.ptr,
                v: s.v.buf.ptr,
                n: s.master.numel() as u64,
                decay: s.decay as i32,
                working_dt: s.working.as_ref().map(|w| dtype_code(w.dtype)).unwrap_or(0),
            });
        }
        if table.is_empty() {
            return Ok(());
        }
        let tab = upload_table(self, &table)?;
        self.run(&step_launch(tab.buf.ptr, &table, hp))
    }

    fn grad_sq_norm(&self, grads: &[&Tensor<Cuda>]) -> Result<f64> {
        let mut table = Vec::with_capacity(grads.len());
        for g in grads {
            if g.dtype != DType::F32 {
                bail!(
                    "grad_sq_norm: gradients must be f32 on CUDA, found {}",
                    g.dtype
                );
            }
            table.push(AdamWEntry {
                grad: g.buf.ptr,
                n: g.numel() as u64,
                ..Default::default()
            });
        }
        if table.is_empty() {
            return Ok(0.0);
        }
        let tab = upload_table(self, &table)?;
        let acc = Tensor::<Cuda>::zeros(self, &[1], DType::F32)?;
        self.run(&sq_norm_launch(tab.buf.ptr, acc.buf.ptr, &table))?;
        Ok(acc.to_f64_vec(self)?[0])
    }
}
