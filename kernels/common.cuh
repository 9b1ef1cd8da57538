// common.cuh — helpers shared by every kernel module (prepended to each .cu by src/cuda/nvrtc.rs).
//
// Conventions
// - Each kernel takes one parameter struct by value, mirrored by a #[repr(C)] struct in src/ops/<op>/mod.rs.
//   Pointers travel as u64 (unsigned long long) so the layouts match exactly on both sides. Every struct's
//   size and field offsets are pinned below its definition (CHECK_LAYOUT / CHECK_FIELD): NVRTC and the
//   emulator's C++ compiler enforce them here (NVRTC the sizes only), and tests/kernels_compile.rs checks the
//   same numbers against the Rust structs (std::mem::offset_of!).
// - Storage types: float, __nv_bfloat16, __half; arithmetic and statistics are always float.
// - Kernel names: <op>_<forward|backward>_<f32|bf16|f16>.
#pragma once
#ifdef BERTQA_EMU
// Compiled on the CPU by the kernel emulator (tests/emu/cuda_emu.hpp defines the CUDA built-ins it needs).
#include "cuda_emu.hpp"
#include <cstddef>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// The block's dynamic shared memory (the launch's smem bytes) as an array of T.
#ifdef BERTQA_EMU
#define DYN_SMEM(T, name) T* name = (T*)::emu::dyn_smem()
#else
#define DYN_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

// The byte layout of a kernel parameter struct, pinned (see Conventions). NVRTC has no offsetof: it checks
// the sizes, and the emulator's C++ compiler — the same struct text, the same layout rules — the offsets.
#define CHECK_LAYOUT(S, size) static_assert(sizeof(S) == size, #S ": size differs from its Rust mirror")
#ifdef BERTQA_EMU
#define CHECK_FIELD(S, f, off) static_assert(offsetof(S, f) == off, #S "." #f ": offset differs from its Rust mirror")
#else
#define CHECK_FIELD(S, f, off) static_assert(true, "")
#endif

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned int u32;
typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;
typedef __half f16;

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half_rn(x); }

// Load/store a float from a buffer whose dtype is only known at run time.
__device__ __forceinline__ float load_dt(u64 p, int dt, u64 i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_BF16) return __bfloat162float(((const bf16*)p)[i]);
    return __half2float(((const f16*)p)[i]);
}
__device__ __forceinline__ void store_dt(u64 p, int dt, u64 i, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else if (dt == DT_BF16) ((bf16*)p)[i] = __float2bfloat16_rn(v);
    else ((f16*)p)[i] = __float2half_rn(v);
}

// ---- Philox4x32 with R rounds, bit-identical to src/rng.rs (hidden dropout 10, attention dropout 7) -----------
template <int R> __device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (r > 0) { k.x += W0; k.y += W1; }
        u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) { return philox4x32<10>(c, k); }

// ---- the dropout stream (src/rng.rs) ---------------------------------------------------------------------
__device__ __forceinline__ u64 splitmix64(u64 x) {
    u64 z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
// The Philox key of a dropout site in this step (src/rng.rs step_site_seed): SplitMix64 of the step's seed XOR
// the site's key. The step's seed is read from device memory (a.step, written with the batch), so no kernel
// parameter changes from step to step and a captured CUDA graph replays any step. 0 when the site is off
// (p = 0), without reading it.
template <typename P> __device__ __forceinline__ u64 dropout_seed(const P& a) {
    return a.p > 0.f ? splitmix64(*(const u64*)a.step ^ a.site) : 0ull;
}
// Keyed by the site's seed in this step; hidden dropout of (window w, position t, feature c) is word c%4 of
// philox([c/4, t, w, 0]), kept iff its top 24 bits / 2^24 >= p. Attention dropout: below (attn_philox).
// Kept elements are scaled by 1/(1-p).
__device__ __forceinline__ u32 philox_word(uint4 r, u32 w) { return w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w; }
__device__ __forceinline__ float keep_factor(u32 word, float p) {
    float u = (float)(word >> 8) * (1.0f / 16777216.0f);
    return u >= p ? 1.0f / (1.0f - p) : 0.f;
}
__device__ __forceinline__ uint2 philox_key(u64 seed) { return make_uint2((u32)seed, (u32)(seed >> 32)); }
// the words of features 4·c4 .. 4·c4+3 of (window w, position t)
__device__ __forceinline__ uint4 hidden_words(u64 seed, int w, int t, int c4) {
    return philox4x32_10(make_uint4((u32)c4, (u32)t, (u32)w, 0u), philox_key(seed));
}
// The hidden-dropout multiplier of feature c of (window w, position t): 0 or 1/(1-p); p <= 0: no dropout.
__device__ __forceinline__ float hidden_factor(u64 seed, int w, int t, int c, float p) {
    if (p <= 0.f) return 1.f;
    return keep_factor(philox_word(hidden_words(seed, w, t, c >> 2), (u32)(c & 3)), p);
}
// The factors of the 4·Q features c0.. (c0 % 4 == 0) of (window w, position t): one Philox call per 4.
template <int Q> __device__ __forceinline__ void hidden_factors(u64 seed, int w, int t, int c0, float p, float* f) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
        if (p <= 0.f) {
            f[4 * q] = f[4 * q + 1] = f[4 * q + 2] = f[4 * q + 3] = 1.f;
        } else {
            uint4 r = hidden_words(seed, w, t, (c0 >> 2) + q);
            f[4 * q] = keep_factor(r.x, p);
            f[4 * q + 1] = keep_factor(r.y, p);
            f[4 * q + 2] = keep_factor(r.z, p);
            f[4 * q + 3] = keep_factor(r.w, p);
        }
    }
}

// ---- 16-byte vectors (the "vec" kernels) ---------------------------------------------------------------------
// 8 bf16/f16 or 4 f32 elements moved with one load/store instruction; the address must be 16-byte aligned.
template <typename T> struct alignas(16) Pack16 {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};
template <typename T> __device__ __forceinline__ Pack16<T> ld16(const T* p) { return *reinterpret_cast<const Pack16<T>*>(p); }
template <typename T> __device__ __forceinline__ void st16(T* p, const Pack16<T>& x) { *reinterpret_cast<Pack16<T>*>(p) = x; }
// The N elements at p (16-byte aligned) as floats, or zeros when p is null: an optional per-column vector such as
// a bias added by the kernel after a GEMM.
template <typename T> __device__ __forceinline__ void ld16_f_or_zero(const T* p, float (&f)[Pack16<T>::N]) {
    if (p) {
        Pack16<T> x = ld16(p);
#pragma unroll
        for (int e = 0; e < Pack16<T>::N; ++e) f[e] = to_f(x.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < Pack16<T>::N; ++e) f[e] = 0.f;
    }
}

// The end of a column-sum kernel with blocks of (32, 8) threads, where thread (x, y) holds the partial sums
// acc[0..N) of columns (blockIdx.x·32 + x)·N + e over its rows: the 8 row partials of each column meet in
// shared memory, then one atomicAdd per column and block into dst (f32, c columns). Every thread of the block
// must call it (it holds a barrier).
template <int N> __device__ __forceinline__ void column_partials_add(const float (&acc)[N], float* dst, int c) {
    __shared__ float part[8][32 * N + 1];
#pragma unroll
    for (int e = 0; e < N; ++e) part[threadIdx.y][threadIdx.x * N + e] = acc[e];
    __syncthreads();
    for (int k = threadIdx.y * 32 + threadIdx.x; k < 32 * N; k += 256) {
        int col = blockIdx.x * 32 * N + k;
        if (col < c) {
            float t = 0.f;
#pragma unroll
            for (int r = 0; r < 8; ++r) t += part[r][k];
            atomicAdd(dst + col, t);
        }
    }
}

// ---- variable-length batches ------------------------------------------------------------------------------
// Window b of a batch (src/ops/mod.rs SeqLayout): rows s0 .. s0+rows of the N rows, its first len rows real
// tokens (the keys), w its index in the optimizer step's whole batch (the dropout key).
struct Window {
    int s0, rows, len, w;
};
__device__ __forceinline__ Window window_at(u64 cu, u64 lens, u64 wid, int b) {
    const int* c = (const int*)cu;
    Window W;
    W.s0 = c[b];
    W.rows = c[b + 1] - c[b];
    W.len = ((const int*)lens)[b];
    W.w = ((const int*)wid)[b];
    return W;
}

// Attention-probability dropout of (window w, head h, query i, key j): the 16-bit half j%2 (0: low) of word
// 2·(i/8 % 2) + j/8 % 2 of philox7([4·(j/16) + (j%8)/2, 8·(i/16) + i%8, h, w]), kept iff half / 2^16 >= p, i.e.
// half >= ceil(p·2^16) (attn_threshold; the same bits). One call draws queries {i, i+8} × keys {j, j+1, j+8,
// j+9} (i%16 < 8, j%16 < 8, j even): in an m16n8k16 layout, what one lane of an S accumulator holds over 16
// keys (attn_draws_fwd), or, with the lane holding the neighbouring key, two lanes' share of a transposed Sᵀ
// accumulator (attn_draws_bwd).
// The counter words of the call that draws (query i, key j): qc of the query, kc of the key. Kernels step them
// along their tiles (attn_kc(k0 + 16·kk + 2·t) = attn_kc(k0) + 4·kk + t for k0 % 16 == 0, t < 4; attn_qc likewise
// + 8 per 16 queries) instead of recomputing them from positions.
__device__ __forceinline__ u32 attn_qc(int i) { return (u32)((i >> 4) * 8 + (i & 7)); }
__device__ __forceinline__ u32 attn_kc(int j) { return (u32)((j >> 4) * 4 + ((j & 7) >> 1)); }
// 7 rounds (src/rng.rs philox4x32_7): the call sits in the attention kernels' main loops
__device__ __forceinline__ uint4 attn_philox(u64 seed, int w, int h, u32 qc, u32 kc) {
    return philox4x32<7>(make_uint4(kc, qc, (u32)h, (u32)w), philox_key(seed));
}
// The keep test, on a word that holds a draw in its top 16 bits (the low 16 bits may hold anything: they are
// below 2^16, so word >= thr·2^16 ⟺ draw >= thr): no shift for a draw that is already a word's top half.
// attn_threshold(p) = ceil(p·2^16)·2^16 (p·2^16 and its ceiling are exact); 0 when p <= 0: everything kept.
// ceil(p·2^16) = 2^16 (p > 1 − 2^-16) keeps nothing: the bound is then 2^32 − 1, which keeps a word only when both
// its halves are 0xffff, and attn_keep_scale is 0, which zeroes whatever was kept (as it zeroes everything else).
// ceil(p·2^16), the 16-bit draws' threshold (p > 0)
__device__ __forceinline__ u32 attn_thr16(float p) { return (u32)ceilf(p * 65536.f); }
__device__ __forceinline__ u32 attn_threshold(float p) {
    if (!(p > 0.f)) return 0u;
    u32 thr = attn_thr16(p);
    return thr > 0xffffu ? 0xffffffffu : thr << 16;
}
// the factor of a kept probability: 1/(1-p); 0 when nothing can be kept (above); 1 without dropout
__device__ __forceinline__ float attn_keep_scale(float p) {
    if (!(p > 0.f)) return 1.f;
    return attn_thr16(p) > 0xffffu ? 0.f : 1.f / (1.f - p);
}
__device__ __forceinline__ bool attn_kept(u32 word, u32 bound) { return word >= bound; }
// One element (variant 1, CUDA cores): 0 or 1/(1-p).
__device__ __forceinline__ float attn_dropout(u64 seed, int w, int h, int i, int j, float p) {
    if (p <= 0.f) return 1.f;
    uint4 r = attn_philox(seed, w, h, attn_qc(i), attn_kc(j));
    u32 word = philox_word(r, (u32)(((i >> 3) & 1) * 2 + ((j >> 3) & 1)));
    u32 draw = (word >> ((j & 1) * 16)) & 0xffffu;
    return (float)draw * (1.0f / 65536.0f) >= p ? 1.0f / (1.0f - p) : 0.f;
}
// The forward layout: this lane's queries i (i%16 < 8) and i+8, keys j, j+1, j+8, j+9 (j%16 < 8, j even);
// qc = attn_qc(i), kc = attn_kc(j). d[0..3] = draws of (i, j), (i, j+1), (i, j+8), (i, j+9); d[4..7] the same for
// query i+8; each in its word's top 16 bits (attn_kept): key j+1's is Philox's word as it is, key j's that word
// shifted up. One call.
__device__ __forceinline__ void attn_draws_fwd(u64 seed, int w, int h, u32 qc, u32 kc, u32 (&d)[8]) {
    uint4 r = attn_philox(seed, w, h, qc, kc);
    u32 x[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        d[2 * k] = x[k] << 16;
        d[2 * k + 1] = x[k];
    }
}
// The backward (Sᵀ) layout: this lane's keys j (j%16 < 8) and j+8, queries i, i+1, i+8, i+9 (i%16 < 8, i even);
// qc = attn_qc(i) (query i+1's call has qc + 1), kc = attn_kc(j), odd = j odd. Lane l^4 holds keys j^1 and
// j^1+8 at the same queries. d[0..3] = draws of (i, j), (i, j+8), (i+8, j), (i+8, j+8); d[4..7] the same for
// query i+1. The even-key lane draws query i's block, the odd-key lane query i+1's, and each passes its
// partner the halves of the partner's key: one call and two shuffles per lane. Each draw lands in its word's top
// 16 bits (attn_kept), the byte moves done by PRMT. All 32 lanes must call together.
__device__ __forceinline__ void attn_draws_bwd(u64 seed, int w, int h, u32 qc, u32 kc, bool odd, u32 (&d)[8]) {
    uint4 r = attn_philox(seed, w, h, qc + (odd ? 1u : 0u), kc);
    // my partner's halves of (x, y) and (z, w) side by side (his: the high halves if I am even, else the low)
    const u32 his = odd ? 0x5410u : 0x7632u;
    // my half moved to the top (the low 16 bits then hold zeros, or the other half: either is fine)
    const u32 mine = odd ? 0x3210u : 0x1044u;
    u32 s0 = __byte_perm(r.x, r.y, his), s1 = __byte_perm(r.z, r.w, his);
    u32 g0 = __shfl_xor_sync(0xffffffffu, s0, 4), g1 = __shfl_xor_sync(0xffffffffu, s1, 4);
    u32 own[4] = {__byte_perm(r.x, 0u, mine), __byte_perm(r.y, 0u, mine), __byte_perm(r.z, 0u, mine), __byte_perm(r.w, 0u, mine)};
    u32 got[4] = {g0 << 16, g0, g1 << 16, g1};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        d[k] = odd ? got[k] : own[k];
        d[4 + k] = odd ? own[k] : got[k];
    }
}

// ---- the attention kernels' parameters (attention.cu variant 1, attention_tc.cu variants 3 and 4) --------
// Mirrored by ops::attention::AttnParams; one definition for both files.
struct AttnParams {
    u64 out, lse, qkv, cu, lens, wid, dout, dqkv, dsum, dqacc, site;
    int b, n, nh, hs;
    float p, scale;
    u64 step;
    u64 dbias;  // (3C) f32 += column sums of dqkv (the QKV bias gradient; the K third's are 0), or 0; tensor-core backward only
};
CHECK_LAYOUT(AttnParams, 128);
CHECK_FIELD(AttnParams, out, 0);
CHECK_FIELD(AttnParams, lse, 8);
CHECK_FIELD(AttnParams, qkv, 16);
CHECK_FIELD(AttnParams, cu, 24);
CHECK_FIELD(AttnParams, lens, 32);
CHECK_FIELD(AttnParams, wid, 40);
CHECK_FIELD(AttnParams, dout, 48);
CHECK_FIELD(AttnParams, dqkv, 56);
CHECK_FIELD(AttnParams, dsum, 64);
CHECK_FIELD(AttnParams, dqacc, 72);
CHECK_FIELD(AttnParams, site, 80);
CHECK_FIELD(AttnParams, b, 88);
CHECK_FIELD(AttnParams, n, 92);
CHECK_FIELD(AttnParams, nh, 96);
CHECK_FIELD(AttnParams, hs, 100);
CHECK_FIELD(AttnParams, p, 104);
CHECK_FIELD(AttnParams, scale, 108);
CHECK_FIELD(AttnParams, step, 112);
CHECK_FIELD(AttnParams, dbias, 120);

// ---- reductions -------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over a whole block (blockDim.x a multiple of 32, at most 1024). `shared` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : 0.f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nw ? shared[lane] : -INFINITY;
    return warp_max(v);
}
