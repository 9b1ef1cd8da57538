// span_loss.cu — start/end softmax cross-entropy over each window's positions, loss and dlogits in one kernel.
// One block per (window, start|end): window b owns rows cu[b]..cu[b+1] of the (N,2) logits; the softmax runs
// over its first lens[b] rows (mask_padding) or all of them. Reference: src/ops/span_loss/cpu.rs.
#include "common.cuh"

struct SpanParams {
    u64 losses, dlogits, logits, starts, ends, cu, lens;
    int b, mask_padding, dt;
    float scale_start, scale_end;
    int _pad;
};
CHECK_LAYOUT(SpanParams, 80);
CHECK_FIELD(SpanParams, losses, 0);
CHECK_FIELD(SpanParams, dlogits, 8);
CHECK_FIELD(SpanParams, logits, 16);
CHECK_FIELD(SpanParams, starts, 24);
CHECK_FIELD(SpanParams, ends, 32);
CHECK_FIELD(SpanParams, cu, 40);
CHECK_FIELD(SpanParams, lens, 48);
CHECK_FIELD(SpanParams, b, 56);
CHECK_FIELD(SpanParams, mask_padding, 60);
CHECK_FIELD(SpanParams, dt, 64);
CHECK_FIELD(SpanParams, scale_start, 68);
CHECK_FIELD(SpanParams, scale_end, 72);
CHECK_FIELD(SpanParams, _pad, 76);

extern "C" __global__ void span_loss_forward_backward(SpanParams a) {
    __shared__ float red[32];
    int bi = blockIdx.x, w = blockIdx.y;
    int s0 = ((const int*)a.cu)[bi], rows = ((const int*)a.cu)[bi + 1] - s0;
    int range = a.mask_padding ? ((const int*)a.lens)[bi] : rows;
    int tgt = w == 0 ? ((const int*)a.starts)[bi] : ((const int*)a.ends)[bi];
    float scale = w == 0 ? a.scale_start : a.scale_end;
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
