// adamw.cu — AdamW over the flat parameter buffers (fp32 master weights and moments, bias correction,
// decoupled weight decay on the elements before n_decay, refresh of the bf16/f16 working copy) and the squared
// gradient norm over the flat gradient. Blocks stride over the elements. Reference: src/ops/adamw/cpu.rs.
// The step's statistics (src/ops/mod.rs STAT_*) stay on the device: stats[0], stats[1] = Σ start / end NLL,
// stats[2] = Σ g²; AdamW reads them (skip on non-finite, clipping), so the host reads them once per step.
#include "common.cuh"

struct AdamWParams {
    u64 master, working, grad, m, v, stats, n, n_decay;
    int working_dt;
    float lr, beta1, beta2, eps, wd, bc1, bc2, loss_scale, max_norm;
};
CHECK_LAYOUT(AdamWParams, 104);
CHECK_FIELD(AdamWParams, master, 0);
CHECK_FIELD(AdamWParams, working, 8);
CHECK_FIELD(AdamWParams, grad, 16);
CHECK_FIELD(AdamWParams, m, 24);
CHECK_FIELD(AdamWParams, v, 32);
CHECK_FIELD(AdamWParams, stats, 40);
CHECK_FIELD(AdamWParams, n, 48);
CHECK_FIELD(AdamWParams, n_decay, 56);
CHECK_FIELD(AdamWParams, working_dt, 64);
CHECK_FIELD(AdamWParams, lr, 68);
CHECK_FIELD(AdamWParams, beta1, 72);
CHECK_FIELD(AdamWParams, beta2, 76);
CHECK_FIELD(AdamWParams, eps, 80);
CHECK_FIELD(AdamWParams, wd, 84);
CHECK_FIELD(AdamWParams, bc1, 88);
CHECK_FIELD(AdamWParams, bc2, 92);
CHECK_FIELD(AdamWParams, loss_scale, 96);
CHECK_FIELD(AdamWParams, max_norm, 100);

extern "C" __global__ void adamw_step(AdamWParams a) {
    // the gradient multiplier (AdamWHyper::grad_scale): none on a non-finite loss or gradient
    const float* st = (const float*)a.stats;
    if (!isfinite(st[0]) || !isfinite(st[1]) || !isfinite(st[2])) return;
    float norm = sqrtf(st[2]) / a.loss_scale;
    float clip = a.max_norm > 0.f ? fminf(a.max_norm / (norm + 1e-6f), 1.f) : 1.f;
    float grad_scale = clip / a.loss_scale;
    float* p = (float*)a.master;
    const float* g = (const float*)a.grad;
    float* m = (float*)a.m;
    float* v = (float*)a.v;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float pi = i < a.n_decay ? p[i] - a.wd * p[i] : p[i];
        float mi = a.beta1 * m[i] + (1.f - a.beta1) * gi;
        float vi = a.beta2 * v[i] + (1.f - a.beta2) * gi * gi;
        pi = pi - a.lr * (mi / a.bc1) / (sqrtf(vi / a.bc2) + a.eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (a.working) store_dt(a.working, a.working_dt, i, pi);
    }
}

extern "C" __global__ void grad_sq_norm(AdamWParams a) {
    __shared__ float red[32];
    const float* g = (const float*)a.grad;
    float s = 0.f;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x) s += g[i] * g[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) atomicAdd((float*)a.stats + 2, s);
}
