//! The wgmma probe (kernels/wgmma_probe.cu): one warpgroup computes `D (64,N) = A (64,K) · B (K,N) (+ C)` with
//! Hopper's `wgmma.mma_async`, for every way of handing it its operands — A from registers or from shared memory
//! (K-major or M-major), B K-major or N-major, each swizzle mode. Not used in training: it is how the kernel
//! emulator's reading of the PTX ISA's wgmma layouts meets the hardware. tests/emu_kernels.rs runs
//! [`WgmmaProbeCase::sweep`] in the emulator and tests/parity.rs `gpu_wgmma_probe` on an sm_90 GPU, both
//! against [`WgmmaProbeCase::reference`], bit for bit: the inputs are small integers, so every product and sum
//! is exact in f32 and a misplaced element cannot hide in a tolerance. A kernel built on wgmma ships only once
//! both pass.

use super::Cuda;
use crate::backend::BackendCore;
use crate::kernel::Launch;
use crate::tensor::{encode_f64, DType};
use anyhow::{bail, Result};

/// kernels/wgmma_probe.cu `WgProbeParams`: device addresses and the case's choices as integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct WgProbeParams {
    /// (64, K) 16-bit, row-major
    pub a: u64,
    /// (K, N) 16-bit, row-major
    pub b: u64,
    /// (64, N) f32, the accumulator's start when `acc` = 1
    pub c: u64,
    /// (64, N) f32, out
    pub d: u64,
    pub k: i32,
    /// 0 registers, 1 shared K-major, 2 shared M-major
    pub a_mode: i32,
    /// 0 K-major, 1 N-major
    pub b_major: i32,
    /// the matrix descriptor's swizzle code ([`Swizzle::code`])
    pub swizzle: i32,
    pub acc: i32,
    /// emulator tests only: 1 skips fence.proxy.async, 2 skips wgmma.fence, 3 writes an accumulator before
    /// wgmma.wait_group, 4 writes it between the waits of groups chained on it (each undefined on a GPU; the
    /// emulator must catch it)
    pub fault: i32,
}
unsafe impl cudarc::driver::DeviceRepr for WgProbeParams {}

/// The parameter layout (checked against kernels/wgmma_probe.cu by tests/kernels_compile.rs).
pub fn layouts() -> Vec<crate::kernel::ParamLayout> {
    vec![crate::param_layout!(WgProbeParams {
        a,
        b,
        c,
        d,
        k,
        a_mode,
        b_major,
        swizzle,
        acc,
        fault
    })]
}

/// Where wgmma takes its A operand from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AOperand {
    /// four 32-bit registers per thread (mma.m16n8k16's A layout per warp)
    Registers,
    /// shared memory, K contiguous
    KMajor,
    /// shared memory, M contiguous (`imm-trans-a` = 1)
    MMajor,
}

/// The shared-memory swizzle of both operands' tiles (PTX ISA 9.7.15.5.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    None,
    B32,
    B64,
    B128,
}

impl Swizzle {
    pub const ALL: [Swizzle; 4] = [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128];
    /// The matrix descriptor's bits 62–63.
    pub fn code(self) -> i32 {
        match self {
            Swizzle::None => 0,
            Swizzle::B128 => 1,
            Swizzle::B64 => 2,
            Swizzle::B32 => 3,
        }
    }
    /// Bytes per swizzled row (16: one core-matrix row, without swizzling).
    pub fn bytes(self) -> usize {
        match self {
            Swizzle::None => 16,
            Swizzle::B32 => 32,
            Swizzle::B64 => 64,
            Swizzle::B128 => 128,
        }
    }
}

/// One probe: shapes, operand sources, swizzle, and whether D starts from C.
#[derive(Clone, Copy, Debug)]
pub struct WgmmaProbeCase {
    /// BF16 or F16
    pub dtype: DType,
    /// 32 or 64
    pub n: usize,
    /// 16, 32, 48 or 64: K/16 chained wgmmas on one accumulator
    pub k: usize,
    pub a: AOperand,
    pub b_n_major: bool,
    pub swizzle: Swizzle,
    /// D = A·B + C (scale-d 1 throughout); false: the first wgmma's scale-d is 0 over NaN accumulators
    pub acc: bool,
}

/// Dynamic shared memory of a probe launch: 1024 bytes to align the tiles, an A tile of 64×64 and a B tile of
/// 64×64 16-bit elements.
pub const PROBE_SMEM: u32 = 1024 + 2 * 64 * 64 * 2;

impl WgmmaProbeCase {
    /// A tile that is MN-major and swizzled needs an MN extent of at least one swizzled row (W/2 elements).
    pub fn valid(&self) -> bool {
        let row = self.swizzle.bytes() / 2;
        matches!(self.dtype, DType::BF16 | DType::F16)
            && (self.n == 32 || self.n == 64)
            && self.k.is_multiple_of(16)
            && (16..=64).contains(&self.k)
            && (!self.b_n_major || self.swizzle == Swizzle::None || self.n >= row)
    }

    pub fn name(&self) -> String {
        format!(
            "{} n{} k{} A {:?} B {} swizzle {:?}{}",
            self.dtype,
            self.n,
            self.k,
            self.a,
            if self.b_n_major { "N-major" } else { "K-major" },
            self.swizzle,
            if self.acc { " +C" } else { "" }
        )
    }

    /// Every valid combination of A source, B major-ness, swizzle and N at K = 48 (three chained wgmmas, the
    /// descriptor's start moving inside and across swizzle rows), half of them accumulating onto C, and K = 16
    /// and 64 once each; in bf16 and f16.
    pub fn sweep() -> Vec<WgmmaProbeCase> {
        let mut v = vec![];
        for dtype in [DType::BF16, DType::F16] {
            for n in [32, 64] {
                for a in [AOperand::Registers, AOperand::KMajor, AOperand::MMajor] {
                    for b_n_major in [false, true] {
                        for swizzle in Swizzle::ALL {
                            let c = WgmmaProbeCase {
                                dtype,
                                n,
                                k: 48,
                                a,
                                b_n_major,
                                swizzle,
                                acc: v.len() % 2 == 1,
                            };
                            if c.valid() {
                                v.push(c);
                            }
                        }
                    }
                }
            }
            for (k, a) in [(16, AOperand::MMajor), (64, AOperand::KMajor)] {
                v.push(WgmmaProbeCase {
                    dtype,
                    n: 64,
                    k,
                    a,
                    b_n_major: true,
                    swizzle: Swizzle::B128,
                    acc: true,
                });
            }
        }
        v
    }

    /// A (64,K), B (K,N) and C (64,N) of small integers (exact in bf16, f16 and every f32 sum here), from a
    /// seed: A, B in [-4, 4], C in [-64, 64].
    pub fn inputs(&self, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = |span: i64| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as i64 % (2 * span + 1) - span) as f32
        };
        let a = (0..64 * self.k).map(|_| next(4)).collect();
        let b = (0..self.k * self.n).map(|_| next(4)).collect();
        let c = (0..64 * self.n).map(|_| next(64)).collect();
        (a, b, c)
    }

    /// `A·B (+ C)`, exact (f64 sums of integers).
    pub fn reference(&self, a: &[f32], b: &[f32], c: &[f32]) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        (0..64 * n)
            .map(|e| {
                let (i, j) = (e / n, e % n);
                let s: f64 = (0..k)
                    .map(|t| a[i * k + t] as f64 * b[t * n + j] as f64)
                    .sum();
                (s + if self.acc { c[e] as f64 } else { 0.0 }) as f32
            })
            .collect()
    }

    /// The launch on buffers at device addresses `a`, `b`, `c`, `d` (one block of one warpgroup).
    pub fn launch(&self, a: u64, b: u64, c: u64, d: u64) -> Result<Launch<WgProbeParams>> {
        if !self.valid() {
            bail!("wgmma probe: not a valid case: {}", self.name());
        }
        let dt = crate::kernel::suffix(self.dtype)?;
        Ok(Launch {
            module: "wgmma_probe",
            name: format!("wgmma_probe_{dt}_n{}", self.n),
            grid: (1, 1, 1),
            block: (128, 1, 1),
            smem: PROBE_SMEM,
            params: WgProbeParams {
                a,
                b,
                c,
                d,
                k: self.k as i32,
                a_mode: match self.a {
                    AOperand::Registers => 0,
                    AOperand::KMajor => 1,
                    AOperand::MMajor => 2,
                },
                b_major: self.b_n_major as i32,
                swizzle: self.swizzle.code(),
                acc: self.acc as i32,
                fault: 0,
            },
        })
    }
}

/// Runs one probe on the GPU and returns D (64·N, row-major). Needs an sm_90 device (the module is compiled
/// for sm_90a there); elsewhere an error says so.
pub fn run(be: &Cuda, case: &WgmmaProbeCase, a: &[f32], b: &[f32], c: &[f32]) -> Result<Vec<f32>> {
    if !be.has_wgmma() {
        bail!(
            "wgmma probe: wgmma needs compute capability 9.0 (this device is {})",
            be.arch()
        );
    }
    let dt = case.dtype;
    let mut ab = be.alloc(dt, a.len())?;
    let mut bb = be.alloc(dt, b.len())?;
    let mut cb = be.alloc(DType::F32, c.len())?;
    let db = be.alloc(DType::F32, 64 * case.n)?;
    let enc = |v: &[f32], d: DType| encode_f64(&v.iter().map(|&x| x as f64).collect::<Vec<_>>(), d);
    be.upload(&mut ab, dt, &enc(a, dt))?;
    be.upload(&mut bb, dt, &enc(b, dt))?;
    be.upload(&mut cb, DType::F32, &enc(c, DType::F32))?;
    let l = case.launch(ab.ptr, bb.ptr, cb.ptr, db.ptr)?;
    // SAFETY: the buffers hold the (64,K), (K,N), (64,N), (64,N) elements the kernel reads and writes
    unsafe { be.run(&l)? };
    be.sync()?;
    let mut out = vec![0u8; 64 * case.n * 4];
    be.download(&db, DType::F32, &mut out)?;
    Ok(out
        .chunks_exact(4)
        .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect())
}
