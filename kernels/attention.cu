// attention.cu — fused multi-head self-attention in the flash-attention style (variant 1: CUDA cores), over
// variable-length windows.
//
// Forward: per (window b, head h, tile of 32 query rows), loop over tiles of 32 keys held in shared memory
// with an online softmax; the scores never reach global memory. Saves only lse = m + log(l) per row. Window b
// owns rows cu[b]..cu[b+1]; its first lens[b] rows are the keys (the rest, padding in padded layouts, get
// probability 0); blocks past the window's rows exit at once. Attention-probability dropout multiplies each
// probability by attn_dropout(seed, window, head, query, key) (common.cuh, the stream of src/rng.rs),
// regenerated in backward.
// Backward (FlashAttention-2 algebra): D_i = dO_i·O_i; P_ij = exp(s_ij − lse_i); dP_ij = (dO_i·v_j)·f_ij;
// dS_ij = P_ij (dP_ij − D_i); dV_j = Σ_i P_ij f_ij dO_i; dK_j = scale Σ_i dS_ij q_i; dQ_i = scale Σ_j dS_ij k_j.
// Two kernels (one over key tiles for dK/dV, one over query tiles for dQ) avoid atomics: deterministic.
//
// Thread layout: 4 lanes per row, lane `sub` owns head dims d = sub + 4k (k < HS/4), so a row's dot product
// is 2 shuffles, and the 8 rows of a warp read the same shared-memory word (broadcast).
// Reference: src/ops/attention/cpu.rs.
#include "common.cuh"


#define ROWS 32
#define LANES 4
#define TILE 32

// head dim d of part (0 Q, 1 K, 2 V) of global row `row` in the (N, 3C) qkv buffer
template <typename T, int HS>
__device__ __forceinline__ float ld_head(const AttnParams& a, u64 row, int part, int h, int d) {
    int C = a.nh * HS;
    return to_f(((const T*)a.qkv)[row * 3 * C + part * C + h * HS + d]);
}

template <int D>
__device__ __forceinline__ float dot4(const float* x, const float* srow, int sub) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < D; ++k) s += x[k] * srow[sub + LANES * k];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    return s;
}

template <typename T, int HS>
__device__ void attn_forward(const AttnParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int D = HS / LANES;
    __shared__ float Ks[TILE][HS];
    __shared__ float Vs[TILE][HS];
    int h = blockIdx.y;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (blockIdx.x * ROWS >= W.rows) return;  // the whole block: past its window
    int r = threadIdx.x / LANES, sub = threadIdx.x % LANES;
    int i = blockIdx.x * ROWS + r;
    bool vi = i < W.rows;
    int C = a.nh * HS;
    float q[D], acc[D];
#pragma unroll
    for (int k = 0; k < D; ++k) {
        q[k] = vi ? ld_head<T, HS>(a, (u64)W.s0 + i, 0, h, sub + LANES * k) : 0.f;
        acc[k] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int kt = 0; kt < W.len; kt += TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < TILE * HS; e += blockDim.x) {
            int jj = e / HS, d = e % HS, j = kt + jj;
            Ks[jj][d] = j < W.len ? ld_head<T, HS>(a, (u64)W.s0 + j, 1, h, d) : 0.f;
            Vs[jj][d] = j < W.len ? ld_head<T, HS>(a, (u64)W.s0 + j, 2, h, d) : 0.f;
        }
        __syncthreads();
        int nk = min(TILE, W.len - kt);  // uniform across the block
        for (int jj = 0; jj < nk; ++jj) {
            int j = kt + jj;
            float s = dot4<D>(q, Ks[jj], sub) * a.scale;
            float mn = fmaxf(m, s);
            float corr = expf(m - mn);
            float pe = expf(s - mn);
            l = l * corr + pe;
            float pf = pe * attn_dropout(seed, W.w, h, vi ? i : 0, j, a.p);
#pragma unroll
            for (int k = 0; k < D; ++k) acc[k] = acc[k] * corr + pf * Vs[jj][sub + LANES * k];
            m = mn;
        }
    }
    if (vi) {
        float inv = l > 0.f ? 1.f / l : 0.f;
        T* out = (T*)a.out + ((u64)W.s0 + i) * C + h * HS;
#pragma unroll
        for (int k = 0; k < D; ++k) out[sub + LANES * k] = from_f<T>(acc[k] * inv);
        if (sub == 0) ((float*)a.lse)[(u64)h * a.n + W.s0 + i] = l > 0.f ? m + logf(l) : INFINITY;
    }
}

// D[h, row] = sum_d dout[row, h, d] * out[row, h, d]   (one thread per (row, head))
template <typename T, int HS>
__device__ void attn_dsum(const AttnParams& a) {
    u64 idx = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    u64 total = (u64)a.n * a.nh;
    if (idx >= total) return;
    int h = (int)(idx / a.n);
    u64 row = idx % a.n;
    int C = a.nh * HS;
    u64 base = row * C + h * HS;
    float s = 0.f;
    for (int d = 0; d < HS; ++d) s += to_f(((const T*)a.dout)[base + d]) * to_f(((const T*)a.out)[base + d]);
    ((float*)a.dsum)[idx] = s;
}

// dK, dV for a tile of 32 keys of a window, looping over its queries. Every row of the window gets its dK,
// dV (padding rows: zeros).
template <typename T, int HS>
__device__ void attn_backward_kv(const AttnParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int D = HS / LANES;
    __shared__ float Qs[TILE][HS];
    __shared__ float Os[TILE][HS];  // dO rows
    __shared__ float Ls[TILE];
    __shared__ float Ds[TILE];
    int h = blockIdx.y;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (blockIdx.x * ROWS >= W.rows) return;  // the whole block: past its window
    int r = threadIdx.x / LANES, sub = threadIdx.x % LANES;
    int j = blockIdx.x * ROWS + r;
    bool vj = j < W.rows;
    int C = a.nh * HS;
    bool live = j < W.len;
    float k_[D], v_[D], dk[D], dv[D];
#pragma unroll
    for (int k = 0; k < D; ++k) {
        k_[k] = live ? ld_head<T, HS>(a, (u64)W.s0 + j, 1, h, sub + LANES * k) : 0.f;
        v_[k] = live ? ld_head<T, HS>(a, (u64)W.s0 + j, 2, h, sub + LANES * k) : 0.f;
        dk[k] = 0.f;
        dv[k] = 0.f;
    }
    u64 hrow = (u64)h * a.n + W.s0;
    for (int qt = 0; qt < W.rows; qt += TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < TILE * HS; e += blockDim.x) {
            int ii = e / HS, d = e % HS, i = qt + ii;
            Qs[ii][d] = i < W.rows ? ld_head<T, HS>(a, (u64)W.s0 + i, 0, h, d) : 0.f;
            Os[ii][d] = i < W.rows ? to_f(((const T*)a.dout)[((u64)W.s0 + i) * C + h * HS + d]) : 0.f;
        }
        for (int ii = threadIdx.x; ii < TILE; ii += blockDim.x) {
            int i = qt + ii;
            Ls[ii] = i < W.rows ? ((const float*)a.lse)[hrow + i] : 0.f;
            Ds[ii] = i < W.rows ? ((const float*)a.dsum)[hrow + i] : 0.f;
        }
        __syncthreads();
        int nq = min(TILE, W.rows - qt);
        for (int ii = 0; ii < nq; ++ii) {
            int i = qt + ii;
            float s = dot4<D>(k_, Qs[ii], sub) * a.scale;
            float dpd = dot4<D>(v_, Os[ii], sub);
            if (!live) continue;  // per-row condition, after the shuffles
            float P = expf(s - Ls[ii]);
            float f = attn_dropout(seed, W.w, h, i, j, a.p);
            float dS = P * (dpd * f - Ds[ii]);
#pragma unroll
            for (int k = 0; k < D; ++k) {
                dv[k] += P * f * Os[ii][sub + LANES * k];
                dk[k] += dS * a.scale * Qs[ii][sub + LANES * k];
            }
        }
    }
    if (vj) {
        T* base = (T*)a.dqkv + ((u64)W.s0 + j) * 3 * C + h * HS;
#pragma unroll
        for (int k = 0; k < D; ++k) {
            base[C + sub + LANES * k] = from_f<T>(dk[k]);
            base[2 * C + sub + LANES * k] = from_f<T>(dv[k]);
        }
    }
}

// dQ for a tile of 32 queries of a window, looping over its keys.
template <typename T, int HS>
__device__ void attn_backward_q(const AttnParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int D = HS / LANES;
    __shared__ float Ks[TILE][HS];
    __shared__ float Vs[TILE][HS];
    int h = blockIdx.y;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (blockIdx.x * ROWS >= W.rows) return;  // the whole block: past its window
    int r = threadIdx.x / LANES, sub = threadIdx.x % LANES;
    int i = blockIdx.x * ROWS + r;
    bool vi = i < W.rows;
    int C = a.nh * HS;
    u64 hrow = (u64)h * a.n + W.s0;
    float q[D], dO[D], dq[D];
#pragma unroll
    for (int k = 0; k < D; ++k) {
        q[k] = vi ? ld_head<T, HS>(a, (u64)W.s0 + i, 0, h, sub + LANES * k) : 0.f;
        dO[k] = vi ? to_f(((const T*)a.dout)[((u64)W.s0 + i) * C + h * HS + sub + LANES * k]) : 0.f;
        dq[k] = 0.f;
    }
    float L = vi ? ((const float*)a.lse)[hrow + i] : 0.f;
    float Dd = vi ? ((const float*)a.dsum)[hrow + i] : 0.f;
    for (int kt = 0; kt < W.len; kt += TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < TILE * HS; e += blockDim.x) {
            int jj = e / HS, d = e % HS, j = kt + jj;
            Ks[jj][d] = j < W.len ? ld_head<T, HS>(a, (u64)W.s0 + j, 1, h, d) : 0.f;
            Vs[jj][d] = j < W.len ? ld_head<T, HS>(a, (u64)W.s0 + j, 2, h, d) : 0.f;
        }
        __syncthreads();
        int nk = min(TILE, W.len - kt);  // uniform across the block
        for (int jj = 0; jj < nk; ++jj) {
            int j = kt + jj;
            float s = dot4<D>(q, Ks[jj], sub) * a.scale;
            float dpd = dot4<D>(dO, Vs[jj], sub);
            float P = expf(s - L);
            float f = attn_dropout(seed, W.w, h, vi ? i : 0, j, a.p);
            float dS = P * (dpd * f - Dd);
#pragma unroll
            for (int k = 0; k < D; ++k) dq[k] += dS * a.scale * Ks[jj][sub + LANES * k];
        }
    }
    if (vi) {
        T* base = (T*)a.dqkv + ((u64)W.s0 + i) * 3 * C + h * HS;
#pragma unroll
        for (int k = 0; k < D; ++k) base[sub + LANES * k] = from_f<T>(dq[k]);
    }
}

#define INSTANTIATE(TY, NAME, HS)                                                                             \
    extern "C" __global__ void __launch_bounds__(ROWS * LANES) attention_forward_##NAME##_hs##HS(AttnParams a) { attn_forward<TY, HS>(a); } \
    extern "C" __global__ void attention_dsum_##NAME##_hs##HS(AttnParams a) { attn_dsum<TY, HS>(a); }          \
    extern "C" __global__ void __launch_bounds__(ROWS * LANES) attention_backward_kv_##NAME##_hs##HS(AttnParams a) { attn_backward_kv<TY, HS>(a); } \
    extern "C" __global__ void __launch_bounds__(ROWS * LANES) attention_backward_q_##NAME##_hs##HS(AttnParams a) { attn_backward_q<TY, HS>(a); }

#define INSTANTIATE_ALL(TY, NAME) INSTANTIATE(TY, NAME, 16) INSTANTIATE(TY, NAME, 32) INSTANTIATE(TY, NAME, 64) INSTANTIATE(TY, NAME, 128)

INSTANTIATE_ALL(float, f32)
INSTANTIATE_ALL(bf16, bf16)
INSTANTIATE_ALL(f16, f16)
