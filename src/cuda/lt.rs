//! cuBLASLt for the forward of the linear layers: `out (N,OC) = inp (N,IC)·Wᵀ + b` as one matmul with the
//! bias added in its epilogue (`CUBLASLT_EPILOGUE_BIAS`), instead of cublasGemmEx followed by the bias_add
//! kernel — which reads and writes the whole output once more (BERT-base, B=32 T=384: 340 MB per layer).
//!
//! Each (shape, dtype, pointer alignment) gets a plan once: descriptors, layouts and the algorithm cuBLASLt's
//! heuristic ranks first; later calls only set the bias pointer and launch. Operands are bf16/f16, the
//! accumulation and the scale type f32 (as in [`super::Cuda::gemm_ptr`]).
//!
//! Column-major view (cuBLAS): row-major `out (N,OC)` is `D (OC,N)`, `W (OC,IC)` is `(IC,OC)` read transposed,
//! `inp (N,IC)` is `(IC,N)`; so `D = op(W)·inp` with `transa = T`, and the bias runs along D's rows (OC).
//!
//! Opt-in (`BERTQA_GEMM=lt`) until the GPU parity suite has run with it: see docs/perf-log.md.

use crate::tensor::DType;
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Arc, Mutex};

/// What decides a plan: (N, IC, OC, dtype code, alignment in bytes of inp, w, out).
type Key = (usize, usize, usize, u8, [u32; 3]);

struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    a: ltsys::cublasLtMatrixLayout_t,
    b: ltsys::cublasLtMatrixLayout_t,
    d: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

pub struct Lt {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: Mutex<HashMap<Key, Plan>>,
}

// The handles are used from one stream at a time (the backend has one stream); cuBLASLt handles are
// thread-safe for use by one host thread at a time, which the plan mutex and the backend's usage ensure.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        if let Ok(plans) = self.plans.get_mut() {
            for (_, p) in plans.drain() {
                unsafe {
                    let _ = lt::destroy_matrix_layout(p.a);
                    let _ = lt::destroy_matrix_layout(p.b);
                    let _ = lt::destroy_matrix_layout(p.d);
                    let _ = lt::destroy_matmul_desc(p.desc);
                }
            }
        }
        unsafe {
            let _ = lt::destroy_handle(self.handle);
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

impl Lt {
    /// A cuBLASLt handle and its workspace (32 MiB on Hopper and later, 4 MiB before: NVIDIA's advice).
    pub fn new(stream: &Arc<CudaStream>, cc_major: i32) -> Result<Lt> {
        let present =
            std::panic::catch_unwind(|| unsafe { ltsys::is_culib_present() }).unwrap_or(false);
        if !present {
            bail!(
                "libcublasLt.so (CUDA 13) could not be loaded: unset BERTQA_GEMM or install cuBLAS"
            );
        }
        let handle = lt::create_handle().map_err(err("create handle"))?;
        let bytes = if cc_major >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = stream
            .alloc_zeros::<u8>(bytes)
            .map_err(|e| anyhow!("cuBLASLt workspace of {bytes} bytes: {e:?}"))?;
        Ok(Lt {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Row-major `out (n,oc) = inp (n,ic)·wᵀ + bias`, every operand of dtype `dt` (bf16 or f16).
    /// Returns Ok(false), having done nothing, when cuBLASLt offers no algorithm for it (the caller then
    /// takes the cublasGemmEx + bias_add path).
    ///
    /// # Safety
    /// The pointers must be device buffers of this context holding n·ic, oc·ic, oc and n·oc elements.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn linear_bias(
        &self,
        stream: &CudaStream,
        (n, ic, oc): (usize, usize, usize),
        inp: u64,
        w: u64,
        bias: u64,
        out: u64,
        dt: DType,
    ) -> Result<bool> {
        let (ty, code) = match dt {
            DType::BF16 => (ltsys::cudaDataType_t::CUDA_R_16BF, 1u8),
            DType::F16 => (ltsys::cudaDataType_t::CUDA_R_16F, 2u8),
            _ => return Ok(false),
        };
        // Every tensor is its own arena allocation (256-byte aligned), so these hold in practice; a bias that
        // is not 16-byte aligned has no alignment preference to declare, so it takes the other path.
        if alignment(bias) < 16 {
            return Ok(false);
        }
        let key: Key = (
            n,
            ic,
            oc,
            code,
            [alignment(inp), alignment(w), alignment(out)],
        );
        let mut plans = self
            .plans
            .lock()
            .map_err(|_| anyhow!("cuBLASLt plan cache poisoned"))?;
        let p = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match self.plan(&key, ty)? {
                Some(p) => e.insert(p),
                None => return Ok(false),
            },
        };
        let what = format!("linear+bias matmul (N={n}, IC={ic}, OC={oc}, {dt})");
        lt::set_matmul_desc_attribute(
            p.desc,
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias as *const u64 as *const _,
            std::mem::size_of::<u64>(),
        )
        .map_err(err(&what))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        use cudarc::driver::DevicePtr;
        let (ws, _rec) = self.workspace.device_ptr(stream);
        lt::matmul(
            self.handle,
            p.desc,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            w as *const _,
            p.a,
            inp as *const _,
            p.b,
            out as *const _,
            p.d,
            out as *mut _,
            p.d,
            &p.algo,
            ws as *mut _,
            self.workspace.len(),
            stream.cu_stream() as *mut _,
        )
        .map_err(err(&what))?;
        Ok(true)
    }

    /// Descriptors, layouts and the heuristic's first algorithm for `key`; None when there is none.
    unsafe fn plan(&self, key: &Key, ty: ltsys::cudaDataType_t) -> Result<Option<Plan>> {
        let &(n, ic, oc, _, align) = key;
        let what = format!("plan for linear+bias (N={n}, IC={ic}, OC={oc})");
        let desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(err(&what))?;
        let set = |attr, val: *const std::ffi::c_void, size| {
            lt::set_matmul_desc_attribute(desc, attr, val, size).map_err(err(&what))
        };
        let trans_t = 1i32; // CUBLAS_OP_T
        set(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans_t as *const i32 as *const _,
            4,
        )?;
        let epilogue = ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        set(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epilogue as *const _ as *const _,
            std::mem::size_of_val(&epilogue),
        )?;
        let bias_ty = ty as i32;
        set(
            ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
            &bias_ty as *const i32 as *const _,
            4,
        )?;
        // A = W read transposed: stored (IC rows, OC cols) column-major; B = inp (IC, N); D = out (OC, N).
        let a =
            lt::create_matrix_layout(ty, ic as u64, oc as u64, ic as i64).map_err(err(&what))?;
        let b = lt::create_matrix_layout(ty, ic as u64, n as u64, ic as i64).map_err(err(&what))?;
        let d = lt::create_matrix_layout(ty, oc as u64, n as u64, oc as i64).map_err(err(&what))?;
        let pref = lt::create_matmul_pref().map_err(err(&what))?;
        let ws = self.workspace.len() as u64;
        let pref_set = |attr, val: *const std::ffi::c_void, size| {
            lt::set_matmul_pref_attribute(pref, attr, val, size).map_err(err(&what))
        };
        use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
        pref_set(
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &ws as *const u64 as *const _,
            8,
        )?;
        // [inp, w, out] → B, A, C and D alignments (the bias has no such preference: see linear_bias)
        for (attr, al) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]),
        ] {
            pref_set(attr, &al as *const u32 as *const _, 4)?;
        }
        let found = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, d, d, pref);
        let _ = lt::destroy_matmul_pref(pref);
        match found {
            Ok(h) => Ok(Some(Plan {
                desc,
                a,
                b,
                d,
                algo: h.algo,
            })),
            Err(_) => {
                let _ = lt::destroy_matrix_layout(a);
                let _ = lt::destroy_matrix_layout(b);
                let _ = lt::destroy_matrix_layout(d);
                let _ = lt::destroy_matmul_desc(desc);
                Ok(None)
            }
        }
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
