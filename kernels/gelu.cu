// gelu.cu — exact (erf) GELU forward and backward. Reference: src/ops/gelu.rs.
// Two versions: the scalar kernels (any dtype at run time, any alignment) and the "vec" kernels (dtype at
// compile time, 16-byte loads and stores, 8 bf16/f16 or 4 f32 elements per step; BERTQA_VEC=1, opt-in until
// the GPU parity suite has run them).
#include "common.cuh"

struct GeluParams {
    u64 out, dout, inp, n;
    int dt, _pad;
};
CHECK_LAYOUT(GeluParams, 40);
CHECK_FIELD(GeluParams, out, 0);
CHECK_FIELD(GeluParams, dout, 8);
CHECK_FIELD(GeluParams, inp, 16);
CHECK_FIELD(GeluParams, n, 24);
CHECK_FIELD(GeluParams, dt, 32);
CHECK_FIELD(GeluParams, _pad, 36);

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float x) {
    float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
    return cdf + x * pdf;
}

extern "C" __global__ void gelu_forward(GeluParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x)
        store_dt(a.out, a.dt, i, gelu_f(load_dt(a.inp, a.dt, i)));
}

extern "C" __global__ void gelu_backward(GeluParams a) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < a.n; i += (u64)gridDim.x * blockDim.x)
        store_dt(a.out, a.dt, i, load_dt(a.dout, a.dt, i) * gelu_grad(load_dt(a.inp, a.dt, i)));
}

// out = gelu(inp) (forward) or out = dout · gelu'(inp) (backward): whole 16-byte vectors, then the tail.
template <typename T, bool BWD>
__device__ void gelu_vec(const GeluParams& a) {
    constexpr int N = Pack16<T>::N;
    const T* inp = (const T*)a.inp;
    const T* dout = (const T*)a.dout;
    T* out = (T*)a.out;
    u64 stride = (u64)gridDim.x * blockDim.x, first = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    for (u64 v = first; v < a.n / N; v += stride) {
        Pack16<T> x = ld16(inp + v * N), y;
        if constexpr (BWD) {
            Pack16<T> d = ld16(dout + v * N);
#pragma unroll
            for (int e = 0; e < N; ++e) y.v[e] = from_f<T>(to_f(d.v[e]) * gelu_grad(to_f(x.v[e])));
        } else {
#pragma unroll
            for (int e = 0; e < N; ++e) y.v[e] = from_f<T>(gelu_f(to_f(x.v[e])));
        }
        st16(out + v * N, y);
    }
    for (u64 i = a.n / N * N + first; i < a.n; i += stride) {
        float x = to_f(inp[i]);
        out[i] = from_f<T>(BWD ? to_f(dout[i]) * gelu_grad(x) : gelu_f(x));
    }
}

extern "C" __global__ void gelu_forward_vec_f32(GeluParams a) { gelu_vec<float, false>(a); }
extern "C" __global__ void gelu_forward_vec_bf16(GeluParams a) { gelu_vec<bf16, false>(a); }
extern "C" __global__ void gelu_forward_vec_f16(GeluParams a) { gelu_vec<f16, false>(a); }
extern "C" __global__ void gelu_backward_vec_f32(GeluParams a) { gelu_vec<float, true>(a); }
extern "C" __global__ void gelu_backward_vec_bf16(GeluParams a) { gelu_vec<bf16, true>(a); }
extern "C" __global__ void gelu_backward_vec_f16(GeluParams a) { gelu_vec<f16, true>(a); }

// The FFN's backward through GELU and the up-projection's bias at once (vec only): dinp = dout · gelu'(inp)
// over N rows of C columns, and dbias (C, f32) += Σ_rows dinp as stored (rounded to T, as the unfused path's
// bias_grad reads it back). Saves that read of dinp (BERT-base: N·3072 elements per layer). bias_grad_vec's
// layout (kernels/reduce.cu): block (32, 8), threadIdx.x a group of N columns, threadIdx.y and blockIdx.y
// striding over rows, then common.cuh column_partials_add.
// Needs C % N == 0 and 16-byte-aligned rows.
struct GeluBiasParams {
    u64 out, dout, inp, dbias;
    int n, c;
};
CHECK_LAYOUT(GeluBiasParams, 40);
CHECK_FIELD(GeluBiasParams, out, 0);
CHECK_FIELD(GeluBiasParams, dout, 8);
CHECK_FIELD(GeluBiasParams, inp, 16);
CHECK_FIELD(GeluBiasParams, dbias, 24);
CHECK_FIELD(GeluBiasParams, n, 32);
CHECK_FIELD(GeluBiasParams, c, 36);

template <typename T>
__device__ void gelu_backward_bias_vec(const GeluBiasParams& a) {
    constexpr int N = Pack16<T>::N;
    int group = blockIdx.x * 32 + threadIdx.x;
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
    if (group < a.c / N) {
        for (int r = blockIdx.y * 8 + threadIdx.y; r < a.n; r += gridDim.y * 8) {
            u64 off = (u64)r * a.c + group * N;
            Pack16<T> x = ld16((const T*)a.inp + off), d = ld16((const T*)a.dout + off), y;
#pragma unroll
            for (int e = 0; e < N; ++e) {
                y.v[e] = from_f<T>(to_f(d.v[e]) * gelu_grad(to_f(x.v[e])));
                acc[e] += to_f(y.v[e]);
            }
            st16((T*)a.out + off, y);
        }
    }
    column_partials_add<N>(acc, (float*)a.dbias, a.c);
}
extern "C" __global__ void gelu_backward_bias_vec_f32(GeluBiasParams a) { gelu_backward_bias_vec<float>(a); }
extern "C" __global__ void gelu_backward_bias_vec_bf16(GeluBiasParams a) { gelu_backward_bias_vec<bf16>(a); }
extern "C" __global__ void gelu_backward_bias_vec_f16(GeluBiasParams a) { gelu_backward_bias_vec<f16>(a); }
