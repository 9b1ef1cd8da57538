// gelu.cu — exact (erf) GELU forward and backward. Reference: src/ops/gelu/cpu.rs.
// Two versions: the scalar kernels (any dtype at run time, any alignment) and the "vec" kernels (dtype at
// compile time, 16-byte loads and stores, 8 bf16/f16 or 4 f32 elements per step; BERTQA_VEC=1, opt-in until
// the GPU parity suite has run them).
#include "common.cuh"

// With a bias (c > 0; the kernels read `bias` only then), x = inp + bias[column] with inp (n/c, c): the FFN
// up-projection's bias, added here
// instead of in a pass after its GEMM; forward and backward both take it, so inp stays the GEMM's output.
struct GeluParams {
    u64 out, dout, inp, n;
    int dt, c;  // c: the bias's length (inp's columns), 0 without a bias
    u64 bias;   // (c) in dt, or 0
};
CHECK_LAYOUT(GeluParams, 48);
CHECK_FIELD(GeluParams, out, 0);
CHECK_FIELD(GeluParams, dout, 8);
CHECK_FIELD(GeluParams, inp, 16);
CHECK_FIELD(GeluParams, n, 24);
CHECK_FIELD(GeluParams, dt, 32);
CHECK_FIELD(GeluParams, c, 36);
CHECK_FIELD(GeluParams, bias, 40);

// The column of element i of a grid-stride loop, stepped without a division per element: col = first % c,
// then each step adds stride % c and wraps once. Without a bias (c = 0) it stays 0 and is not used.
struct ColStep {
    u64 col, step, c;
    __device__ ColStep(u64 first, u64 stride, int c_) : col(c_ ? first % c_ : 0), step(c_ ? stride % c_ : 0), c(c_) {}
    __device__ __forceinline__ void next() {
        col += step;
        if (col >= c) col -= c;
    }
};

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad(float x) {
    float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
    return cdf + x * pdf;
}

extern "C" __global__ void gelu_forward(GeluParams a) {
    u64 first = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    ColStep col(first, stride, a.c);
    for (u64 i = first; i < a.n; i += stride, col.next()) {
        float x = load_dt(a.inp, a.dt, i) + (a.c ? load_dt(a.bias, a.dt, col.col) : 0.f);
        store_dt(a.out, a.dt, i, gelu_f(x));
    }
}

extern "C" __global__ void gelu_backward(GeluParams a) {
    u64 first = blockIdx.x * (u64)blockDim.x + threadIdx.x, stride = (u64)gridDim.x * blockDim.x;
    ColStep col(first, stride, a.c);
    for (u64 i = first; i < a.n; i += stride, col.next()) {
        float x = load_dt(a.inp, a.dt, i) + (a.c ? load_dt(a.bias, a.dt, col.col) : 0.f);
        store_dt(a.out, a.dt, i, load_dt(a.dout, a.dt, i) * gelu_grad(x));
    }
}

// out = gelu(x) (forward) or out = dout · gelu'(x) (backward), x = inp (+ bias): whole 16-byte vectors, then
// the tail. With a bias, c is a multiple of N (the launcher's condition): no vector straddles two rows.
template <typename T, bool BWD>
__device__ void gelu_vec(const GeluParams& a) {
    constexpr int N = Pack16<T>::N;
    const T* inp = (const T*)a.inp;
    const T* dout = (const T*)a.dout;
    const T* bias = a.c ? (const T*)a.bias : nullptr;  // the bias is there when its length is (c > 0)
    T* out = (T*)a.out;
    u64 stride = (u64)gridDim.x * blockDim.x, first = blockIdx.x * (u64)blockDim.x + threadIdx.x;
    ColStep col(first * N, stride * N, a.c);
    for (u64 v = first; v < a.n / N; v += stride, col.next()) {
        Pack16<T> x = ld16(inp + v * N), y;
        float xf[N];
        ld16_f_or_zero(bias ? bias + col.col : nullptr, xf);
#pragma unroll
        for (int e = 0; e < N; ++e) xf[e] += to_f(x.v[e]);
        if constexpr (BWD) {
            Pack16<T> d = ld16(dout + v * N);
#pragma unroll
            for (int e = 0; e < N; ++e) y.v[e] = from_f<T>(to_f(d.v[e]) * gelu_grad(xf[e]));
        } else {
#pragma unroll
            for (int e = 0; e < N; ++e) y.v[e] = from_f<T>(gelu_f(xf[e]));
        }
        st16(out + v * N, y);
    }
    for (u64 i = a.n / N * N + first; i < a.n; i += stride) {
        float x = to_f(inp[i]) + (bias ? to_f(bias[i % a.c]) : 0.f);
        out[i] = from_f<T>(BWD ? to_f(dout[i]) * gelu_grad(x) : gelu_f(x));
    }
}

extern "C" __global__ void gelu_forward_vec_f32(GeluParams a) { gelu_vec<float, false>(a); }
extern "C" __global__ void gelu_forward_vec_bf16(GeluParams a) { gelu_vec<bf16, false>(a); }
extern "C" __global__ void gelu_forward_vec_f16(GeluParams a) { gelu_vec<f16, false>(a); }
extern "C" __global__ void gelu_backward_vec_f32(GeluParams a) { gelu_vec<float, true>(a); }
extern "C" __global__ void gelu_backward_vec_bf16(GeluParams a) { gelu_vec<bf16, true>(a); }
extern "C" __global__ void gelu_backward_vec_f16(GeluParams a) { gelu_vec<f16, true>(a); }

// The FFN's backward through GELU and the up-projection's bias at once (vec only): dinp = dout · gelu'(inp + bias)
// over N rows of C columns, and dbias (C, f32) += Σ_rows dinp as stored (rounded to T, as the unfused path's
// bias_grad reads it back). Saves that read of dinp (BERT-base: N·3072 elements per layer). bias_grad_vec's
// layout (kernels/reduce.cu): block (32, 8), threadIdx.x a group of N columns, threadIdx.y and blockIdx.y
// striding over rows, then common.cuh column_partials_add.
// Needs C % N == 0 and 16-byte-aligned rows and bias.
struct GeluBiasParams {
    u64 out, dout, inp, dbias;
    int n, c;
    u64 bias;  // (c) in T: the forward's bias, the derivative taken at inp + bias; or 0
};
CHECK_LAYOUT(GeluBiasParams, 48);
CHECK_FIELD(GeluBiasParams, out, 0);
CHECK_FIELD(GeluBiasParams, dout, 8);
CHECK_FIELD(GeluBiasParams, inp, 16);
CHECK_FIELD(GeluBiasParams, dbias, 24);
CHECK_FIELD(GeluBiasParams, n, 32);
CHECK_FIELD(GeluBiasParams, c, 36);
CHECK_FIELD(GeluBiasParams, bias, 40);

template <typename T>
__device__ void gelu_backward_bias_vec(const GeluBiasParams& a) {
    constexpr int N = Pack16<T>::N;
    int group = blockIdx.x * 32 + threadIdx.x;
    float acc[N];
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = 0.f;
    if (group < a.c / N) {
        float b[N];
        ld16_f_or_zero(a.bias ? (const T*)a.bias + group * N : nullptr, b);
        for (int r = blockIdx.y * 8 + threadIdx.y; r < a.n; r += gridDim.y * 8) {
            u64 off = (u64)r * a.c + group * N;
            Pack16<T> x = ld16((const T*)a.inp + off), d = ld16((const T*)a.dout + off), y;
#pragma unroll
            for (int e = 0; e < N; ++e) {
                y.v[e] = from_f<T>(to_f(d.v[e]) * gelu_grad(to_f(x.v[e]) + b[e]));
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
