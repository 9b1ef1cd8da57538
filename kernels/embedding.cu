// embedding.cu — word + position + token-type gather fused with LayerNorm and dropout; backward re-gathers
// the sum, runs the LayerNorm backward and scatter-adds into the three tables (float atomics).
// Reference: src/ops/embedding.rs. One warp per token row.
#include "common.cuh"

struct EmbParams {
    u64 out, mean, rstd, ids, types, word, pos, ttype, gamma, beta;
    u64 dword, dpos, dttype, dgamma, dbeta, seed;
    int n, t, c, v, tv;
    float eps, p;
    int padding_idx;  // backward: no word-embedding gradient for this id (-1: none)
};

template <typename T>
__device__ __forceinline__ float gathered(const EmbParams& a, int id, int ty, int tt, int i) {
    return to_f(((const T*)a.word)[(u64)id * a.c + i]) + to_f(((const T*)a.pos)[(u64)tt * a.c + i]) +
           to_f(((const T*)a.ttype)[(u64)ty * a.c + i]);
}

template <typename T>
__device__ void emb_forward(const EmbParams& a) {
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    int id = ((const int*)a.ids)[row], ty = ((const int*)a.types)[row], tt = row % a.t;
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
        out[i] = from_f<T>(y * dropout_factor(a.seed, (u64)row * a.c + i, a.p));
    }
    if (lane == 0) {
        ((float*)a.mean)[row] = mean;
        ((float*)a.rstd)[row] = rstd;
    }
}

template <typename T>
__device__ void emb_backward(const EmbParams& a) {
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    int id = ((const int*)a.ids)[row], ty = ((const int*)a.types)[row], tt = row % a.t;
    id = min(max(id, 0), a.v - 1);
    ty = min(max(ty, 0), a.tv - 1);
    const T* dout = (const T*)a.out + (u64)row * a.c;
    const T* g = (const T*)a.gamma;
    float mean = ((const float*)a.mean)[row], rstd = ((const float*)a.rstd)[row];
    float mg = 0.f, mgx = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        float dy = to_f(dout[i]) * dropout_factor(a.seed, (u64)row * a.c + i, a.p);
        float xh = (gathered<T>(a, id, ty, tt, i) - mean) * rstd;
        float gi = dy * to_f(g[i]);
        mg += gi;
        mgx += gi * xh;
    }
    mg = warp_sum(mg) / a.c;
    mgx = warp_sum(mgx) / a.c;
    for (int i = lane; i < a.c; i += 32) {
        float dy = to_f(dout[i]) * dropout_factor(a.seed, (u64)row * a.c + i, a.p);
        float xh = (gathered<T>(a, id, ty, tt, i) - mean) * rstd;
        float dx = rstd * (dy * to_f(g[i]) - mg - xh * mgx);
        atomicAdd((float*)a.dgamma + i, dy * xh);
        atomicAdd((float*)a.dbeta + i, dy);
        if (id != a.padding_idx) atomicAdd((float*)a.dword + (u64)id * a.c + i, dx);
        atomicAdd((float*)a.dpos + (u64)tt * a.c + i, dx);
        atomicAdd((float*)a.dttype + (u64)ty * a.c + i, dx);
    }
}

extern "C" __global__ void embeddings_forward_f32(EmbParams a) { emb_forward<float>(a); }
extern "C" __global__ void embeddings_forward_bf16(EmbParams a) { emb_forward<bf16>(a); }
extern "C" __global__ void embeddings_forward_f16(EmbParams a) { emb_forward<f16>(a); }
extern "C" __global__ void embeddings_backward_f32(EmbParams a) { emb_backward<float>(a); }
extern "C" __global__ void embeddings_backward_bf16(EmbParams a) { emb_backward<bf16>(a); }
extern "C" __global__ void embeddings_backward_f16(EmbParams a) { emb_backward<f16>(a); }
