// layernorm.cu — fused residual + dropout + LayerNorm (BERT's post-LN), forward and backward, over the N rows
// of a batch; row r's dropout is keyed by (window roww[r], position pos[r]) (common.cuh, the dropout stream).
// Reference: src/ops/layernorm/cpu.rs. One warp per row; statistics in float.
#include "common.cuh"

struct LnFwdParams {
    u64 out, pos, roww, sum, mean, rstd, inp, resid, gamma, beta, site;
    int n, c;
    float eps, p;
    u64 step;
    u64 bias;  // (C) T: the bias of the linear layer that produced inp, added before the dropout; or 0
};
CHECK_LAYOUT(LnFwdParams, 120);
CHECK_FIELD(LnFwdParams, out, 0);
CHECK_FIELD(LnFwdParams, pos, 8);
CHECK_FIELD(LnFwdParams, roww, 16);
CHECK_FIELD(LnFwdParams, sum, 24);
CHECK_FIELD(LnFwdParams, mean, 32);
CHECK_FIELD(LnFwdParams, rstd, 40);
CHECK_FIELD(LnFwdParams, inp, 48);
CHECK_FIELD(LnFwdParams, resid, 56);
CHECK_FIELD(LnFwdParams, gamma, 64);
CHECK_FIELD(LnFwdParams, beta, 72);
CHECK_FIELD(LnFwdParams, site, 80);
CHECK_FIELD(LnFwdParams, n, 88);
CHECK_FIELD(LnFwdParams, c, 92);
CHECK_FIELD(LnFwdParams, eps, 96);
CHECK_FIELD(LnFwdParams, p, 100);
CHECK_FIELD(LnFwdParams, step, 104);
CHECK_FIELD(LnFwdParams, bias, 112);

struct LnBwdParams {
    u64 dinp, pos, roww, dresid, dgamma, dbeta, dout, sum, mean, rstd, gamma, site;
    int n, c;
    float p;
    int _pad;
    u64 step;
    u64 dbias;  // (C) f32 += Σ_rows dinp (the bias gradient of the linear layer that produced inp), or 0
};
CHECK_LAYOUT(LnBwdParams, 128);
CHECK_FIELD(LnBwdParams, dinp, 0);
CHECK_FIELD(LnBwdParams, pos, 8);
CHECK_FIELD(LnBwdParams, roww, 16);
CHECK_FIELD(LnBwdParams, dresid, 24);
CHECK_FIELD(LnBwdParams, dgamma, 32);
CHECK_FIELD(LnBwdParams, dbeta, 40);
CHECK_FIELD(LnBwdParams, dout, 48);
CHECK_FIELD(LnBwdParams, sum, 56);
CHECK_FIELD(LnBwdParams, mean, 64);
CHECK_FIELD(LnBwdParams, rstd, 72);
CHECK_FIELD(LnBwdParams, gamma, 80);
CHECK_FIELD(LnBwdParams, site, 88);
CHECK_FIELD(LnBwdParams, n, 96);
CHECK_FIELD(LnBwdParams, c, 100);
CHECK_FIELD(LnBwdParams, p, 104);
CHECK_FIELD(LnBwdParams, _pad, 108);
CHECK_FIELD(LnBwdParams, step, 112);
CHECK_FIELD(LnBwdParams, dbias, 120);

// sum = resid + dropout(inp + bias); out = LN(sum). The statistics are taken over `sum` as stored (rounded to
// T), exactly what backward reads back.
template <typename T>
__device__ void ln_forward(const LnFwdParams& a) {
    const u64 seed = dropout_seed(a);
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    const T* inp = (const T*)a.inp + (u64)row * a.c;
    const T* res = (const T*)a.resid + (u64)row * a.c;
    T* sum = (T*)a.sum + (u64)row * a.c;
    T* out = (T*)a.out + (u64)row * a.c;
    int w = ((const int*)a.roww)[row], t = ((const int*)a.pos)[row];
    const T* bias = (const T*)a.bias;
    float s = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        float v = to_f(res[i]) + (to_f(inp[i]) + (bias ? to_f(bias[i]) : 0.f)) * hidden_factor(seed, w, t, i, a.p);
        T vs = from_f<T>(v);
        sum[i] = vs;
        s += to_f(vs);
    }
    float mean = warp_sum(s) / a.c;
    float q = 0.f;
    for (int i = lane; i < a.c; i += 32) {
        float d = to_f(sum[i]) - mean;
        q += d * d;
    }
    float rstd = rsqrtf(warp_sum(q) / a.c + a.eps);
    const T* g = (const T*)a.gamma;
    const T* b = (const T*)a.beta;
    for (int i = lane; i < a.c; i += 32) {
        out[i] = from_f<T>((to_f(sum[i]) - mean) * rstd * to_f(g[i]) + to_f(b[i]));
    }
    if (lane == 0) {
        ((float*)a.mean)[row] = mean;
        ((float*)a.rstd)[row] = rstd;
    }
}

template <typename T>
__device__ void ln_backward(const LnBwdParams& a) {
    const u64 seed = dropout_seed(a);
    DYN_SMEM(float, smem);  // dgamma[c], dbeta[c] (and dbias[c]) partials of this block
    float* sdg = smem;
    float* sdb = smem + a.c;
    float* sdi = smem + 2 * a.c;
    const bool bias = a.dbias != 0;
    for (int i = threadIdx.x; i < (bias ? 3 : 2) * a.c; i += blockDim.x) smem[i] = 0.f;
    __syncthreads();
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    const T* g = (const T*)a.gamma;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < a.n; row += gridDim.x * warps) {
        const T* dout = (const T*)a.dout + (u64)row * a.c;
        const T* x = (const T*)a.sum + (u64)row * a.c;
        float mean = ((const float*)a.mean)[row], rstd = ((const float*)a.rstd)[row];
        int w = ((const int*)a.roww)[row], t = ((const int*)a.pos)[row];
        float mg = 0.f, mgx = 0.f;
        for (int i = lane; i < a.c; i += 32) {
            float gi = to_f(dout[i]) * to_f(g[i]);
            float xh = (to_f(x[i]) - mean) * rstd;
            mg += gi;
            mgx += gi * xh;
        }
        mg = warp_sum(mg) / a.c;
        mgx = warp_sum(mgx) / a.c;
        T* dres = (T*)a.dresid + (u64)row * a.c;
        T* dinp = (T*)a.dinp + (u64)row * a.c;
        for (int i = lane; i < a.c; i += 32) {
            float dy = to_f(dout[i]);
            float xh = (to_f(x[i]) - mean) * rstd;
            float ds = rstd * (dy * to_f(g[i]) - mg - xh * mgx);
            float di = ds * hidden_factor(seed, w, t, i, a.p);
            dres[i] = from_f<T>(ds);
            dinp[i] = from_f<T>(di);
            atomicAdd(&sdg[i], dy * xh);
            atomicAdd(&sdb[i], dy);
            if (bias) atomicAdd(&sdi[i], di);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < a.c; i += blockDim.x) {
        atomicAdd((float*)a.dgamma + i, sdg[i]);
        atomicAdd((float*)a.dbeta + i, sdb[i]);
        if (bias) atomicAdd((float*)a.dbias + i, sdi[i]);
    }
}

// ---- the "vec" kernels (BERTQA_VEC=1; opt-in until the GPU parity suite has run them) ---------------------
// Same contract and results as above, for C a multiple of the vector width N (8 bf16/f16, 4 f32) and at most
// 32·CH·N: lane l owns the 16-byte chunks l, l+32, … (CH of them at most) of every row it handles, keeps the
// row in registers (one read of each input, no re-reads through the cache), draws one Philox call per 4
// elements instead of one per element, and — backward — accumulates dγ, dβ for its columns in registers
// across its rows, touching shared memory once per column at the end instead of twice per element.

template <typename T, int CH>
__device__ void ln_forward_vec(const LnFwdParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int N = Pack16<T>::N;
    int warps = blockDim.x / 32, lane = threadIdx.x & 31;
    int row = blockIdx.x * warps + (threadIdx.x >> 5);
    if (row >= a.n) return;
    int nch = a.c / N;
    u64 r0 = (u64)row * a.c;
    int w = ((const int*)a.roww)[row], t = ((const int*)a.pos)[row];
    float v[CH][N];  // sum = resid + dropout(inp + bias), as stored (rounded to T)
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k) {
        int ch = lane + 32 * k;
        if (ch < nch) {
            u64 i = r0 + (u64)ch * N;
            Pack16<T> x = ld16((const T*)a.inp + i), r = ld16((const T*)a.resid + i), y;
            float f[N], bv[N];
            hidden_factors<N / 4>(seed, w, t, ch * N, a.p, f);
            ld16_f_or_zero(a.bias ? (const T*)a.bias + ch * N : nullptr, bv);
#pragma unroll
            for (int e = 0; e < N; ++e) {
                y.v[e] = from_f<T>(to_f(r.v[e]) + (to_f(x.v[e]) + bv[e]) * f[e]);
                v[k][e] = to_f(y.v[e]);
                s += v[k][e];
            }
            st16((T*)a.sum + i, y);
        }
    }
    float mean = warp_sum(s) / a.c;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < CH; ++k)
        if (lane + 32 * k < nch)
#pragma unroll
            for (int e = 0; e < N; ++e) q += (v[k][e] - mean) * (v[k][e] - mean);
    float rstd = rsqrtf(warp_sum(q) / a.c + a.eps);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
        int ch = lane + 32 * k;
        if (ch < nch) {
            Pack16<T> g = ld16((const T*)a.gamma + ch * N), b = ld16((const T*)a.beta + ch * N), y;
#pragma unroll
            for (int e = 0; e < N; ++e) y.v[e] = from_f<T>((v[k][e] - mean) * rstd * to_f(g.v[e]) + to_f(b.v[e]));
            st16((T*)a.out + r0 + (u64)ch * N, y);
        }
    }
    if (lane == 0) {
        ((float*)a.mean)[row] = mean;
        ((float*)a.rstd)[row] = rstd;
    }
}

template <typename T, int CH>
__device__ void ln_backward_vec(const LnBwdParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int N = Pack16<T>::N;
    // Shared: dgamma[c], dbeta[c] partials of this block; with dbias, also dbias[c], then each warp's slice
    // of dbias partials for its lanes' columns, float4 (k·N/4 + h)·32 + lane holding elements 4h..4h+3 of
    // chunk lane + 32k (each lane touches only its own, conflict-free). The slices are in shared memory, not
    // registers, because dγ and dβ fill the 128 registers of __launch_bounds__(256, 2). 16-byte aligned:
    // 3·C is a multiple of 4 (C of N). At most 44 KiB (C = 1024 in bf16), under the 48 KiB default.
    DYN_SMEM(float, smem);
    int warps = blockDim.x / 32, lane = threadIdx.x & 31, nch = a.c / N;
    float* sdg = smem;
    float* sdb = smem + a.c;
    float* sdi = smem + 2 * a.c;
    float4* slice = (float4*)(smem + 3 * a.c) + (threadIdx.x >> 5) * (CH * N / 4) * 32;
    const bool bias = a.dbias != 0;
    for (int i = threadIdx.x; i < (bias ? 3 * a.c + warps * CH * 32 * N : 2 * a.c); i += blockDim.x) smem[i] = 0.f;
    __syncthreads();
    // the row's dout and sum stay packed (T) in registers; dγ, dβ partials are f32; γ is read again (L1) where
    // it is needed: kept in registers it pushed the kernel past its 128 (spills at C = 768 in bf16)
    float dg[CH][N], db[CH][N];
#pragma unroll
    for (int k = 0; k < CH; ++k)
#pragma unroll
        for (int e = 0; e < N; ++e) dg[k][e] = db[k][e] = 0.f;
    for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < a.n; row += gridDim.x * warps) {
        u64 r0 = (u64)row * a.c;
        float mean = ((const float*)a.mean)[row], rstd = ((const float*)a.rstd)[row];
        int w = ((const int*)a.roww)[row], t = ((const int*)a.pos)[row];
        Pack16<T> d[CH], x[CH];
        float mg = 0.f, mgx = 0.f;
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            int ch = lane + 32 * k;
            if (ch < nch) {
                d[k] = ld16((const T*)a.dout + r0 + (u64)ch * N);
                x[k] = ld16((const T*)a.sum + r0 + (u64)ch * N);
                Pack16<T> gam = ld16((const T*)a.gamma + ch * N);
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    float dy = to_f(d[k].v[e]), xh = (to_f(x[k].v[e]) - mean) * rstd;
                    float gi = dy * to_f(gam.v[e]);
                    mg += gi;
                    mgx += gi * xh;
                    dg[k][e] += dy * xh;
                    db[k][e] += dy;
                }
            }
        }
        mg = warp_sum(mg) / a.c;
        mgx = warp_sum(mgx) / a.c;
#pragma unroll
        for (int k = 0; k < CH; ++k) {
            int ch = lane + 32 * k;
            if (ch < nch) {
                u64 i = r0 + (u64)ch * N;
                float f[N];
                hidden_factors<N / 4>(seed, w, t, ch * N, a.p, f);
                Pack16<T> dr, di, gam = ld16((const T*)a.gamma + ch * N);
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    float xh = (to_f(x[k].v[e]) - mean) * rstd;
                    float ds = rstd * (to_f(d[k].v[e]) * to_f(gam.v[e]) - mg - xh * mgx);
                    dr.v[e] = from_f<T>(ds);
                    f[e] *= ds;  // dinp, unrounded
                    di.v[e] = from_f<T>(f[e]);
                }
                if (bias)
#pragma unroll
                    for (int h = 0; h < N / 4; ++h) {
                        float4& acc = slice[(k * (N / 4) + h) * 32 + lane];
                        float4 v = acc;
                        v.x += f[4 * h];
                        v.y += f[4 * h + 1];
                        v.z += f[4 * h + 2];
                        v.w += f[4 * h + 3];
                        acc = v;
                    }
                st16((T*)a.dresid + i, dr);
                st16((T*)a.dinp + i, di);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
        int ch = lane + 32 * k;
        if (ch < nch)
#pragma unroll
            for (int e = 0; e < N; ++e) {
                atomicAdd(&sdg[ch * N + e], dg[k][e]);
                atomicAdd(&sdb[ch * N + e], db[k][e]);
                if (bias) atomicAdd(&sdi[ch * N + e], ((const float*)&slice[(k * (N / 4) + e / 4) * 32 + lane])[e % 4]);
            }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < a.c; i += blockDim.x) {
        atomicAdd((float*)a.dgamma + i, sdg[i]);
        atomicAdd((float*)a.dbeta + i, sdb[i]);
        if (bias) atomicAdd((float*)a.dbias + i, sdi[i]);
    }
}

#define LN_VEC(TY, NAME, CH)                                                                                           \
    extern "C" __global__ void residual_layernorm_forward_vec##CH##_##NAME(LnFwdParams a) { ln_forward_vec<TY, CH>(a); } \
    extern "C" __global__ void __launch_bounds__(256, 2) residual_layernorm_backward_vec##CH##_##NAME(LnBwdParams a) { ln_backward_vec<TY, CH>(a); }
#define LN_VEC_ALL(TY, NAME) LN_VEC(TY, NAME, 1) LN_VEC(TY, NAME, 2) LN_VEC(TY, NAME, 3) LN_VEC(TY, NAME, 4)
LN_VEC_ALL(float, f32)
LN_VEC_ALL(bf16, bf16)
LN_VEC_ALL(f16, f16)

extern "C" __global__ void residual_layernorm_forward_f32(LnFwdParams a) { ln_forward<float>(a); }
extern "C" __global__ void residual_layernorm_forward_bf16(LnFwdParams a) { ln_forward<bf16>(a); }
extern "C" __global__ void residual_layernorm_forward_f16(LnFwdParams a) { ln_forward<f16>(a); }
extern "C" __global__ void residual_layernorm_backward_f32(LnBwdParams a) { ln_backward<float>(a); }
extern "C" __global__ void residual_layernorm_backward_bf16(LnBwdParams a) { ln_backward<bf16>(a); }
extern "C" __global__ void residual_layernorm_backward_f16(LnBwdParams a) { ln_backward<f16>(a); }
