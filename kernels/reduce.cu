// reduce.cu — small helpers: bias add/grad for the linear layers, dtype casts.
// Reference: src/ops/linear.rs and src/ops/adamw.rs (cast).
#include "common.cuh"

struct BiasParams {
    u64 out, bias;
    int n, oc, out_dt, bias_dt;
};

// out[r, j] += bias[j]
extern "C" __global__ void bias_add(BiasParams a) {
    u64 total = (u64)a.n * a.oc;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int j = (int)(i % a.oc);
        store_dt(a.out, a.out_dt, i, load_dt(a.out, a.out_dt, i) + load_dt(a.bias, a.bias_dt, j));
    }
}

// bias[j] (f32) += sum_r out[r, j]. Block (32, 8): threadIdx.x picks the column (coalesced reads along a row),
// threadIdx.y and blockIdx.y stride over rows; a shared-memory tree sums the 8 partials.
extern "C" __global__ void bias_grad(BiasParams a) {
    __shared__ float part[8][33];
    int j = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (j < a.oc) {
        for (int r = blockIdx.y * 8 + threadIdx.y; r < a.n; r += gridDim.y * 8) s += load_dt(a.out, a.out_dt, (u64)r * a.oc + j);
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < a.oc) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
        atomicAdd((float*)a.bias + j, t);
    }
}

struct CastParams {
    u64 dst, src, n;
    int dst_dt, src_dt;
};

extern "C" __global__ void cast(CastParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x)
        store_dt(a.dst, a.dst_dt, i, load_dt(a.src, a.src_dt, i));
}
