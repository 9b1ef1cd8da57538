//! cuBLASLt for the bf16/f16 GEMMs (`GemmPath::Lt` in the kernel configuration, `--gemm lt` /
//! `BERTQA_GEMM=lt`; opt-in until the GPU parity suite has run it):
//! - the linear layers' forward as one matmul with the bias added in its epilogue (`CUBLASLT_EPILOGUE_BIAS`)
//!   instead of cublasGemmEx followed by the bias_add kernel, which reads and writes the whole output once
//!   more (BERT-base, B=32 T=384: 340 MB per layer);
//! - every other bf16/f16 GEMM (the backward's dX and dW) through the same path, so that all of them get
//!   the algorithm choice below.
//!
//! Each (shape, transposes, dtypes, epilogue, pointer alignment) gets a plan once: descriptors, layouts and an
//! algorithm. The algorithm is the fastest of cuBLASLt's first 8 heuristic candidates, each timed (CUDA
//! events, 3 runs after a warm-up) into a scratch output; without tuning (`--gemm-tune off`) the heuristic's first.
//! Later calls only set the bias pointer and launch. Accumulation and scale type are f32.
//!
//! Row-major terms as [`super::Cuda::gemm`]: `C(m,n) = α·op(A)(m,k)·op(B)(k,n) + β·C`. cuBLAS is
//! column-major, where row-major C is `Cᵀ (n,m)`: so cuBLASLt's first operand is our B (op = T when `tb`),
//! its second our A, and its D is `(n, m)` with leading dimension n; a bias of length n runs along D's rows.

use crate::tensor::DType;
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use std::collections::hash_map::{Entry, HashMap};
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

/// A plan's key: the GEMM and the alignment in bytes of A, B and C.
type Key = (Gemm, [u32; 3]);

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
}

// The backend has one stream, and the plan cache is behind a mutex held for the whole call.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(plans) = self.plans.get_mut() {
            for (_, p) in plans.drain() {
                if let Some(p) = p {
                    p.destroy();
                }
            }
        }
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl Plan {
    fn destroy(self) {
        unsafe {
            let _ = lt::destroy_matrix_layout(self.l1);
            let _ = lt::destroy_matrix_layout(self.l2);
            let _ = lt::destroy_matrix_layout(self.ld);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn err(what: &str) -> impl Fn(lt::CublasError) -> anyhow::Error + '_ {
    move |e| anyhow!("cuBLASLt {what}: {e:?}")
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
        })
    }

    /// Run `g` (see [`Gemm`]); `bias` is read only when `g.bias`. Ok(false), having done nothing, when
    /// cuBLASLt has no algorithm for it or the dtypes are not bf16/f16 operands: the caller then takes the
    /// cublasGemmEx path. `may_plan`: a shape met for the first time may be planned (and tuned: allocations,
    /// events, synchronisation); false while a CUDA graph is recorded, where a new shape is an error.
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
        if g.bias && alignment(bias) < 16 {
            return Ok(false); // there is no alignment preference to declare for the bias
        }
        let key: Key = (*g, [alignment(a), alignment(b), alignment(c)]);
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
        let Some(p) = p else {
            return Ok(false);
        };
        self.launch(stream, p, g, alpha, a, b, beta, c, bias)?;
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
    ) -> Result<()> {
        let what = format!("matmul {g:?}");
        if g.bias {
            lt::set_matmul_desc_attribute(
                p.desc,
                ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )
            .map_err(err(&what))?;
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
        .map_err(err(&what))
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
        let what = format!("plan for {g:?}");
        let (Some(tab), Some(tc)) = (lt_type(g.ab), lt_type(g.c)) else {
            return Ok(None);
        };
        let desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(err(&what))?;
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
        let l1 = lt::create_matrix_layout(tab, r1, c1, r1 as i64).map_err(err(&what))?;
        let l2 = lt::create_matrix_layout(tab, r2, c2, r2 as i64).map_err(err(&what))?;
        let ld = lt::create_matrix_layout(tc, n, m, n as i64).map_err(err(&what))?;
        let mut plan = Plan {
            desc,
            l1,
            l2,
            ld,
            algo: ltsys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let candidates = match self.candidates(&plan, align, &what) {
            Ok(c) if !c.is_empty() => c,
            _ => {
                plan.destroy();
                return Ok(None);
            }
        };
        plan.algo = candidates[0];
        if self.tune && candidates.len() > 1 {
            plan.algo = self.fastest(stream, &mut plan, g, &candidates, a, b, bias)?;
        }
        Ok(Some(plan))
    }

    /// Up to 8 algorithms from cuBLASLt's heuristic, best first.
    unsafe fn candidates(
        &self,
        p: &Plan,
        align: &[u32; 3],
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
        let mut results: [ltsys::cublasLtMatmulHeuristicResult_t; 8] = std::mem::zeroed();
        let mut count = 0i32;
        let r = r.and_then(|_| {
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
        });
        let _ = lt::destroy_matmul_pref(pref);
        r.map_err(err(what))?;
        Ok(results[..count.clamp(0, 8) as usize]
            .iter()
            .filter(|h| h.state.result().is_ok())
            .map(|h| h.algo)
            .collect())
    }

    /// The fastest of `candidates` on this GEMM: each runs once to warm up, then 3 times between CUDA events,
    /// writing (β = 0) into a scratch output so that the caller's C is untouched.
    #[allow(clippy::too_many_arguments)]
    unsafe fn fastest(
        &self,
        stream: &Arc<CudaStream>,
        plan: &mut Plan,
        g: &Gemm,
        candidates: &[ltsys::cublasLtMatmulAlgo_t],
        a: u64,
        b: u64,
        bias: u64,
    ) -> Result<ltsys::cublasLtMatmulAlgo_t> {
        let bytes = g.m * g.n * g.c.size();
        let scratch = stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| anyhow!("cuBLASLt tuning scratch of {bytes} bytes: {e:?}"))?;
        let (d, _rec) = scratch.device_ptr(stream);
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |s: &str| {
            self.ctx
                .new_event(flags)
                .map_err(|e| anyhow!("cuBLASLt tuning: {s} event: {e:?}"))
        };
        let (start, stop) = (ev("start")?, ev("stop")?);
        let mut best = (f32::INFINITY, candidates[0]);
        for &algo in candidates {
            plan.algo = algo;
            // a candidate that fails to launch is skipped
            if self
                .launch(stream, plan, g, 1.0, a, b, 0.0, d, bias)
                .is_err()
            {
                continue;
            }
            let timed = (|| -> Result<f32> {
                start.record(stream).map_err(|e| anyhow!("{e:?}"))?;
                for _ in 0..3 {
                    self.launch(stream, plan, g, 1.0, a, b, 0.0, d, bias)?;
                }
                stop.record(stream).map_err(|e| anyhow!("{e:?}"))?;
                start.elapsed_ms(&stop).map_err(|e| anyhow!("{e:?}"))
            })();
            if let Ok(ms) = timed {
                if ms < best.0 {
                    best = (ms, algo);
                }
            }
        }
        stream
            .synchronize()
            .map_err(|e| anyhow!("cuBLASLt tuning of {g:?}: {e:?}"))?;
        Ok(best.1)
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100), 256);
        assert_eq!(alignment(0x7f00_0000_0080), 128);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0x7f00_0000_0001), 1);
    }
}
