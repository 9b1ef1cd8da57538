// common.cuh — helpers shared by every kernel module (prepended to each .cu by src/cuda/nvrtc.rs).
//
// Conventions
// - Each kernel takes one parameter struct by value, mirrored by a #[repr(C)] struct in src/ops/<op>/mod.rs
//   (the cast's and the wgmma probe's in src/cuda/cast.rs and src/cuda/wgmma_probe.rs).
//   Pointers travel as u64 (unsigned long long) so the layouts match exactly on both sides. Every struct's
//   size and field offsets are pinned below its definition (CHECK_LAYOUT / CHECK_FIELD): NVRTC and the
//   emulator's C++ compiler enforce them here (NVRTC the sizes only), and tests/kernels_compile.rs checks the
//   same numbers against the Rust structs (std::mem::offset_of!).
// - Storage types: float, __nv_bfloat16, __half; arithmetic and statistics are always float.
// - Kernel names: <op>_<forward|backward>_<f32|bf16|f16>, variants inserting their tags before the dtype
//   (attention_tc4_backward_w8b2_p0_bf16_hs64: variant, block shape, no dropout, then dtype and head size);
//   a few take the dtype at run time (gelu_forward, dropout_forward, bias_add) or have no direction
//   (adamw_step, grad_sq_norm, span_loss_sums).
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

// Whether a 16-bit storage type is bf16 (the tensor-core instructions name their input type).
template <typename T> struct is_bf16 { static constexpr bool value = false; };
template <> struct is_bf16<bf16> { static constexpr bool value = true; };
// The 16 bits of a 16-bit float (packing pairs into the 32-bit registers of the tensor-core instructions).
__device__ __forceinline__ u32 bits(bf16 x) { return (u32)__bfloat16_as_ushort(x); }
__device__ __forceinline__ u32 bits(f16 x) { return (u32)__half_as_ushort(x); }

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

// ---- the attention kernels' parameters (attention.cu variant 1, attention_tc.cu variants 3 and 4,
// attention_wg.cu variants 5 and 6) ------------------------------------------------------------------------
// Mirrored by ops::attention::AttnParams; one definition for the three files.
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

// ---- shared memory, cp.async, tensor-core packing, ex2 (the tensor-core attention kernels) -----------------
// A pair of 16-bit floats in one 32-bit register, `lo` in the low half (mma/wgmma operand order).
template <typename T> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    return bits(from_f<T>(lo)) | (bits(from_f<T>(hi)) << 16);
}

// The .shared address of a pointer into shared memory (ldmatrix, cp.async, matrix descriptors, swizzles).
__device__ __forceinline__ u32 smem_u32(const void* p) {
#ifdef BERTQA_EMU
    return ::emu::shared_addr(p);
#else
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
#endif
}

// cp.async (sm_80+): copies global → shared without a register round trip, `bytes` of them or zeros when
// `valid` is false (src must still be a mapped address); completion via commit/wait groups.
// cp_async16_at: the destination as a tile plus an element offset, formed like ldsm_x4's address (a 32-bit
// .shared address whose constant part ptxas folds into the instruction).
#ifdef BERTQA_EMU
template <typename T> __device__ __forceinline__ void cp_async16_at(T* tile, int off, const void* src, bool valid) {
    ::emu::cp_async(tile + off, src, 16, valid);
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) { ::emu::cp_async(dst, src, 4, valid); }
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ::emu::cp_async_wait(N); }
#else
template <typename T> __device__ __forceinline__ void cp_async16_at(T* tile, int off, const void* src, bool valid) {
    u32 d = smem_u32(tile) + (u32)off * (u32)sizeof(T);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

// 2^x, hardware approximation (max relative error 2^-22), flushing denormals; ex2(-inf) = 0
__device__ __forceinline__ float ex2(float x) {
#ifdef BERTQA_EMU
    return ::emu::ex2_approx_ftz(x);
#else
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#endif
}
#define LOG2E_F 1.4426950408889634f
#define LN2_F 0.69314718055994531f


// ---- wgmma: Hopper's warpgroup MMA (sm_90a; PTX ISA 9.7.15) -------------------------------------------------
// Compiled where the target has it (NVRTC's sm_90a, which defines __CUDA_ARCH_FEAT_SM90_ALL) and in the
// emulator (tests/emu, which implements these instructions from the PTX ISA). A warpgroup is 4 consecutive warps;
// every wgmma.mma_async is issued by all its 128 threads. The protocol, per the ISA: shared-memory tiles written
// by the threads are handed to wgmma after fence_proxy_async() and a barrier; wg_fence() before the first
// wgmma_* and after the registers it uses were written; wg_commit() closes a group of wgmma_*; wg_wait<n>()
// waits until at most n groups are in flight — only then may the accumulators (and A fragments) be touched.
#if defined(BERTQA_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BERTQA_HAVE_WGMMA 1

// Swizzle modes as the matrix descriptor encodes them, and the width in bytes of one swizzled row.
#define WG_SWIZZLE_NONE 0
#define WG_SWIZZLE_128B 1
#define WG_SWIZZLE_64B 2
#define WG_SWIZZLE_32B 3
__host__ __device__ __forceinline__ constexpr u32 wg_swizzle_bytes(int mode) {
    return mode == WG_SWIZZLE_128B ? 128u : mode == WG_SWIZZLE_64B ? 64u : mode == WG_SWIZZLE_32B ? 32u : 16u;
}
// Where the 16-byte chunk at .shared address `a` of a tile in `mode` lives: bits 4.. ^= bits 7.. (the
// Swizzle<log2(W/16),4,3> of the canonical layouts; the identity without swizzling). Tiles must start on the
// pattern's boundary (W·8 bytes): descriptors here leave the matrix base offset 0.
__device__ __forceinline__ u32 wg_swizzle(u32 a, int mode) {
    return mode == WG_SWIZZLE_NONE ? a : a ^ (((a >> 7) & (wg_swizzle_bytes(mode) / 16 - 1)) << 4);
}
// A matrix descriptor: start .shared address, leading and stride dimension byte offsets, swizzle mode.
__device__ __forceinline__ u64 wg_desc(u32 start, u32 lbo, u32 sbo, int mode) {
    return (u64)((start & 0x3FFFF) >> 4) | (u64)((lbo & 0x3FFFF) >> 4) << 16 | (u64)((sbo & 0x3FFFF) >> 4) << 32 |
           (u64)mode << 62;
}

// Pins registers in place for the compiler: wgmma reads and writes its accumulators (and A fragments)
// asynchronously, which the compiler does not know; call this on them after wg_wait and before wg_fence, so
// that no other use of them is moved across.
template <int M> __device__ __forceinline__ void wg_pin(float (&r)[M]) {
#ifndef BERTQA_EMU
#pragma unroll
    for (int i = 0; i < M; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int M> __device__ __forceinline__ void wg_pin(u32 (&r)[M]) {
#ifndef BERTQA_EMU
#pragma unroll
    for (int i = 0; i < M; ++i) asm volatile("" : "+r"(r[i])::"memory");
#endif
}

#ifdef BERTQA_EMU
__device__ __forceinline__ void fence_proxy_async() { ::emu::fence_proxy_async(); }
__device__ __forceinline__ void wg_fence() { ::emu::wgmma_fence(); }
__device__ __forceinline__ void wg_commit() { ::emu::wgmma_commit(); }
template <int N> __device__ __forceinline__ void wg_wait() { ::emu::wgmma_wait(N); }
// D (64×N) = A·B + (scale_d ? D : 0), A (64×16) and B (16×N) from shared memory (K-major, or MN-major when TA/TB)
template <int N, int TA, int TB, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], u64 adesc, u64 bdesc, int scale_d) {
    ::emu::wgmma(N, is_bf16<T>::value, d, nullptr, adesc, bdesc, scale_d != 0, TA, TB);
}
// the same with A from registers (mma.m16n8k16's A layout, warp w of the warpgroup holding rows 16w..16w+15)
template <int N, int TB, typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 bdesc, int scale_d) {
    ::emu::wgmma(N, is_bf16<T>::value, d, a, 0, bdesc, scale_d != 0, false, TB);
}
#else
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

template <int N, int TA, int TB, typename T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], u64 adesc, u64 bdesc, int scale_d) {
    static_assert(N == 32 || N == 64, "wgmma_ss: N = 32 or 64");
    if constexpr (N == 32 && is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                     : "l"(adesc), "l"(bdesc), "r"(scale_d), "n"(TA), "n"(TB));
    } else if constexpr (N == 32 && !is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %20;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                     : "l"(adesc), "l"(bdesc), "r"(scale_d), "n"(TA), "n"(TB));
    } else if constexpr (N == 64 && is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                     : "l"(adesc), "l"(bdesc), "r"(scale_d), "n"(TA), "n"(TB));
    } else if constexpr (N == 64 && !is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                     : "l"(adesc), "l"(bdesc), "r"(scale_d), "n"(TA), "n"(TB));
    }
}
template <int N, int TB, typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const u32 (&a)[4], u64 bdesc, int scale_d) {
    static_assert(N == 32 || N == 64, "wgmma_rs: N = 32 or 64");
    if constexpr (N == 32 && is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d), "n"(TB));
    } else if constexpr (N == 32 && !is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d), "n"(TB));
    } else if constexpr (N == 64 && is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d), "n"(TB));
    } else if constexpr (N == 64 && !is_bf16<T>::value) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(bdesc), "r"(scale_d), "n"(TB));
    }
}
#endif  // BERTQA_EMU
#endif  // wgmma

// ---- the tensor-core attention forward's softmax over one key tile (attention_tc.cu variant 4, attention_wg.cu
// variant 5) ----------------------------------------------------------------------------------------------------
// One lane's rows: i0 (row g of the warp's 16) and i1 = i0 + 8.
struct FwdRows {
    float m0, m1;    // bases: the rows' maxima of the raw scores q·k when last rebased (−inf: none yet)
    float l0, l1;    // the rows' sums of probabilities, against the bases
    float nb0, nb1;  // −base·scale·log2 e: a probability is 2^{s·sl2 + nb}
};

// S (this warp's 16 rows × 8·NJ keys from k0, in the m16n8 accumulator layout: s[j][e] is key k0 + 8j + 2·t4 +
// e%2 of row i0 (e < 2) or i1) masked past the window's `len` keys on a partial tile (the last: a block-uniform
// branch), then the rows' maxima and FlashAttention-4's conditional rebase: the bases move only when a row's new
// maximum passes its base by more than `gap` (2^8 in the exponent); until then a probability is at most 2^8
// against a stale base, which the final division by l (summed against the same base) cancels, and O and l are
// not rescaled. The branch is warp-uniform: a warp rebases all its rows when one of them must. The first tile
// always does (m = −inf; a row without a live key so far keeps nb = 0 and P = 0). Rebasing scales the lane's O
// accumulator (o[n][e]: columns 8n + 2·t4 + e%2 of row i0 (e < 2) or i1) with its rows.
template <int NJ, int NO>
__device__ __forceinline__ void fwd_tile_rebase(float (&s)[NJ][4], int k0, int len, int t4, FwdRows& r, float sl2,
                                                float gap, float (&o)[NO][4]) {
    if (k0 + 8 * NJ > len) {  // the last tile, partial: keys past the window's real ones get probability 0
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                bool live = k0 + j * 8 + 2 * t4 + e < len;
                s[j][e] = live ? s[j][e] : -INFINITY;
                s[j][2 + e] = live ? s[j][2 + e] : -INFINITY;
            }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;  // of the raw scores: the scale joins the exponent's FFMA
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            mx0 = fmaxf(mx0, s[j][e]);
            mx1 = fmaxf(mx1, s[j][2 + e]);
        }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    if (!__any_sync(0xffffffffu, mx0 > r.m0 + gap || mx1 > r.m1 + gap)) return;
    float mn0 = fmaxf(r.m0, mx0), mn1 = fmaxf(r.m1, mx1);
    float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
    float c0 = ex2((r.m0 - base0) * sl2), c1 = ex2((r.m1 - base1) * sl2);
    r.nb0 = -base0 * sl2;  // e^{scale·(s − base)} = 2^{s·sl2 + nb}
    r.nb1 = -base1 * sl2;
    r.l0 *= c0;
    r.l1 *= c1;
    r.m0 = mn0;
    r.m1 = mn1;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        o[n][0] *= c0; o[n][1] *= c0;
        o[n][2] *= c1; o[n][3] *= c1;
    }
}

// The probabilities of keys 16kk.. of the tile (two m16n8 strips of s) as the A fragment of P·V (the
// accumulator layout is the A layout: no shuffles), dropped ones 0 (the dropout's 1/(1-p) is applied to O at
// the end); the rows' sums take every probability, kept or not. kc: the dropout counter of the lane's first key.
template <typename T, int NJ, bool DROP>
__device__ __forceinline__ void fwd_tile_probs(const float (&s)[NJ][4], int kk, FwdRows& r, float sl2, u64 seed,
                                               int w, int h, u32 qc0, u32 kc, u32 thr, u32 (&pa)[4]) {
    u32 d[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};  // all kept (thr = 0) without dropout
    if (DROP) attn_draws_fwd(seed, w, h, qc0, kc, d);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int j = 2 * kk + half;
        float p00 = ex2(fmaf(s[j][0], sl2, r.nb0)), p01 = ex2(fmaf(s[j][1], sl2, r.nb0));
        float p10 = ex2(fmaf(s[j][2], sl2, r.nb1)), p11 = ex2(fmaf(s[j][3], sl2, r.nb1));
        r.l0 += p00 + p01;
        r.l1 += p10 + p11;
        pa[half * 2 + 0] = pack2<T>(attn_kept(d[2 * half], thr) ? p00 : 0.f, attn_kept(d[2 * half + 1], thr) ? p01 : 0.f);
        pa[half * 2 + 1] = pack2<T>(attn_kept(d[4 + 2 * half], thr) ? p10 : 0.f, attn_kept(d[5 + 2 * half], thr) ? p11 : 0.f);
    }
}

// The forward's epilogue (variants 4 and 5): the rows' sums across the quad, O·(1/(1-p))/l into out, lse.
// o[n][e]: the lane's O accumulator in the m16n8 layout (columns 8n + 2·t4 + e%2 of row i0 (e < 2) or i1).
template <typename T, int HS, bool DROP>
__device__ __forceinline__ void fwd_store(const AttnParams& a, const Window& W, int h, int i0, int t4, FwdRows& r,
                                          const float (&o)[HS / 8][4]) {
    r.l0 += __shfl_xor_sync(0xffffffffu, r.l0, 1);
    r.l0 += __shfl_xor_sync(0xffffffffu, r.l0, 2);
    r.l1 += __shfl_xor_sync(0xffffffffu, r.l1, 1);
    r.l1 += __shfl_xor_sync(0xffffffffu, r.l1, 2);
    int C = a.nh * HS, i1 = i0 + 8;
    float ks = DROP ? attn_keep_scale(a.p) : 1.f;  // every kept probability's dropout factor
    float inv0 = r.l0 > 0.f ? ks / r.l0 : 0.f, inv1 = r.l1 > 0.f ? ks / r.l1 : 0.f;
#pragma unroll
    for (int n = 0; n < HS / 8; ++n) {
        int d = n * 8 + 2 * t4;
        if (i0 < W.rows) *(u32*)((T*)a.out + ((u64)W.s0 + i0) * C + h * HS + d) = pack2<T>(o[n][0] * inv0, o[n][1] * inv0);
        if (i1 < W.rows) *(u32*)((T*)a.out + ((u64)W.s0 + i1) * C + h * HS + d) = pack2<T>(o[n][2] * inv1, o[n][3] * inv1);
    }
    if (t4 == 0) {
        float* lse = (float*)a.lse + (u64)h * a.n + W.s0;
        if (i0 < W.rows) lse[i0] = r.l0 > 0.f ? r.m0 * a.scale + logf(r.l0) : INFINITY;
        if (i1 < W.rows) lse[i1] = r.l1 > 0.f ? r.m1 * a.scale + logf(r.l1) : INFINITY;
    }
}

// The lse and D of queries q0 .. q0+BQ of window W (hrow: head h's first row of the window in the (NH,N) lse and
// D) into ls and ds by cp.async (the caller commits); queries past the window get 0 from a mapped address.
template <int BQ>
__device__ __forceinline__ void stage_lse_d(const AttnParams& a, const Window& W, u64 hrow, int q0, float* ls, float* ds) {
    for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
        bool valid = q0 + i < W.rows;
        u64 q = hrow + (valid ? q0 + i : 0);
        cp_async4(ls + i, (const float*)a.lse + q, valid);
        cp_async4(ds + i, (const float*)a.dsum + q, valid);
    }
}

// ---- the tensor-core attention backward's probabilities and dS over one query tile (attention_tc.cu variant 4,
// attention_wg.cu variant 6) ------------------------------------------------------------------------------------
// Sᵀ and dPᵀ (this warp's 16 keys ja = row g, jb = g + 8 × 8·NQ queries, in the m16n8 accumulator layout: s[n][e] is
// query 8n + 2·t4 + e%2 of key ja (e < 2) or jb; masked to −inf where a key or query is past the window) give,
// for the queries 16kk.. (two strips), P (kept, without the dropout's 1/(1-p), which dV takes at the end) and
// dS = P·(dP·keep/(1-p) − D), packed as the A fragments of Pᵀ·dO and dSᵀ·Q (pa, sa; the accumulator layout is
// the A layout). Lb, Db: the tile's lse and D by query; qc: the dropout counter of the lane's first query
// (attn_qc(q0) + 8kk + 2·t4), kca: key ja's, odd: ja odd (attn_draws_bwd).
template <typename T, int NQ, bool DROP>
__device__ __forceinline__ void bwd_tile_ps(const float (&s)[NQ][4], const float (&dp)[NQ][4], int kk, const float* Lb,
                                            const float* Db, u64 seed, int w, int h, u32 qc, u32 kca, bool odd, int t4,
                                            float sl2, u32 thr, float ks, u32 (&pa)[4], u32 (&sa)[4]) {
    // the draws of queries i, i+1, i+8, i+9 (i = q0 + 16kk + 2·t4) of keys ja, jb; all kept without dropout
    u32 d[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
    if (DROP) attn_draws_bwd(seed, w, h, qc, kca, odd, d);
    // lse·log2 e and D of this lane's queries (2kk + half)·8 + 2·t4 + {0, 1}, read before the caller's dS stores
    // (the compiler cannot tell a dS tile from Ls/Ds apart, and would read them again after each store)
    // (8-byte loads: Lb and Db are 8-byte aligned, the pair's first query even)
    float lq[2][2], dd[2][2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int qi = (2 * kk + half) * 8 + 2 * t4;
        float2 l = *(const float2*)(Lb + qi), dv = *(const float2*)(Db + qi);
        lq[half][0] = l.x * LOG2E_F;
        lq[half][1] = l.y * LOG2E_F;
        dd[half][0] = dv.x;
        dd[half][1] = dv.y;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int n = 2 * kk + half;
        float pv[4], sv[4];
        // e: (ja, i), (ja, i+1), (jb, i), (jb, i+1) of this half's queries i
        u32 ws[4] = {d[2 * half], d[4 + 2 * half], d[2 * half + 1], d[5 + 2 * half]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float P = ex2(fmaf(s[n][e], sl2, -lq[half][e & 1]));  // 0 where masked
            bool keep = attn_kept(ws[e], thr);                     // thr = 0 without dropout
            pv[e] = keep ? P : 0.f;
            sv[e] = P * fmaf(keep ? dp[n][e] : 0.f, ks, -dd[half][e & 1]);
        }
        pa[half * 2 + 0] = pack2<T>(pv[0], pv[1]);
        pa[half * 2 + 1] = pack2<T>(pv[2], pv[3]);
        sa[half * 2 + 0] = pack2<T>(sv[0], sv[1]);
        sa[half * 2 + 1] = pack2<T>(sv[2], sv[3]);
    }
}

// ---- the tensor-core attention backward's reductions and dK/dV store (variants 3, 4 and 6) ------------------
// p[0], p[1] += x, y in global memory, one vector reduction on sm_90 (8-byte aligned p)
__device__ __forceinline__ void red_add2(float* p, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#endif
}

// One step of warp_cols_add's reduction across lane bit `o` (one of the row-group bits 16, 8, 4) of the M
// column-pair sums v[0..M) a lane holds: with M ≥ 2, a lane keeps half of them (the upper half when its bit
// is set: nb, the first n it holds, moves up) and adds its partner's copy of that half (reduce-scatter: one
// shuffle per kept pair); with M = 1 both partners keep the sum.
template <int NO, int M>
__device__ __forceinline__ void cols_step(float (&v)[NO][2], int o, int& nb) {
    const bool up = threadIdx.x & o;
    if constexpr (M >= 2) {
        constexpr int H = M / 2;
#pragma unroll
        for (int i = 0; i < H; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float send = up ? v[i][c] : v[i + H][c];
                float keep = up ? v[i + H][c] : v[i][c];
                v[i][c] = keep + __shfl_xor_sync(0xffffffffu, send, o);
            }
        if (up) nb += H;
    } else {
        v[0][0] += __shfl_xor_sync(0xffffffffu, v[0][0], o);
        v[0][1] += __shfl_xor_sync(0xffffffffu, v[0][1], o);
    }
}

// The QKV bias gradient's share of one warp's 16 rows of an m16n8 accumulator array (rows g in x[n][0..1], rows
// g+8 in x[n][2..3], columns n·8 + 2·t4 + {0, 1}): the column sums over the rows that exist (ok0, ok1), times
// `scale` — exactly what the caller stores, before rounding — added to dst[n·8 + 2·t4 + {0, 1}]. The sums over
// the 8 row groups (lane bits 4, 3, 2) scatter the n's across them, so that each lane ends with NO/8 column
// pairs (HS=64: 7 shuffles per column instead of 24) and adds them with one vector reduction each; below
// NO = 8 the last steps are plain butterflies and only the lanes with those bits clear add. Every lane must
// call it (a warp-uniform condition).
template <int NO>
__device__ __forceinline__ void warp_cols_add(const float (&x)[NO][4], bool ok0, bool ok1, float scale, float* dst) {
    float v[NO][2];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) v[n][c] = (ok0 ? x[n][c] : 0.f) + (ok1 ? x[n][2 + c] : 0.f);
    constexpr int M1 = NO, M2 = NO / 2 > 1 ? NO / 2 : 1, M3 = NO / 4 > 1 ? NO / 4 : 1, MF = NO / 8 > 1 ? NO / 8 : 1;
    int nb = 0;
    cols_step<NO, M1>(v, 16, nb);
    cols_step<NO, M2>(v, 8, nb);
    cols_step<NO, M3>(v, 4, nb);
    // the bits whose step was a plain butterfly hold copies: only the lanes with them clear add
    constexpr int copies = (M1 == 1 ? 16 : 0) | (M2 == 1 ? 8 : 0) | (M3 == 1 ? 4 : 0);
    if (threadIdx.x & copies) return;
    int t4 = threadIdx.x % 4;
#pragma unroll
    for (int i = 0; i < MF; ++i) red_add2(dst + (nb + i) * 8 + 2 * t4, v[i][0] * scale, v[i][1] * scale);
}

// dK·scale and dV·dv_scale of keys ja (accumulator rows g) and jb (rows g+8) of window W into dqkv; every row
// of the window is written (padding rows: zeros, they are no one's keys)
template <typename T, int HS, int NO>
__device__ __forceinline__ void store_dkdv(const AttnParams& a, const float (&dk)[NO][4], const float (&dv)[NO][4],
                                           const Window& W, int h, int ja, int jb, float dv_scale) {
    int C = a.nh * HS, t4 = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        int d = n * 8 + 2 * t4;
        if (ja < W.rows) {
            T* base = (T*)a.dqkv + ((u64)W.s0 + ja) * 3 * C + h * HS + d;
            *(u32*)(base + C) = pack2<T>(dk[n][0] * a.scale, dk[n][1] * a.scale);
            *(u32*)(base + 2 * C) = pack2<T>(dv[n][0] * dv_scale, dv[n][1] * dv_scale);
        }
        if (jb < W.rows) {
            T* base = (T*)a.dqkv + ((u64)W.s0 + jb) * 3 * C + h * HS + d;
            *(u32*)(base + C) = pack2<T>(dk[n][2] * a.scale, dk[n][3] * a.scale);
            *(u32*)(base + 2 * C) = pack2<T>(dv[n][2] * dv_scale, dv[n][3] * dv_scale);
        }
    }
    // The V third of the QKV bias gradient. The K third gets nothing: a bias on every key adds q_i·b to all of
    // query i's scores, which the softmax ignores — Σ_j dS_ij = Σ_j P_ij·(f_ij·dP_ij) − D_i·Σ_j P_ij = D_i − D_i
    // = 0 for every row, so Σ_j dK_j = 0 exactly (summing the stored dK would add only rounding noise).
    if (a.dbias) warp_cols_add<NO>(dv, ja < W.rows, jb < W.rows, dv_scale, (float*)a.dbias + 2 * C + h * HS);
}
