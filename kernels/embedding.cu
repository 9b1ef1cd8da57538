// embedding.cu — word + position + token-type gather fused with LayerNorm and dropout over the N rows of a
// batch (row r at position posid[r] of window roww[r]: the position-embedding row and the dropout keys);
// backward re-gathers the sum, runs the LayerNorm backward and scatter-adds into the three tables (float
// atomics). Reference: src/ops/embedding/cpu.rs. One warp per token row.
#include "common.cuh"

struct EmbParams {
    u64 out, mean, rstd, ids, types, posid, roww, word, pos, ttype, gamma, beta;
    u64 dword, dpos, dttype, dgamma, dbeta, site;
    int n, c, v, tv;
    float eps, p;
    int padding_idx;  // backward: no word-embedding gradient for this id (-1: none)
    int _pad;
    u64 step;
};
CHECK_LAYOUT(EmbParams, 184);
CHECK_FIELD(EmbParams, out, 0);
CHECK_FIELD(EmbParams, mean, 8);
CHECK_FIELD(EmbParams, rstd, 16);
CHECK_FIELD(EmbParams, ids, 24);
CHECK_FIELD(EmbParams, types, 32);
CHECK_FIELD(EmbParams, posid, 40);
CHECK_FIELD(EmbParams, roww, 48);
CHECK_FIELD(EmbParams, word, 56);
CHECK_FIELD(EmbParams, pos, 64);
CHECK_FIELD(EmbParams, ttype, 72);
CHECK_FIELD(EmbParams, gamma, 80);
CHECK_FIELD(EmbParams, beta, 88);
CHECK_FIELD(EmbParams, dword, 96);
CHECK_FIELD(EmbParams, dpos, 104);
CHECK_FIELD(EmbParams, dttype, 112);
CHECK_FIELD(EmbParams, dgamma, 120);
CHECK_FIELD(EmbParams, dbeta, 128);
CHECK_FIELD(EmbParams, site, 136);
CHECK_FIELD(EmbParams, n, 144);
CHECK_FIELD(EmbParams, c, 148);
CHECK_FIELD(EmbParams, v, 152);
CHECK_FIELD(EmbParams, tv, 156);
CHECK_FIELD(EmbParams, eps, 160);
CHECK_FIELD(EmbParams, p, 164);
CHECK_FIELD(EmbParams, padding_idx, 168);
CHECK_FIELD(EmbParams, _pad, 172);
CHECK_FIELD(EmbParams, step, 176);

template <typename T>
__device__ __forceinline__ float gathered(const EmbParams& a, int id, int ty, int tt, int i) {
    return to_f(((const T*)a.word)[(u64)id * a.c + i]) + to_f(((const T*)a.pos)[(u64)tt * a.c + i]) +
           to_f(((const T*)a.ttype)[(u64)ty * a.c + i]);
}

template <typename T>
__device__ void emb_forward(const EmbParams& a) {
    const u64 seed = dropout_seed(a);
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    int id = ((const int*)a.ids)[row], ty = ((const int*)a.types)[row], tt = ((const int*)a.posid)[row];
    int w = ((const int*)a.roww)[row];
    id = min(max(id, 0), a.v - 1);  // ids are validated on the host; clamp keeps a bad one in bounds
    ty = min(max(ty, 0), a.tv - 1);
    float s = 0.f;
    for (int i = lane; i < a.c; i += 32) s += gathered<T>(a, id, ty, tt, i);
    float mean = warp_sum(s) / a.c;
    float q = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        float d = gathered<T>(a, id, ty, tt, i) - mean;
        q += d * d;
    }
    float rstd = rsqrtf(warp_sum(q) / a.c + a.eps);
    T* out = (T*)a.out + (u64)row * a.c;
    for (int i = lane; i < a.c; i += 32) {
        float y = (gathered<T>(a, id, ty, tt, i) - mean) * rstd * to_f(((const T*)a.gamma)[i]) + to_f(((const T*)a.beta)[i]);
        out[i] = from_f<T>(y * hidden_factor(seed, w, tt, i, a.p));
    }
    if (lane == 0) {
        ((float*)a.mean)[row] = mean;
        ((float*)a.rstd)[row] = rstd;
    }
}

template <typename T>
__device__ void emb_backward(const EmbParams& a) {
    const u64 seed = dropout_seed(a);
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    int id = ((const int*)a.ids)[row], ty = ((const int*)a.types)[row], tt = ((const int*)a.posid)[row];
    int w = ((const int*)a.roww)[row];
    id = min(max(id, 0), a.v - 1);
    ty = min(max(ty, 0), a.tv - 1);
    const T* dout = (const T*)a.out + (u64)row * a.c;
    const T* g = (const T*)a.gamma;
    float mean = ((const float*)a.mean)[row], rstd = ((const float*)a.rstd)[row];
    float mg = 0.f, mgx = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        float dy = to_f(dout[i]) * hidden_factor(seed, w, tt, i, a.p);
        float xh = (gathered<T>(a, id, ty, tt, i) - mean) * rstd;
        float gi = dy * to_f(g[i]);
        mg += gi;
        mgx += gi * xh;
    }
    mg = warp_sum(mg) / a.c;
    mgx = warp_sum(mgx) / a.c;
    for (int i = lane; i < a.c; i += 32) {
        float dy = to_f(dout[i]) * hidden_factor(seed, w, tt, i, a.p);
        float xh = (gathered<T>(a, id, ty, tt, i) - mean) * rstd;
        float dx = rstd * (dy * to_f(g[i]) - mg - xh * mgx);
        atomicAdd((float*)a.dgamma + i, dy * xh);
        atomicAdd((float*)a.dbeta + i, dy);
        if (id != a.padding_idx) atomicAdd((float*)a.dword + (u64)id * a.c + i, dx);
        atomicAdd((float*)a.dpos + (u64)tt * a.c + i, dx);
        atomicAdd((float*)a.dttype + (u64)ty * a.c + i, dx);
    }
}

// The "vec" backward (BERTQA_VEC=1; opt-in until the GPU parity suite has run it), for C a multiple of the
// vector width N and at most 32·CH·N, and at most 2 token types. The scalar kernel above makes 5 global float
// atomics per element, two of them (dγ, dβ) onto the same C addresses from every row and one (token type)
// onto 2·C: heavily contended. Here a block's warps stride over rows, each lane owning the row's 16-byte
// chunks lane, lane+32, …: dγ and dβ build up in registers across the warp's rows and the token-type rows in
// shared memory, each reaching global memory once per block and column; the word and position rows keep
// their global atomics (spread over many addresses). Two passes per row (statistics, then the gradient),
// the second re-reading its inputs (cache hits) rather than holding them in registers.
template <typename T, int CH>
__device__ void emb_backward_vec(const EmbParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int N = Pack16<T>::N;
    DYN_SMEM(float, smem);  // dγ[c], dβ[c], dttype[tv][c] partials of this block
    float* sdg = smem;
    float* sdb = smem + a.c;
    float* sdt = smem + 2 * a.c;
    for (int i = threadIdx.x; i < (2 + a.tv) * a.c; i += blockDim.x) smem[i] = 0.f;
    __syncthreads();
    int warps = blockDim.x / 32, lane = threadIdx.x & 31, nch = a.c / N;
    float dg[CH][N], db[CH][N];
#pragma unroll
    for (int k = 0; k < CH; ++k)
#pragma unroll
        for (int e = 0; e < N; ++e) dg[k][e] = db[k][e] = 0.f;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < a.n; row += gridDim.x * warps) {
        int id = min(max(((const int*)a.ids)[row], 0), a.v - 1);
        int ty = min(max(((const int*)a.types)[row], 0), a.tv - 1);
        int tt = ((const int*)a.posid)[row], win = ((const int*)a.roww)[row];
        float mean = ((const float*)a.mean)[row], rstd = ((const float*)a.rstd)[row];
        u64 r0 = (u64)row * a.c;
        // this lane's chunk k of the row: dy = dropout(dout), xh = (x - mean)·rstd, γ
        auto chunk = [&](int k, float* dy, float* xh, float* gm) {
            int col = (lane + 32 * k) * N;
            Pack16<T> d = ld16((const T*)a.out + r0 + col), w = ld16((const T*)a.word + (u64)id * a.c + col),
                      ps = ld16((const T*)a.pos + (u64)tt * a.c + col), tk = ld16((const T*)a.ttype + (u64)ty * a.c + col),
                      g = ld16((const T*)a.gamma + col);
            float f[N];
            hidden_factors<N / 4>(seed, win, tt, col, a.p, f);
#pragma unroll
            for (int e = 0; e < N; ++e) {
                dy[e] = to_f(d.v[e]) * f[e];
                xh[e] = (to_f(w.v[e]) + to_f(ps.v[e]) + to_f(tk.v[e]) - mean) * rstd;
                gm[e] = to_f(g.v[e]);
            }
        };
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            if (lane + 32 * k < nch) {
                float dy[N], xh[N], gm[N];
                chunk(k, dy, xh, gm);
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    mg += dy[e] * gm[e];
                    mgx += dy[e] * gm[e] * xh[e];
                    dg[k][e] += dy[e] * xh[e];
                    db[k][e] += dy[e];
                }
            }
        }
        mg = warp_sum(mg) / a.c;
        mgx = warp_sum(mgx) / a.c;
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            if (lane + 32 * k < nch) {
                int col = (lane + 32 * k) * N;
                float dy[N], xh[N], gm[N];
                chunk(k, dy, xh, gm);
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    float dx = rstd * (dy[e] * gm[e] - mg - xh[e] * mgx);
                    if (id != a.padding_idx) atomicAdd((float*)a.dword + (u64)id * a.c + col + e, dx);
                    atomicAdd((float*)a.dpos + (u64)tt * a.c + col + e, dx);
                    atomicAdd(&sdt[ty * a.c + col + e], dx);
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
        if (lane + 32 * k < nch) {
            int col = (lane + 32 * k) * N;
#pragma unroll
            for (int e = 0; e < N; ++e) {
                atomicAdd(&sdg[col + e], dg[k][e]);
                atomicAdd(&sdb[col + e], db[k][e]);
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < a.c; i += blockDim.x) {
        atomicAdd((float*)a.dgamma + i, sdg[i]);
        atomicAdd((float*)a.dbeta + i, sdb[i]);
    }
    for (int i = threadIdx.x; i < a.tv * a.c; i += blockDim.x) atomicAdd((float*)a.dttype + i, sdt[i]);
}

#define EMB_VEC(TY, NAME, CH)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 2) embeddings_backward_vec##CH##_##NAME(EmbParams a) { emb_backward_vec<TY, CH>(a); }
#define EMB_VEC_ALL(TY, NAME) EMB_VEC(TY, NAME, 1) EMB_VEC(TY, NAME, 2) EMB_VEC(TY, NAME, 3) EMB_VEC(TY, NAME, 4)
EMB_VEC_ALL(float, f32)
EMB_VEC_ALL(bf16, bf16)
EMB_VEC_ALL(f16, f16)

extern "C" __global__ void embeddings_forward_f32(EmbParams a) { emb_forward<float>(a); }
extern "C" __global__ void embeddings_forward_bf16(EmbParams a) { emb_forward<bf16>(a); }
extern "C" __global__ void embeddings_forward_f16(EmbParams a) { emb_forward<f16>(a); }
extern "C" __global__ void embeddings_backward_f32(EmbParams a) { emb_backward<float>(a); }
extern "C" __global__ void embeddings_backward_bf16(EmbParams a) { emb_backward<bf16>(a); }
extern "C" __global__ void embeddings_backward_f16(EmbParams a) { emb_backward<f16>(a); }
