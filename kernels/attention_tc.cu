// attention_tc.cu — fused attention, variant 3: tensor cores (mma.sync m16n8k16, bf16/f16 in, f32 accumulate),
// FlashAttention-2 structure. Same contract as attention.cu (variant 1: CUDA cores, the f32 path and the
// fallback): variable-length windows (blockIdx.z = window b, rows cu[b]..cu[b+1], its first lens[b] rows the
// keys), saves only lse (NH,N); attention dropout from the shared stream keyed by (window, head, query, key)
// (common.cuh attn_dropout*). Blocks past their window's rows exit at once.
// (Variant 2, the first tensor-core version with scalar tile loads and transposed tiles, was retired after
// variant 3 passed the same parity suite and ran the step 1.85× faster: docs/perf-log.md, 2026-11-27.)
//
// MMA fragment layout (PTX ISA, mma.m16n8k16, g = lane/4, t = lane%4):
//   A 16×16 row-major: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B 16×8 "col":      b0 = B[2t..2t+1][g],  b1 = B[2t+8..2t+9][g]      (pairs run along k)
//   C 16×8 f32:        c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
// So an S accumulator strip is already the A fragment of the next product (P·V, dS·K): no shared-memory
// round trip for P. Tiles are loaded with 16-byte global loads into row-major shared memory (rows padded by
// 8 elements: conflict-free ldmatrix), and fragments are read with ldmatrix — `.trans` for the B operands
// whose k runs down the rows (V in P·V, dO in dV, Q in dK, K in dQ), so no transposed tiles are needed.
// Dropout: one Philox call per lane and 16 keys (forward, dQ) or 16 queries (dK/dV): common.cuh attn_draws_*.
//
// forward:  block = 4 warps × 16 query rows; key tiles of 64; O and the row max/sum in registers.
// dK/dV:    block = 4 warps × 16 keys; query tiles of 32; dK, dV accumulated in registers.
// dQ:       block = 4 warps × 16 queries; key tiles of 32.  (D_i = dO_i·O_i comes from attention.cu.)
// Variant 4 (BERTQA_ATTN=v4; opt-in until it has passed the GPU parity suite) keeps this forward and replaces
// the two backward kernels by one (tc4_backward, below: dQ through f32 reductions, cp.async query tiles).

template <typename T>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
#ifdef BERTQA_EMU
    ::emu::mma_m16n8k16(is_bf16<T>::value, c, a, b0, b1);
#else
    if constexpr (is_bf16<T>::value) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}

// Two n-tiles of one product: c0 += a·(b[0], b[1]), c1 += a·(b[2], b[3]) — the fragments an ldb_nk2 / ldb_kn2
// load gives
template <typename T>
__device__ __forceinline__ void mma16816x2(float* c0, float* c1, const u32* a, const u32 (&b)[4]) {
    mma16816<T>(c0, a, b[0], b[1]);
    mma16816<T>(c1, a, b[2], b[3]);
}

// ldmatrix (.m8n8 .b16): lanes 8i..8i+7 give the row addresses of 8×8 matrix i; r[i] = this lane's pair of
// matrix i — row lane/4, columns 2·(lane%4) and +1 (.trans: rows 2·(lane%4) and +1 of column lane/4).
// The address is `tile` (generic, into shared memory) plus `off` elements. On the GPU it is formed as a 32-bit
// .shared address: the tile's (one cvta, hoisted out of the unrolled loops) plus the offset, whose lane part
// is loop-invariant and whose fragment part is a compile-time constant that ptxas folds into the instruction.
// (Generic 64-bit addresses cost three integer instructions per ldmatrix: ~190 of the forward's tile.)
#ifdef BERTQA_EMU
template <typename T> __device__ __forceinline__ void ldsm_x4(u32* r, const T* tile, int off, bool trans = false) {
    ::emu::ldmatrix(r, 4, trans, tile + off);
}
template <typename T> __device__ __forceinline__ void ldsm_x2(u32& b0, u32& b1, const T* tile, int off, bool trans) {
    u32 r[2];
    ::emu::ldmatrix(r, 2, trans, tile + off);
    b0 = r[0], b1 = r[1];
}
#else
template <typename T> __device__ __forceinline__ void ldsm_x4(u32* r, const T* tile, int off, bool trans = false) {
    u32 a = smem_u32(tile) + (u32)off * (u32)sizeof(T);
    if (trans) asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                            : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
    else asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                      : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
template <typename T> __device__ __forceinline__ void ldsm_x2(u32& b0, u32& b1, const T* tile, int off, bool trans) {
    u32 a = smem_u32(tile) + (u32)off * (u32)sizeof(T);
    if (trans) asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(a));
    else asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(a));
}
#endif
// A fragment (16×16, row-major tile with row stride `ld` elements) at (row 0, col k0)
template <typename T> __device__ __forceinline__ void lda_x4(u32* r, const T* tile, int ld, int k0) {
    int l = threadIdx.x & 31;
    ldsm_x4(r, tile, (((l >> 3) & 1) * 8 + (l & 7)) * ld + (l >> 4) * 8 + k0);
}
// A fragment (16×16: rows m0.., cols k0..) from a tile stored transposed, [k][m] (row k, m contiguous): the four
// 8×8 matrices (m 0-7 and 8-15 of k 0-7, then of k 8-15) read with .trans
template <typename T> __device__ __forceinline__ void lda_x4_km(u32* r, const T* tile, int ld, int m0, int k0) {
    int l = threadIdx.x & 31;
    ldsm_x4(r, tile, ((l & 7) + ((l >> 4) & 1) * 8) * ld + ((l >> 3) & 1) * 8 + (k0 * ld + m0), true);
}
// B fragment (k 16 × n 8) from a tile stored [n][k] (row n, k contiguous): rows n0..n0+7, cols k0..k0+15
template <typename T> __device__ __forceinline__ void ldb_nk(u32& b0, u32& b1, const T* tile, int ld, int n0, int k0) {
    int l = threadIdx.x & 31;
    ldsm_x2(b0, b1, tile, (l & 7) * ld + ((l >> 3) & 1) * 8 + (n0 * ld + k0), false);
}
// ldb_nk for the two n-tiles n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3]) with one ldmatrix.x4
template <typename T> __device__ __forceinline__ void ldb_nk2(u32 (&b)[4], const T* tile, int ld, int n0, int k0) {
    int l = threadIdx.x & 31;
    ldsm_x4(b, tile, ((l & 7) + ((l >> 4) & 1) * 8) * ld + ((l >> 3) & 1) * 8 + (n0 * ld + k0));
}
// B fragment (k 16 × n 8) from a tile stored [k][n] (row k, n contiguous): rows k0..k0+15, cols n0..n0+7
template <typename T> __device__ __forceinline__ void ldb_kn(u32& b0, u32& b1, const T* tile, int ld, int k0, int n0) {
    int l = threadIdx.x & 31;
    ldsm_x2(b0, b1, tile, (l & 15) * ld + (k0 * ld + n0), true);
}
// ldb_kn for the two n-tiles n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3]) with one ldmatrix.x4.trans
template <typename T> __device__ __forceinline__ void ldb_kn2(u32 (&b)[4], const T* tile, int ld, int k0, int n0) {
    int l = threadIdx.x & 31;
    ldsm_x4(b, tile, (l & 15) * ld + (l >> 4) * 8 + (k0 * ld + n0), true);
}

// rows r0.. (positions in window W) of part (0 Q, 1 K, 2 V, 3 dO) into a row-major [ROWS][HS+8] tile, 16 bytes
// per thread and step, plain loads; rows at or past `limit` are zeros.
template <typename T, int HS, int ROWS>
__device__ __forceinline__ void load_rows(const AttnParams& a, const Window& W, int limit, int h, int part, int r0, T* dst) {
    constexpr int CH = HS / 8;
    int C = a.nh * HS;
    auto src = [&](int row, int c) {
        u64 g = (u64)W.s0 + row;
        return part == 3 ? (const T*)a.dout + g * C + h * HS + c * 8 : (const T*)a.qkv + g * 3 * C + part * C + h * HS + c * 8;
    };
    for (int e = threadIdx.x; e < ROWS * CH; e += blockDim.x) {
        int r = e / CH, c = e % CH, row = r0 + r;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (row < limit) v = *(const uint4*)src(row, c);
        *(uint4*)(dst + r * (HS + 8) + c * 8) = v;
    }
}

// load_rows through cp.async with a compile-time thread count NT (the caller commits and waits): thread t
// copies 16-byte chunk t % (HS/8) of rows t / (HS/8), + NT/(HS/8), …, so its source and destination are formed
// once and stepped by constants and one stride (the generic loop above cost ~10 instructions per copy).
template <typename T, int HS, int ROWS, int NT>
__device__ __forceinline__ void stage_rows(const AttnParams& a, const Window& W, int limit, int h, int part, int r0, T* dst) {
    constexpr int CH = HS / 8, RSTEP = NT / CH, PER = (ROWS + RSTEP - 1) / RSTEP;
    static_assert(NT % CH == 0, "stage_rows: whole rows per pass");
    int C = a.nh * HS, r = threadIdx.x / CH, c = threadIdx.x % CH;
    u32 stride = (part == 3 ? 1u : 3u) * (u32)C * (u32)sizeof(T);  // bytes per row
    const char* src = (const char*)(part == 3 ? (const T*)a.dout + (u64)W.s0 * C + h * HS
                                              : (const T*)a.qkv + (u64)W.s0 * 3 * C + part * C + h * HS) + c * 16;
    // zero-filled rows (at or past `limit`) still name a mapped address: the last row before the limit (row 0
    // of the window when limit is 0)
    int last = max(limit, 1) - 1;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        if (ROWS % RSTEP != 0 && r + i * RSTEP >= ROWS) break;
        int row = r0 + r + i * RSTEP;
        cp_async16_at(dst, (r + i * RSTEP) * (HS + 8) + c * 8, src + (u64)min(row, last) * stride, row < limit);
    }
}

// ---- tile products shared by the variants -------------------------------------------------------------------
// S strip (16 query rows of this warp × NJ·8 keys) = Q·Kᵀ: qa = this warp's Q fragments, Ks = [keys][HS] tile.
template <typename T, int KS, int NJ>
__device__ __forceinline__ void qk_strip(float (&s)[NJ][4], const u32 (&qa)[KS][4], const T* Ks, int ld) {
    static_assert(NJ % 2 == 0, "key tiles in pairs (ldb_nk2)");
#pragma unroll
    for (int j = 0; j < NJ; j += 2) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        s[j + 1][0] = s[j + 1][1] = s[j + 1][2] = s[j + 1][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            u32 b[4];
            ldb_nk2(b, Ks, ld, j * 8, kk * 16);
            mma16816x2<T>(s[j], s[j + 1], qa[kk], b);
        }
    }
}
// Sᵀ and dPᵀ strips (16 keys of this warp × NQ·8 queries): s = K·Qᵀ, dp = V·dOᵀ; Kw, Vw = this warp's 16 rows.
template <typename T, int KS, int NQ>
__device__ __forceinline__ void kq_strips(float (&s)[NQ][4], float (&dp)[NQ][4], const T* Kw, const T* Vw, const T* Qs,
                                          const T* Os, int ld) {
#pragma unroll
    for (int n = 0; n < NQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        u32 ka[4], va[4];
        lda_x4(ka, Kw, ld, kk * 16);
        lda_x4(va, Vw, ld, kk * 16);
        static_assert(NQ % 2 == 0, "query tiles in pairs (ldb_nk2)");
#pragma unroll
        for (int n = 0; n < NQ; n += 2) {
            u32 b[4];
            ldb_nk2(b, Qs, ld, n * 8, kk * 16);
            mma16816x2<T>(s[n], s[n + 1], ka, b);
            ldb_nk2(b, Os, ld, n * 8, kk * 16);
            mma16816x2<T>(dp[n], dp[n + 1], va, b);
        }
    }
}
template <typename T, int HS>
__device__ void tc3_forward(const AttnParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int BK = 64, KS = HS / 16, NO = HS / 8, LD = HS + 8;
    DYN_SMEM(unsigned char, smem_raw);
    T* Qs = (T*)smem_raw;                // [64][LD]
    T* Ks = Qs + 64 * LD;                // [BK][LD]
    T* Vs = Ks + BK * LD;                // [BK][LD]
    int h = blockIdx.y, q0 = blockIdx.x * 64;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (q0 >= W.rows) return;  // the whole block: past its window
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    load_rows<T, HS, 64>(a, W, W.rows, h, 0, q0, Qs);
    __syncthreads();
    u32 qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) lda_x4(qa[kk], Qs + warp * 16 * LD, LD, kk * 16);
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    const u32 qc0 = attn_qc(i0);  // the dropout counter of rows i0, i1
    const bool drop = a.p > 0.f;
    const u32 thr = attn_threshold(a.p);
    const float ks = attn_keep_scale(a.p);  // a kept probability's dropout factor (1 without dropout)
    for (int k0 = 0; k0 < W.len; k0 += BK) {
        __syncthreads();
        load_rows<T, HS, BK>(a, W, W.len, h, 1, k0, Ks);
        load_rows<T, HS, BK>(a, W, W.len, h, 2, k0, Vs);
        __syncthreads();
        float s[BK / 8][4];
        qk_strip<T>(s, qa, Ks, LD);
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                bool live = k0 + j * 8 + 2 * t4 + e < W.len;
                s[j][e] = live ? s[j][e] * a.scale : -INFINITY;
                s[j][2 + e] = live ? s[j][2 + e] * a.scale : -INFINITY;
                mx0 = fmaxf(mx0, s[j][e]);
                mx1 = fmaxf(mx1, s[j][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
        float c0 = expf(m0 - base0), c1 = expf(m1 - base1);
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            o[n][0] *= c0; o[n][1] *= c0;
            o[n][2] *= c1; o[n][3] *= c1;
        }
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            u32 pa[4], d[8];
            if (drop) attn_draws_fwd(seed, W.w, h, qc0, attn_kc(k0) + 4 * kk + t4, d);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                int j = 2 * kk + half;
                float p00 = expf(s[j][0] - base0), p01 = expf(s[j][1] - base0);
                float p10 = expf(s[j][2] - base1), p11 = expf(s[j][3] - base1);
                l0 += p00 + p01;
                l1 += p10 + p11;
                if (drop) {
                    p00 *= attn_kept(d[2 * half], thr) ? ks : 0.f;
                    p01 *= attn_kept(d[2 * half + 1], thr) ? ks : 0.f;
                    p10 *= attn_kept(d[4 + 2 * half], thr) ? ks : 0.f;
                    p11 *= attn_kept(d[4 + 2 * half + 1], thr) ? ks : 0.f;
                }
                pa[half * 2 + 0] = pack2<T>(p00, p01);
                pa[half * 2 + 1] = pack2<T>(p10, p11);
            }
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                u32 b0, b1;
                ldb_kn(b0, b1, Vs, LD, kk * 16, n * 8);
                mma16816<T>(o[n], pa, b0, b1);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    int C = a.nh * HS;
    float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        int d = n * 8 + 2 * t4;
        if (i0 < W.rows) *(u32*)((T*)a.out + ((u64)W.s0 + i0) * C + h * HS + d) = pack2<T>(o[n][0] * inv0, o[n][1] * inv0);
        if (i1 < W.rows) *(u32*)((T*)a.out + ((u64)W.s0 + i1) * C + h * HS + d) = pack2<T>(o[n][2] * inv1, o[n][3] * inv1);
    }
    if (t4 == 0) {
        float* lse = (float*)a.lse + (u64)h * a.n + W.s0;
        if (i0 < W.rows) lse[i0] = l0 > 0.f ? m0 + logf(l0) : INFINITY;
        if (i1 < W.rows) lse[i1] = l1 > 0.f ? m1 + logf(l1) : INFINITY;
    }
}

template <typename T, int HS>
__device__ void tc3_backward_kv(const AttnParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int BQ = 32, KS = HS / 16, NO = HS / 8, LD = HS + 8;
    DYN_SMEM(unsigned char, smem_raw);
    T* Ks = (T*)smem_raw;          // [64][LD]
    T* Vs = Ks + 64 * LD;          // [64][LD]
    T* Qs = Vs + 64 * LD;          // [BQ][LD]
    T* Os = Qs + BQ * LD;          // [BQ][LD]  dO
    float* Ls = (float*)(Os + BQ * LD);
    float* Ds = Ls + BQ;
    int h = blockIdx.y, j0 = blockIdx.x * 64;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (j0 >= W.rows) return;  // the whole block: past its window
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    load_rows<T, HS, 64>(a, W, W.len, h, 1, j0, Ks);
    load_rows<T, HS, 64>(a, W, W.len, h, 2, j0, Vs);
    int ja = j0 + warp * 16 + g, jb = ja + 8;
    const u32 kca = attn_kc(ja);  // the dropout counter of keys ja, jb
    bool livea = ja < W.len, liveb = jb < W.len;
    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
    u64 hrow = (u64)h * a.n + W.s0;
    const T* Kw = Ks + warp * 16 * LD;
    const T* Vw = Vs + warp * 16 * LD;
    const bool drop = a.p > 0.f;
    const u32 thr = attn_threshold(a.p);
    const float ks = attn_keep_scale(a.p);
    for (int q0 = 0; q0 < W.rows; q0 += BQ) {
        __syncthreads();
        load_rows<T, HS, BQ>(a, W, W.rows, h, 0, q0, Qs);
        load_rows<T, HS, BQ>(a, W, W.rows, h, 3, q0, Os);
        for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
            Ls[i] = q0 + i < W.rows ? ((const float*)a.lse)[hrow + q0 + i] : 0.f;
            Ds[i] = q0 + i < W.rows ? ((const float*)a.dsum)[hrow + q0 + i] : 0.f;
        }
        __syncthreads();
        float s[BQ / 8][4], dp[BQ / 8][4];
        kq_strips<T, KS>(s, dp, Kw, Vw, Qs, Os, LD);
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            u32 pa[4], sa[4], d[8];
            // queries i, i+1, i+8, i+9 (i = q0 + 16kk + 2·t4) of keys ja, jb
            if (drop) attn_draws_bwd(seed, W.w, h, attn_qc(q0) + 8 * kk + 2 * t4, kca, ja & 1, d);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                int n = 2 * kk + half;
                float pv[4], sv[4];
                // e: (ja, i), (ja, i+1), (jb, i), (jb, i+1) of this half's queries i
                float fs[4] = {1.f, 1.f, 1.f, 1.f};
                if (drop) {
                    fs[0] = attn_kept(d[2 * half], thr) ? ks : 0.f;
                    fs[1] = attn_kept(d[4 + 2 * half], thr) ? ks : 0.f;
                    fs[2] = attn_kept(d[2 * half + 1], thr) ? ks : 0.f;
                    fs[3] = attn_kept(d[4 + 2 * half + 1], thr) ? ks : 0.f;
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int qi = n * 8 + 2 * t4 + (e & 1);
                    int i = q0 + qi;
                    bool live = (e < 2 ? livea : liveb) && i < W.rows;
                    float P = live ? expf(s[n][e] * a.scale - Ls[qi]) : 0.f;
                    float f = live ? fs[e] : 1.f;
                    pv[e] = P * f;
                    sv[e] = P * (dp[n][e] * f - Ds[qi]);
                }
                pa[half * 2 + 0] = pack2<T>(pv[0], pv[1]);
                pa[half * 2 + 1] = pack2<T>(pv[2], pv[3]);
                sa[half * 2 + 0] = pack2<T>(sv[0], sv[1]);
                sa[half * 2 + 1] = pack2<T>(sv[2], sv[3]);
            }
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                u32 b0, b1;
                ldb_kn(b0, b1, Os, LD, kk * 16, n * 8);
                mma16816<T>(dv[n], pa, b0, b1);
                ldb_kn(b0, b1, Qs, LD, kk * 16, n * 8);
                mma16816<T>(dk[n], sa, b0, b1);
            }
        }
    }
    store_dkdv<T, HS>(a, dk, dv, W, h, ja, jb, 1.f);
}

template <typename T, int HS>
__device__ void tc3_backward_q(const AttnParams& a) {
    const u64 seed = dropout_seed(a);
    constexpr int BK = 32, KS = HS / 16, NO = HS / 8, LD = HS + 8;
    DYN_SMEM(unsigned char, smem_raw);
    T* Qs = (T*)smem_raw;          // [64][LD]
    T* Os = Qs + 64 * LD;          // [64][LD]  dO
    T* Ks = Os + 64 * LD;          // [BK][LD]
    T* Vs = Ks + BK * LD;          // [BK][LD]
    int h = blockIdx.y, q0 = blockIdx.x * 64;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (q0 >= W.rows) return;  // the whole block: past its window
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    load_rows<T, HS, 64>(a, W, W.rows, h, 0, q0, Qs);
    load_rows<T, HS, 64>(a, W, W.rows, h, 3, q0, Os);
    __syncthreads();
    u32 qa[KS][4], oa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        lda_x4(qa[kk], Qs + warp * 16 * LD, LD, kk * 16);
        lda_x4(oa[kk], Os + warp * 16 * LD, LD, kk * 16);
    }
    int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    const u32 qc0 = attn_qc(i0);  // the dropout counter of rows i0, i1
    u64 hrow = (u64)h * a.n + W.s0;
    float L0 = i0 < W.rows ? ((const float*)a.lse)[hrow + i0] : 0.f, L1 = i1 < W.rows ? ((const float*)a.lse)[hrow + i1] : 0.f;
    float D0 = i0 < W.rows ? ((const float*)a.dsum)[hrow + i0] : 0.f, D1 = i1 < W.rows ? ((const float*)a.dsum)[hrow + i1] : 0.f;
    float dq[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
    const bool drop = a.p > 0.f;
    const u32 thr = attn_threshold(a.p);
    const float ks = attn_keep_scale(a.p);
    for (int k0 = 0; k0 < W.len; k0 += BK) {
        __syncthreads();
        load_rows<T, HS, BK>(a, W, W.len, h, 1, k0, Ks);
        load_rows<T, HS, BK>(a, W, W.len, h, 2, k0, Vs);
        __syncthreads();
        float s[BK / 8][4], dp[BK / 8][4];
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                u32 b0, b1;
                ldb_nk(b0, b1, Ks, LD, j * 8, kk * 16);
                mma16816<T>(s[j], qa[kk], b0, b1);
                ldb_nk(b0, b1, Vs, LD, j * 8, kk * 16);
                mma16816<T>(dp[j], oa[kk], b0, b1);
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            u32 sa[4], d[8];
            if (drop) attn_draws_fwd(seed, W.w, h, qc0, attn_kc(k0) + 4 * kk + t4, d);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                int j = 2 * kk + half;
                int kj = j * 8 + 2 * t4;  // even: keys kj, kj+1
                bool live0 = k0 + kj < W.len, live1 = k0 + kj + 1 < W.len;
                float2 f0 = make_float2(1.f, 1.f), f1 = f0;
                if (drop) {
                    f0 = make_float2(attn_kept(d[2 * half], thr) ? ks : 0.f, attn_kept(d[2 * half + 1], thr) ? ks : 0.f);
                    f1 = make_float2(attn_kept(d[4 + 2 * half], thr) ? ks : 0.f, attn_kept(d[4 + 2 * half + 1], thr) ? ks : 0.f);
                }
                float P00 = live0 ? expf(s[j][0] * a.scale - L0) : 0.f, P01 = live1 ? expf(s[j][1] * a.scale - L0) : 0.f;
                float P10 = live0 ? expf(s[j][2] * a.scale - L1) : 0.f, P11 = live1 ? expf(s[j][3] * a.scale - L1) : 0.f;
                sa[half * 2 + 0] = pack2<T>(P00 * (dp[j][0] * f0.x - D0), P01 * (dp[j][1] * f0.y - D0));
                sa[half * 2 + 1] = pack2<T>(P10 * (dp[j][2] * f1.x - D1), P11 * (dp[j][3] * f1.y - D1));
            }
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                u32 b0, b1;
                ldb_kn(b0, b1, Ks, LD, kk * 16, n * 8);
                mma16816<T>(dq[n], sa, b0, b1);
            }
        }
    }
    int C = a.nh * HS;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
        int d = n * 8 + 2 * t4;
        if (i0 < W.rows) *(u32*)((T*)a.dqkv + ((u64)W.s0 + i0) * 3 * C + h * HS + d) = pack2<T>(dq[n][0] * a.scale, dq[n][1] * a.scale);
        if (i1 < W.rows) *(u32*)((T*)a.dqkv + ((u64)W.s0 + i1) * 3 * C + h * HS + d) = pack2<T>(dq[n][2] * a.scale, dq[n][3] * a.scale);
    }
    if (a.dbias) warp_cols_add<NO>(dq, i0 < W.rows, i1 < W.rows, a.scale, (float*)a.dbias + h * HS);  // the Q third
}

// ---- variant 4, forward: variant 3's tiling with the K/V tiles double-buffered by cp.async (tile i+1
// loads while tile i computes), the exponentials in base 2 on the special-function unit (ex2.approx of one
// FFMA of the raw score: 2^{s·scale·log2 e − base·scale·log2 e}), the dropout tested as integers, and the
// dropout's 1/(1-p) applied once to O instead of to every probability.
// Counted in the SASS (scripts/sass_count.sh: ptxas 13.0, sm_90, bf16, hs64), per warp and 64-key tile, at
// commit 9e9b8ad (dropout stream version 2, one Philox call per 2×2 block): variant 3 2204 instructions
// (64 HMMA; ~34 per HMMA, most of the rest Philox and full-precision expf — it was bound by instruction issue,
// not by the tensor cores), this one 1244 (two lanes sharing each call). Now: 1007 with version 3's 16-bit
// draws (one call per lane and 16 keys), 820 with ldmatrix addresses formed in 32 bits (ldsm_x4), and 743 on
// a full tile now that only the last, partial tile masks keys and the stages' addresses are stepped, and 692
// with dropout a compile-time choice (758 in the loop, of which 66 masking; 318 integer, 224 float, 34 MUFU,
// 78 memory, 64 HMMA): ~11 per HMMA; without dropout (the _p0 kernel) 429 (494 in the loop): ~7 per HMMA.
// (Variant 3 then: 1422.) With Philox-7 (stream version 4) 644 (710 in the loop), and 628 (694) with the keep
// test on draws left in their words' top halves (common.cuh attn_kept): ~9.8 per HMMA (variant 3: 1358). Then
// 615 (411 without dropout; variant 3: 1346) with Kᵀ's fragments loaded two key tiles at a time (qk_strip's ldb_nk2: 16
// ldmatrix.x4 instead of 32 .x2 per tile); V's stay .x2 here: loading them .x4 too gave 638 (register moves at
// the 128-register bound). 573 (375) on a tile that keeps its rows' bases (the rescaling block, 50
// instructions, skipped; most tiles after the first).
// DROP: whether the launch has dropout (p > 0); the p = 0 instantiation (evaluation, or attention dropout
// off) carries no Philox calls and no keep tests.
template <typename T, int HS, bool DROP>
__device__ void tc4_forward(const AttnParams& a) {
    const u64 seed = DROP ? dropout_seed(a) : 0ull;
    constexpr int BK = 64, KS = HS / 16, NO = HS / 8, LD = HS + 8;
    DYN_SMEM(unsigned char, smem_raw);
    T* Qs = (T*)smem_raw;                // [64][LD]
    T* Kb = Qs + 64 * LD;                // [2][BK][LD]
    T* Vb = Kb + 2 * BK * LD;            // [2][BK][LD]
    int h = blockIdx.y, q0 = blockIdx.x * 64;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (q0 >= W.rows) return;  // the whole block: past its window
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    auto stage = [&](int k0, int buf) {  // the key tile at k0 into buffer buf, asynchronously
        stage_rows<T, HS, BK, 128>(a, W, W.len, h, 1, k0, Kb + buf * BK * LD);
        stage_rows<T, HS, BK, 128>(a, W, W.len, h, 2, k0, Vb + buf * BK * LD);
        cp_async_commit();
    };
    stage(0, 0);
    load_rows<T, HS, 64>(a, W, W.rows, h, 0, q0, Qs);
    __syncthreads();
    u32 qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) lda_x4(qa[kk], Qs + warp * 16 * LD, LD, kk * 16);
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    FwdRows r{-INFINITY, -INFINITY, 0.f, 0.f, 0.f, 0.f};
    int i0 = q0 + warp * 16 + g;
    const u32 qc0 = attn_qc(i0);  // the dropout counter of rows i0, i0 + 8
    const float sl2 = a.scale * LOG2E_F;
    const float gap = 8.f / sl2;  // a raw score this far above its row's base rebases the row (2^8)
    const u32 thr = DROP ? attn_threshold(a.p) : 0u;
    int tiles = (W.len + BK - 1) / BK;
    for (int it = 0; it < tiles; ++it) {
        int k0 = it * BK, buf = it & 1;
        if (it + 1 < tiles) stage(k0 + BK, buf ^ 1);
        else cp_async_commit();  // an empty group keeps "all but the newest group done" = tile `it` done
        cp_async_wait<1>();
        __syncthreads();
        const T* Ks = Kb + buf * BK * LD;
        const T* Vs = Vb + buf * BK * LD;
        float s[BK / 8][4];
        qk_strip<T>(s, qa, Ks, LD);
        fwd_tile_rebase<BK / 8>(s, k0, W.len, t4, r, sl2, gap, o);
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            u32 pa[4];
            fwd_tile_probs<T, BK / 8, DROP>(s, kk, r, sl2, seed, W.w, h, qc0, attn_kc(k0) + 4 * kk + t4, thr, pa);
#pragma unroll
            for (int n = 0; n < NO; ++n) {
                u32 b0, b1;
                ldb_kn(b0, b1, Vs, LD, kk * 16, n * 8);
                mma16816<T>(o[n], pa, b0, b1);
            }
        }
        __syncthreads();  // this buffer is restaged by the next iteration
    }
    fwd_store<T, HS, DROP>(a, W, h, i0, t4, r, o);
}

// ---- variant 4, backward: one kernel per key block (NW warps × 16 keys) computes dK and dV in registers, as
// tc3_backward_kv does, and also each query tile's dQ contribution dS·K, which it adds into an f32
// accumulator dqacc (B,T,C) with vector reductions; attention_tc4_dq_store then writes dqacc·scale into dqkv.
// Against variant 3 this drops the second pass over all (query, key) pairs (tc3_backward_q recomputes S, dP,
// the exponentials and the dropout stream), at the price of T/(16·NW) reductions per dQ element; the
// exponentials, the dropout test and its 1/(1-p) are done as in tc4_forward. SASS count (sm_90, bf16, hs64)
// per warp for a 16 × 32 (key, query) block at commit 9e9b8ad (stream version 2): variant 3 1700 (dK/dV
// kernel) + 1274 (dQ kernel) = 2974 instructions, this one 1355 (w8) to 1428 (w4); now (version 3, 32-bit
// ldmatrix addresses, stage_rows, dropout a compile-time choice): 854 (w8), 895 (w8b2), 931 (w4), and
// without dropout 619, 638, 661; variant 3 1305 + 972. With Philox-7 (stream version 4) 825, 859, 897, and
// with the keep test on draws in their words' top halves (PRMT moves, no shifts for the high halves) 804, 840,
// 875, and 786, 821, 858 with dS's dropout as one FFMA (loop instructions); variant 3 1245 + 944. Then with
// dS stored transposed as packed pairs (one 32-bit store per pair, read back with ldmatrix.trans) 742, 767,
// 808; and, with the key/query masking a block that only partial tiles run, 697, 715, 759 on a whole tile
// (without dropout 527, 543, 577); 649, 663, 725 (478, 489, 544) with the B fragments loaded two n-tiles at a
// time (ldmatrix.x4: ldb_nk2, ldb_kn2; variant 3 then 1231 + 944).
// Query tiles (Q, dO, lse, D) are double-buffered with cp.async: tile i+1 loads while tile i computes.
// dqacc must be zero on entry (tc4_dsum, launched before, zeroes it).

template <typename T, int HS, int NW, bool DROP>
__device__ void tc4_backward(const AttnParams& a) {
    const u64 seed = DROP ? dropout_seed(a) : 0ull;
    constexpr int BKEY = NW * 16, BQ = 32, KS = HS / 16, NO = HS / 8, LD = HS + 8, LDT = BQ + 8;
    constexpr int NQ = NO / (NW / 2);  // dQ: warp w owns query rows (w&1)·16.. and NQ of the NO column tiles
    static_assert(NQ >= 1 && NO % (NW / 2) == 0, "dQ split");
    DYN_SMEM(unsigned char, smem_raw);
    T* Ks = (T*)smem_raw;                 // [BKEY][LD]
    T* Vs = Ks + BKEY * LD;               // [BKEY][LD]
    T* Qs = Vs + BKEY * LD;               // [2][BQ][LD]   double-buffered
    T* Os = Qs + 2 * BQ * LD;             // [2][BQ][LD]   dO, double-buffered
    T* St = Os + 2 * BQ * LD;             // [BKEY][LDT]   dS of the current tile, transposed: [key][query]
    float* Ls = (float*)(St + BKEY * LDT);  // [2][BQ]     lse
    float* Ds = Ls + 2 * BQ;              // [2][BQ]       D
    int h = blockIdx.y, j0 = blockIdx.x * BKEY;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (j0 >= W.rows) return;  // the whole block: past its window
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    u64 hrow = (u64)h * a.n + W.s0;
    auto stage = [&](int q0, int buf) {
        stage_rows<T, HS, BQ, NW * 32>(a, W, W.rows, h, 0, q0, Qs + buf * BQ * LD);
        stage_rows<T, HS, BQ, NW * 32>(a, W, W.rows, h, 3, q0, Os + buf * BQ * LD);
        stage_lse_d<BQ>(a, W, hrow, q0, Ls + buf * BQ, Ds + buf * BQ);
        cp_async_commit();
    };
    stage(0, 0);
    load_rows<T, HS, BKEY>(a, W, W.len, h, 1, j0, Ks);
    load_rows<T, HS, BKEY>(a, W, W.len, h, 2, j0, Vs);
    int ja = j0 + warp * 16 + g, jb = ja + 8;
    const u32 kca = attn_kc(ja);  // the dropout counter of keys ja, jb
    bool livea = ja < W.len, liveb = jb < W.len;
    const bool keys_full = j0 + BKEY <= W.len;  // no key of the block past the window (block-uniform)
    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
    const T* Kw = Ks + warp * 16 * LD;
    const T* Vw = Vs + warp * 16 * LD;
    int C = a.nh * HS, tiles = (W.rows + BQ - 1) / BQ;
    const float sl2 = a.scale * LOG2E_F;
    const u32 thr = DROP ? attn_threshold(a.p) : 0u;
    const float ks = DROP ? attn_keep_scale(a.p) : 1.f;  // a kept probability's dropout factor
    for (int it = 0; it < tiles; ++it) {
        int q0 = it * BQ, buf = it & 1;
        if (it + 1 < tiles) stage(q0 + BQ, buf ^ 1);
        else cp_async_commit();  // an empty group keeps "all but the newest group done" = tile `it` done
        cp_async_wait<1>();
        __syncthreads();
        const T* Qb = Qs + buf * BQ * LD;
        const T* Ob = Os + buf * BQ * LD;
        const float* Lb = Ls + buf * BQ;
        const float* Db = Ds + buf * BQ;
        float s[BQ / 8][4], dp[BQ / 8][4];
        kq_strips<T, KS>(s, dp, Kw, Vw, Qb, Ob, LD);
        // Scores of keys past the window (a partial key block) or of queries past its rows (the last, partial
        // query tile) become -inf, so that their probabilities below are exactly 0 (ex2.approx(-inf) = +0; the
        // lse staged for a row past the window is 0, zero-filled by cp.async), and with them their dV and dS
        // terms. Whole tiles (most of them) skip this instead of testing every element.
        if (!keys_full || q0 + BQ > W.rows) {
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!((e < 2 ? livea : liveb) && q0 + n * 8 + 2 * t4 + (e & 1) < W.rows)) s[n][e] = -INFINITY;
        }
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            u32 pa[4], sa[4];
            bwd_tile_ps<T, BQ / 8, DROP>(s, dp, kk, Lb, Db, seed, W.w, h, attn_qc(q0) + 8 * kk + 2 * t4, kca, ja & 1, t4,
                                         sl2, thr, ks, pa, sa);
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                // dSᵀ for the dQ product below: the packed pair (key, queries i and i+1) is one 32-bit store
                // (bank-conflict free with LDT = 40: rows g·20 words apart cover the 32 banks)
                T* sr = St + (warp * 16 + g) * LDT + (2 * kk + half) * 8 + 2 * t4;
                *(u32*)sr = sa[half * 2 + 0];
                *(u32*)(sr + 8 * LDT) = sa[half * 2 + 1];
            }
#pragma unroll
            for (int n = 0; n < NO; n += 2) {  // NO = HS/8 is even
                u32 b[4];
                ldb_kn2(b, Ob, LD, kk * 16, n * 8);
                mma16816x2<T>(dv[n], dv[n + 1], pa, b);
                ldb_kn2(b, Qb, LD, kk * 16, n * 8);
                mma16816x2<T>(dk[n], dk[n + 1], sa, b);
            }
        }
        __syncthreads();  // the whole dS tile (BQ queries × BKEY keys) is in St
        {
            int mt = warp & 1, n0 = (warp >> 1) * NQ;
            float acc[NQ][4];
#pragma unroll
            for (int n = 0; n < NQ; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BKEY / 16; ++kk) {
                u32 sa[4];
                lda_x4_km(sa, St, LDT, mt * 16, kk * 16);
#pragma unroll
                for (int n = 0; n + 1 < NQ; n += 2) {
                    u32 b[4];
                    ldb_kn2(b, Ks, LD, kk * 16, (n0 + n) * 8);
                    mma16816x2<T>(acc[n], acc[n + 1], sa, b);
                }
                if (NQ % 2) {  // an odd count (HS=32 with 8 warps: one tile each)
                    u32 b0, b1;
                    ldb_kn(b0, b1, Ks, LD, kk * 16, (n0 + NQ - 1) * 8);
                    mma16816<T>(acc[NQ - 1], sa, b0, b1);
                }
            }
            int r0 = q0 + mt * 16 + g, r1 = r0 + 8;
            float* dq = (float*)a.dqacc;
#pragma unroll
            for (int n = 0; n < NQ; ++n) {
                int d = h * HS + (n0 + n) * 8 + 2 * t4;
                if (r0 < W.rows) red_add2(dq + ((u64)W.s0 + r0) * C + d, acc[n][0], acc[n][1]);
                if (r1 < W.rows) red_add2(dq + ((u64)W.s0 + r1) * C + d, acc[n][2], acc[n][3]);
            }
        }
        // No barrier here: the next tile's first writes (its cp.async stage, into the buffer read before the dS
        // barrier above; its dS stores into St) come after that tile's own barrier (after cp_async_wait), which
        // every warp reaches only once done with this tile's St and K reads. The emulator's race detector
        // (tests/emu, -fsanitize=thread) finds no race without it.
    }
    store_dkdv<T, HS>(a, dk, dv, W, h, ja, jb, ks);
}

// D[h, row] = dO_row·O_row of head h (variant 4's replacement for attention.cu's attn_dsum, one thread per row
// with 2-byte loads): G = HS/N threads per (row, head), one 16-byte load each of dO and O, a shuffle sum. Each
// thread also zeroes the N floats of the dQ accumulator at the same (row, head, group) offset, so that dqacc
// (N,C) is zero when tc4_backward starts (instead of a memset launch of its own).
template <typename T, int HS>
__device__ void tc4_dsum(const AttnParams& a) {
    constexpr int N = Pack16<T>::N, G = HS / N;
    static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "G must be a power of two ≤ 32");
    u64 gid = blockIdx.x * (u64)blockDim.x + threadIdx.x, pair = gid / G;  // pair = row·NH + h
    u64 pairs = (u64)a.n * a.nh;
    float s = 0.f;
    if (pair < pairs) {
        u64 off = pair * HS + (gid % G) * N;  // (N,C) offset: C = NH·HS
        Pack16<T> x = ld16((const T*)a.dout + off), y = ld16((const T*)a.out + off);
#pragma unroll
        for (int e = 0; e < N; ++e) s += to_f(x.v[e]) * to_f(y.v[e]);
        float4* z = (float4*)((float*)a.dqacc + off);  // (N,C) f32, the same offset: 32-byte aligned
#pragma unroll
        for (int e = 0; e < N / 4; ++e) z[e] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (pair < pairs && gid % G == 0) {
        int h = (int)(pair % a.nh);
        u64 row = pair / a.nh;
        ((float*)a.dsum)[(u64)h * a.n + row] = s;
    }
}

// The Q third of dqkv (N,3C) ← dqacc (N,C) · scale, and with dbias the Q third of the QKV bias gradient (the
// column sums of dQ·scale, before rounding). Block (32, 8): threadIdx.x picks a column pair, threadIdx.y and
// blockIdx.y stride over the rows; the 8 partials meet in common.cuh column_partials_add.
template <typename T>
__device__ void tc4_dq_store(const AttnParams& a) {
    int C = a.nh * a.hs, col = (blockIdx.x * 32 + threadIdx.x) * 2;
    float acc[2] = {0.f, 0.f};
    if (col < C) {
        for (int row = blockIdx.y * 8 + threadIdx.y; row < a.n; row += gridDim.y * 8) {
            float2 v = *(const float2*)((const float*)a.dqacc + (u64)row * C + col);
            v.x *= a.scale;
            v.y *= a.scale;
            *(u32*)((T*)a.dqkv + (u64)row * 3 * C + col) = pack2<T>(v.x, v.y);
            acc[0] += v.x;
            acc[1] += v.y;
        }
    }
    if (a.dbias) column_partials_add<2>(acc, (float*)a.dbias, C);
}

#define TC3_INSTANTIATE(TY, NAME, HS)                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attention_tc3_forward_##NAME##_hs##HS(AttnParams a) { tc3_forward<TY, HS>(a); } \
    extern "C" __global__ void __launch_bounds__(128) attention_tc3_backward_kv_##NAME##_hs##HS(AttnParams a) { tc3_backward_kv<TY, HS>(a); } \
    extern "C" __global__ void __launch_bounds__(128) attention_tc3_backward_q_##NAME##_hs##HS(AttnParams a) { tc3_backward_q<TY, HS>(a); }

TC3_INSTANTIATE(bf16, bf16, 32)
TC3_INSTANTIATE(bf16, bf16, 64)
TC3_INSTANTIATE(bf16, bf16, 128)
TC3_INSTANTIATE(f16, f16, 32)
TC3_INSTANTIATE(f16, f16, 64)
TC3_INSTANTIATE(f16, f16, 128)

// Shapes of variant 4's backward, picked by --attention-v4-shape (src/kernel.rs Tc4Shape). Registers from
// ptxas 13.0 for sm_90 (bf16, with dropout; spill stores/loads in bytes; scripts/sass_count.sh prints them):
//   w4   4 warps, 64 keys per block, ≤ 170 registers (3 blocks/SM): hs32 141, hs64 159, hs128 168 (344/256)
//   w8   8 warps, 128 keys: half the dQ reductions and Q/dO loads per key; hs32 154, hs64 212, hs128 242
//        (1 block/SM)
//   w8b2 8 warps held to 128 registers (2 blocks/SM): hs32 127, hs64 128 (8/8), hs128 128 (1024/792)
// Each with dropout and, suffixed _p0, without (src/ops/attention/mod.rs picks by p).
#define TC4_INSTANTIATE(TY, NAME, HS, CFG, NW, MINB)                                                                   \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB) attention_tc4_backward_##CFG##_##NAME##_hs##HS(AttnParams a) { \
        tc4_backward<TY, HS, NW, true>(a);                                                                           \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(NW * 32, MINB) attention_tc4_backward_##CFG##_p0_##NAME##_hs##HS(AttnParams a) { \
        tc4_backward<TY, HS, NW, false>(a);                                                                          \
    }
#define TC4_HS(TY, NAME, HS)                                                                                           \
    TC4_INSTANTIATE(TY, NAME, HS, w4, 4, 3) TC4_INSTANTIATE(TY, NAME, HS, w8, 8, 1) TC4_INSTANTIATE(TY, NAME, HS, w8b2, 8, 2) \
    extern "C" __global__ void __launch_bounds__(128, HS == 128 ? 2 : 4) attention_tc4_forward_##NAME##_hs##HS(AttnParams a) { tc4_forward<TY, HS, true>(a); } \
    extern "C" __global__ void __launch_bounds__(128, HS == 128 ? 2 : 4) attention_tc4_forward_p0_##NAME##_hs##HS(AttnParams a) { tc4_forward<TY, HS, false>(a); } \
    extern "C" __global__ void attention_tc4_dsum_##NAME##_hs##HS(AttnParams a) { tc4_dsum<TY, HS>(a); }
#define TC4_ALL(TY, NAME)                                                                                              \
    TC4_HS(TY, NAME, 32) TC4_HS(TY, NAME, 64) TC4_HS(TY, NAME, 128)                                                   \
    extern "C" __global__ void attention_tc4_dq_store_##NAME(AttnParams a) { tc4_dq_store<TY>(a); }
TC4_ALL(bf16, bf16)
TC4_ALL(f16, f16)

