// attention_wg.cu — fused attention on Hopper's warpgroup MMA (wgmma, sm_90a): variant 5's forward and variant 6's
// backward (variant 5 = this forward + variant 4's backward; variant 6 = both from here). Its own module so that
// the GPU-verified attention_tc.cu keeps its sm_90 target: NVRTC compiles this one for sm_90a on an sm_90 device
// (src/cuda/nvrtc.rs ARCH_SPECIFIC); elsewhere its kernels are stubs that trap. Same contract as attention_tc.cu's
// variant 4, whose per-element code it shares (common.cuh fwd_tile_*, fwd_store, bwd_tile_ps, store_dkdv).
#include "common.cuh"

// ---- variant 5, forward (sm_90a): each warpgroup (4 warps × 16 query rows, as in variant 4; one or two per
// block, below) takes 64 queries, and both products are Hopper's wgmma instead of per-warp mma.sync: S (64 queries × 64 keys) = Q·Kᵀ as HS/16
// wgmma m64n64k16 reading Q and K from shared memory, O += P·V as 4 wgmma m64nHSk16 with P from registers (the S
// accumulator of each warp is in the m16n8 layout, so fwd_tile_probs packs it into the A fragments as variant 4
// does) and V from shared memory. No ldmatrix and 8 MMA instructions per warpgroup and tile instead of 64 per
// warp. The softmax, dropout, masking, epilogue and the double-buffered cp.async staging are variant 4's.
// Head sizes 32 and 64 (at 128 variant 4's forward runs: src/ops/attention/mod.rs).
// Tiles (Q, and two buffers each of K and V, 64 rows × HS) are in wgmma's canonical layout: rows of W = 2·HS
// bytes, atoms of 8 rows (8W bytes) in order, the 16-byte chunks swizzled by .shared address in W bytes (128-byte
// swizzle at HS = 64, 64-byte at HS = 32; kernels/wgmma_probe.cu checks this reading of the PTX ISA on a GPU).
// The same bytes are a K-major operand for Q and K (rows are M or N, HS is K) and an N-major one for V (rows
// are K, HS is N). Before the products read a tile (async proxy), each thread fences its own cp.async copies
// (fence.proxy.async) and the block synchronises. This first version waits for each product before the next
// step (S, then the softmax, then P·V): the overlap of one tile's softmax with the next tile's S
// (FlashAttention-3's intra-warpgroup pipelining) is the next step once the GPU has measured this one.
#ifdef BERTQA_HAVE_WGMMA
template <int HS> struct Tc5Tile {
    static constexpr u32 W = 2 * HS;
    static constexpr int MODE = HS == 64 ? WG_SWIZZLE_128B : WG_SWIZZLE_64B;
    static_assert(HS == 32 || HS == 64, "variant 5: head size 32 or 64");
    // element offset of chunk c (8 elements) of row r in a tile: the swizzle acts on .shared address bits 4-9,
    // so on a tile that starts on a 1024-byte boundary it is the swizzle of the offset alone (a constant per
    // thread, whichever buffer)
    __device__ __forceinline__ static int chunk(int r, int c) {
        return (int)(wg_swizzle((u32)r * W + (u32)c * 16u, MODE) / 2u);
    }
    // K-major operand, k-step s (elements 16s.. of each row): 8-row groups 8W apart (SBO), the step's 32 bytes
    // along the row (the leading byte offset is unused with swizzling: 16, encoded 1)
    __device__ __forceinline__ static u64 kmajor(u32 base, int s) { return wg_desc(base + 32u * s, 16u, 8u * W, MODE); }
    // N-major operand, k-step s (rows 16s..): rows W apart, 8-row groups 8W apart (SBO); one swizzle row holds
    // all HS columns, so the leading byte offset (next HS/… columns) is unused
    __device__ __forceinline__ static u64 nmajor(u32 base, int s) { return wg_desc(base + 16u * W * s, 8u * W, 8u * W, MODE); }
};

// The cp.async staging of one part's (0 Q, 1 K, 2 V, 3 dO) 64-row tiles into Tc5Tiles by NT threads, rows
// r0.. (the caller commits and waits); rows at or past `limit` are zero-filled from a mapped address (as
// stage_rows). Thread t (0 ≤ t < NT) copies chunk t % CH of rows t / CH + i·RSTEP. The addresses are formed once per thread: since RSTEP is a
// multiple of the swizzle's 8-row period, row r + i·RSTEP's chunk sits i·RSTEP·HS elements after row r's, and a
// tile whose rows all exist (the block-uniform common case) is one 64-bit product plus constant steps; the last,
// partial tile of a window clamps and zero-fills row by row.
template <typename T, int HS, int NT = 128> struct Tc5Stager {
    static constexpr int CH = HS / 8, RSTEP = NT / CH, PER = 64 / RSTEP;
    static_assert(RSTEP % 8 == 0, "a thread's rows must share the swizzle phase");
    const char* src;  // this thread's chunk of the window's row r
    u64 stride;       // bytes from a row to the next
    int r, off, limit;
    __device__ __forceinline__ Tc5Stager(const AttnParams& a, const Window& W, int limit_, int h, int part, int t) {
        int C = a.nh * HS, c = t % CH;
        r = t / CH;
        stride = (u64)((part == 3 ? 1 : 3) * C) * sizeof(T);
        src = (const char*)(part == 3 ? (const T*)a.dout + (u64)W.s0 * C + h * HS
                                      : (const T*)a.qkv + (u64)W.s0 * 3 * C + part * C + h * HS) + c * 16 + r * stride;
        off = Tc5Tile<HS>::chunk(r, c);
        limit = limit_;
    }
    // rows r0.. into `tile`; with TWO, the same rows of the part `delta` bytes further along each row into
    // `tile2` (K then V: the addresses formed once for both)
    template <bool TWO = false>
    __device__ __forceinline__ void issue(int r0, T* tile, T* tile2 = nullptr, u64 delta = 0) const {
        if (r0 + 64 <= limit) {
            const char* p = src + (u64)r0 * stride;
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                const char* pi = p + i * RSTEP * stride;
                cp_async16_at(tile, off + i * RSTEP * HS, pi, true);
                if (TWO) cp_async16_at(tile2, off + i * RSTEP * HS, pi + delta, true);
            }
        } else {
            int last = max(limit, 1) - 1;
            const char* p0 = src - (u64)r * stride;
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                int row = r0 + r + i * RSTEP;
                const char* pi = p0 + (u64)min(row, last) * stride;
                cp_async16_at(tile, off + i * RSTEP * HS, pi, row < limit);
                if (TWO) cp_async16_at(tile2, off + i * RSTEP * HS, pi + delta, row < limit);
            }
        }
    }
    // K and V rows r0.. (V is C elements after K in each qkv row)
    __device__ __forceinline__ void issue_kv(const AttnParams& a, int r0, T* kt, T* vt) const {
        issue<true>(r0, kt, vt, (u64)a.nh * HS * sizeof(T));
    }
};

// Two shapes, as variant 6's backward (the backward shape setting): NWG = 1 warpgroup and 64 queries per block
// (w4), or NWG = 2 (w8: 128 queries, warpgroup i the queries 64i..), whose warpgroups share each K/V tile — half
// the K/V reads from L2 (226 → 113 MB per BERT-base layer) and half the copies per thread — at the price of a
// block-wide barrier pair per tile over 8 warps instead of 4.
template <typename T, int HS, bool DROP, int NWG>
__device__ void tc5_forward(const AttnParams& a) {
    using L = Tc5Tile<HS>;
    const u64 seed = DROP ? dropout_seed(a) : 0ull;
    static_assert(NWG == 1 || NWG == 2, "one or two warpgroups");
    constexpr int BK = 64, NO = HS / 8, TILE = 64 * HS, NT = 128 * NWG;  // elements per tile
    DYN_SMEM(unsigned char, smem_raw);
    T* Qs = (T*)(smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u));  // [NWG] tiles, on the swizzle's boundary
    T* Kb = Qs + NWG * TILE;  // [2] tiles
    T* Vb = Kb + 2 * TILE;    // [2] tiles
    int h = blockIdx.y, qb = blockIdx.x * 64 * NWG;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (qb >= W.rows) return;  // the whole block: past its window
    // warpgroup wg: queries q0.. (one wholly past the window computes what it stores nowhere: it shares the
    // block's barriers; wg through a shuffle, a value ptxas knows to be warp-uniform: see tc5_backward)
    const int wg = NWG == 1 ? 0 : __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0);
    const int tw = NWG == 1 ? threadIdx.x : threadIdx.x % 128, q0 = qb + 64 * wg;
    int warp = tw / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const Tc5Stager<T, HS, NT> kv(a, W, W.len, h, 1, threadIdx.x);
    auto stage = [&](int k0, int buf) {  // the key tile at k0 into buffer buf, asynchronously
        kv.issue_kv(a, k0, Kb + buf * TILE, Vb + buf * TILE);
        cp_async_commit();
    };
    Tc5Stager<T, HS>(a, W, W.rows, h, 0, tw).issue(q0, Qs + wg * TILE);  // in the first tile's group
    stage(0, 0);
    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float(&of)[HS / 2] = reinterpret_cast<float(&)[HS / 2]>(o);  // the wgmma accumulator: of[4n + e] = o[n][e]
    FwdRows r{-INFINITY, -INFINITY, 0.f, 0.f, 0.f, 0.f};
    int i0 = q0 + warp * 16 + g;
    const u32 qc0 = attn_qc(i0);
    const float sl2 = a.scale * LOG2E_F;
    const float gap = 8.f / sl2;
    const u32 thr = DROP ? attn_threshold(a.p) : 0u;
    // the descriptors of buffer 0's first k-step; a descriptor's low 14 bits are its start address / 16, so a
    // step or the other buffer is an addition (every .shared address is below 2^18)
    const u64 qd = L::kmajor(smem_u32(Qs + wg * TILE), 0), kd = L::kmajor(smem_u32(Kb), 0), vd = L::nmajor(smem_u32(Vb), 0);
    constexpr u32 TB = TILE * sizeof(T);  // bytes per tile
    int tiles = (W.len + BK - 1) / BK;
    for (int it = 0; it < tiles; ++it) {
        int k0 = it * BK, buf = it & 1;
        if (it + 1 < tiles) stage(k0 + BK, buf ^ 1);
        else cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();  // this thread's copies of tile `it` (and Q), visible to wgmma
        __syncthreads();
        float s[BK / 8][4];
        float(&sf)[BK / 2] = reinterpret_cast<float(&)[BK / 2]>(s);  // sf[4j + e] = s[j][e]
        wg_fence();
#pragma unroll
        for (int ks = 0; ks < HS / 16; ++ks)
            wgmma_ss<BK, 0, 0, T>(sf, qd + 2u * ks, kd + ((buf * TB) >> 4) + 2u * ks, ks > 0);
        wg_commit();
        wg_wait<0>();
        wg_pin(sf);
        fwd_tile_rebase<BK / 8>(s, k0, W.len, t4, r, sl2, gap, o);
        u32 pa[BK / 16][4];
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk)
            fwd_tile_probs<T, BK / 8, DROP>(s, kk, r, sl2, seed, W.w, h, qc0, attn_kc(k0) + 4 * kk + t4, thr, pa[kk]);
        wg_pin(of);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wgmma_rs<HS, 1, T>(of, pa[kk], vd + ((buf * TB + 16u * L::W * kk) >> 4), 1);
        wg_commit();
        wg_wait<0>();
        wg_pin(of);
        __syncthreads();  // this buffer is restaged by the next iteration
    }
    fwd_store<T, HS, DROP>(a, W, h, i0, t4, r, o);
}

// ---- variant 6, backward (sm_90a): variant 4's one-pass backward with its five products on wgmma. The block is
// one warpgroup and 64 keys (warp w: keys 16w.., as variant 4's w4); query tiles of 64, double-buffered. Per
// tile: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (wgmma m64n64k16 from shared memory, K and V as K-major A, Q and dO as K-major
// B), then P and dS in registers (bwd_tile_ps, variant 4's code: the accumulators are in its m16n8 layout), dV +=
// Pᵀ·dO and dK += dSᵀ·Q (wgmma m64nHSk16, Pᵀ and dSᵀ from registers, dO and Q N-major), and dQ = dS·K (wgmma
// with A = dSᵀ from shared memory M-major, B = K N-major) added into the f32 accumulator dqacc with vector
// reductions, as variant 4 does. Q, K, V and dO tiles share Tc5Tile's layout (K-major and N-major views of the
// same bytes); dSᵀ is a [key][query] tile of 64 × 64 with 128-byte rows, 128-byte swizzle. dqacc must be zero on
// entry (tc4_dsum zeroes it), and attention_tc4_dq_store writes dQ and its bias-gradient third afterwards.
// Two shapes (the backward shape's warps, src/ops/attention): NWG = 1 warpgroup per block (w4: 64 keys, 2 blocks
// per SM), or NWG = 2 (w8: 128 keys, warpgroup i the keys 64i.., 1 block per SM). With two, the query tiles are
// staged once for both warpgroups (half the Q and dO traffic from L2) and each warpgroup's dQ over its own 64 keys
// is summed with the other's in shared memory before the reductions (X: each adds half of the columns), so the
// f32 reductions into dqacc per element fall from T/64 to T/128 (6 to 3 at T = 384): what the dQ accumulator's
// atomics cost on the GPU is unmeasured, and the two shapes let the bench decide.

// dQ over one query tile: rows r0 (acc[n][0..1]) and r0 + 8 (acc[n][2..3]), columns 8n + 2·t4, +1 for n in
// [LO, HI), added into the f32 accumulator at dq (row r0, column 2·t4 of this head; C columns per row); the
// bounds tested only on a window's partial last tile (full: both rows exist)
template <int LO, int HI, int NO>
__device__ __forceinline__ void tc6_dq_red(const float (&acc)[NO][4], float* dq, int C, bool full, bool ok0, bool ok1) {
    if (full) {
#pragma unroll
        for (int n = LO; n < HI; ++n) {
            red_add2(dq + n * 8, acc[n][0], acc[n][1]);
            red_add2(dq + 8 * C + n * 8, acc[n][2], acc[n][3]);
        }
    } else {
#pragma unroll
        for (int n = LO; n < HI; ++n) {
            if (ok0) red_add2(dq + n * 8, acc[n][0], acc[n][1]);
            if (ok1) red_add2(dq + 8 * C + n * 8, acc[n][2], acc[n][3]);
        }
    }
}
// The two warpgroups' dQ halves traded through X ([2][NO/2][128] float4: receiver, column block, thread of the
// warpgroup — a thread's twin in the other warpgroup holds the same rows and columns): send stores columns
// [LO, HI) for warpgroup RCV, recv adds what the other warpgroup stored for this one.
template <int LO, int HI, int RCV, int NO>
__device__ __forceinline__ void tc6_dq_send(const float (&acc)[NO][4], float4* X, int tw) {
#pragma unroll
    for (int n = LO; n < HI; ++n) X[(RCV * (NO / 2) + n - LO) * 128 + tw] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
}
template <int LO, int HI, int RCV, int NO>
__device__ __forceinline__ void tc6_dq_recv(float (&acc)[NO][4], const float4* X, int tw) {
#pragma unroll
    for (int n = LO; n < HI; ++n) {
        float4 v = X[(RCV * (NO / 2) + n - LO) * 128 + tw];
        acc[n][0] += v.x;
        acc[n][1] += v.y;
        acc[n][2] += v.z;
        acc[n][3] += v.w;
    }
}

template <typename T, int HS, bool DROP, int NWG>
__device__ void tc5_backward(const AttnParams& a) {
    using L = Tc5Tile<HS>;
    using LS = Tc5Tile<64>;  // the dSᵀ tile: 64 queries per row, 128 bytes
    static_assert(NWG == 1 || NWG == 2, "one or two warpgroups");
    const u64 seed = DROP ? dropout_seed(a) : 0ull;
    constexpr int BQ = 64, NO = HS / 8, TILE = 64 * HS, NT = 128 * NWG;
    DYN_SMEM(unsigned char, smem_raw);
    T* Ks = (T*)(smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u));  // [NWG] tiles, warpgroup i's keys
    T* Vs = Ks + NWG * TILE;                // [NWG] tiles
    T* Qs = Vs + NWG * TILE;                // [2] tiles
    T* Os = Qs + 2 * TILE;                  // [2] tiles (dO)
    T* St = Os + 2 * TILE;                  // [NWG] dSᵀ, 64 × 64
    float* Ls = (float*)(St + NWG * 64 * 64);  // [2][BQ] lse
    float* Ds = Ls + 2 * BQ;                // [2][BQ] D
    float4* X = (float4*)(Ds + 2 * BQ);     // NWG = 2: [2][NO/2][128] the traded dQ halves (tc6_dq_send)
    int h = blockIdx.y, j0 = blockIdx.x * 64 * NWG;
    const Window W = window_at(a.cu, a.lens, a.wid, blockIdx.z);
    if (j0 >= W.rows) return;  // the whole block: past its window
    // warpgroup wg: keys jw.. (a warpgroup wholly past the window computes zeros: it shares the block's barriers)
    // (wg through a shuffle: a value ptxas knows to be warp-uniform, so the descriptors built from it stay in
    // uniform registers, as CUTLASS's canonical_warp_group_idx does)
    const int wg = NWG == 1 ? 0 : __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0);
    const int tw = NWG == 1 ? threadIdx.x : threadIdx.x % 128, jw = j0 + 64 * wg;
    int warp = tw / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    u64 hrow = (u64)h * a.n + W.s0;
    const Tc5Stager<T, HS, NT> qst(a, W, W.rows, h, 0, threadIdx.x), ost(a, W, W.rows, h, 3, threadIdx.x);
    auto stage = [&](int q0, int buf) {
        qst.issue(q0, Qs + buf * TILE);
        ost.issue(q0, Os + buf * TILE);
        stage_lse_d<BQ>(a, W, hrow, q0, Ls + buf * BQ, Ds + buf * BQ);
        cp_async_commit();
    };
    Tc5Stager<T, HS>(a, W, W.len, h, 1, tw).issue(jw, Ks + wg * TILE);  // in the first tile's group
    Tc5Stager<T, HS>(a, W, W.len, h, 2, tw).issue(jw, Vs + wg * TILE);
    stage(0, 0);
    int ja = jw + warp * 16 + g, jb = ja + 8;
    const u32 kca = attn_kc(ja);
    bool livea = ja < W.len, liveb = jb < W.len;
    const bool keys_full = jw + 64 <= W.len;
    float dk[NO][4], dv[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
    float(&dkf)[HS / 2] = reinterpret_cast<float(&)[HS / 2]>(dk);
    float(&dvf)[HS / 2] = reinterpret_cast<float(&)[HS / 2]>(dv);
    int C = a.nh * HS, tiles = (W.rows + BQ - 1) / BQ;
    const float sl2 = a.scale * LOG2E_F;
    const u32 thr = DROP ? attn_threshold(a.p) : 0u;
    const float ks = DROP ? attn_keep_scale(a.p) : 1.f;
    // descriptors of the first k-step (buffer 0): K and V as K-major A; K as N-major B (dQ); Q and dO as K-major
    // B (Sᵀ, dPᵀ) and N-major B (dK, dV); dSᵀ as M-major A (dQ). A step or the other buffer is an addition.
    const u32 kb = smem_u32(Ks + wg * TILE), vb = smem_u32(Vs + wg * TILE), qb = smem_u32(Qs), ob = smem_u32(Os);
    T* Sw = St + wg * 64 * 64;  // this warpgroup's dSᵀ tile
    const u32 sb = smem_u32(Sw);
    // where this lane stores dSᵀ (keys ja, jb = rows r, r + 8 of Sw; queries 8n + 2·t4, +1): LS::chunk(r, n) bytes,
    // i.e. r·128 + 16·(n ^ (r % 8)) + 4·t4 on the 1024-aligned tile, with r % 8 = g for both rows
    char* sw = (char*)Sw + (warp * 16 + g) * 128 + 4 * t4;
    const int gx = 16 * g;
    const u64 kdk = L::kmajor(kb, 0), vdk = L::kmajor(vb, 0), kdn = L::nmajor(kb, 0);
    const u64 qdk = L::kmajor(qb, 0), odk = L::kmajor(ob, 0), qdn = L::nmajor(qb, 0), odn = L::nmajor(ob, 0);
    const u64 sdm = LS::nmajor(sb, 0);
    constexpr u32 TB16 = TILE * sizeof(T) / 16;  // a tile in descriptor units
    constexpr u32 KSTEP = 2, NSTEP = 16 * L::W / 16, SSTEP = 16 * LS::W / 16;  // one k-step, in descriptor units
    for (int it = 0; it < tiles; ++it) {
        int q0 = it * BQ, buf = it & 1;
        if (it + 1 < tiles) stage(q0 + BQ, buf ^ 1);
        else cp_async_commit();
        cp_async_wait<1>();
        fence_proxy_async();  // this thread's copies of tile `it` (and K, V), visible to wgmma
        __syncthreads();
        const float* Lb = Ls + buf * BQ;
        const float* Db = Ds + buf * BQ;
        float s[BQ / 8][4], dp[BQ / 8][4];
        float(&sf)[BQ / 2] = reinterpret_cast<float(&)[BQ / 2]>(s);
        float(&dpf)[BQ / 2] = reinterpret_cast<float(&)[BQ / 2]>(dp);
        wg_fence();
#pragma unroll
        for (int k = 0; k < HS / 16; ++k)
            wgmma_ss<BQ, 0, 0, T>(sf, kdk + KSTEP * k, qdk + buf * TB16 + KSTEP * k, k > 0);
#pragma unroll
        for (int k = 0; k < HS / 16; ++k)
            wgmma_ss<BQ, 0, 0, T>(dpf, vdk + KSTEP * k, odk + buf * TB16 + KSTEP * k, k > 0);
        wg_commit();
        wg_wait<0>();
        wg_pin(sf);
        wg_pin(dpf);
        if (!keys_full || q0 + BQ > W.rows) {  // as variant 4: dead keys or queries get probability 0
#pragma unroll
            for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!((e < 2 ? livea : liveb) && q0 + n * 8 + 2 * t4 + (e & 1) < W.rows)) s[n][e] = -INFINITY;
        }
        u32 pa[BQ / 16][4], sa[BQ / 16][4];
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) {
            bwd_tile_ps<T, BQ / 8, DROP>(s, dp, kk, Lb, Db, seed, W.w, h, attn_qc(q0) + 8 * kk + 2 * t4, kca, ja & 1, t4,
                                         sl2, thr, ks, pa[kk], sa[kk]);
#pragma unroll
            for (int half = 0; half < 2; ++half) {  // dSᵀ (key, queries 8n + 2·t4, +1) for dQ, one 32-bit store each
                int n = 2 * kk + half;
                *(u32*)(sw + ((16 * n) ^ gx)) = sa[kk][half * 2 + 0];
                *(u32*)(sw + 1024 + ((16 * n) ^ gx)) = sa[kk][half * 2 + 1];
            }
        }
        wg_pin(dvf);
        wg_pin(dkf);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) wgmma_rs<HS, 1, T>(dvf, pa[kk], odn + buf * TB16 + NSTEP * kk, 1);
#pragma unroll
        for (int kk = 0; kk < BQ / 16; ++kk) wgmma_rs<HS, 1, T>(dkf, sa[kk], qdn + buf * TB16 + NSTEP * kk, 1);
        wg_commit();
        fence_proxy_async();  // this thread's dSᵀ stores, visible to wgmma
        __syncthreads();      // the whole dSᵀ tile (this warpgroup's; a named barrier per warpgroup would do)
        float acc[NO][4];
        float(&accf)[HS / 2] = reinterpret_cast<float(&)[HS / 2]>(acc);
#pragma unroll
        for (int kk = 0; kk < 64 / 16; ++kk) wgmma_ss<HS, 1, 1, T>(accf, sdm + SSTEP * kk, kdn + NSTEP * kk, kk > 0);
        wg_commit();
        wg_wait<0>();
        wg_pin(accf);
        wg_pin(dvf);
        wg_pin(dkf);
        // rows r0 and r0 + 8, columns h·HS + 8n + 2·t4, +1: one address per tile, the rest constant offsets
        int r0 = q0 + warp * 16 + g;
        float* dq = (float*)a.dqacc + ((u64)W.s0 + r0) * C + h * HS + 2 * t4;
        const bool full = q0 + BQ <= W.rows, ok0 = r0 < W.rows, ok1 = r0 + 8 < W.rows;
        if constexpr (NWG == 1) {
            tc6_dq_red<0, NO>(acc, dq, C, full, ok0, ok1);
        } else {  // warpgroup 0 adds columns n < NO/2 of both warpgroups' sums, warpgroup 1 the rest
            if (wg == 0) tc6_dq_send<NO / 2, NO, 1>(acc, X, tw);
            else tc6_dq_send<0, NO / 2, 0>(acc, X, tw);
            __syncthreads();
            if (wg == 0) {
                tc6_dq_recv<0, NO / 2, 0>(acc, X, tw);
                tc6_dq_red<0, NO / 2>(acc, dq, C, full, ok0, ok1);
            } else {
                tc6_dq_recv<NO / 2, NO, 1>(acc, X, tw);
                tc6_dq_red<NO / 2, NO>(acc, dq, C, full, ok0, ok1);
            }
        }
        __syncthreads();  // dSᵀ, X and this tile's buffers are rewritten by the next iteration
    }
    store_dkdv<T, HS>(a, dk, dv, W, h, ja, jb, ks);
}
#define TC5_FWD(TY, HS, DROP, NWG) tc5_forward<TY, HS, DROP, NWG>(a);
#define TC6_BWD(TY, HS, DROP, NWG) tc5_backward<TY, HS, DROP, NWG>(a);
#else
// compiled for a target without wgmma (NVRTC's plain sm_90, sm_80): the entry points exist and trap
#define TC5_FWD(TY, HS, DROP, NWG) __trap();
#define TC6_BWD(TY, HS, DROP, NWG) __trap();
#endif
// variant 5's forward: w4 (4 blocks of one warpgroup per SM), w8 (2 blocks of two); variant 6's backward: w4 (2
// blocks of one warpgroup per SM), w8 (1 block of two)
#define TC5_HS(TY, NAME, HS)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128, 4) attention_tc5_forward_w4_##NAME##_hs##HS(AttnParams a) { TC5_FWD(TY, HS, true, 1) } \
    extern "C" __global__ void __launch_bounds__(128, 4) attention_tc5_forward_w4_p0_##NAME##_hs##HS(AttnParams a) { TC5_FWD(TY, HS, false, 1) } \
    extern "C" __global__ void __launch_bounds__(256, 2) attention_tc5_forward_w8_##NAME##_hs##HS(AttnParams a) { TC5_FWD(TY, HS, true, 2) } \
    extern "C" __global__ void __launch_bounds__(256, 2) attention_tc5_forward_w8_p0_##NAME##_hs##HS(AttnParams a) { TC5_FWD(TY, HS, false, 2) } \
    extern "C" __global__ void __launch_bounds__(128, 2) attention_tc6_backward_w4_##NAME##_hs##HS(AttnParams a) { TC6_BWD(TY, HS, true, 1) } \
    extern "C" __global__ void __launch_bounds__(128, 2) attention_tc6_backward_w4_p0_##NAME##_hs##HS(AttnParams a) { TC6_BWD(TY, HS, false, 1) } \
    extern "C" __global__ void __launch_bounds__(256, 1) attention_tc6_backward_w8_##NAME##_hs##HS(AttnParams a) { TC6_BWD(TY, HS, true, 2) } \
    extern "C" __global__ void __launch_bounds__(256, 1) attention_tc6_backward_w8_p0_##NAME##_hs##HS(AttnParams a) { TC6_BWD(TY, HS, false, 2) }
TC5_HS(bf16, bf16, 32)
TC5_HS(bf16, bf16, 64)
TC5_HS(f16, f16, 32)
TC5_HS(f16, f16, 64)
