// layernorm.cu — fused residual + dropout + LayerNorm (BERT's post-LN), forward and backward.
// Reference: src/ops/layernorm.rs (CPU loops). One warp per row; statistics in float.
#include "common.cuh"

struct LnFwdParams {
    u64 out, sum, mean, rstd, inp, resid, gamma, beta, seed;
    int n, c;
    float eps, p;
};

struct LnBwdParams {
    u64 dinp, dresid, dgamma, dbeta, dout, sum, mean, rstd, gamma, seed;
    int n, c;
    float p;
    int _pad;
};

// sum = resid + dropout(inp); out = LN(sum). The statistics are taken over `sum` as stored (rounded to T),
// exactly what backward reads back.
template <typename T>
__device__ void ln_forward(const LnFwdParams& a) {
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    const T* inp = (const T*)a.inp + (u64)row * a.c;
    const T* res = (const T*)a.resid + (u64)row * a.c;
    T* sum = (T*)a.sum + (u64)row * a.c;
    T* out = (T*)a.out + (u64)row * a.c;
    float s = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        u64 idx = (u64)row * a.c + i;
        float v = to_f(res[i]) + to_f(inp[i]) * dropout_factor(a.seed, idx, a.p);
        T vs = from_f<T>(v);
        sum[i] = vs;
        s += to_f(vs);
    }
    float mean = warp_sum(s) / a.c;
    float q = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        float d = to_f(sum[i]) - mean;
        q += d * d;
    }
    float rstd = rsqrtf(warp_sum(q) / a.c + a.eps);
    const T* g = (const T*)a.gamma;
    const T* b = (const T*)a.beta;
    for (int i = lane; i < a.c; i += 32) {
        out[i] = from_f<T>((to_f(sum[i]) - mean) * rstd * to_f(g[i]) + to_f(b[i]));
    }
    if (lane == 0) {
        ((float*)a.mean)[row] = mean;
        ((float*)a.rstd)[row] = rstd;
    }
}

template <typename T>
__device__ void ln_backward(const LnBwdParams& a) {
    extern __shared__ float smem[];  // dgamma[c], dbeta[c] partials of this block
    float* sdg = smem;
    float* sdb = smem + a.c;
    for (int i = threadIdx.x; i < 2 * a.c; i += blockDim.x) smem[i] = 0.f;
    __syncthreads();
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    const T* g = (const T*)a.gamma;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < a.n; row += gridDim.x * warps) {
        const T* dout = (const T*)a.dout + (u64)row * a.c;
        const T* x = (const T*)a.sum + (u64)row * a.c;
        float mean = ((const float*)a.mean)[row], rstd = ((const float*)a.rstd)[row];
        float mg = 0.f, mgx = 0.f;
        for (int i = lane; i < a.c; i += 32) {
            float gi = to_f(dout[i]) * to_f(g[i]);
            float xh = (to_f(x[i]) - mean) * rstd;
            mg += gi;
            mgx += gi * xh;
        }
        mg = warp_sum(mg) / a.c;
        mgx = warp_sum(mgx) / a.c;
        T* dres = (T*)a.dresid + (u64)row * a.c;
        T* dinp = (T*)a.dinp + (u64)row * a.c;
        for (int i = lane; i < a.c; i += 32) {
            float dy = to_f(dout[i]);
            float xh = (to_f(x[i]) - mean) * rstd;
            float ds = rstd * (dy * to_f(g[i]) - mg - xh * mgx);
            dres[i] = from_f<T>(ds);
            dinp[i] = from_f<T>(ds * dropout_factor(a.seed, (u64)row * a.c + i, a.p));
            atomicAdd(&sdg[i], dy * xh);
            atomicAdd(&sdb[i], dy);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < a.c; i += blockDim.x) {
        atomicAdd((float*)a.dgamma + i, sdg[i]);
        atomicAdd((float*)a.dbeta + i, sdb[i]);
    }
}

extern "C" __global__ void residual_layernorm_forward_f32(LnFwdParams a) { ln_forward<float>(a); }
extern "C" __global__ void residual_layernorm_forward_bf16(LnFwdParams a) { ln_forward<bf16>(a); }
extern "C" __global__ void residual_layernorm_forward_f16(LnFwdParams a) { ln_forward<f16>(a); }
extern "C" __global__ void residual_layernorm_backward_f32(LnBwdParams a) { ln_backward<float>(a); }
extern "C" __global__ void residual_layernorm_backward_bf16(LnBwdParams a) { ln_backward<bf16>(a); }
extern "C" __global__ void residual_layernorm_backward_f16(LnBwdParams a) { ln_backward<f16>(a); }
