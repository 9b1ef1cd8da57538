//! The CPU reference backend: plain loops, f64-capable, the oracle every CUDA kernel is tested against.
//!
//! Storage is one `Vec` per buffer in its own dtype. Each op computes in f64 when its activations are f64
//! (gradient checks) and in f32 otherwise; bf16/f16 buffers are widened to f32 on read and rounded to
//! nearest-even on store, which is exactly the GPU's mixed-precision policy. The only fast path is the GEMM
//! (`matrixmultiply`, threaded); everything else is written to be read.

use crate::backend::BackendCore;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use half::{bf16, f16};
use std::borrow::Cow;
use std::ops::{Deref, DerefMut};

/// The CPU backend. Cheap to construct; holds no state.
#[derive(Clone, Debug, Default)]
pub struct Cpu;

/// One CPU buffer in its storage dtype.
#[derive(Clone, Debug)]
pub enum CpuBuf {
    F64(Vec<f64>),
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
}

impl CpuBuf {
    pub fn len(&self) -> usize {
        match self {
            CpuBuf::F64(v) => v.len(),
            CpuBuf::F32(v) => v.len(),
            CpuBuf::BF16(v) => v.len(),
            CpuBuf::F16(v) => v.len(),
            CpuBuf::I32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn to_vec<T: Real>(&self) -> Vec<T> {
        match self {
            CpuBuf::F64(v) => v.iter().map(|&x| T::of(x)).collect(),
            CpuBuf::F32(v) => v.iter().map(|&x| T::of32(x)).collect(),
            CpuBuf::BF16(v) => v.iter().map(|&x| T::of32(x.to_f32())).collect(),
            CpuBuf::F16(v) => v.iter().map(|&x| T::of32(x.to_f32())).collect(),
            CpuBuf::I32(v) => v.iter().map(|&x| T::of(x as f64)).collect(),
        }
    }
    fn store<T: Real>(&mut self, src: &[T]) {
        match self {
            CpuBuf::F64(v) => v.iter_mut().zip(src).for_each(|(d, s)| *d = s.f64()),
            CpuBuf::F32(v) => v.iter_mut().zip(src).for_each(|(d, s)| *d = s.f32()),
            CpuBuf::BF16(v) => v
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = bf16::from_f32(s.f32())),
            CpuBuf::F16(v) => v
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = f16::from_f32(s.f32())),
            CpuBuf::I32(v) => v.iter_mut().zip(src).for_each(|(d, s)| *d = s.f64() as i32),
        }
    }
}

/// A float type the reference loops compute in: f32 or f64.
pub trait Real:
    num_traits::Float
    + num_traits::NumAssign
    + std::iter::Sum
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::fmt::Display
    + 'static
{
    fn of(x: f64) -> Self;
    fn of32(x: f32) -> Self;
    fn f64(self) -> f64;
    fn f32(self) -> f32;
    fn erf(self) -> Self;
    fn slice(buf: &CpuBuf) -> Option<&[Self]>;
    fn slice_mut(buf: &mut CpuBuf) -> Option<&mut [Self]>;
    /// Row-major `C(m,n) = alpha·A(m,k)·B(k,n) + beta·C` with explicit row/column strides.
    #[allow(clippy::too_many_arguments)]
    fn gemm_strided(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        rsa: isize,
        csa: isize,
        b: &[Self],
        rsb: isize,
        csb: isize,
        beta: Self,
        c: &mut [Self],
    );
}

/// `Real` for f32 and f64: the same code but for the storage variant and the matrixmultiply routine.
macro_rules! impl_real {
    ($t:ty, $variant:ident, $erf:path, $gemm:path) => {
        impl Real for $t {
            fn of(x: f64) -> Self {
                x as $t
            }
            fn of32(x: f32) -> Self {
                x as $t
            }
            fn f64(self) -> f64 {
                self as f64
            }
            fn f32(self) -> f32 {
                self as f32
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            fn slice(buf: &CpuBuf) -> Option<&[Self]> {
                if let CpuBuf::$variant(v) = buf {
                    Some(v)
                } else {
                    None
                }
            }
            fn slice_mut(buf: &mut CpuBuf) -> Option<&mut [Self]> {
                if let CpuBuf::$variant(v) = buf {
                    Some(v)
                } else {
                    None
                }
            }
            fn gemm_strided(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                rsa: isize,
                csa: isize,
                b: &[Self],
                rsb: isize,
                csb: isize,
                beta: Self,
                c: &mut [Self],
            ) {
                assert!(c.len() >= m * n);
                // SAFETY: the caller (`gemm` below) checks every operand's length against its strides.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                }
            }
        }
    };
}

impl_real!(f32, F32, libm::erff, matrixmultiply::sgemm);
impl_real!(f64, F64, libm::erf, matrixmultiply::dgemm);

/// Row-major GEMM on contiguous operands: `C(m,n) = alpha·op(A)·op(B) + beta·C`, where `op(A)` is `(m,k)`
/// and A is stored `(m,k)`, or `(k,m)` when `ta`; `op(B)` is `(k,n)` and B is stored `(k,n)`, or `(n,k)` when
/// `tb`. With `beta == 0`, C's old contents are ignored.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    beta: T,
    c: &mut [T],
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "gemm: operand too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].iter_mut().for_each(|x| {
            *x = if beta == T::zero() {
                T::zero()
            } else {
                *x * beta
            }
        });
        return;
    }
    let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
    T::gemm_strided(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c);
}

/// Round values in place to what storing them in `dtype` would keep (bf16/f16: round to nearest even).
pub fn round_slice<T: Real>(v: &mut [T], dtype: DType) {
    match dtype {
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = T::of32(bf16::from_f32(x.f32()).to_f32())),
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = T::of32(f16::from_f32(x.f32()).to_f32())),
        DType::F32 => v.iter_mut().for_each(|x| *x = T::of32(x.f32())),
        _ => {}
    }
}

/// Read a float tensor as `[T]`, borrowing when the dtype matches and converting otherwise.
pub fn rd<T: Real>(t: &Tensor<Cpu>) -> Cow<'_, [T]> {
    match T::slice(&t.buf) {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(t.buf.to_vec()),
    }
}

/// Read an optional float tensor.
pub fn rd_opt<T: Real>(t: Option<&Tensor<Cpu>>) -> Option<Cow<'_, [T]>> {
    t.map(rd)
}

/// The i32 contents of an integer tensor.
pub fn ids(t: &Tensor<Cpu>) -> Result<&[i32]> {
    match &t.buf {
        CpuBuf::I32(v) => Ok(v),
        _ => bail!("expected an i32 tensor, found {} {:?}", t.dtype, t.shape),
    }
}

/// A writable view of a tensor as `[T]`: borrows when the dtype matches; otherwise works on a converted copy
/// (holding the old values when `load`) and stores it back, rounded, when dropped.
pub enum Out<'a, T: Real> {
    Direct(&'a mut [T]),
    Temp(&'a mut CpuBuf, Vec<T>),
}

pub fn wr<T: Real>(t: &mut Tensor<Cpu>, load: bool) -> Out<'_, T> {
    if T::slice(&t.buf).is_some() {
        Out::Direct(T::slice_mut(&mut t.buf).expect("dtype checked"))
    } else {
        let v = if load {
            t.buf.to_vec()
        } else {
            vec![T::zero(); t.buf.len()]
        };
        Out::Temp(&mut t.buf, v)
    }
}

impl<T: Real> Deref for Out<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Out::Direct(s) => s,
            Out::Temp(_, v) => v,
        }
    }
}

impl<T: Real> DerefMut for Out<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Out::Direct(s) => s,
            Out::Temp(_, v) => v,
        }
    }
}

impl<T: Real> Drop for Out<'_, T> {
    fn drop(&mut self) {
        if let Out::Temp(buf, v) = self {
            buf.store(v);
        }
    }
}

/// Run `$body` with `$T` bound to f64 when `$dtype` is F64, else to f32.
#[macro_export]
macro_rules! cpu_compute {
    ($dtype:expr, $T:ident => $body:block) => {
        if $dtype == $crate::tensor::DType::F64 {
            #[allow(unused_imports)]
            use num_traits::{Float as _, One as _, Zero as _};
            type $T = f64;
            $body
        } else {
            #[allow(unused_imports)]
            use num_traits::{Float as _, One as _, Zero as _};
            type $T = f32;
            $body
        }
    };
}

impl BackendCore for Cpu {
    type Buf = CpuBuf;

    fn name(&self) -> String {
        "cpu".into()
    }
    fn supports(&self, _dtype: DType) -> bool {
        true
    }
    fn alloc(&self, dtype: DType, n: usize) -> Result<CpuBuf> {
        Ok(match dtype {
            DType::F64 => CpuBuf::F64(vec![0.0; n]),
            DType::F32 => CpuBuf::F32(vec![0.0; n]),
            DType::BF16 => CpuBuf::BF16(vec![bf16::ZERO; n]),
            DType::F16 => CpuBuf::F16(vec![f16::ZERO; n]),
            DType::I32 => CpuBuf::I32(vec![0; n]),
        })
    }
    fn upload_f64(&self, buf: &mut CpuBuf, _dtype: DType, data: &[f64]) -> Result<()> {
        if buf.len() != data.len() {
            bail!(
                "upload: buffer has {} elements, data {}",
                buf.len(),
                data.len()
            );
        }
        match buf {
            // Round through f32 like a GPU upload would.
            CpuBuf::BF16(v) => v
                .iter_mut()
                .zip(data)
                .for_each(|(d, &s)| *d = bf16::from_f32(s as f32)),
            CpuBuf::F16(v) => v
                .iter_mut()
                .zip(data)
                .for_each(|(d, &s)| *d = f16::from_f32(s as f32)),
            _ => buf.store(data),
        }
        Ok(())
    }
    fn upload_i32(&self, buf: &mut CpuBuf, data: &[i32]) -> Result<()> {
        match buf {
            CpuBuf::I32(v) if v.len() == data.len() => {
                v.copy_from_slice(data);
                Ok(())
            }
            _ => bail!(
                "upload_i32: buffer is not an i32 buffer of {} elements",
                data.len()
            ),
        }
    }
    fn download_f64(&self, buf: &CpuBuf, _dtype: DType, n: usize) -> Result<Vec<f64>> {
        if buf.len() != n {
            bail!("download: buffer has {} elements, asked for {n}", buf.len());
        }
        Ok(buf.to_vec())
    }
    fn zero(&self, buf: &mut CpuBuf, dtype: DType, n: usize) -> Result<()> {
        *buf = self.alloc(dtype, n)?;
        Ok(())
    }
    fn cast(&self, dst: &mut CpuBuf, _dd: DType, src: &CpuBuf, _sd: DType, n: usize) -> Result<()> {
        if dst.len() != n || src.len() != n {
            bail!("cast: sizes {} and {} (expected {n})", dst.len(), src.len());
        }
        match src {
            CpuBuf::F64(v) => dst.store(v),
            _ => dst.store(&src.to_vec::<f32>()),
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_loops_for_all_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let mut c = vec![1.0; m * n];
                gemm(m, k, n, 2.0, &a, ta, &b, tb, 0.5, &mut c);
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0.0;
                        for p in 0..k {
                            let av = if ta { a[p * m + i] } else { a[i * k + p] };
                            let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                            s += av * bv;
                        }
                        assert!((c[i * n + j] - (2.0 * s + 0.5)).abs() < 1e-12);
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_storage_rounds_on_store() {
        let be = Cpu;
        let t = Tensor::from_f64(&be, &[1.0 + 1.0 / 512.0, 3.0], &[2], DType::BF16).unwrap();
        let v = t.to_f64_vec(&be).unwrap();
        assert_eq!(v, vec![1.0, 3.0]); // 1 + 2^-9 is below bf16's half-ulp at 1 (2^-8): rounds to 1
    }
}
