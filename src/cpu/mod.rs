//! The CPU reference backend: plain loops, f64-capable, the oracle every CUDA kernel is tested against.
//!
//! Storage is one allocation per buffer in its own dtype; tensors are views of it (most own the whole). Each
//! op computes in f64 when its activations are f64 (gradient checks) and in f32 otherwise; bf16/f16 buffers
//! are widened to f32 on read and rounded to nearest-even on store, which is exactly the GPU's mixed-precision
//! policy. The only fast path is the GEMM (`matrixmultiply`, its rows split over the rayon pool); the attention,
//! GELU and AdamW loops also run their independent rows on rayon; everything is written to be read.
//!
//! Views of one allocation may overlap (a flat buffer and its per-tensor views), so reads ([`rd`], [`ids`])
//! and writes ([`wr`]) register the element range they borrow with the allocation, like a `RefCell`: a write
//! overlapping any live borrow of the same allocation, or a read overlapping a live write, panics with both
//! ranges named. Safe code therefore never holds aliasing `&mut` slices, whatever views it made.
//!
//! The backend counts the bytes of its live allocations (and their peak), as the CUDA arena does, so memory
//! plans are testable here.

use crate::backend::{BackendCore, MemStats};
use crate::tensor::{DType, HostScalar, Tensor};
use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Allocation counters of one backend value (clones share them).
#[derive(Debug, Default)]
struct Counters {
    live: AtomicUsize,
    peak: AtomicUsize,
    /// allocations made so far
    made: AtomicUsize,
}

/// The CPU backend. Cheap to construct and to clone (clones share the allocation counters).
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    counters: Arc<Counters>,
    /// [`BackendCore::row_bucket`] (0: 1, exact row counts; tests set it to exercise the filler window)
    row_bucket: usize,
}

impl Cpu {
    pub fn new() -> Self {
        Self::default()
    }
    /// A CPU backend whose packed batches are rounded up to a multiple of `rows` (as a GPU's may be).
    pub fn with_row_bucket(rows: usize) -> Self {
        Cpu {
            row_bucket: rows,
            ..Self::default()
        }
    }
    /// Allocations made so far by this backend (and its clones): tests check that a training step makes
    /// none after the first, which CUDA graphs need of the model and trainer code.
    pub fn allocations(&self) -> usize {
        self.counters.made.load(Ordering::Relaxed)
    }
}

/// One allocation: `bytes` of `dtype` elements, 64-byte aligned, zeroed; the element ranges borrowed now.
struct Store {
    ptr: NonNull<u8>,
    layout: Layout,
    dtype: DType,
    counters: Arc<Counters>,
    borrows: Mutex<Vec<Borrow>>,
}

#[derive(Clone, Copy, Debug)]
struct Borrow {
    id: u64,
    start: usize,
    end: usize,
    write: bool,
}

// SAFETY: the memory is owned by the Store; access to element ranges is serialised by the borrow registry.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        self.counters
            .live
            .fetch_sub(self.layout.size(), Ordering::Relaxed);
        // SAFETY: allocated in `Cpu::alloc` with this layout (non-zero size)
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

static NEXT_BORROW: AtomicU64 = AtomicU64::new(1);

/// A registered borrow of a range of a store; unregistered on drop.
pub struct Guard {
    store: Arc<Store>,
    id: u64,
}

impl Guard {
    fn new(store: &Arc<Store>, start: usize, end: usize, write: bool) -> Guard {
        let id = NEXT_BORROW.fetch_add(1, Ordering::Relaxed);
        let mut b = store.borrows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = b
            .iter()
            .find(|o| o.start < end && start < o.end && (write || o.write))
        {
            let kind = |w: bool| if w { "written" } else { "read" };
            panic!(
                "bug: elements {start}..{end} of a CPU buffer are {} while elements {}..{} of it are {} \
                 (overlapping tensor views used together)",
                kind(write),
                c.start,
                c.end,
                kind(c.write)
            );
        }
        b.push(Borrow {
            id,
            start,
            end,
            write,
        });
        Guard {
            store: store.clone(),
            id,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut b = self.store.borrows.lock().unwrap_or_else(|e| e.into_inner());
        b.retain(|x| x.id != self.id);
    }
}

/// A view of a CPU allocation: elements `off..off + len`.
pub struct CpuBuf {
    store: Arc<Store>,
    off: usize,
    len: usize,
}

impl CpuBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn dtype(&self) -> DType {
        self.store.dtype
    }
    /// The elements as `&[T]` under a registered read (T must be the storage type).
    fn slice<T: HostScalar>(&self) -> (&[T], Guard) {
        assert_eq!(
            T::DTYPE,
            self.dtype(),
            "CPU buffer read with the wrong type"
        );
        let g = Guard::new(&self.store, self.off, self.off + self.len, false);
        // SAFETY: in bounds of the allocation (checked when the view was made), aligned (64-byte allocation,
        // offset in whole elements), and no overlapping write is live (the guard).
        let s = unsafe {
            std::slice::from_raw_parts(self.store.ptr.as_ptr().cast::<T>().add(self.off), self.len)
        };
        (s, g)
    }
    /// The elements as `&mut [T]` under a registered write.
    fn slice_mut<T: HostScalar>(&mut self) -> (&mut [T], Guard) {
        assert_eq!(
            T::DTYPE,
            self.dtype(),
            "CPU buffer written with the wrong type"
        );
        let g = Guard::new(&self.store, self.off, self.off + self.len, true);
        // SAFETY: as in `slice`, and no other borrow of an overlapping range is live (the guard).
        let s = unsafe {
            std::slice::from_raw_parts_mut(
                self.store.ptr.as_ptr().cast::<T>().add(self.off),
                self.len,
            )
        };
        (s, g)
    }
    fn bytes(&self) -> (&[u8], Guard) {
        let sz = self.dtype().size();
        let g = Guard::new(&self.store, self.off, self.off + self.len, false);
        // SAFETY: as in `slice`
        let s = unsafe {
            std::slice::from_raw_parts(self.store.ptr.as_ptr().add(self.off * sz), self.len * sz)
        };
        (s, g)
    }
    fn bytes_mut(&mut self) -> (&mut [u8], Guard) {
        let sz = self.dtype().size();
        let g = Guard::new(&self.store, self.off, self.off + self.len, true);
        // SAFETY: as in `slice_mut`
        let s = unsafe {
            std::slice::from_raw_parts_mut(
                self.store.ptr.as_ptr().add(self.off * sz),
                self.len * sz,
            )
        };
        (s, g)
    }
    /// The elements converted to `T` (any storage dtype).
    fn to_vec<T: Real>(&self) -> Vec<T> {
        match self.dtype() {
            DType::F64 => self.slice::<f64>().0.iter().map(|&x| T::of(x)).collect(),
            DType::F32 => self.slice::<f32>().0.iter().map(|&x| T::of32(x)).collect(),
            DType::BF16 => self
                .slice::<bf16>()
                .0
                .iter()
                .map(|&x| T::of32(x.to_f32()))
                .collect(),
            DType::F16 => self
                .slice::<f16>()
                .0
                .iter()
                .map(|&x| T::of32(x.to_f32()))
                .collect(),
            DType::I32 => self
                .slice::<i32>()
                .0
                .iter()
                .map(|&x| T::of(x as f64))
                .collect(),
        }
    }
    /// Store `src` converted (rounded) to the storage dtype.
    fn store<T: Real>(&mut self, src: &[T]) {
        match self.dtype() {
            DType::F64 => self
                .slice_mut::<f64>()
                .0
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = s.f64()),
            DType::F32 => self
                .slice_mut::<f32>()
                .0
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = s.f32()),
            DType::BF16 => self
                .slice_mut::<bf16>()
                .0
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = bf16::from_f32(s.f32())),
            DType::F16 => self
                .slice_mut::<f16>()
                .0
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = f16::from_f32(s.f32())),
            DType::I32 => self
                .slice_mut::<i32>()
                .0
                .iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = s.f64() as i32),
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
    + HostScalar
    + 'static
{
    fn of(x: f64) -> Self;
    fn of32(x: f32) -> Self;
    fn f64(self) -> f64;
    fn f32(self) -> f32;
    fn erf(self) -> Self;
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

/// `Real` for f32 and f64: the same code but for the matrixmultiply routine.
macro_rules! impl_real {
    ($t:ty, $erf:path, $gemm:path) => {
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

impl_real!(f32, libm::erff, matrixmultiply::sgemm);
impl_real!(f64, libm::erf, matrixmultiply::dgemm);

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
    // matrixmultiply runs single-threaded (its `threading` feature is off): a large product is split here
    // into row blocks of C on the rayon pool, and a product called from inside a rayon task (the attention's
    // per-head products) stays on its thread — one pool, no second one competing for the cores. The split
    // does not change the result, whatever the number of threads (see the block size below).
    let threads = rayon::current_num_threads();
    if threads > 1
        && rayon::current_thread_index().is_none()
        && m * k * n >= PAR_GEMM_WORK
        && m >= 2
    {
        // blocks start at multiples of 16 rows: matrixmultiply computes a partial tile of rows (fewer than its
        // kernel's MR, at most 16) by another path whose last bits differ, so only a split at whole tiles
        // leaves every element as the unsplit product computes it (tested below)
        let rows = m.div_ceil(threads).next_multiple_of(16);
        c[..m * n]
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(blk, cb)| {
                let i0 = blk * rows;
                let a0 = if ta { i0 } else { i0 * k };
                T::gemm_strided(
                    cb.len() / n,
                    k,
                    n,
                    alpha,
                    &a[a0..],
                    rsa,
                    csa,
                    b,
                    rsb,
                    csb,
                    beta,
                    cb,
                );
            });
        return;
    }
    T::gemm_strided(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c);
}

/// Multiply-adds from which [`gemm`] splits a product across the rayon threads (below it one thread is faster).
const PAR_GEMM_WORK: usize = 1 << 18;

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

/// A tensor read as `[T]`: borrowed (under a registered read) when the dtype is `T`, else a converted copy.
pub enum In<'a, T> {
    Borrowed(&'a [T], #[allow(dead_code)] Guard),
    Owned(Vec<T>),
}

impl<T> Deref for In<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            In::Borrowed(s, _) => s,
            In::Owned(v) => v,
        }
    }
}

/// Read a float tensor as `[T]`, borrowing when the dtype matches and converting otherwise.
pub fn rd<T: Real>(t: &Tensor<Cpu>) -> In<'_, T> {
    if t.buf.dtype() == T::DTYPE {
        let (s, g) = t.buf.slice::<T>();
        In::Borrowed(s, g)
    } else {
        In::Owned(t.buf.to_vec())
    }
}

/// The i32 contents of an integer tensor.
pub fn ids(t: &Tensor<Cpu>) -> Result<In<'_, i32>> {
    if t.buf.dtype() != DType::I32 {
        bail!(
            "expected an i32 tensor, found {} {:?}",
            t.dtype(),
            t.shape()
        );
    }
    let (s, g) = t.buf.slice::<i32>();
    Ok(In::Borrowed(s, g))
}

/// A writable view of a tensor as `[T]`: borrows when the dtype matches; otherwise works on a converted copy
/// (holding the old values when `load`) and stores it back, rounded, when dropped. Registered as a write.
pub enum Out<'a, T: Real> {
    Direct(&'a mut [T], #[allow(dead_code)] Guard),
    Temp(&'a mut CpuBuf, Vec<T>, Option<Guard>),
}

pub fn wr<T: Real>(t: &mut Tensor<Cpu>, load: bool) -> Out<'_, T> {
    if t.buf.dtype() == T::DTYPE {
        let (s, g) = t.buf.slice_mut::<T>();
        Out::Direct(s, g)
    } else {
        let v = if load {
            t.buf.to_vec()
        } else {
            vec![T::zero(); t.buf.len()]
        };
        // the range is registered as written while the copy lives: nothing may read it meanwhile
        let g = Guard::new(&t.buf.store, t.buf.off, t.buf.off + t.buf.len, true);
        Out::Temp(&mut t.buf, v, Some(g))
    }
}

impl<T: Real> Deref for Out<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Out::Direct(s, _) => s,
            Out::Temp(_, v, _) => v,
        }
    }
}

impl<T: Real> DerefMut for Out<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Out::Direct(s, _) => s,
            Out::Temp(_, v, _) => v,
        }
    }
}

impl<T: Real> Drop for Out<'_, T> {
    fn drop(&mut self) {
        if let Out::Temp(buf, v, g) = self {
            drop(g.take()); // `store` registers its own write
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

fn check_len(what: &str, buf: &CpuBuf, dtype: DType, bytes: usize) -> Result<()> {
    if buf.dtype() != dtype {
        bail!("{what}: buffer holds {}, not {dtype}", buf.dtype());
    }
    if buf.len * dtype.size() != bytes {
        bail!(
            "{what}: buffer has {} {dtype} elements ({} bytes), data {bytes} bytes",
            buf.len,
            buf.len * dtype.size()
        );
    }
    Ok(())
}

impl BackendCore for Cpu {
    type Buf = CpuBuf;
    type Graph = ();

    /// The CPU runs every op as it is called: there is nothing to record ([`BackendCore::graphs_on`] is
    /// false, so the trainer never asks).
    fn capture(&self, _f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        bail!("the CPU backend records no graphs (graphs_on is false)")
    }
    fn replay(&self, _g: &()) -> Result<()> {
        bail!("the CPU backend records no graphs (graphs_on is false)")
    }

    fn name(&self) -> String {
        "cpu".into()
    }
    fn supports(&self, _dtype: DType) -> bool {
        true
    }
    fn alloc(&self, dtype: DType, n: usize) -> Result<CpuBuf> {
        let bytes = (n * dtype.size()).max(1);
        let layout = Layout::from_size_align(bytes, 64)
            .map_err(|e| anyhow::anyhow!("CPU allocation of {bytes} bytes: {e}"))?;
        // SAFETY: non-zero size
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or_else(|| {
            anyhow::anyhow!(
                "out of memory allocating {:.1} MiB on the CPU",
                bytes as f64 / 1048576.0
            )
        })?;
        let live = self.counters.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.counters.peak.fetch_max(live, Ordering::Relaxed);
        self.counters.made.fetch_add(1, Ordering::Relaxed);
        Ok(CpuBuf {
            store: Arc::new(Store {
                ptr,
                layout,
                dtype,
                counters: self.counters.clone(),
                borrows: Mutex::new(Vec::new()),
            }),
            off: 0,
            len: n,
        })
    }
    fn view(&self, buf: &CpuBuf, dtype: DType, offset: usize, n: usize) -> Result<CpuBuf> {
        if buf.dtype() != dtype || offset + n > buf.len {
            bail!(
                "view of {n} {dtype} elements at {offset} in a buffer of {} {}",
                buf.len,
                buf.dtype()
            );
        }
        Ok(CpuBuf {
            store: buf.store.clone(),
            off: buf.off + offset,
            len: n,
        })
    }
    fn upload(&self, buf: &mut CpuBuf, dtype: DType, bytes: &[u8]) -> Result<()> {
        check_len("upload", buf, dtype, bytes.len())?;
        buf.bytes_mut().0.copy_from_slice(bytes);
        Ok(())
    }
    fn download(&self, buf: &CpuBuf, dtype: DType, out: &mut [u8]) -> Result<()> {
        check_len("download", buf, dtype, out.len())?;
        out.copy_from_slice(buf.bytes().0);
        Ok(())
    }
    fn zero(&self, buf: &mut CpuBuf, dtype: DType, n: usize) -> Result<()> {
        check_len("zero", buf, dtype, n * dtype.size())?;
        buf.bytes_mut().0.fill(0);
        Ok(())
    }
    fn cast(&self, dst: &mut CpuBuf, dd: DType, src: &CpuBuf, sd: DType, n: usize) -> Result<()> {
        if dst.len != n || src.len != n || dst.dtype() != dd || src.dtype() != sd {
            bail!(
                "cast: {} {} and {} {} (expected {n} each)",
                dst.len,
                dst.dtype(),
                src.len,
                src.dtype()
            );
        }
        if !dd.is_float() || !sd.is_float() {
            bail!("cast: only float dtypes ({sd} -> {dd})");
        }
        if sd == DType::F64 {
            let v = src.to_vec::<f64>();
            dst.store(&v);
        } else {
            let v = src.to_vec::<f32>();
            dst.store(&v);
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn memory_stats(&self) -> MemStats {
        MemStats {
            live_bytes: self.counters.live.load(Ordering::Relaxed),
            peak_bytes: self.counters.peak.load(Ordering::Relaxed),
        }
    }
    fn reset_peak(&self) {
        let live = self.counters.live.load(Ordering::Relaxed);
        self.counters.peak.store(live, Ordering::Relaxed);
    }
    fn row_bucket(&self) -> usize {
        self.row_bucket.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gemm` splits large products across the rayon threads; the result must be bit for bit the unsplit
    /// product's (else the CPU results would depend on the machine's core count: an exact resume elsewhere
    /// would diverge). Shapes with partial row tiles, both transposes, β = 0, 1 and ½, f32 and f64.
    #[test]
    fn the_threaded_gemm_equals_one_call_bit_for_bit() {
        fn case<T: Real>(m: usize, k: usize, n: usize, ta: bool, tb: bool, beta: f64) -> usize {
            let val = |i: usize, f: f64| T::of(((i * 7919 % 1009) as f64 * f).sin());
            let a: Vec<T> = (0..m * k).map(|i| val(i, 0.0137)).collect();
            let b: Vec<T> = (0..k * n).map(|i| val(i, 0.091)).collect();
            let c0: Vec<T> = (0..m * n).map(|i| val(i, 0.3)).collect();
            let mut split = c0.clone();
            gemm(m, k, n, T::of(0.7), &a, ta, &b, tb, T::of(beta), &mut split);
            let mut one = c0;
            let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
            let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
            T::gemm_strided(
                m,
                k,
                n,
                T::of(0.7),
                &a,
                rsa,
                csa,
                &b,
                rsb,
                csb,
                T::of(beta),
                &mut one,
            );
            split
                .iter()
                .zip(&one)
                .filter(|(x, y)| x.f64().to_bits() != y.f64().to_bits())
                .count()
        }
        if rayon::current_num_threads() < 2 {
            crate::say!("SKIPPED: one rayon thread, so gemm never splits");
            return;
        }
        let mut bad = vec![];
        for (m, k, n) in [
            (77, 300, 129),
            (401, 768, 64),
            (200, 300, 129),
            (129, 512, 70),
            (1000, 1, 300),
        ] {
            assert!(m * k * n >= PAR_GEMM_WORK, "({m},{k},{n}) is not split");
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for beta in [0.0, 1.0, 0.5] {
                    for (dt, d) in [
                        ("f32", case::<f32>(m, k, n, ta, tb, beta)),
                        ("f64", case::<f64>(m, k, n, ta, tb, beta)),
                    ] {
                        if d > 0 {
                            bad.push(format!(
                                "{dt} ({m},{k},{n}) ta={ta} tb={tb} β={beta}: {d} elements differ"
                            ));
                        }
                    }
                }
            }
        }
        assert!(bad.is_empty(), "{bad:#?}");
    }

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
        let be = Cpu::new();
        let t = Tensor::from_f64(&be, &[1.0 + 1.0 / 512.0, 3.0], &[2], DType::BF16).unwrap();
        let v = t.to_f64_vec(&be).unwrap();
        assert_eq!(v, vec![1.0, 3.0]); // 1 + 2^-9 is below bf16's half-ulp at 1 (2^-8): rounds to 1
    }

    #[test]
    fn views_share_memory_and_overlapping_writes_are_caught() {
        let be = Cpu::new();
        let whole = Tensor::from_f64(&be, &[1.0, 2.0, 3.0, 4.0, 5.0], &[5], DType::F32).unwrap();
        let mut a = whole.view(&be, 1, &[2]).unwrap();
        let b = whole.view(&be, 3, &[2]).unwrap();
        wr::<f32>(&mut a, true).iter_mut().for_each(|x| *x *= 10.0);
        assert_eq!(
            whole.to_f64_vec(&be).unwrap(),
            vec![1.0, 20.0, 30.0, 4.0, 5.0]
        );
        // disjoint views: a write of one while the other is read is fine
        {
            let rb = rd::<f32>(&b);
            let mut wa = wr::<f32>(&mut a, false);
            wa[0] = rb[0];
        }
        assert_eq!(whole.to_f64_vec(&be).unwrap()[1], 4.0);
        // overlapping: reading the whole while a part is written is a bug, reported
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _w = wr::<f32>(&mut a, false);
            let _r = rd::<f32>(&whole);
        }));
        let msg = r
            .unwrap_err()
            .downcast::<String>()
            .map(|s| *s)
            .unwrap_or_default();
        assert!(msg.contains("overlapping tensor views"), "{msg}");
        // the registry is clean again after the panic unwound the guards
        let _r = rd::<f32>(&whole);
        assert!(whole.view(&be, 4, &[2]).is_err());
    }

    #[test]
    fn allocations_are_counted() {
        let be = Cpu::new();
        let a = Tensor::<Cpu>::zeros(&be, &[256], DType::F32).unwrap();
        assert_eq!(be.memory_stats().live_bytes, 1024);
        let v = a.view(&be, 0, &[128]).unwrap(); // a view allocates nothing
        assert_eq!(be.memory_stats().live_bytes, 1024);
        drop(a);
        assert_eq!(be.memory_stats().live_bytes, 1024); // the view keeps the allocation alive
        drop(v);
        assert_eq!(be.memory_stats().live_bytes, 0);
        assert_eq!(be.memory_stats().peak_bytes, 1024);
        // one allocation made, the view none; clones share the count
        assert_eq!(be.allocations(), 1);
        let _b = Tensor::<Cpu>::zeros(&be.clone(), &[4], DType::F32).unwrap();
        assert_eq!(be.allocations(), 2);
    }
}
