//! The CUDA backend: a context and one stream, a caching arena (a training step allocates nothing after the
//! first), NVRTC-compiled kernels (kernels/*.cu, see [`nvrtc`]), cuBLAS/cuBLASLt for every GEMM ([`gemm`],
//! [`lt`]), and a per-kernel profiler. It knows no op: each op's launcher (`src/ops/<op>/cuda.rs`) builds its
//! launches from the op's launch plan and runs them through `Cuda::run`.
//!
//! cudarc loads libcuda/libcublas/libnvrtc at run time, so this module always compiles; [`Cuda::new`] probes
//! for the driver first (cudarc panics when a library is missing) and returns a clear error instead.
//!
//! Device memory is reachable only inside the crate: buffers' device addresses are `pub(crate)`, and the raw
//! launch (`Cuda::run`) is an `unsafe fn` whose contract the launchers uphold (every address in the
//! parameter struct is a live buffer of this context holding what the kernel reads or writes).

pub mod cast;
pub mod gemm;
pub mod lt;
pub mod nvrtc;
pub mod wgmma_probe;

use crate::backend::{BackendCore, MemStats};
use crate::kernel::{KernelConfig, Launch};
use crate::tensor::DType;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    result as dres, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr,
};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Caching allocator: freed blocks go to a free list keyed by their rounded size and are handed out again.
pub struct Arena {
    free: Mutex<HashMap<usize, Vec<CudaSlice<u8>>>>,
    live_bytes: AtomicUsize,
    peak_bytes: AtomicUsize,
    /// cudaMalloc calls so far (the bench checks that a step makes none after the first)
    pub cuda_mallocs: AtomicUsize,
}

/// One allocation from the arena, returned to it when the last view is dropped.
struct Alloc {
    slice: Option<CudaSlice<u8>>,
    arena: Arc<Arena>,
}

impl Drop for Alloc {
    fn drop(&mut self) {
        if let Some(s) = self.slice.take() {
            self.arena.live_bytes.fetch_sub(s.len(), Ordering::Relaxed);
            if let Ok(mut f) = self.arena.free.lock() {
                f.entry(s.len()).or_default().push(s);
            }
        }
    }
}

/// A view of a device allocation: `bytes` bytes from device address `ptr`.
pub struct CudaBuf {
    pub(crate) ptr: u64,
    bytes: usize,
    _alloc: Arc<Alloc>,
}

impl CudaBuf {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    arena: Arc<Arena>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// loaded kernels, each with the dynamic shared memory it has been allowed (bytes above 48 KiB need an
    /// opt-in, set once per function and size rather than at every launch)
    funcs: Mutex<HashMap<String, (CudaFunction, u32)>>,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub device_name: String,
    pub sm_count: i32,
    /// Which kernels run (attention variant, GEMM path, vector kernels).
    kernels: KernelConfig,
    /// cuBLASLt (every bf16/f16 GEMM, bias epilogues), created on first use when the configuration asks.
    lt: std::sync::OnceLock<std::result::Result<lt::Lt, String>>,
    /// While profiling ([`Cuda::set_profiling`]; `cargo bench` does it for a few training steps): a pair of
    /// CUDA events around every kernel launch and GEMM, read by [`Cuda::profile_report`].
    profile: Mutex<Option<Vec<ProfileEntry>>>,
    /// Set while [`BackendCore::capture`] records a CUDA graph: allocations, host copies and
    /// synchronisation are refused meanwhile (they would not be replayed, or would break the capture).
    capturing: std::sync::atomic::AtomicBool,
    /// cuBLAS's workspace when graphs are on ([`Cuda::set_blas_workspace`])
    blas_workspace: Option<CudaBuf>,
}

/// How [`Cuda::load_module`] loaded a kernel module.
#[derive(Clone, Debug)]
pub struct ModuleLoad {
    /// where its images came from
    pub origin: nvrtc::Origin,
    /// true: its machine code (cubin); false: its PTX, translated by the driver
    pub machine_code: bool,
    /// the driver's error for a cubin it refused (the PTX was loaded instead)
    pub refused: Option<String>,
    /// seconds the driver took to load it (a PTX's translation included)
    pub secs: f64,
}

/// A captured CUDA graph, instantiated ([`BackendCore::capture`]), replayed by [`BackendCore::replay`].
pub struct Graph {
    g: cudarc::driver::CudaGraph,
    /// kernel nodes and other nodes, for logs
    pub nodes: usize,
}

type ProfileEntry = (String, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent);

/// Whether the CUDA driver library can be loaded at all (cudarc panics instead of returning an error).
pub fn driver_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

impl Cuda {
    /// Open GPU `ordinal` with the kernels of `kernels`. Fails with an actionable message when there is no
    /// driver or no device.
    pub fn new(ordinal: usize, kernels: KernelConfig) -> Result<Self> {
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
        // the legacy default stream, unless graphs are recorded: CUDA cannot record on that one
        let stream = if kernels.graphs {
            ctx.new_stream()
                .map_err(|e| anyhow!("cannot create a CUDA stream: {e:?}"))?
        } else {
            ctx.default_stream()
        };
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS init failed: {e:?}"))?;
        let cc = ctx.compute_capability().map_err(|e| anyhow!("{e:?}"))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        kernels_run_on(&kernels, cc, &device_name)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(0);
        let mut cuda = Cuda {
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
            kernels,
            lt: std::sync::OnceLock::new(),
            profile: Mutex::new(None),
            capturing: std::sync::atomic::AtomicBool::new(false),
            blas_workspace: None,
        };
        if kernels.graphs {
            cuda.set_blas_workspace()?;
        }
        Ok(cuda)
    }

    /// Whether this GPU has Hopper's wgmma (attention variants 5 and 6, the wgmma probe).
    pub fn has_wgmma(&self) -> bool {
        wgmma_cc(self.cc)
    }

    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// The kernel configuration this backend runs.
    pub fn kernels(&self) -> &KernelConfig {
        &self.kernels
    }

    /// Run other kernels from now on (benches and tests compare variants on one device). cuBLASLt's handle,
    /// made on first use, keeps the tuning choice it was made with. Turning graphs on moves the backend off
    /// the legacy default stream (CUDA cannot record a graph on it) onto a stream of its own, after the
    /// work queued so far.
    pub fn set_kernels(&mut self, k: KernelConfig) -> Result<()> {
        kernels_run_on(&k, self.cc, &self.device_name)?;
        if k.graphs && self.stream.cu_stream().is_null() {
            self.sync()?;
            let s = self
                .ctx
                .new_stream()
                .map_err(|e| anyhow!("cannot create a CUDA stream: {e:?}"))?;
            // SAFETY: the handle's previous stream has no queued work (synchronised above)
            unsafe { self.blas.set_stream(s.clone()) }
                .map_err(|e| anyhow!("cuBLAS set_stream: {e:?}"))?;
            self.stream = s;
            if self.blas_workspace.is_none() {
                self.set_blas_workspace()?;
            }
        }
        self.kernels = k;
        Ok(())
    }

    /// cudaMalloc calls made so far by the arena.
    pub fn cuda_mallocs(&self) -> usize {
        self.arena.cuda_mallocs.load(Ordering::Relaxed)
    }

    /// Kernel `name` of module `module` (`kernels/<module>.cu`), compiled and loaded on first use, allowed
    /// `smem` bytes of dynamic shared memory.
    fn func(&self, module: &'static str, name: &str, smem: u32) -> Result<CudaFunction> {
        let key = format!("{module}::{name}");
        let mut known = None;
        if let Some((f, allowed)) = self
            .funcs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if smem <= (*allowed).max(48 * 1024) {
                return Ok(f.clone());
            }
            known = Some(f.clone());
        }
        let f = match known {
            Some(f) => f,
            None => self.load_func(module, name)?,
        };
        let mut allowed = 0;
        if smem > 48 * 1024 {
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| anyhow!("{name}: cannot raise shared memory to {smem} bytes: {e:?}"))?;
            allowed = smem;
        }
        let mut funcs = self.funcs.lock().unwrap_or_else(|e| e.into_inner());
        let entry = funcs.entry(key).or_insert((f.clone(), 0));
        entry.1 = entry.1.max(allowed);
        Ok(f)
    }

    fn load_func(&self, module: &'static str, name: &str) -> Result<CudaFunction> {
        let m = {
            let mut mods = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = mods.get(module) {
                m.clone()
            } else {
                let (m, _) = self.load_module(module)?;
                mods.insert(module, m.clone());
                m
            }
        };
        m.load_function(name)
            .map_err(|e| anyhow!("kernel {name} not found in kernels/{module}.cu: {e:?}"))
    }

    /// Load kernels/`module`.cu for this device ([`nvrtc::module_image`]: prebuilt in `$BERTQA_KERNELS`,
    /// cached or compiled now): see [`Cuda::load_module_from`].
    pub fn load_module(&self, module: &str) -> Result<(Arc<CudaModule>, ModuleLoad)> {
        let prebuilt = std::env::var_os("BERTQA_KERNELS").map(std::path::PathBuf::from);
        self.load_module_from(module, prebuilt.as_deref())
    }

    /// Load kernels/`module`.cu for this device, its images looked up in `prebuilt`, then the cache, else
    /// compiled ([`nvrtc::module_image_in`]): its machine code, or its PTX (which the driver then
    /// translates) where there is no machine code or the driver refuses it. Prebuilt images the driver takes
    /// neither of (built by a newer NVRTC than it knows, say) give way to the cache's, and images that do not
    /// load are compiled again here (into the cache, where the next process finds them). Says what was
    /// loaded, and how long the load took.
    pub fn load_module_from(
        &self,
        module: &str,
        prebuilt: Option<&std::path::Path>,
    ) -> Result<(Arc<CudaModule>, ModuleLoad)> {
        let arch = nvrtc::module_arch(module, &self.arch());
        let cache = nvrtc::cache_dir();
        let stem = nvrtc::image_stem(module, &nvrtc::module_source(module)?, &arch);
        let mut failed = vec![];
        let img = nvrtc::module_image_in(module, &arch, prebuilt, &cache)?;
        let origin = img.origin.clone();
        if let Some(done) = self.try_load(module, &arch, img, &mut failed) {
            return Ok(done);
        }
        if let nvrtc::Origin::Compiled(_) = origin {
            bail!(
                "loading kernels/{module}.cu for {arch}: {}",
                failed.join("; ")
            );
        }
        // prebuilt images that do not load: the cache's, if it holds any
        if let nvrtc::Origin::Prebuilt(_) = origin {
            if let Some(img) = nvrtc::found_image(&stem, None, &cache) {
                if let Some(done) = self.try_load(module, &arch, img, &mut failed) {
                    return Ok(done);
                }
            }
        }
        crate::say!(
            "note: the driver loads no image found of kernels/{module}.cu for {arch} ({}); compiling it here",
            failed.join("; ")
        );
        let img = nvrtc::compile_into(module, &arch, &cache).with_context(|| {
            format!(
                "kernels/{module}.cu for {arch}: no image found loads ({})",
                failed.join("; ")
            )
        })?;
        match self.try_load(module, &arch, img, &mut failed) {
            Some(done) => Ok(done),
            None => bail!(
                "loading kernels/{module}.cu for {arch}: {}",
                failed.join("; ")
            ),
        }
    }

    /// [`Cuda::load_image`] of `img`, timed; None (and what the driver said, in `failed`) when it loads
    /// neither image.
    fn try_load(
        &self,
        module: &str,
        arch: &str,
        img: nvrtc::Image,
        failed: &mut Vec<String>,
    ) -> Option<(Arc<CudaModule>, ModuleLoad)> {
        let t = std::time::Instant::now();
        let from = match &img.origin {
            nvrtc::Origin::Prebuilt(d) | nvrtc::Origin::Cache(d) => d.display().to_string(),
            nvrtc::Origin::Compiled(_) => "a compile here".to_string(),
        };
        match self.load_image(module, arch, img.cubin, img.ptx) {
            Ok((m, machine_code, refused)) => Some((
                m,
                ModuleLoad {
                    origin: img.origin,
                    machine_code,
                    refused,
                    secs: t.elapsed().as_secs_f64(),
                },
            )),
            Err(e) => {
                failed.push(format!("from {from}: {e}"));
                None
            }
        }
    }

    /// The driver's load of a module's machine code, else of its PTX: (module, machine code loaded, the
    /// driver's error for refused machine code); the PTX's error otherwise.
    fn load_image(
        &self,
        module: &str,
        arch: &str,
        cubin: Option<Vec<u8>>,
        ptx: String,
    ) -> std::result::Result<(Arc<CudaModule>, bool, Option<String>), String> {
        let mut refused = None;
        if let Some(cubin) = cubin {
            match self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)) {
                Ok(m) => return Ok((m, true, None)),
                Err(e) => {
                    crate::say!(
                        "note: the driver refused the machine code of kernels/{module}.cu for {arch} ({e:?}); \
                         loading its PTX instead"
                    );
                    refused = Some(format!("{e:?}"));
                }
            }
        }
        self.ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map(|m| (m, false, refused))
            .map_err(|e| format!("{e:?}"))
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
        self.profiled_if(|| Some(name()), f)
    }

    /// [`Cuda::profiled`], filing nothing when `name` (asked after `f` ran) is None: `f` turned out to run no
    /// work of its own (a cuBLASLt bias epilogue it declined).
    pub(crate) fn profiled_if(
        &self,
        name: impl FnOnce() -> Option<String>,
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
        if let (Ok(mut p), Some(name)) = (self.profile.lock(), name()) {
            if let Some(v) = p.as_mut() {
                v.push((name, start, stop));
            }
        }
        Ok(())
    }

    /// While profiling: the GPU time of every kernel and GEMM run since profiling began or the last report,
    /// summed by name, largest first, per `per` repetitions (e.g. training steps), as a table; the events are
    /// cleared. None when not profiling.
    pub fn profile_report(&self, per: usize) -> Result<Option<String>> {
        Ok(self.profile_rows(per)?.map(|rows| {
            let total: f64 = rows.iter().map(|r| r.2).sum();
            let mut out = format!(
                "{:<66} {:>7} {:>10} {:>6}\n",
                "kernel or GEMM (per repetition)", "calls", "ms", "%"
            );
            for (name, n, ms) in &rows {
                out += &format!(
                    "{name:<66} {n:>7.1} {ms:>10.3} {:>5.1}%\n",
                    100.0 * ms / total.max(1e-12)
                );
            }
            out += &format!("{:<66} {:>7} {:>10.3}\n", "sum of kernel times", "", total);
            out
        }))
    }

    /// While profiling: (name, calls, ms) per repetition of every kernel and GEMM, largest first; cleared.
    pub fn profile_rows(&self, per: usize) -> Result<Option<Vec<(String, f64, f64)>>> {
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
        let per = per.max(1) as f64;
        let mut rows: Vec<(String, f64, f64)> = by
            .into_iter()
            .map(|(n, (c, ms))| (n, c as f64 / per, ms / per))
            .collect();
        rows.sort_by(|x, y| y.2.total_cmp(&x.2));
        Ok(Some(rows))
    }

    /// Run one launch description (src/kernel.rs `Launch`).
    ///
    /// # Safety
    /// Every device address in `l.params` must be 0 (unused by the kernel) or point into a live buffer of this
    /// backend holding at least what the kernel reads or writes for the launch's shapes; buffers the kernel
    /// writes must not be read or written by anything else until the stream has passed the launch. The
    /// launch plans (src/ops/*/mod.rs) and their launchers (src/ops/*/cuda.rs) establish this from checked
    /// tensor shapes.
    pub(crate) unsafe fn run<P: DeviceRepr + Copy>(&self, l: &Launch<P>) -> Result<()> {
        let Launch {
            module,
            name,
            grid,
            block,
            smem,
            params,
        } = l;
        let (grid, block, smem) = (*grid, *block, *smem);
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = self.func(module, name, smem)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        self.profiled(
            || name.to_string(),
            || {
                let mut b = self.stream.launch_builder(&f);
                b.arg(params);
                unsafe { b.launch(cfg) }.map_err(|e| {
                    anyhow!(
                        "launch of {name} (grid {grid:?}, block {block:?}, smem {smem}) failed: {e:?}"
                    )
                })?;
                Ok(())
            },
        )?;
        if self.kernels.sync_launch {
            self.stream
                .synchronize()
                .map_err(|e| anyhow!("kernel {name} failed: {e:?}"))?;
        }
        Ok(())
    }

    /// cuBLASLt when the configuration asks for it (bf16/f16 GEMMs then run through it with timed algorithm
    /// choice, and the linear layers' forward adds the bias in the GEMM's epilogue: [`lt`]), else None. An
    /// error when it is asked for and cannot be set up.
    pub(crate) fn lt(&self) -> Result<Option<&lt::Lt>> {
        let crate::kernel::GemmPath::Lt { tune } = self.kernels.gemm else {
            return Ok(None);
        };
        if self.lt.get().is_none() {
            self.not_capturing("setting up cuBLASLt")?;
        }
        match self.lt.get_or_init(|| {
            lt::Lt::new(&self.stream, self.cc.0, tune).map_err(|e| format!("{e:#}"))
        }) {
            Ok(l) => Ok(Some(l)),
            Err(e) => bail!("cuBLASLt (--gemm ex turns it off): {e}"),
        }
    }

    /// What cuBLASLt's tuning measured (one line per GEMM shape timed: the heuristic's first candidate against
    /// the fastest, see [`lt::Tuned::line`]); empty when cuBLASLt has not been set up or did not tune.
    pub fn gemm_tuning_report(&self) -> Vec<String> {
        match self.lt.get() {
            Some(Ok(l)) => l.tuning().iter().map(|t| t.line()).collect(),
            _ => Vec::new(),
        }
    }

    /// What the calls to cuBLASLt did since it was set up ([`lt::LtCounts`]: run, with the bias epilogue,
    /// handed to cublasGemmEx, epilogues declined, shapes given up with a warning); None when it has not
    /// been (`--gemm ex`, or no GEMM yet).
    pub fn gemm_lt_counts(&self) -> Option<lt::LtCounts> {
        match self.lt.get() {
            Some(Ok(l)) => Some(l.counts()),
            _ => None,
        }
    }

    /// The GPU time of `f`'s work on the stream in ms (CUDA events before and after; waits for it).
    pub fn time_ms(&self, f: &mut dyn FnMut()) -> Result<f64> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = || {
            self.ctx
                .new_event(flags)
                .map_err(|e| anyhow!("timing event: {e:?}"))
        };
        let (start, end) = (ev()?, ev()?);
        start
            .record(&self.stream)
            .map_err(|e| anyhow!("timing: {e:?}"))?;
        f();
        end.record(&self.stream)
            .map_err(|e| anyhow!("timing: {e:?}"))?;
        end.synchronize().map_err(|e| anyhow!("timing: {e:?}"))?;
        Ok(start
            .elapsed_ms(&end)
            .map_err(|e| anyhow!("timing: {e:?}"))? as f64)
    }

    /// Wait for the stream; an error here usually means an earlier kernel faulted.
    pub fn sync(&self) -> Result<()> {
        self.not_capturing("a stream synchronisation")?;
        self.stream.synchronize().map_err(|e| {
            anyhow!("CUDA stream synchronize failed (an earlier kernel faulted?): {e:?}")
        })
    }

    /// Error while a CUDA graph is being recorded: `what` cannot be part of one.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing.load(Ordering::Relaxed) {
            bail!(
                "{what} while recording a CUDA graph: the recorded region (a training micro-batch's forward, \
                 loss and backward) must queue device work only — allocate before it, and copy or synchronise \
                 outside it (or run without --cuda-graphs)"
            );
        }
        Ok(())
    }

    /// An error cudarc recorded earlier where it could not return one (freeing a dropped buffer), reported as
    /// earlier than `what` instead of as `what`'s own.
    fn stale_error(&self, what: &str) -> Result<()> {
        self.ctx.check_err().map_err(|e| {
            anyhow::Error::new(crate::train::graphs::EarlierFault(format!(
                "before the CUDA graph {what}: an earlier CUDA call had failed where it could not report it \
                 (dropping a buffer, stream or event): {e:?}"
            )))
        })
    }

    /// Whether cuBLASLt may plan (and time) a GEMM shape it meets for the first time: not while recording.
    pub(crate) fn may_plan(&self) -> bool {
        !self.capturing.load(Ordering::Relaxed)
    }

    /// End a capture still open on the stream (after an error or a panic while recording), discarding what
    /// it recorded, so that later work runs instead of being recorded.
    fn abandon_capture(&self) {
        use cudarc::driver::sys::CUstreamCaptureStatus;
        let s = self.stream.cu_stream();
        // SAFETY: this backend's stream; a graph the driver hands back is destroyed at once
        unsafe {
            if matches!(
                dres::stream::is_capturing(s),
                Ok(st) if st != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
            ) {
                if let Ok(g) = dres::stream::end_capture(s) {
                    if !g.is_null() {
                        let _ = dres::graph::destroy(g);
                    }
                }
            }
        }
    }

    /// With graphs on: give cuBLAS a workspace of its own, from the arena, for good — without one, cuBLAS
    /// allocates its workspace while a graph is recorded (memory nodes in every graph, memory held by each).
    /// 32 MiB on Hopper, 4 MiB before (NVIDIA's recommendation).
    fn set_blas_workspace(&mut self) -> Result<()> {
        let bytes = if self.cc.0 >= 9 { 32 << 20 } else { 4 << 20 };
        let ws = self.alloc(DType::F32, bytes / 4)?;
        // SAFETY: a live device buffer of `bytes` bytes, kept as long as the handle (in self)
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *self.blas.handle(),
                ws.ptr as *mut std::ffi::c_void,
                bytes,
            )
        }
        .result()
        .map_err(|e| anyhow!("cublasSetWorkspace: {e:?}"))?;
        self.blas_workspace = Some(ws);
        Ok(())
    }

    /// Whether the profiler is on.
    fn profiling(&self) -> bool {
        self.profile.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    /// The stream every op of this backend runs on (NCCL's collectives are queued on it too).
    pub(crate) fn raw_stream(&self) -> cudarc::driver::sys::CUstream {
        self.stream.cu_stream()
    }

    /// Make this backend's context current on the calling thread (each replica's thread calls it first).
    pub fn bind_to_thread(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| {
            anyhow!(
                "binding the CUDA context of device {} to this thread: {e:?}",
                self.ctx.ordinal()
            )
        })
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }
}

/// A kernel configuration the GPU at hand cannot run (attention variants 5 and 6 off sm_90). Its own type, so
/// that `--device auto` reports it instead of falling back to the CPU as it does when there is no GPU.
#[derive(Debug)]
pub struct KernelsUnsupported(pub String);

impl std::fmt::Display for KernelsUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for KernelsUnsupported {}

/// Whether a device of compute capability `cc` has Hopper's wgmma (sm_90, the `sm_90a` target).
fn wgmma_cc(cc: (i32, i32)) -> bool {
    cc == (9, 0)
}

/// Whether the kernels of `k` exist on a device of compute capability `cc`: attention variants 5 and 6 are
/// Hopper's wgmma (sm_90 only).
fn kernels_run_on(k: &KernelConfig, cc: (i32, i32), device: &str) -> Result<()> {
    use crate::kernel::AttnKernel;
    if let AttnKernel::V5(_) | AttnKernel::V6(_) = k.attention {
        if !wgmma_cc(cc) {
            return Err(KernelsUnsupported(format!(
                "{} needs an sm_90 GPU (Hopper's wgmma); this is {device} (sm_{}{}): choose another attention \
                 kernel (--attention-kernel or BERTQA_ATTN: v4)",
                k.describe(),
                cc.0,
                cc.1
            ))
            .into());
        }
    }
    Ok(())
}

fn check_view(what: &str, buf: &CudaBuf, dtype: DType, bytes: usize) -> Result<()> {
    if buf.bytes < bytes {
        bail!(
            "{what}: {bytes} bytes of {dtype} do not fit a {}-byte buffer",
            buf.bytes
        );
    }
    Ok(())
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
        self.not_capturing(&format!("an allocation of {n} {dtype} elements"))?;
        if dtype == DType::F64 {
            bail!("f64 tensors exist on the CPU backend only");
        }
        let want = dtype.size() * n;
        let bytes = want.max(1).div_ceil(256) * 256;
        let reused = self
            .arena
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
            bytes: want,
            _alloc: Arc::new(Alloc {
                slice: Some(slice),
                arena: self.arena.clone(),
            }),
        })
    }
    fn release_cached(&self) -> Result<()> {
        self.not_capturing("releasing cached memory")?;
        let cached =
            std::mem::take(&mut *self.arena.free.lock().unwrap_or_else(|e| e.into_inner()));
        // each CudaSlice frees its memory as it is dropped (stream-ordered after the work queued so far);
        // a failure is kept by cudarc and reported at the next check (synchronize, a graph capture)
        drop(cached);
        Ok(())
    }
    fn view(&self, buf: &CudaBuf, dtype: DType, offset: usize, n: usize) -> Result<CudaBuf> {
        let (off, len) = (offset * dtype.size(), n * dtype.size());
        if off + len > buf.bytes {
            bail!(
                "view of {n} {dtype} elements at {offset} in a {}-byte buffer",
                buf.bytes
            );
        }
        Ok(CudaBuf {
            ptr: buf.ptr + off as u64,
            bytes: len,
            _alloc: buf._alloc.clone(),
        })
    }
    fn upload(&self, buf: &mut CudaBuf, dtype: DType, bytes: &[u8]) -> Result<()> {
        self.not_capturing("a host-to-device copy")?;
        check_view("upload", buf, dtype, bytes.len())?;
        // SAFETY: the view holds at least bytes.len() bytes (checked); the copy completes before returning.
        unsafe { dres::memcpy_htod_async(buf.ptr, bytes, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("host-to-device copy failed: {e:?}"))?;
        self.sync()
    }
    fn download(&self, buf: &CudaBuf, dtype: DType, out: &mut [u8]) -> Result<()> {
        self.not_capturing("a device-to-host copy")?;
        check_view("download", buf, dtype, out.len())?;
        // SAFETY: as in upload; `out` is not touched until the stream has synchronised.
        unsafe { dres::memcpy_dtoh_async(out, buf.ptr, self.stream.cu_stream()) }
            .map_err(|e| anyhow!("device-to-host copy failed: {e:?}"))?;
        self.sync()
    }
    fn zero(&self, buf: &mut CudaBuf, dtype: DType, n: usize) -> Result<()> {
        check_view("zero", buf, dtype, n * dtype.size())?;
        unsafe { dres::memset_d8_async(buf.ptr, 0, n * dtype.size(), self.stream.cu_stream()) }
            .map_err(|e| anyhow!("memset: {e:?}"))
    }
    fn cast(&self, dst: &mut CudaBuf, dd: DType, src: &CudaBuf, sd: DType, n: usize) -> Result<()> {
        check_view("cast", dst, dd, n * dd.size())?;
        check_view("cast", src, sd, n * sd.size())?;
        cast::cast(self, dst.ptr, dd, src.ptr, sd, n)
    }
    fn synchronize(&self) -> Result<()> {
        self.sync()
    }
    fn memory_stats(&self) -> MemStats {
        MemStats {
            live_bytes: self.arena.live_bytes.load(Ordering::Relaxed),
            peak_bytes: self.arena.peak_bytes.load(Ordering::Relaxed),
        }
    }
    fn reset_peak(&self) {
        let live = self.arena.live_bytes.load(Ordering::Relaxed);
        self.arena.peak_bytes.store(live, Ordering::Relaxed);
    }
    fn peak(&self, dtype: DType) -> Option<crate::backend::Peak> {
        datasheet_peak(&self.device_name, dtype)
    }
    /// cuBLASLt chooses (and, tuned, times) an algorithm per GEMM shape: packed batches rounded up to 128
    /// rows (≤ 127 masked rows, ~2% of a batch of 32 SQuAD windows) reuse them. cublasGemmEx keeps no state:
    /// exact row counts.
    /// With CUDA graphs, packed batches are rounded up to 128 rows as well, so that a graph recorded for one
    /// batch is replayed for the many of the same bucket.
    fn row_bucket(&self) -> usize {
        if self.kernels.gemm_lt() || self.kernels.graphs {
            128
        } else {
            1
        }
    }

    type Graph = Graph;
    fn graphs_on(&self) -> bool {
        self.kernels.graphs
            && !self.kernels.sync_launch
            && !self.profiling()
            && !self.stream.cu_stream().is_null()
    }
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Graph> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        if self.capturing.load(Ordering::Relaxed) {
            bail!("capture: a CUDA graph is being recorded already");
        }
        // cudarc keeps the error of a failed free (a dropped buffer) until the next call that checks it;
        // begin_capture would return it as its own, and the batch shape would be marked unrecordable for an
        // unrelated earlier fault: report it as what it is
        self.stale_error("capture")?;
        if self.capturing.swap(true, Ordering::Relaxed) {
            bail!("capture: a CUDA graph is being recorded already");
        }
        // thread-local mode: this thread's unsafe calls (cudaMalloc, synchronous copies) fail the capture
        if let Err(e) = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            self.capturing.store(false, Ordering::Relaxed);
            bail!("capture: cannot begin recording a CUDA graph: {e:?}");
        }
        // a panic in `f` still ends the capture and clears the flag
        struct Open<'a>(&'a Cuda);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.capturing.store(false, Ordering::Relaxed);
                self.0.abandon_capture();
            }
        }
        let open = Open(self);
        let r = f();
        self.capturing.store(false, Ordering::Relaxed);
        let g = self.stream.end_capture(CUgraphInstantiate_flags(0));
        // whatever happened, the stream is not left recording (cudarc's end_capture returns an error it had
        // recorded earlier without ending the capture)
        drop(open);
        r?;
        let g = g
            .map_err(|e| {
                anyhow!("capture: recording or instantiating the CUDA graph failed: {e:?}")
            })?
            .ok_or_else(|| anyhow!("capture: the recorded region queued no work"))?;
        // the graph's one-time set-up now, not in the first replay
        g.upload()
            .map_err(|e| anyhow!("capture: uploading the CUDA graph: {e:?}"))?;
        let mut nodes = 0usize;
        // SAFETY: a live graph owned by `g`; a null node array asks for the count only
        unsafe {
            cudarc::driver::sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut nodes)
        }
        .result()
        .map_err(|e| anyhow!("capture: counting the graph's nodes: {e:?}"))?;
        Ok(Graph { g, nodes })
    }
    fn replay(&self, g: &Graph) -> Result<()> {
        self.not_capturing("a graph replay")?;
        self.stale_error("replay")?;
        g.g.launch()
            .map_err(|e| anyhow!("replaying a CUDA graph of {} nodes failed: {e:?}", g.nodes))?;
        if self.kernels.sync_launch {
            self.sync()?;
        }
        Ok(())
    }
}

/// Dense (no sparsity) tensor-core peaks from NVIDIA's datasheets, TFLOP/s: (name fragment, bf16/f16, f32 —
/// the CUDA-core rate, as bertqa's f32 GEMMs do not use TF32). The first fragment the device name contains
/// wins, so the more specific come first.
const DATASHEET: &[(&str, f64, f64)] = &[
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
];

/// The datasheet peak of the device called `name` for `dtype` GEMMs, if it is in `DATASHEET`.
pub fn datasheet_peak(name: &str, dtype: DType) -> Option<crate::backend::Peak> {
    let (frag, lowp, f32_) = DATASHEET.iter().find(|(f, _, _)| name.contains(f))?;
    let (tflops, kind) = match dtype {
        DType::BF16 | DType::F16 => (*lowp, "dense bf16/f16 tensor cores"),
        DType::F32 => (*f32_, "f32 CUDA cores"),
        _ => return None,
    };
    Some(crate::backend::Peak {
        tflops,
        source: format!("datasheet: NVIDIA {frag}, {kind}"),
    })
}

/// Elements of `d` in one 16-byte vector, when every pointer is 16-byte aligned (always true of arena
/// allocations and of the flat buffers' views) — what the vec kernels need; None otherwise.
pub fn vec_width(d: DType, ptrs: &[u64]) -> Option<usize> {
    let n = 16 / d.size();
    ptrs.iter().all(|p| p % 16 == 0).then_some(n)
}

/// Open the device for a `--device` flag with kernel configuration `k`: "auto" falls back to the CPU (with a
/// message) when there is no GPU.
pub fn open_for_flag(flag: &str, k: KernelConfig) -> Result<Option<Cuda>> {
    match flag {
        "cpu" => Ok(None),
        "cuda" | "gpu" => Cuda::new(0, k).map(Some).context("--device cuda"),
        "auto" => match Cuda::new(0, k) {
            Ok(c) => Ok(Some(c)),
            // a GPU that cannot run the chosen kernels is an error, not a reason to train on the CPU
            Err(e) if e.downcast_ref::<KernelsUnsupported>().is_some() => Err(e),
            Err(e) => {
                crate::say!("bertqa: no usable GPU ({e:#}); running on the CPU");
                Ok(None)
            }
        },
        other => bail!("--device must be auto, cpu or cuda (got {other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::kernels_run_on;
    use crate::kernel::{AttnKernel, KernelConfig, Tc4Shape};

    /// Attention variant 5 (wgmma) is refused off sm_90, with the device and the way out named.
    #[test]
    fn variant_5_needs_sm_90() {
        let v5 = KernelConfig {
            attention: AttnKernel::V5(Tc4Shape::W8B2),
            ..KernelConfig::default()
        };
        assert!(kernels_run_on(&v5, (9, 0), "H100").is_ok());
        for cc in [(8, 0), (8, 9), (10, 0)] {
            let e = kernels_run_on(&v5, cc, "some GPU").unwrap_err().to_string();
            assert!(
                e.contains("sm_90") && e.contains("some GPU") && e.contains("BERTQA_ATTN"),
                "{e}"
            );
        }
        assert!(kernels_run_on(&KernelConfig::default(), (8, 0), "A100").is_ok());
        let v6 = KernelConfig {
            attention: AttnKernel::V6(Tc4Shape::W8B2),
            ..KernelConfig::default()
        };
        let e = kernels_run_on(&v6, (8, 0), "A100").unwrap_err();
        assert!(
            e.downcast_ref::<super::KernelsUnsupported>().is_some(),
            "{e}"
        );
        assert!(kernels_run_on(&v6, (9, 0), "H200").is_ok());
    }
}
