// gelu.cu — exact (erf) GELU forward and backward. Reference: src/ops/gelu.rs.
#include "common.cuh"

struct GeluParams {
    u64 out, dout, inp, n;
    int dt, _pad;
};

extern "C" __global__ void gelu_forward(GeluParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x) {
        float x = load_dt(a.inp, a.dt, i);
        store_dt(a.out, a.dt, i, 0.5f * x * (1.f + erff(x * 0.70710678118654752f)));
    }
}

extern "C" __global__ void gelu_backward(GeluParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x) {
        float x = load_dt(a.inp, a.dt, i);
        float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
        float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
        store_dt(a.out, a.dt, i, load_dt(a.dout, a.dt, i) * (cdf + x * pdf));
    }
}
