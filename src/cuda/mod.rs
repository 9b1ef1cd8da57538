//! The CUDA backend: a context and one stream, a caching arena (a training step allocates nothing after the
//! first), NVRTC-compiled kernels (kernels/*.cu, see [`nvrtc`]) and cuBLAS for every GEMM.
//!
//! cudarc loads libcuda/libcublas/libnvrtc at run time, so this module always compiles; [`Cuda::new`] probes
//! for the driver first (cudarc panics when a library is missing) and returns a clear error instead.
//! Kernel launchers live next to their CPU reference in `src/ops/<op>.rs`; each kernel takes one `#[repr(C)]`
//! parameter struct mirrored in its .cu file.

pub mod lt;
pub mod nvrtc;

use crate::backend::BackendCore;
use crate::tensor::{DType, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::{sys as bsys, CudaBlas};
use cudarc::driver::{
    result as dres, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr,
};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Caching allocator: freed blocks go to a free list keyed by their rounded size and are handed out again.
pub struct Arena {
    free: Mutex<HashMap<usize, Vec<CudaSlice<u8>>>>,
    pub live_bytes: AtomicUsize,
    pub peak_bytes: AtomicUsize,
    pub cuda_mallocs: AtomicUsize,
}

/// A device buffer (raw pointer plus the allocation that owns it, returned to the arena on drop).
pub struct CudaBuf {
    pub ptr: u64,
    pub bytes: usize,
    slice: Option<CudaSlice<u8>>,
    arena: Arc<Arena>,
}

impl Drop for CudaBuf {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.arena.live_bytes.fetch_sub(s.len(), Ordering::Relaxed);
            if let Ok(mut f) = self.arena.free.lock() {
                f.entry(s.len()).or_default().push(s);
            }
        }
    }
}

pub struct Cuda {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    blas: CudaBlas,
    pub arena: Arc<Arena>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<String, CudaFunction>>,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub device_name: String,
    pub sm_count: i32,
    /// Allow TF32 tensor cores in f32 GEMMs (off by default: the parity path).
    pub tf32: bool,
    /// cuBLASLt (every bf16/f16 GEMM, bias epilogues), created on first use when [`gemm_lt`].
    lt: std::sync::OnceLock<std::result::Result<lt::Lt, String>>,
    /// While profiling ([`Cuda::set_profiling`]; `cargo bench` does it for a few training steps): a pair of
    /// CUDA events around every kernel launch and GEMM, read by [`Cuda::profile_report`].
    profile: Mutex<Option<Vec<ProfileEntry>>>,
}

type ProfileEntry = (String, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent);

/// Whether the CUDA driver library can be loaded at all (cudarc panics instead of returning an error).
pub fn driver_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

impl Cuda {
    /// Open GPU `ordinal`. Fails with an actionable message when there is no driver or no device.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            bail!("no CUDA driver found (libcuda.so could not be loaded): run on a machine with an NVIDIA GPU, or use --device cpu");
        }
        let cublas_ok =
            std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() })
                .unwrap_or(false);
        if !cublas_ok {
            bail!("libcublas.so (CUDA 13) could not be loaded: install cuBLAS or add it to LD_LIBRARY_PATH, or use --device cpu");
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| {
                anyhow!("the CUDA driver panicked while opening device {ordinal}; use --device cpu")
            })?
            .map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e:?}; use --device cpu"))?;
        // One stream, so cudarc's cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS init failed: {e:?}"))?;
        let cc = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(0);
        Ok(Cuda {
            ctx,
            stream,
            blas,
            arena: Arc::new(Arena {
                free: Mutex::new(HashMap::new()),
                live_bytes: AtomicUsize::new(0),
                peak_bytes: AtomicUsize::new(0),
                cuda_mallocs: AtomicUsize::new(0),
            }),
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            cc,
            device_name,
            sm_count,
            tf32: false,
            lt: std::sync::OnceLock::new(),
            profile: Mutex::new(None),
        })
    }

    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// A kernel from module `module` (`kernels/<module>.cu`), compiled on first use.
    pub fn func(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let key = format!("{module}::{name}");
        if let Some(f) = self.funcs.lock().unwrap().get(&key) {
            return Ok(f.clone());
        }
        let m = {
            let mut mods = self.modules.lock().unwrap();
            if let Some(m) = mods.get(module) {
                m.clone()
            } else {
                let ptx = nvrtc::cached_ptx(module, &self.arch())?;
                let m = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(|e| {
                        anyhow!("loading kernels/{module}.cu for {}: {e:?}", self.arch())
                    })?;
                mods.insert(module, m.clone());
                m
            }
        };
        let f = m
            .load_function(name)
            .map_err(|e| anyhow!("kernel {name} not found in kernels/{module}.cu: {e:?}"))?;
        self.funcs.lock().unwrap().insert(key, f.clone());
        Ok(f)
    }

    /// Turn the per-kernel profiler on (clearing what it holds) or off.
    pub fn set_profiling(&self, on: bool) {
        if let Ok(mut p) = self.profile.lock() {
            *p = on.then(Vec::new);
        }
    }

    /// While profiling, run `f` (one kernel or GEMM) between two timing events filed under `name`; otherwise
    /// just run it.
    pub(crate) fn profiled(
        &self,
        name: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let on = self.profile.lock().map(|p| p.is_some()).unwrap_or(false);
        if !on {
            return f();
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = || {
            self.ctx
                .new_event(flags)
                .map_err(|e| anyhow!("profiler: event: {e:?}"))
        };
        let (start, stop) = (ev()?, ev()?);
        start
            .record(&self.stream)
            .map_err(|e| anyhow!("profiler: {e:?}"))?;
        f()?;
        stop.record(&self.stream)
            .map_err(|e| anyhow!("profiler: {e:?}"))?;
        if let Ok(mut p) = self.profile.lock() {
            if let Some(v) = p.as_mut() {
                v.push((name(), start, stop));
            }
        }
        Ok(())
    }

    /// While profiling: the GPU time of every kernel and GEMM run since profiling began or the last report,
    /// summed by name, largest first, per `per` repetitions (e.g. training steps), as a table; the events are
    /// cleared. None when not profiling.
    pub fn profile_report(&self, per: usize) -> Result<Option<String>> {
        let events = match self.profile.lock() {
            Ok(mut p) => match p.as_mut() {
                Some(v) => std::mem::take(v),
                None => return Ok(None),
            },
            Err(_) => bail!("profiler lock poisoned"),
        };
        self.sync()?;
        let mut by: HashMap<String, (usize, f64)> = HashMap::new();
        for (name, a, b) in &events {
            let ms = a.elapsed_ms(b).map_err(|e| anyhow!("profiler: {e:?}"))? as f64;
            let e = by.entry(name.clone()).or_default();
            e.0 += 1;
            e.1 += ms;
        }
        let total: f64 = by.values().map(|v| v.1).sum();
        let mut rows: Vec<_> = by.into_iter().collect();
        rows.sort_by(|x, y| y.1 .1.total_cmp(&x.1 .1));
        let per = per.max(1) as f64;
        let mut out = format!(
            "{:<66} {:>7} {:>10} {:>6}\n",
            "kernel or GEMM (per repetition)", "calls", "ms", "%"
        );
        for (name, (n, ms)) in rows {
            out += &format!(
                "{name:<66} {:>7.1} {:>10.3} {:>5.1}%\n",
                n as f64 / per,
                ms / per,
                100.0 * ms / total.max(1e-12)
            );
        }
        out += &format!(
            "{:<66} {:>7} {:>10.3}\n",
            "sum of kernel times",
            "",
            total / per
        );
        Ok(Some(out))
    }

    /// Run one launch description (src/ops/mod.rs `Launch`).
    pub fn run<P: DeviceRepr + Copy>(&self, l: &crate::ops::Launch<P>) -> Result<()> {
        self.launch(l.module, &l.name, l.grid, l.block, l.smem, l.params)
    }

    /// Launch `module::name` with one parameter struct. `what` names the op in errors.
    pub fn launch<P: DeviceRepr>(
        &self,
        module: &'static str,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: P,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.func(module, name)?;
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| anyhow!("{name}: cannot raise shared memory to {smem} bytes: {e:?}"))?;
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        self.profiled(
            || name.to_string(),
            || {
                let mut b = self.stream.launch_builder(&f);
                b.arg(&params);
                unsafe { b.launch(cfg) }.map_err(|e| {
                    anyhow!(
                        "launch of {name} (grid {grid:?}, block {block:?}, smem {smem}) failed: {e:?}"
                    )
                })?;
                Ok(())
            },
        )?;
        if std::env::var_os("BERTQA_SYNC_LAUNCH").is_some() {
            self.stream
                .synchronize()
                .map_err(|e| anyhow!("kernel {name} failed: {e:?}"))?;
        }
        Ok(())
    }

    /// Row-major GEMM through cuBLAS: `C(m,n) = alpha·op(A)(m,k)·op(B)(k,n) + beta·C`, A stored (m,k) or (k,m)
    /// when `ta`, B stored (k,n) or (n,k) when `tb` — the same contract as [`crate::cpu::gemm`].
    /// A and B share a dtype (f32 or bf16/f16); C is that dtype or f32; accumulation is f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: &Tensor<Cuda>,
        ta: bool,
        b: &Tensor<Cuda>,
        tb: bool,
        beta: f32,
        c: &mut Tensor<Cuda>,
    ) -> Result<()> {
        self.gemm_ptr(
            m, k, n, alpha, a.buf.ptr, a.dtype, ta, b.buf.ptr, b.dtype, tb, beta, c.buf.ptr,
            c.dtype,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn gemm_ptr(
        &self,
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: u64,
        adt: DType,
        ta: bool,
        b: u64,
        bdt: DType,
        tb: bool,
        beta: f32,
        c: u64,
        cdt: DType,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if adt != bdt {
            bail!("gemm: A is {adt} but B is {bdt}");
        }
        let g = lt::Gemm {
            m,
            k,
            n,
            ta,
            tb,
            ab: adt,
            c: cdt,
            bias: false,
        };
        self.profiled(
            || gemm_label(&g),
            || self.gemm_run(&g, alpha, a, b, beta, c),
        )
    }

    /// `g` through cuBLASLt when it is on and has an algorithm, else through cublasGemmEx.
    fn gemm_run(&self, g: &lt::Gemm, alpha: f32, a: u64, b: u64, beta: f32, c: u64) -> Result<()> {
        let &lt::Gemm {
            m,
            k,
            n,
            ta,
            tb,
            ab: adt,
            c: cdt,
            ..
        } = g;
        if let Some(lt) = self.lt()? {
            // SAFETY: the caller's contract (device buffers of this context holding these shapes)
            if unsafe { lt.gemm(&self.stream, g, alpha, a, b, beta, c, 0)? } {
                return Ok(());
            }
        }
        let dt = |d: DType| -> Result<bsys::cudaDataType_t> {
            Ok(match d {
                DType::F32 => bsys::cudaDataType_t::CUDA_R_32F,
                DType::BF16 => bsys::cudaDataType_t::CUDA_R_16BF,
                DType::F16 => bsys::cudaDataType_t::CUDA_R_16F,
                _ => bail!("gemm: dtype {d} not supported on CUDA"),
            })
        };
        let compute = if adt == DType::F32 && self.tf32 {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands.
        // Column-major view: B stored (k,n) row-major is a (n,k) column-major matrix with ld n.
        let (opb, ldb) = if tb {
            (bsys::cublasOperation_t::CUBLAS_OP_T, k)
        } else {
            (bsys::cublasOperation_t::CUBLAS_OP_N, n)
        };
        let (opa, lda) = if ta {
            (bsys::cublasOperation_t::CUBLAS_OP_T, m)
        } else {
            (bsys::cublasOperation_t::CUBLAS_OP_N, k)
        };
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                opb,
                opa,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b as *const _,
                dt(adt)?,
                ldb as i32,
                a as *const _,
                dt(adt)?,
                lda as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                dt(cdt)?,
                n as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            anyhow!(
                "cublasGemmEx (m={m}, k={k}, n={n}, {adt}->{cdt}, ta={ta}, tb={tb}) failed: {e:?}"
            )
        })
    }

    /// cuBLASLt when [`gemm_lt`] (bf16/f16 GEMMs then run through it with timed algorithm choice, and the
    /// linear layers' forward adds the bias in the GEMM's epilogue: [`lt`]), else None. An error when it is on
    /// and cannot be set up.
    pub fn lt(&self) -> Result<Option<&lt::Lt>> {
        if !gemm_lt() {
            return Ok(None);
        }
        match self
            .lt
            .get_or_init(|| lt::Lt::new(&self.stream, self.cc.0).map_err(|e| format!("{e:#}")))
        {
            Ok(l) => Ok(Some(l)),
            Err(e) => bail!("cuBLASLt (BERTQA_GEMM=ex turns it off): {e}"),
        }
    }

    /// Wait for the stream; an error here usually means an earlier kernel faulted.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            anyhow!("CUDA stream synchronize failed (an earlier kernel faulted?): {e:?}")
        })
    }
}

fn bytes_of(dtype: DType, n: usize) -> usize {
    dtype.size() * n
}

impl BackendCore for Cuda {
    type Buf = CudaBuf;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, {})",
            self.ctx.ordinal(),
            self.device_name,
            self.arch()
        )
    }
    fn supports(&self, dtype: DType) -> bool {
        dtype != DType::F64
    }
    fn alloc(&self, dtype: DType, n: usize) -> Result<CudaBuf> {
        if dtype == DType::F64 {
            bail!("f64 tensors exist on the CPU backend only");
        }
        let bytes = bytes_of(dtype, n).max(1).div_ceil(256) * 256;
        let reused = self
            .arena
            .free
            .lock()
            .unwrap()
            .get_mut(&bytes)
            .and_then(|v| v.pop());
        let slice = match reused {
            Some(s) => s,
            None => {
                self.arena.cuda_mallocs.fetch_add(1, Ordering::Relaxed);
                unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| {
                    let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
                    anyhow!(
                        "out of GPU memory allocating {:.1} MiB ({:.1} of {:.1} GiB free): try a smaller --batch-size \
                         with --grad-accum-steps, or a shorter --max-seq-length ({e:?})",
                        bytes as f64 / 1048576.0,
                        free as f64 / 1073741824.0,
                        total as f64 / 1073741824.0
                    )
                })?
            }
        };
        let live = self.arena.live_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.arena.peak_bytes.fetch_max(live, Ordering::Relaxed);
        use cudarc::driver::DevicePtr;
        let ptr = slice.device_ptr(&self.stream).0;
        unsafe { dres::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("memset: {e:?}"))?;
        Ok(CudaBuf {
            ptr,
            bytes,
            slice: Some(slice),
            arena: self.arena.clone(),
        })
    }
    fn upload_f64(&self, buf: &mut CudaBuf, dtype: DType, data: &[f64]) -> Result<()> {
        let n = data.len();
        if bytes_of(dtype, n) > buf.bytes {
            bail!(
                "upload: {n} {dtype} values do not fit a {}-byte buffer",
                buf.bytes
            );
        }
        let st = self.stream.cu_stream();
        unsafe {
            match dtype {
                DType::F32 => {
                    let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
                    dres::memcpy_htod_async(buf.ptr, &v, st)
                }
                DType::BF16 => {
                    let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x as f32)).collect();
                    dres::memcpy_htod_async(buf.ptr, &v, st)
                }
                DType::F16 => {
                    let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x as f32)).collect();
                    dres::memcpy_htod_async(buf.ptr, &v, st)
                }
                DType::I32 => {
                    let v: Vec<i32> = data.iter().map(|&x| x as i32).collect();
                    dres::memcpy_htod_async(buf.ptr, &v, st)
                }
                DType::F64 => bail!("f64 is CPU-only"),
            }
        }
        .map_err(|e| anyhow!("host-to-device copy failed: {e:?}"))?;
        self.sync()
    }
    fn upload_i32(&self, buf: &mut CudaBuf, data: &[i32]) -> Result<()> {
        if data.len() * 4 > buf.bytes {
            bail!(
                "upload_i32: {} values do not fit a {}-byte buffer",
                data.len(),
                buf.bytes
            );
        }
        unsafe { dres::memcpy_htod_async(buf.ptr, data, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("host-to-device copy failed: {e:?}"))?;
        self.sync()
    }
    fn download_f64(&self, buf: &CudaBuf, dtype: DType, n: usize) -> Result<Vec<f64>> {
        let st = self.stream.cu_stream();
        let out: Vec<f64> = unsafe {
            match dtype {
                DType::F32 => {
                    let mut v = vec![0f32; n];
                    dres::memcpy_dtoh_async(&mut v, buf.ptr, st).map_err(|e| anyhow!("{e:?}"))?;
                    self.sync()?;
                    v.into_iter().map(|x| x as f64).collect()
                }
                DType::BF16 => {
                    let mut v = vec![bf16::ZERO; n];
                    dres::memcpy_dtoh_async(&mut v, buf.ptr, st).map_err(|e| anyhow!("{e:?}"))?;
                    self.sync()?;
                    v.into_iter().map(|x| x.to_f64()).collect()
                }
                DType::F16 => {
                    let mut v = vec![f16::ZERO; n];
                    dres::memcpy_dtoh_async(&mut v, buf.ptr, st).map_err(|e| anyhow!("{e:?}"))?;
                    self.sync()?;
                    v.into_iter().map(|x| x.to_f64()).collect()
                }
                DType::I32 => {
                    let mut v = vec![0i32; n];
                    dres::memcpy_dtoh_async(&mut v, buf.ptr, st).map_err(|e| anyhow!("{e:?}"))?;
                    self.sync()?;
                    v.into_iter().map(|x| x as f64).collect()
                }
                DType::F64 => bail!("f64 is CPU-only"),
            }
        };
        Ok(out)
    }
    fn zero(&self, buf: &mut CudaBuf, dtype: DType, n: usize) -> Result<()> {
        unsafe { dres::memset_d8_async(buf.ptr, 0, bytes_of(dtype, n), self.stream.cu_stream()) }
            .map_err(|e| anyhow!("memset: {e:?}"))
    }
    fn cast(&self, dst: &mut CudaBuf, dd: DType, src: &CudaBuf, sd: DType, n: usize) -> Result<()> {
        crate::ops::adamw::cuda_cast(self, dst.ptr, dd, src.ptr, sd, n)
    }
    fn synchronize(&self) -> Result<()> {
        self.sync()
    }
    fn memory_stats(&self) -> Option<(usize, usize)> {
        Some((
            self.arena.live_bytes.load(Ordering::Relaxed),
            self.arena.peak_bytes.load(Ordering::Relaxed),
        ))
    }
}

/// The defaults of the kernel switches. A path becomes the default here once `scripts/gpu_check.sh` has
/// passed with it on a GPU and the bench shows it faster (docs/perf-log.md); the environment variable still
/// selects either side. Not yet: nothing of the three has run on a GPU.
pub const GEMM_LT_DEFAULT: bool = false; // BERTQA_GEMM=lt | ex
pub const VEC_DEFAULT: bool = false; // BERTQA_VEC=1 | 0

/// `var` = `on` → true, = `off` → false, unset (or anything else) → `default`.
fn switch(var: &str, on: &str, off: &str, default: bool) -> bool {
    match std::env::var(var).as_deref() {
        Ok(v) if v == on => true,
        Ok(v) if v == off => false,
        _ => default,
    }
}

/// Whether the "vec" elementwise kernels (16-byte loads, dtype at compile time: kernels/gelu.cu,
/// kernels/layernorm.cu, the bias gradient in kernels/reduce.cu) run: `BERTQA_VEC=1|0`, default
/// [`VEC_DEFAULT`].
pub fn vec_kernels() -> bool {
    switch("BERTQA_VEC", "1", "0", VEC_DEFAULT)
}

/// Whether bf16/f16 GEMMs go through cuBLASLt ([`lt`]): `BERTQA_GEMM=lt|ex`, default [`GEMM_LT_DEFAULT`].
pub fn gemm_lt() -> bool {
    switch("BERTQA_GEMM", "lt", "ex", GEMM_LT_DEFAULT)
}

/// Elements of `d` in one 16-byte vector, when every pointer is 16-byte aligned (always true of arena
/// allocations) — what the vec kernels need; None otherwise.
pub fn vec_width(d: DType, ptrs: &[u64]) -> Option<usize> {
    let n = 16 / d.size();
    ptrs.iter().all(|p| p % 16 == 0).then_some(n)
}

/// How the profiler names a GEMM: `gemm M×K×N` (row-major C(M,N) = op(A)(M,K)·op(B)(K,N)), transposes,
/// dtypes, whether cuBLASLt runs it and `+bias` for its bias epilogue.
pub(crate) fn gemm_label(g: &lt::Gemm) -> String {
    let t = |x: bool| if x { "T" } else { "N" };
    let lt = if gemm_lt() && matches!(g.ab, DType::BF16 | DType::F16) {
        " lt"
    } else {
        ""
    };
    let bias = if g.bias { " +bias" } else { "" };
    let (m, k, n, ab, c) = (g.m, g.k, g.n, g.ab, g.c);
    format!(
        "gemm {m}x{k}x{n} {}{} {ab}->{c}{lt}{bias}",
        t(g.ta),
        t(g.tb)
    )
}

/// Kernel dtype suffix: `f32`, `bf16` or `f16`.
pub fn suffix(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => bail!("no CUDA kernels for dtype {d}"),
    })
}

/// The numeric code of a dtype in kernel parameter structs (matches DT_* in kernels/common.cuh).
pub fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
        DType::I32 => 3,
        DType::F64 => 4,
    }
}

/// Open the device for a `--device` flag: "auto" falls back to the CPU (with a message) when there is no GPU.
pub fn open_for_flag(flag: &str) -> Result<Option<Cuda>> {
    match flag {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Cuda::new(0).map(Some).context("--device cuda"),
        "auto" => match Cuda::new(0) {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                eprintln!("bertqa: no usable GPU ({e:#}); running on the CPU");
                Ok(None)
            }
        },
        other => bail!("--device must be auto, cpu or cuda (got {other:?})"),
    }
}
