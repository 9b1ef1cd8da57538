// adamw.cu — multi-tensor AdamW (fp32 master weights and moments, bias correction, decoupled weight decay,
// refresh of the bf16/f16 working copy) and the global squared gradient norm.
// blockIdx.y selects the tensor in a table of entries; blockIdx.x strides over its elements.
// Reference: src/ops/adamw.rs.
#include "common.cuh"

struct AdamWEntry {
    u64 master, working, grad, m, v, n;
    int decay, working_dt;
};

struct AdamWParams {
    u64 table, out;
    float lr, beta1, beta2, eps, wd, bc1, bc2, grad_scale;
};

extern "C" __global__ void adamw_step(AdamWParams a) {
    const AdamWEntry e = ((const AdamWEntry*)a.table)[blockIdx.y];
    float* p = (float*)e.master;
    const float* g = (const float*)e.grad;
    float* m = (float*)e.m;
    float* v = (float*)e.v;
    float wd = e.decay ? a.wd : 0.f;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < e.n; i += (u64)gridDim.x * blockDim.x) {
        float gi = g[i] * a.grad_scale;
        float pi = p[i] - wd * p[i];
        float mi = a.beta1 * m[i] + (1.f - a.beta1) * gi;
        float vi = a.beta2 * v[i] + (1.f - a.beta2) * gi * gi;
        pi = pi - a.lr * (mi / a.bc1) / (sqrtf(vi / a.bc2) + a.eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (e.working) store_dt(e.working, e.working_dt, i, pi);
    }
}

extern "C" __global__ void grad_sq_norm(AdamWParams a) {
    __shared__ float red[32];
    const AdamWEntry e = ((const AdamWEntry*)a.table)[blockIdx.y];
    const float* g = (const float*)e.grad;
    float s = 0.f;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < e.n; i += (u64)gridDim.x * blockDim.x) s += g[i] * g[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) atomicAdd((float*)a.out, s);
}
