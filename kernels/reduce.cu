// reduce.cu — small helpers: bias add/grad for the linear layers, dtype casts.
// Reference: src/ops/linear/cpu.rs and src/cuda/cast.rs (cast).
#include "common.cuh"

struct BiasParams {
    u64 out, bias;
    int n, oc, out_dt, bias_dt;
};
CHECK_LAYOUT(BiasParams, 32);
CHECK_FIELD(BiasParams, out, 0);
CHECK_FIELD(BiasParams, bias, 8);
CHECK_FIELD(BiasParams, n, 16);
CHECK_FIELD(BiasParams, oc, 20);
CHECK_FIELD(BiasParams, out_dt, 24);
CHECK_FIELD(BiasParams, bias_dt, 28);

// out[r, j] += bias[j]
extern "C" __global__ void bias_add(BiasParams a) {
    u64 total = (u64)a.n * a.oc;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int j = (int)(i % a.oc);
        store_dt(a.out, a.out_dt, i, load_dt(a.out, a.out_dt, i) + load_dt(a.bias, a.bias_dt, j));
    }
}

// bias[j] (f32) += sum_r out[r, j]. Block (32, 8): threadIdx.x picks the column (coalesced reads along a row),
// threadIdx.y and blockIdx.y stride over rows; the 8 partials meet in common.cuh column_partials_add.
extern "C" __global__ void bias_grad(BiasParams a) {
    int j = blockIdx.x * 32 + threadIdx.x;
    float s[1] = {0.f};
    if (j < a.oc) {
        for (int r = blockIdx.y * 8 + threadIdx.y; r < a.n; r += gridDim.y * 8) s[0] += load_dt(a.out, a.out_dt, (u64)r * a.oc + j);
    }
    column_partials_add<1>(s, (float*)a.bias, a.oc);
}

// The "vec" version (BERTQA_VEC=1; opt-in until the GPU parity suite has run it): 16-byte loads, N = 8
// (bf16/f16) or 4 (f32) columns per thread. Block (32, 8): threadIdx.x picks a group of N columns, threadIdx.y
// and blockIdx.y stride over rows; the 8 row partials meet in shared memory, then one atomicAdd per column and
// block. Needs OC % N == 0 and 16-byte-aligned rows.
template <typename T>
__device__ void bias_grad_vec(const BiasParams& a) {
    constexpr int N = Pack16<T>::N;
    int group = blockIdx.x * 32 + threadIdx.x;
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
    if (group < a.oc / N) {
        for (int r = blockIdx.y * 8 + threadIdx.y; r < a.n; r += gridDim.y * 8) {
            Pack16<T> v = ld16((const T*)a.out + (u64)r * a.oc + group * N);
#pragma unroll
            for (int e = 0; e < N; ++e) acc[e] += to_f(v.v[e]);
        }
    }
    column_partials_add<N>(acc, (float*)a.bias, a.oc);
}
extern "C" __global__ void bias_grad_vec_f32(BiasParams a) { bias_grad_vec<float>(a); }
extern "C" __global__ void bias_grad_vec_bf16(BiasParams a) { bias_grad_vec<bf16>(a); }
extern "C" __global__ void bias_grad_vec_f16(BiasParams a) { bias_grad_vec<f16>(a); }

struct CastParams {
    u64 dst, src, n;
    int dst_dt, src_dt;
};
CHECK_LAYOUT(CastParams, 32);
CHECK_FIELD(CastParams, dst, 0);
CHECK_FIELD(CastParams, src, 8);
CHECK_FIELD(CastParams, n, 16);
CHECK_FIELD(CastParams, dst_dt, 24);
CHECK_FIELD(CastParams, src_dt, 28);

extern "C" __global__ void cast(CastParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x)
        store_dt(a.dst, a.dst_dt, i, load_dt(a.src, a.src_dt, i));
}
