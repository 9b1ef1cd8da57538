//! cuBLASLt for the bf16/f16 GEMMs (`GemmPath::Lt` in the kernel configuration, `--gemm lt` /
//! `BERTQA_GEMM=lt`; opt-in until the GPU parity suite has run it):
//! - the linear layers' forward as one matmul with the bias added in its epilogue (`CUBLASLT_EPILOGUE_BIAS`)
//!   instead of cublasGemmEx followed by the bias_add kernel, which reads and writes the whole output once
//!   more (BERT-base, B=32 T=384: 340 MB per layer);
//! - every other bf16/f16 GEMM (the backward's dX and dW) through the same path, so that all of them get
//!   the algorithm choice below.
//!
//! Each (shape, transposes, dtypes, epilogue, pointer alignments) gets a plan once: descriptors, layouts and an
//! algorithm. The algorithm is the fastest of cuBLASLt's first 8 heuristic candidates, each timed (CUDA
//! events, 3 runs after a warm-up) into a scratch output; without tuning (`--gemm-tune off`) the heuristic's
//! first that runs. Where cuBLASLt has no algorithm, or none of them runs, or the chosen one later refuses to
//! launch (outside a CUDA graph's recording), the GEMM goes to cublasGemmEx (the last two with a warning);
//! [`Lt::counts`] says how often each path was taken, and [`Lt::tuning`] what the tuning measured.
//! Later calls only set the bias pointer and launch. Accumulation and scale type are f32.
//!
//! Row-major terms as [`super::Cuda::gemm`]: `C(m,n) = α·op(A)(m,k)·op(B)(k,n) + β·C`. cuBLAS is
//! column-major, where row-major C is `Cᵀ (n,m)`: so cuBLASLt's first operand is our B (op = T when `tb`),
//! its second our A, and its D is `(n, m)` with leading dimension n; a bias of length n runs along D's rows.

use crate::tensor::DType;
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use std::collections::hash_map::{Entry, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One GEMM: `C(m,n) = α·op(A)(m,k)·op(B)(k,n) + β·C` (+ `bias[j]` on every row when `bias`), A and B of
/// dtype `ab` (bf16/f16), C of dtype `c` (the same or f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub ta: bool,
    pub tb: bool,
    pub ab: DType,
    pub c: DType,
    pub bias: bool,
}

impl Gemm {
    /// `M×K×N` (row-major C(M,N) = op(A)(M,K)·op(B)(K,N)), the transposes and the dtypes, e.g.
    /// `4096x768x3072 NT bf16->bf16`.
    pub fn shape(&self) -> String {
        let t = |x: bool| if x { "T" } else { "N" };
        let (m, k, n, ab, c) = (self.m, self.k, self.n, self.ab, self.c);
        format!("{m}x{k}x{n} {}{} {ab}->{c}", t(self.ta), t(self.tb))
    }
}

/// A plan's key: the GEMM and the alignment in bytes of A, B, C and the bias (0 without one): cuBLASLt's
/// heuristic reads the bias pointer's value for the alignment it may assume.
type Key = (Gemm, [u32; 4]);

struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    /// cuBLASLt's first operand (our B), second (our A), and C = D
    l1: ltsys::cublasLtMatrixLayout_t,
    l2: ltsys::cublasLtMatrixLayout_t,
    ld: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

pub struct Lt {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    ctx: Arc<CudaContext>,
    /// per shape and alignments: its plan, or None where cuBLASLt has no algorithm (cublasGemmEx then)
    plans: Mutex<HashMap<Key, Option<Plan>>>,
    /// time the heuristic's candidates (else take its first)
    tune: bool,
    /// what each tuning measured, in the order the shapes were met ([`Lt::tuning`])
    tuned: Mutex<Vec<Tuned>>,
    /// what the calls to [`Lt::gemm`] did ([`LtCounts`])
    ran: AtomicUsize,
    ran_bias: AtomicUsize,
    fell_back: AtomicUsize,
    bias_declined: AtomicUsize,
    failed: AtomicUsize,
}

/// What the calls to [`Lt::gemm`] did so far (calls, not launches: a CUDA graph's replays do not call it):
/// - `lt`: run by cuBLASLt; `lt_bias` of them with the bias epilogue;
/// - `fallback`: GEMMs without a bias handed back to cublasGemmEx — cuBLASLt has no algorithm for the shape and
///   alignments (silent: expected for odd leading dimensions), or one of the failures below;
/// - `bias_declined`: bias epilogues declined (a bias aligned below 16 bytes, or no algorithm with the
///   epilogue): the caller then runs the GEMM without it and adds the bias in a pass of its own;
/// - `failed`: shapes given up with a warning — none of the heuristic's algorithms ran, or the chosen one
///   later refused to launch. A healthy cuBLASLt has none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LtCounts {
    pub lt: usize,
    pub lt_bias: usize,
    pub fallback: usize,
    pub bias_declined: usize,
    pub failed: usize,
}

/// One shape's tuning: each candidate's time (ms per launch; None: it failed to run), the heuristic's order.
#[derive(Clone, Debug)]
pub struct Tuned {
    pub gemm: Gemm,
    /// the alignments in bytes of A, B, C and the bias (0: none), as in the plan's key
    pub align: [u32; 4],
    pub ms: Vec<Option<f32>>,
}

impl Tuned {
    /// The fastest candidate's index and time, if any ran.
    pub fn best(&self) -> Option<(usize, f32)> {
        self.ms
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .min_by(|x, y| x.1.total_cmp(&y.1))
    }
    /// One line: the shape, the heuristic's first choice, the fastest and its gain, the failures, e.g.
    /// `4096x768x3072 NT bf16->bf16 +bias: heuristic's #1 41.2 µs, fastest #3 38.0 µs (-7.8%), 8 timed`.
    pub fn line(&self) -> String {
        let bias = if self.gemm.bias { " +bias" } else { "" };
        let [a, b, c, bb] = self.align;
        let bias_al = if self.gemm.bias {
            format!("/{bb}")
        } else {
            String::new()
        };
        let head = format!("{}{bias} (aligned {a}/{b}/{c}{bias_al})", self.gemm.shape());
        let failed = self.ms.iter().filter(|t| t.is_none()).count();
        let failed = if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        };
        match (self.ms.first().copied().flatten(), self.best()) {
            (_, None) => format!("{head}: none of {} candidates ran", self.ms.len()),
            (first, Some((i, best))) => {
                let first = first.map_or("failed".to_string(), |f| format!("{:.1} µs", 1e3 * f));
                let gain = match self.ms.first().copied().flatten() {
                    Some(f) if f > 0.0 => format!(" ({:+.1}%)", 100.0 * (best - f) / f),
                    _ => String::new(),
                };
                format!(
                    "{head}: heuristic's #1 {first}, fastest #{} {:.1} µs{gain}, of {} candidates{failed}",
                    i + 1,
                    1e3 * best,
                    self.ms.len()
                )
            }
        }
    }
}

// The backend has one stream, and the plan cache is behind a mutex held for the whole call.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // the plans first (their descriptors), then the handle
        self.plans
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// A plan's descriptors are destroyed with it, on every path (a plan abandoned half-built included); a null
/// one (not yet created) is skipped.
impl Drop for Plan {
    fn drop(&mut self) {
        unsafe {
            for l in [self.l1, self.l2, self.ld] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

fn err(what: &str) -> impl Fn(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
}

/// Whether a failed `cublasLtMatmul` is the algorithm refusing the problem (it ran nothing): another
/// algorithm, or cublasGemmEx, may take it. Anything else (a faulted context, no memory) is an error.
fn refused(e: &lt::CublasError) -> bool {
    use ltsys::cublasStatus_t as S;
    matches!(
        e.0,
        S::CUBLAS_STATUS_NOT_SUPPORTED
            | S::CUBLAS_STATUS_INVALID_VALUE
            | S::CUBLAS_STATUS_ARCH_MISMATCH
    )
}

/// Largest power of two (≤ 256) dividing the address: what cuBLASLt may assume about an operand.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

fn lt_type(d: DType) -> Option<ltsys::cudaDataType_t> {
    match d {
        DType::BF16 => Some(ltsys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Some(ltsys::cudaDataType_t::CUDA_R_16F),
        DType::F32 => Some(ltsys::cudaDataType_t::CUDA_R_32F),
        _ => None,
    }
}

impl Lt {
    /// A cuBLASLt handle and its workspace (32 MiB on Hopper and later, 4 MiB before: NVIDIA's advice).
    pub fn new(stream: &Arc<CudaStream>, cc_major: i32, tune: bool) -> Result<Lt> {
        let present =
            std::panic::catch_unwind(|| unsafe { ltsys::is_culib_present() }).unwrap_or(false);
        if !present {
            bail!("libcublasLt.so (CUDA 13) could not be loaded: use --gemm ex or install cuBLAS");
        }
        let handle = lt::create_handle().map_err(err("create handle"))?;
        let bytes = if cc_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| anyhow!("cuBLASLt workspace of {bytes} bytes: {e:?}"))?;
        Ok(Lt {
            handle,
            workspace,
            ctx: stream.context().clone(),
            plans: Mutex::new(HashMap::new()),
            tune,
            tuned: Mutex::new(Vec::new()),
            ran: AtomicUsize::new(0),
            ran_bias: AtomicUsize::new(0),
            fell_back: AtomicUsize::new(0),
            bias_declined: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        })
    }

    /// What [`Lt::gemm`] did so far.
    pub fn counts(&self) -> LtCounts {
        LtCounts {
            lt: self.ran.load(Ordering::Relaxed),
            lt_bias: self.ran_bias.load(Ordering::Relaxed),
            fallback: self.fell_back.load(Ordering::Relaxed),
            bias_declined: self.bias_declined.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Run `g` (see [`Gemm`]); `bias` is read only when `g.bias`. Ok(false), having done nothing, when
    /// cuBLASLt has no algorithm for it (or its algorithm failed to launch: a warning says so, and the shape
    /// is left to cublasGemmEx from then on) or the dtypes are not bf16/f16 operands: the caller then takes
    /// the cublasGemmEx path. `may_plan`: a shape met for the first time may be planned (and tuned:
    /// allocations, events, synchronisation); false while a CUDA graph is recorded, where a new shape is an
    /// error.
    ///
    /// # Safety
    /// The pointers must be device buffers of this context holding the elements `g` describes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        &self,
        stream: &Arc<CudaStream>,
        g: &Gemm,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        bias: u64,
        may_plan: bool,
    ) -> Result<bool> {
        if !matches!(g.ab, DType::BF16 | DType::F16) || (g.c != DType::F32 && g.c != g.ab) {
            return Ok(false);
        }
        // a GEMM cuBLASLt does not take: a declined bias epilogue, or one handed to cublasGemmEx
        let decline = |n: &AtomicUsize| {
            n.fetch_add(1, Ordering::Relaxed);
            Ok(false)
        };
        let declined = if g.bias {
            &self.bias_declined
        } else {
            &self.fell_back
        };
        if g.bias && alignment(bias) < 16 {
            return decline(declined); // there is no alignment preference to declare for the bias
        }
        let bias_align = if g.bias { alignment(bias) } else { 0 };
        let key: Key = (*g, [alignment(a), alignment(b), alignment(c), bias_align]);
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| anyhow!("cuBLASLt plan cache poisoned"))?;
        let p = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(_) if !may_plan => bail!(
                "cuBLASLt: GEMM {g:?} met for the first time while recording a CUDA graph (its planning \
                 allocates and synchronises): the shape's first micro-batch should have run it"
            ),
            Entry::Vacant(e) => e.insert(self.plan(stream, &key, a, b, bias)?),
        };
        let Some(plan) = p else {
            return decline(declined);
        };
        if let Err(e) = self.launch(stream, plan, g, alpha, a, b, beta, c, bias) {
            let refused = refused(&e);
            // cublasLt.h: an algorithm that passed its checks may still refuse to run. Outside a recording,
            // the shape goes to cublasGemmEx from now on; while recording, the error ends the recording
            // (graphs.rs then runs the micro-batch directly, where this is decided); a failure that is
            // not a refusal (a faulted context, no memory) is an error either way
            if !refused || !may_plan {
                return Err(err(&format!("matmul {}", g.shape()))(e));
            }
            crate::say!(
                "warning: cuBLASLt {}: its algorithm refused to launch ({e}); cublasGemmEx runs this shape from now on",
                g.shape()
            );
            *p = None;
            self.failed.fetch_add(1, Ordering::Relaxed);
            return decline(declined);
        }
        self.ran.fetch_add(1, Ordering::Relaxed);
        if g.bias {
            self.ran_bias.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(
        &self,
        stream: &CudaStream,
        p: &Plan,
        g: &Gemm,
        alpha: f32,
        a: u64,
        b: u64,
        beta: f32,
        c: u64,
        bias: u64,
    ) -> std::result::Result<(), lt::CublasError> {
        if g.bias {
            lt::set_matmul_desc_attribute(
                p.desc,
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )?;
        }
        let (ws, _rec) = self.workspace.device_ptr(stream);
        lt::matmul(
            self.handle,
            p.desc,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            b as *const _,
            p.l1,
            a as *const _,
            p.l2,
            c as *const _,
            p.ld,
            c as *mut _,
            p.ld,
            &p.algo,
            ws as *mut _,
            self.workspace.len(),
            stream.cu_stream() as *mut _,
        )
    }

    /// Descriptors and layouts for `key`, and its algorithm (timed among the heuristic's candidates, see the
    /// module doc); None when cuBLASLt offers none.
    unsafe fn plan(
        &self,
        stream: &Arc<CudaStream>,
        key: &Key,
        a: u64,
        b: u64,
        bias: u64,
    ) -> Result<Option<Plan>> {
        let (g, align) = key;
        let what = format!("plan for {}", g.shape());
        let (Some(tab), Some(tc)) = (lt_type(g.ab), lt_type(g.c)) else {
            return Ok(None);
        };
        // filled in step by step: whatever was created is destroyed with it if a step fails (Drop)
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            l1: std::ptr::null_mut(),
            l2: std::ptr::null_mut(),
            ld: std::ptr::null_mut(),
            algo: ltsys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(err(&what))?;
        let desc = plan.desc;
        let set = |attr, val: *const std::ffi::c_void, size| {
            lt::set_matmul_desc_attribute(desc, attr, val, size).map_err(err(&what))
        };
        let set_i32 = |attr, v: i32| set(attr, &v as *const i32 as *const _, 4);
        use ltsys::cublasLtMatmulDescAttributes_t as D;
        set_i32(D::CUBLASLT_MATMUL_DESC_TRANSA, g.tb as i32)?; // 1 = CUBLAS_OP_T
        set_i32(D::CUBLASLT_MATMUL_DESC_TRANSB, g.ta as i32)?;
        if g.bias {
            let epilogue = ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &epilogue as *const _ as *const _,
                std::mem::size_of_val(&epilogue),
            )?;
            // "Bias vector elements are the same type as the elements of output matrix (Dtype)" (cublasLt.h)
            // for these dtypes; the callers pass a bias of the output's dtype (gemm.rs)
            set_i32(D::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, tc as i32)?;
            set(
                D::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const _,
                8,
            )?;
        }
        // cuBLASLt's operand 1 = our B: stored (n,k) row-major when tb = (k,n) column-major, else (k,n)
        // row-major = (n,k) column-major; operand 2 = our A likewise; D = (n,m) column-major.
        let (m, k, n) = (g.m as u64, g.k as u64, g.n as u64);
        let (r1, c1) = if g.tb { (k, n) } else { (n, k) };
        let (r2, c2) = if g.ta { (m, k) } else { (k, m) };
        plan.l1 = lt::create_matrix_layout(tab, r1, c1, r1 as i64).map_err(err(&what))?;
        plan.l2 = lt::create_matrix_layout(tab, r2, c2, r2 as i64).map_err(err(&what))?;
        plan.ld = lt::create_matrix_layout(tc, n, m, n as i64).map_err(err(&what))?;
        let candidates = self.candidates(&plan, align, &what)?;
        if candidates.is_empty() {
            return Ok(None); // no algorithm for this shape and these alignments: cublasGemmEx
        }
        // what the candidates are tried with: a scratch output, and events when tuned. Without them (no
        // memory left) the heuristic's first, untried (a refusal at its first launch still falls back, see
        // gemm); a failure while trying them is an error
        let tools = (|| -> Result<_> {
            let bytes = g.m * g.n * g.c.size();
            let scratch = stream
                .alloc_zeros::<u8>(bytes.max(1))
                .map_err(|e| anyhow!("a scratch output of {bytes} bytes: {e:?}"))?;
            let events = if self.tune {
                let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                let ev = || {
                    self.ctx
                        .new_event(flags)
                        .map_err(|e| anyhow!("an event: {e:?}"))
                };
                Some((ev()?, ev()?))
            } else {
                None
            };
            Ok((scratch, events))
        })();
        let (scratch, events) = match tools {
            Ok(t) => t,
            Err(e) => {
                crate::say!(
                    "warning: cuBLASLt {}: no room to try its algorithms ({e:#}); taking the heuristic's first",
                    g.shape()
                );
                plan.algo = candidates[0];
                return Ok(Some(plan));
            }
        };
        let chosen = self
            .choose(
                stream,
                &mut plan,
                key,
                &candidates,
                (a, b, bias),
                &scratch,
                events.as_ref(),
            )
            .map_err(|e| anyhow!("cuBLASLt {what}: trying its algorithms: {e:#}"))?;
        match chosen {
            Some(algo) => {
                plan.algo = algo;
                Ok(Some(plan))
            }
            None => {
                crate::say!(
                    "warning: cuBLASLt {}: none of its {} algorithms ran; cublasGemmEx runs this shape",
                    g.shape(),
                    candidates.len()
                );
                self.failed.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// What the tuning measured so far, one [`Tuned`] per shape timed, in the order met.
    pub fn tuning(&self) -> Vec<Tuned> {
        self.tuned.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Up to 8 algorithms from cuBLASLt's heuristic, best first.
    unsafe fn candidates(
        &self,
        p: &Plan,
        align: &[u32; 4],
        what: &str,
    ) -> Result<Vec<ltsys::cublasLtMatmulAlgo_t>> {
        let pref = lt::create_matmul_pref().map_err(err(what))?;
        let ws = self.workspace.len() as u64;
        use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
        let settings = [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[0]), // our A is operand 2
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[1]), // our B is operand 1
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]),
        ];
        let mut r = lt::set_matmul_pref_attribute(
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const _,
            8,
        );
        for (attr, al) in settings {
            r = r.and_then(|_| {
                lt::set_matmul_pref_attribute(pref, attr, &al as *const u32 as *const _, 4)
            });
        }
        if let Err(e) = r {
            let _ = lt::destroy_matmul_pref(pref);
            return Err(err(what)(e)); // a preference cuBLASLt does not accept: a mistake here
        }
        let mut results: [ltsys::cublasLtMatmulHeuristicResult_t; 8] = std::mem::zeroed();
        let mut count = 0i32;
        let r = {
            ltsys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                p.desc,
                p.l1,
                p.l2,
                p.ld,
                p.ld,
                pref,
                results.len() as i32,
                results.as_mut_ptr(),
                &mut count,
            )
            .result()
        };
        let _ = lt::destroy_matmul_pref(pref);
        match r {
            // cublasLt.h: "CUBLAS_STATUS_NOT_SUPPORTED if no heuristic function available for current
            // configuration" — no algorithm, not a mistake; any other status is one (a bad attribute, layout)
            Err(lt::CublasError(ltsys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                return Ok(vec![])
            }
            r => r.map_err(err(what))?,
        }
        Ok(results[..count.clamp(0, 8) as usize]
            .iter()
            .filter(|h| h.state.result().is_ok())
            .map(|h| h.algo)
            .collect())
    }

    /// The algorithm to run `key`'s GEMM with: each candidate (the heuristic's order) launches once into
    /// `scratch` (β = 0, so the caller's C is untouched) — one that refuses is passed over; with `events`
    /// (tuned), each that ran then runs 3 times between them and the fastest is taken (what was measured goes
    /// to [`Lt::tuning`]); without, the first that ran. Ok(None) when none ran; Err when the stream fails.
    #[allow(clippy::too_many_arguments)]
    unsafe fn choose(
        &self,
        stream: &Arc<CudaStream>,
        plan: &mut Plan,
        key: &Key,
        candidates: &[ltsys::cublasLtMatmulAlgo_t],
        (a, b, bias): (u64, u64, u64),
        scratch: &CudaSlice<u8>,
        events: Option<&(CudaEvent, CudaEvent)>,
    ) -> Result<Option<ltsys::cublasLtMatmulAlgo_t>> {
        let g = &key.0;
        let (d, _rec) = scratch.device_ptr(stream);
        let mut best: Option<(f32, ltsys::cublasLtMatmulAlgo_t)> = None;
        let mut times = Vec::with_capacity(candidates.len());
        for &algo in candidates {
            plan.algo = algo;
            times.push(None);
            match self.launch(stream, plan, g, 1.0, a, b, 0.0, d, bias) {
                Ok(()) => {}
                Err(e) if refused(&e) => continue, // this candidate does not run here: the next one
                Err(e) => return Err(err("trying a candidate")(e)),
            }
            let Some((start, stop)) = events else {
                best = Some((0.0, algo)); // untuned: the first that runs
                break;
            };
            start.record(stream).map_err(|e| anyhow!("{e:?}"))?;
            // it ran once just now: a failure of the same launch is a fault, not a refusal
            for _ in 0..3 {
                self.launch(stream, plan, g, 1.0, a, b, 0.0, d, bias)
                    .map_err(err("timing a candidate"))?;
            }
            stop.record(stream).map_err(|e| anyhow!("{e:?}"))?;
            let ms = start.elapsed_ms(stop).map_err(|e| anyhow!("{e:?}"))?;
            *times.last_mut().expect("pushed above") = Some(ms / 3.0);
            if best.is_none_or(|(b, _)| ms < b) {
                best = Some((ms, algo));
            }
        }
        stream
            .synchronize()
            .map_err(|e| anyhow!("synchronising after its candidates: {e:?}"))?;
        if events.is_some() {
            if let Ok(mut t) = self.tuned.lock() {
                t.push(Tuned {
                    gemm: *g,
                    align: key.1,
                    ms: times,
                });
            }
        }
        Ok(best.map(|(_, algo)| algo))
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn a_tuning_line_names_the_heuristics_first_the_fastest_and_the_failures() {
        use super::{Gemm, Tuned};
        use crate::tensor::DType;
        let gemm = Gemm {
            m: 4096,
            k: 768,
            n: 3072,
            ta: false,
            tb: true,
            ab: DType::BF16,
            c: DType::BF16,
            bias: true,
        };
        let t = Tuned {
            gemm,
            align: [256, 256, 256, 128],
            ms: vec![Some(0.050), None, Some(0.040), Some(0.045)],
        };
        assert_eq!(t.best(), Some((2, 0.040)));
        assert_eq!(
            t.line(),
            "4096x768x3072 NT bf16->bf16 +bias (aligned 256/256/256/128): heuristic's #1 50.0 µs, fastest #3 40.0 µs (-20.0%), of 4 candidates, 1 failed"
        );
        let first_failed = Tuned {
            gemm,
            align: [256, 16, 256, 256],
            ms: vec![None, Some(0.030)],
        };
        assert_eq!(
            first_failed.line(),
            "4096x768x3072 NT bf16->bf16 +bias (aligned 256/16/256/256): heuristic's #1 failed, fastest #2 30.0 µs, of 2 candidates, 1 failed"
        );
        let none = Tuned {
            gemm: Gemm {
                bias: false,
                ..gemm
            },
            align: [256, 256, 256, 0],
            ms: vec![None, None],
        };
        assert_eq!(none.best(), None);
        assert_eq!(
            none.line(),
            "4096x768x3072 NT bf16->bf16 (aligned 256/256/256): none of 2 candidates ran"
        );
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100), 256);
        assert_eq!(alignment(0x7f00_0000_0080), 128);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0x7f00_0000_0001), 1);
    }
}
