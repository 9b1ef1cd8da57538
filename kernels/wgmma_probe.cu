// wgmma_probe.cu — one warpgroup multiplies D (64×N, f32) = A (64×K) · B (K×N) (+ C) with wgmma.mma_async, for
// each way of handing it its operands: A from registers or from shared memory (K-major or M-major), B K-major
// or N-major, in each swizzle mode. Not used in training. It is the check that the emulator (tests/emu) reads
// the PTX ISA's wgmma layouts (register fragments, matrix descriptors, canonical layouts, swizzles) as the
// hardware does: tests/emu_kernels.rs runs it against a CPU product in the emulator, and the GPU test
// (tests/parity.rs `gpu_wgmma_probe`) on an sm_90 device — the same cases, the same reference. A kernel built on
// wgmma ships only after both pass. Reference: src/cuda/wgmma_probe.rs `reference`.
//
// Staging follows the canonical layouts (PTX ISA 9.7.15.5.1.2.1.3; T = 8 16-bit elements = 16 bytes, W the
// swizzle width in bytes), each element (mn, k) of a tile with MN extent R and K extent K placed at:
//   K-major, none:      core matrices of 8 rows × 16 bytes; (mn/8, k/8) at (k/8 · R/8 + mn/8) · 128 bytes:
//                       SBO = 128 (next 8 rows), LBO = R/8 · 128 (next 8 k).
//   K-major, W:         atoms of 8 rows × W bytes; (mn/8, k/(W/2)) at (k/(W/2) · R/8 + mn/8) · 8W: SBO = 8W;
//                       the k-step's 32 bytes at (32·step) % W within its row (the descriptor's start moves).
//   MN-major, none:     core matrices of 8 k-rows × 16 bytes of mn; (mn/8, k/8) at (k/8 · R/8 + mn/8) · 128:
//                       SBO = 128 (next 8 mn), LBO = R/8 · 128 (next 8 k).
//   MN-major, W:        atoms of 8 k-rows × W bytes of mn; (mn/(W/2), k/8) at (k/8 · R/(W/2) + mn/(W/2)) · 8W:
//                       LBO = 8W (next W/2 mn), SBO = R/(W/2) · 8W (next 8 k).
// then the 16-byte chunk swizzled by its .shared address. Tiles start on a 1024-byte boundary of the .shared
// window (the kernel aligns them; the emulator's window is deliberately not aligned).
#include "common.cuh"

struct WgProbeParams {
    u64 a;        // (64, K) 16-bit, row-major
    u64 b;        // (K, N) 16-bit, row-major
    u64 c;        // (64, N) f32: the accumulator's start when acc = 1
    u64 d;        // (64, N) f32: out
    int k;        // a multiple of 16, at most 64
    int a_mode;   // 0: registers, 1: shared K-major, 2: shared M-major
    int b_major;  // 0: K-major, 1: N-major
    int swizzle;  // WG_SWIZZLE_* (A and B alike)
    int acc;      // 1: D = A·B + C; 0: the first wgmma ignores the (NaN) accumulator (scale-d = 0)
    int fault;    // emulator tests of its protocol checks: 1 no fence.proxy.async, 2 no wgmma.fence,
                  // 3 an accumulator written before wgmma.wait_group, 4 the same between the waits of two
                  // groups chained on it (0 on a GPU: the others are undefined there)
};
CHECK_LAYOUT(WgProbeParams, 56);
CHECK_FIELD(WgProbeParams, a, 0);
CHECK_FIELD(WgProbeParams, b, 8);
CHECK_FIELD(WgProbeParams, c, 16);
CHECK_FIELD(WgProbeParams, d, 24);
CHECK_FIELD(WgProbeParams, k, 32);
CHECK_FIELD(WgProbeParams, a_mode, 36);
CHECK_FIELD(WgProbeParams, b_major, 40);
CHECK_FIELD(WgProbeParams, swizzle, 44);
CHECK_FIELD(WgProbeParams, acc, 48);
CHECK_FIELD(WgProbeParams, fault, 52);

#ifdef BERTQA_HAVE_WGMMA
// Byte offset (before swizzling) of element (mn, k) in a tile of MN extent r (see the header), and the tile's
// leading and stride byte offsets.
struct ProbeTile {
    bool mn_major;
    int mode, r;
    __device__ u32 w() const { return wg_swizzle_bytes(mode); }
    __device__ u32 offset(int mn, int k) const {
        if (!mn_major) {
            if (mode == WG_SWIZZLE_NONE) return (u32)((k / 8) * (r / 8) + mn / 8) * 128u + (mn % 8) * 16u + (k % 8) * 2u;
            u32 per = w() / 2;
            return (u32)((k / per) * (r / 8) + mn / 8) * 8u * w() + (mn % 8) * w() + (k % per) * 2u;
        }
        if (mode == WG_SWIZZLE_NONE) return (u32)((k / 8) * (r / 8) + mn / 8) * 128u + (k % 8) * 16u + (mn % 8) * 2u;
        u32 per = w() / 2;
        return (u32)((k / 8) * (r / per) + mn / per) * 8u * w() + (k % 8) * w() + (mn % per) * 2u;
    }
    __device__ u32 lbo() const {
        if (!mn_major) return mode == WG_SWIZZLE_NONE ? (u32)(r / 8) * 128u : 16u;  // swizzled K-major: unused
        return mode == WG_SWIZZLE_NONE ? (u32)(r / 8) * 128u : 8u * w();
    }
    __device__ u32 sbo() const {
        if (!mn_major) return mode == WG_SWIZZLE_NONE ? 128u : 8u * w();
        return mode == WG_SWIZZLE_NONE ? 128u : (u32)(r / (w() / 2)) * 8u * w();
    }
    // the descriptor's start for k-step s (16 k): where element (0, 16s) is, before swizzling
    __device__ u32 step(int s) const { return offset(0, 16 * s); }
};

template <typename T>
__device__ void stage(char* tile, const T* src, int rows, int cols, bool transposed, const ProbeTile& t) {
    // src is (rows, cols) row-major; element (i, j) is (mn, k) = (i, j), or (j, i) when transposed
    u32 base = smem_u32(tile);
    for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
        int i = e / cols, j = e % cols;
        int mn = transposed ? j : i, k = transposed ? i : j;
        u32 at = wg_swizzle(base + t.offset(mn, k), t.mode);
        *(T*)(tile + (at - base)) = src[e];
    }
}

template <typename T, int N>
__device__ void wgmma_probe(const WgProbeParams& p) {
    DYN_SMEM(char, smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 s0 = smem_u32(smem);
    char* as = smem + ((1024u - (s0 & 1023u)) & 1023u);  // tiles on the 128-byte swizzle's 1024-byte boundary
    char* bs = as + 64 * 64 * sizeof(T);
    ProbeTile ta{p.a_mode == 2, p.swizzle, 64}, tb{p.b_major == 1, p.swizzle, N};
    if (p.a_mode != 0) stage<T>(as, (const T*)p.a, 64, p.k, false, ta);
    stage<T>(bs, (const T*)p.b, p.k, N, true, tb);  // B (K, N) row-major: element (k, n) is (mn, k) = (n, k)
    if (p.fault != 1) fence_proxy_async();
    __syncthreads();
    // this thread's accumulator elements: d[4j + i] is (row 16·warp + lane/4 + 8(i/2), col 8j + 2(lane%4) + i%2)
    float d[N / 2];
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = 16 * warp + lane / 4 + 8 * (i / 2), col = 8 * j + 2 * (lane % 4) + i % 2;
            d[4 * j + i] = p.acc ? ((const float*)p.c)[row * N + col] : __int_as_float(0x7fc00000);
        }
    // A fragments for every k-step (mma.m16n8k16's A layout within the warp's 16 rows)
    u32 a[4][4];
    const T* ag = (const T*)p.a;
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            int row = 16 * warp + lane / 4 + 8 * (r % 2), col = 16 * s + 2 * (lane % 4) + 8 * (r / 2);
            a[s][r] = 16 * s < p.k && p.a_mode == 0
                          ? (u32)bits(ag[row * p.k + col]) | ((u32)bits(ag[row * p.k + col + 1]) << 16)
                          : 0u;
        }
    const u32 abase = smem_u32(as), bbase = smem_u32(bs);
    wg_pin(d);
    if (p.fault != 2) wg_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // unrolled: a[s] stays in registers
        if (16 * s >= p.k) break;
        u64 bd = wg_desc(bbase + tb.step(s), tb.lbo(), tb.sbo(), p.swizzle);
        int scale_d = p.acc || s > 0;
        if (p.a_mode == 0) {
            if (p.b_major == 0) wgmma_rs<N, 0, T>(d, a[s], bd, scale_d);
            else wgmma_rs<N, 1, T>(d, a[s], bd, scale_d);
        } else {
            u64 ad = wg_desc(abase + ta.step(s), ta.lbo(), ta.sbo(), p.swizzle);
            if (p.a_mode == 1 && p.b_major == 0) wgmma_ss<N, 0, 0, T>(d, ad, bd, scale_d);
            if (p.a_mode == 1 && p.b_major == 1) wgmma_ss<N, 0, 1, T>(d, ad, bd, scale_d);
            if (p.a_mode == 2 && p.b_major == 0) wgmma_ss<N, 1, 0, T>(d, ad, bd, scale_d);
            if (p.a_mode == 2 && p.b_major == 1) wgmma_ss<N, 1, 1, T>(d, ad, bd, scale_d);
        }
        if (p.fault == 4) wg_commit();  // a group per k-step
    }
    wg_commit();
    if (p.fault == 3) d[0] += 1.f;
    if (p.fault == 4) {  // the first group lands, the accumulator is written while the later ones are in flight
        wg_wait<2>();
        d[0] += 1.f;
    }
    wg_wait<0>();
    wg_pin(d);
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = 16 * warp + lane / 4 + 8 * (i / 2), col = 8 * j + 2 * (lane % 4) + i % 2;
            ((float*)p.d)[row * N + col] = d[4 * j + i];
        }
}
#define PROBE(T, NAME, N) \
    extern "C" __global__ void __launch_bounds__(128) wgmma_probe_##NAME##_n##N(WgProbeParams p) { wgmma_probe<T, N>(p); }
#else
// compiled for a target without wgmma (NVRTC's plain sm_90 or earlier): the kernels exist and trap
#define PROBE(T, NAME, N) \
    extern "C" __global__ void wgmma_probe_##NAME##_n##N(WgProbeParams p) { (void)p; __trap(); }
#endif
PROBE(bf16, bf16, 32)
PROBE(bf16, bf16, 64)
PROBE(f16, f16, 32)
PROBE(f16, f16, 64)
