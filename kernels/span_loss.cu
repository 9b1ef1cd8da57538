// span_loss.cu — start/end softmax cross-entropy over the sequence, loss and dlogits in one kernel.
// One block per (example, start|end). Reference: src/ops/span_loss.rs.
#include "common.cuh"

struct SpanParams {
    u64 losses, dlogits, logits, starts, ends, mask;
    int b, t, mask_padding, dt;
    float scale_start, scale_end;
};
CHECK_LAYOUT(SpanParams, 72);
CHECK_FIELD(SpanParams, losses, 0);
CHECK_FIELD(SpanParams, dlogits, 8);
CHECK_FIELD(SpanParams, logits, 16);
CHECK_FIELD(SpanParams, starts, 24);
CHECK_FIELD(SpanParams, ends, 32);
CHECK_FIELD(SpanParams, mask, 40);
CHECK_FIELD(SpanParams, b, 48);
CHECK_FIELD(SpanParams, t, 52);
CHECK_FIELD(SpanParams, mask_padding, 56);
CHECK_FIELD(SpanParams, dt, 60);
CHECK_FIELD(SpanParams, scale_start, 64);
CHECK_FIELD(SpanParams, scale_end, 68);

extern "C" __global__ void span_loss_forward_backward(SpanParams a) {
    __shared__ float red[32];
    int bi = blockIdx.x, w = blockIdx.y;
    int tgt = w == 0 ? ((const int*)a.starts)[bi] : ((const int*)a.ends)[bi];
    float scale = w == 0 ? a.scale_start : a.scale_end;
    const int* mask = (const int*)a.mask + (u64)bi * a.t;
    bool tgt_ok = tgt >= 0 && tgt < a.t && (!a.mask_padding || mask[tgt] != 0);
    float m = -INFINITY;
    for (int j = threadIdx.x; j < a.t; j += blockDim.x)
        if (!a.mask_padding || mask[j] != 0) m = fmaxf(m, load_dt(a.logits, a.dt, ((u64)bi * a.t + j) * 2 + w));
    m = block_max(m, red);
    float z = 0.f;
    for (int j = threadIdx.x; j < a.t; j += blockDim.x)
        if (!a.mask_padding || mask[j] != 0) z += expf(load_dt(a.logits, a.dt, ((u64)bi * a.t + j) * 2 + w) - m);
    z = block_sum(z, red);
    float lse = m + logf(z);
    for (int j = threadIdx.x; j < a.t; j += blockDim.x) {
        u64 idx = ((u64)bi * a.t + j) * 2 + w;
        float g = 0.f;
        if (tgt_ok && (!a.mask_padding || mask[j] != 0)) g = (expf(load_dt(a.logits, a.dt, idx) - lse) - (j == tgt ? 1.f : 0.f)) * scale;
        store_dt(a.dlogits, a.dt, idx, g);
    }
    if (threadIdx.x == 0)
        ((float*)a.losses)[bi * 2 + w] = tgt_ok ? lse - load_dt(a.logits, a.dt, ((u64)bi * a.t + tgt) * 2 + w) : 0.f;
}
