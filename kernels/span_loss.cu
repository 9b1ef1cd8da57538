// span_loss.cu — start/end softmax cross-entropy over each window's positions, loss and dlogits in one kernel.
// One block per (window, start|end): window b owns rows cu[b]..cu[b+1] of the (N,2) logits; the softmax runs
// over its first lens[b] rows (mask_padding) or all of them; then span_loss_sums adds the batch's loss sums to
// the step's statistics. Reference: src/ops/span_loss/cpu.rs.
#include "common.cuh"

struct SpanParams {
    u64 losses, stats, dlogits, logits, starts, ends, cu, lens;
    int b, mask_padding, dt;
    int _pad;
    u64 scale;  // (2) f32: the gradient scales of the start and end halves (device memory: they change every step)
};
CHECK_LAYOUT(SpanParams, 88);
CHECK_FIELD(SpanParams, losses, 0);
CHECK_FIELD(SpanParams, stats, 8);
CHECK_FIELD(SpanParams, dlogits, 16);
CHECK_FIELD(SpanParams, logits, 24);
CHECK_FIELD(SpanParams, starts, 32);
CHECK_FIELD(SpanParams, ends, 40);
CHECK_FIELD(SpanParams, cu, 48);
CHECK_FIELD(SpanParams, lens, 56);
CHECK_FIELD(SpanParams, b, 64);
CHECK_FIELD(SpanParams, mask_padding, 68);
CHECK_FIELD(SpanParams, dt, 72);
CHECK_FIELD(SpanParams, _pad, 76);
CHECK_FIELD(SpanParams, scale, 80);

extern "C" __global__ void span_loss_forward_backward(SpanParams a) {
    __shared__ float red[32];
    int bi = blockIdx.x, w = blockIdx.y;
    int s0 = ((const int*)a.cu)[bi], rows = ((const int*)a.cu)[bi + 1] - s0;
    int range = a.mask_padding ? ((const int*)a.lens)[bi] : rows;
    int tgt = w == 0 ? ((const int*)a.starts)[bi] : ((const int*)a.ends)[bi];
    float scale = ((const float*)a.scale)[w];
    bool tgt_ok = tgt >= 0 && tgt < range;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < range; j += blockDim.x) m = fmaxf(m, load_dt(a.logits, a.dt, ((u64)s0 + j) * 2 + w));
    m = block_max(m, red);
    float z = 0.f;
    for (int j = threadIdx.x; j < range; j += blockDim.x) z += expf(load_dt(a.logits, a.dt, ((u64)s0 + j) * 2 + w) - m);
    z = block_sum(z, red);
    float lse = m + logf(z);
    for (int j = threadIdx.x; j < rows; j += blockDim.x) {
        u64 idx = ((u64)s0 + j) * 2 + w;
        float g = 0.f;
        if (tgt_ok && j < range) g = (expf(load_dt(a.logits, a.dt, idx) - lse) - (j == tgt ? 1.f : 0.f)) * scale;
        store_dt(a.dlogits, a.dt, idx, g);
    }
    if (threadIdx.x == 0) ((float*)a.losses)[bi * 2 + w] = tgt_ok ? lse - load_dt(a.logits, a.dt, ((u64)s0 + tgt) * 2 + w) : 0.f;
}

// The batch's loss sums added to the step's statistics: stats[0] += Σ_b losses[b,0], stats[1] += Σ_b
// losses[b,1], each summed in window order by one thread (the CPU reference's order; B is at most a few
// hundred). Launched after span_loss_forward_backward on the same stream.
extern "C" __global__ void span_loss_sums(SpanParams a) {
    int w = threadIdx.x;
    if (w >= 2) return;
    const float* l = (const float*)a.losses;
    float s = 0.f;
    for (int bi = 0; bi < a.b; bi++) s += l[bi * 2 + w];
    ((float*)a.stats)[w] += s;
}
