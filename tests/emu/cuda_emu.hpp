// cuda_emu.hpp — runs this project's CUDA kernels on the CPU, for tests on machines without a GPU.
//
// The kernel sources (kernels/*.cu) are compiled by the host C++ compiler with BERTQA_EMU defined; this header
// supplies what nvcc/NVRTC would: the execution-space keywords, threadIdx/blockIdx, the vector and 16-bit float
// types, the intrinsics, and the warp-level instructions the kernels reach through inline PTX (mma.sync
// m16n8k16, ldmatrix, cp.async, ex2.approx; and Hopper's warpgroup wgmma.mma_async with its fence, commit and
// wait, and fence.proxy.async) — each written from the PTX ISA's definition, not from the kernels, so a kernel
// that misreads a fragment layout gets wrong numbers here as it would on the GPU.
//
// Execution model. Every CUDA thread is a fiber (ucontext); one block runs at a time, and a thread runs until it
// reaches a barrier (__syncthreads, or a warp collective: shuffles, mma, ldmatrix), where the scheduler picks
// the next (driver.cpp, EMU_SCHED: one warp as far as it can go, lowest or highest first, or all in lockstep).
// Shared memory: `__shared__` arrays are function statics (one block at a time) and the dynamic shared memory
// is a fresh allocation of exactly the launch's bytes, filled with NaN bytes, so a read past a tile or of an
// unwritten element shows in the result.
//
// Checks a GPU would not report clearly: a barrier that not every live thread reaches (deadlock, named with the
// waiting threads), a warp collective after lanes of the warp have exited, ldmatrix rows outside the dynamic
// shared memory or not 16-byte aligned, cp.async with a source outside every global buffer (the driver registers
// them) or a destination outside shared memory.
//
// cp.async: by default each copy lands when its thread waits for the group (the latest the PTX ISA allows);
// EMU_CP_ASYNC=eager lands it at issue (the earliest). A kernel whose result differs between the two reads a
// tile before waiting for it or overwrites one still being read.
//
// wgmma (PTX ISA 9.7.15): a warpgroup is warps 4i..4i+3, and every one of its 128 threads must issue each
// wgmma.mma_async (a warpgroup barrier here). Shared-memory operands are read through their matrix
// descriptors (start address, leading/stride byte offsets, swizzle mode; the canonical layouts of 9.7.15.5.1.2),
// from the block's *async-proxy view* of shared memory: a copy of shared memory taken whenever a thread
// executes fence.proxy.async, so a kernel that writes a tile with ordinary stores (or cp.async) and hands it to
// wgmma without that fence reads the NaN-filled start (or a stale tile). (One thread's fence publishes every
// thread's writes here: a fence missing in only some threads is not caught.) The product is formed when the first
// thread of the warpgroup waits for it (wgmma.wait_group; EMU_CP_ASYNC=eager: at issue) and added to each
// thread's accumulator at its own wait. Checked: a wgmma.mma_async without a wgmma.fence since the thread's last
// wait (or its start); accumulator or A-fragment registers changed between issue and wait; descriptors that
// differ between the threads; an element outside the dynamic shared memory; a nonzero matrix base offset (not
// emulated); a thread exiting with a wgmma in flight, or while its warpgroup issues one. Not modelled: the
// hardware synchronises a wgmma.mma_async only within each warp, and here it is a barrier over the warpgroup,
// so a kernel missing a __syncthreads between other warps' shared-memory writes and a wgmma reading them passes
// here (and under ThreadSanitizer); the GPU parity tests are what check such hand-offs. Shared addresses (`shared_addr`) start at
// EMU_SMEM_WINDOW, which is 16- but not 1024-byte aligned, so a kernel that assumes its dynamic shared memory
// starts on a swizzle-pattern boundary fails here: it must align its tiles itself.
//
// Data races (-fsanitize=thread, e.g. BERTQA_EMU_CXXFLAGS=-fsanitize=thread): each CUDA thread is a separate
// ThreadSanitizer fiber, switched without synchronisation; __syncthreads and warp collectives are the only
// happens-before edges inside a block (blocks and launches run in order, so races between blocks are not
// seen). ldmatrix reads and cp.async writes are reported as accesses of the lane that addressed them; the
// emulator's own bookkeeping is not instrumented. Any access pair two threads make to the same shared or
// global byte, one a write, with no barrier between them is reported, whatever the interleaving.
#pragma once
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <memory>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
// One block runs at a time, so a function-static array is exactly the block's shared memory.
#define __shared__ static

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// ---- 16-bit floats: storage only, conversions round to nearest even (as __float2bfloat16_rn/__float2half_rn) --
struct __nv_bfloat16 {
    uint16_t x;
};
struct __half {
    uint16_t x;
};
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) { return __uint_as_float((uint32_t)i); }
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((uint32_t)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1);
    return {(uint16_t)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return {x}; }
inline float __half2float(__half h) {
    uint32_t s = (uint32_t)(h.x & 0x8000) << 16, e = (h.x >> 10) & 0x1f, m = h.x & 0x3ff;
    if (e == 0x1f) return __uint_as_float(s | 0x7f800000u | (m << 13));
    if (e == 0) {  // zero or subnormal: m · 2^-24
        float v = (float)m * 5.9604644775390625e-8f;
        return s ? -v : v;
    }
    return __uint_as_float(s | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
    uint32_t u = __float_as_uint(f), s = (u >> 16) & 0x8000;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return {(uint16_t)(s | 0x7e00)};
    if (a >= 0x477ff000u) return {(uint16_t)(s | 0x7c00)};  // rounds to ≥ 65520: infinity
    if (a < 0x38800000u) {                                   // below 2^-14: subnormal half, m = round(|f|·2^24)
        float v = std::nearbyint(__uint_as_float(a) * 16777216.0f);  // exact scaling; ties to even
        return {(uint16_t)(s | (uint32_t)v)};
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1);  // round the 13 dropped bits to nearest even
    return {(uint16_t)(s | ((r - 0x38000000u) >> 13))};
}
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short x) { return {x}; }

// ---- intrinsics ----------------------------------------------------------------------------------------------
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
// CUDA Math API: byte n of the result is byte ((s >> 4n) & 7) of the 8 bytes {x (bytes 0-3), y (bytes 4-7)}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    uint64_t in = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned)((in >> (8 * ((s >> (4 * n)) & 7))) & 0xffu) << (8 * n);
    return r;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
using std::max;
using std::min;
using std::isfinite;  // CUDA math API: isfinite(float) in device code
template <typename T> inline T __ldg(const T* p) { return *p; }

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
// the instrumentation's own entry points (libtsan exports them; the public header does not declare them)
extern "C" void __tsan_read4(void*);
extern "C" void __tsan_read16(void*);
extern "C" void __tsan_write4(void*);
extern "C" void __tsan_write16(void*);
#define EMU_TSAN 1
// the emulator's bookkeeping (barrier counters, exchange slots) is not what is being checked
#define EMU_UNCHECKED __attribute__((no_sanitize_thread))
#else
#define EMU_TSAN 0
#define EMU_UNCHECKED
#endif

namespace emu {

[[noreturn]] void fail(const char* fmt, ...);

struct Fiber;
struct WgOp;  // one wgmma.mma_async of a warpgroup (driver.cpp)
struct WgPending {
    std::shared_ptr<WgOp> op;
    float* d;                 // the issuing thread's accumulator registers
    bool chained;             // an earlier wgmma on the same accumulator was in flight at issue
    std::vector<float> snap;  // the accumulator at issue (when not chained)
    const uint32_t* a;        // the A-fragment registers (null: A from shared memory)
    uint32_t a_snap[4];
    long group;
};
struct WarpGroup {
    int live = 0, arrived = 0, size = 0;
    uint64_t gen = 0;
    uint64_t slot[128][8];
    std::shared_ptr<WgOp> op;  // the wgmma being issued (built by the first thread past the barrier)
    uint64_t op_gen = ~0ull;
};
struct Warp {
    int live = 0, arrived = 0, size = 0;
    uint64_t gen = 0;
    uint64_t slot[32][6];
    const void* addr[32];
};
struct Pending {
    void* dst;
    const void* src;
    int bytes;
    bool valid;
    long group;
};
struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;            // where the fiber resumes (fast switching, driver.cpp)
    bool started = false;  // entered once already
    void* tsan = nullptr;  // the ThreadSanitizer fiber (-fsanitize=thread)
    char* stack = nullptr;
    dim3 tid;
    int lane = 0, warp = 0;
    bool done = false;
    int wait = 0;  // 0 runnable, 1 at a warp barrier, 2 at the block barrier, 3 at a warpgroup barrier
    uint64_t wait_gen = 0;
    long group = 0;  // the cp.async group being filled
    std::vector<Pending> cp;
    long wg_group = 0;        // the wgmma group being filled
    bool wg_fenced = false;   // a wgmma.fence since the last wgmma.wait_group (or the start)
    std::vector<WgPending> wg;
};

// the running launch (one block at a time)
extern Fiber* cur;
extern dim3 block_idx, block_dim, grid_dim;
extern unsigned char* smem_base;
extern size_t smem_bytes;
extern std::vector<Warp> warps;
extern std::vector<WarpGroup> groups;
extern const char* kernel_name;

inline unsigned char* dyn_smem() { return smem_base; }
void yield();
void warp_barrier();  // every live lane of this warp
void block_barrier(); // every live thread of this block
bool in_global(const void* p, size_t bytes);

// warp collective: exchange one 64-bit word per lane
template <typename V> EMU_UNCHECKED inline V exchange(V v, int src_lane) {
    static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
    Warp& w = warps[cur->warp];
    if (w.live != w.size) fail("%s: warp collective after %d lanes of warp %d exited", kernel_name, w.size - w.live, cur->warp);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    w.slot[cur->lane][0] = bits;
    warp_barrier();
    uint64_t got = (src_lane >= 0 && src_lane < w.size) ? w.slot[src_lane][0] : bits;
    warp_barrier();
    V r;
    std::memcpy(&r, &got, sizeof(V));
    return r;
}

// warp vote (vote.sync.ballot.b32): bit l of the result is lane l's predicate, for every lane of the warp
EMU_UNCHECKED inline unsigned ballot(bool pred) {
    Warp& w = warps[cur->warp];
    if (w.live != w.size) fail("%s: warp vote after %d lanes of warp %d exited", kernel_name, w.size - w.live, cur->warp);
    w.slot[cur->lane][0] = pred ? 1u : 0u;
    warp_barrier();
    unsigned r = 0;
    for (int l = 0; l < w.size; ++l) r |= (unsigned)(w.slot[l][0] & 1u) << l;
    warp_barrier();
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, D = A·B + C, from the PTX ISA's fragment
// layouts (groupID g = lane/4, threadID_in_group t = lane%4):
//   A: a0,a1 (row g, cols 2t, 2t+1), a2,a3 (row g+8), a4,a5 (row g, cols 2t+8, +9), a6,a7 (row g+8, cols 2t+8, +9);
//      register i holds the pair (a_{2i}, a_{2i+1}), the lower element in the low 16 bits.
//   B: b0,b1 (rows 2t, 2t+1, col g), b2,b3 (rows 2t+8, 2t+9, col g).
//   C, D: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1).
// Products of 16-bit inputs are exact in f32; the sum is formed in double and added to C once.
void mma_m16n8k16(bool bf16, float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lanes 8i..8i+7 address the 8 rows (16 bytes each)
// of matrix i; register i of lane l = matrix i's (row l/4, cols 2(l%4), 2(l%4)+1), or with .trans (rows 2(l%4),
// 2(l%4)+1, col l/4), the lower element in the low 16 bits.
void ldmatrix(uint32_t* r, int n, bool trans, const void* p);

// cp.async.{ca,cg}.shared.global [dst], [src], bytes, valid ? bytes : 0 (zeros when not valid)
void cp_async(void* dst, const void* src, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int n);  // all but the newest n committed groups of this thread are complete

// The .shared address of a byte of the dynamic shared memory (what cvta.to.shared gives on the GPU).
constexpr uint32_t EMU_SMEM_WINDOW = 0x1230;
uint32_t shared_addr(const void* p);
// fence.proxy.async.shared::cta: this thread's earlier shared-memory writes become visible to wgmma (and any
// other async-proxy reader); here: the async-proxy view is refreshed from shared memory.
void fence_proxy_async();
// wgmma.fence.sync.aligned, wgmma.commit_group.sync.aligned, wgmma.wait_group.sync.aligned n
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int n);
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16}: D (64×N, f32) = A (64×16) · B (16×N) + (scale_d ?
// D : 0). A from the four registers `a` (when not null; the layout of mma.m16n8k16's A, warp w of the group
// holding rows 16w..16w+15) or from shared memory through `adesc` (K-major, or M-major when trans_a); B from
// shared memory through `bdesc` (K-major, or N-major when trans_b). `d` holds this thread's N/2 accumulator
// elements: d[4j + i] is row 16w + lane/4 + 8(i/2), column 8j + 2(lane%4) + i%2.
void wgmma(int n, bool bf16, float* d, const uint32_t* a, uint64_t adesc, uint64_t bdesc, bool scale_d, bool trans_a,
           bool trans_b);

// ex2.approx.ftz.f32: 2^x, subnormal inputs and results flushed to zero
inline float ex2_approx_ftz(float x) {
    if (std::fabs(x) < 1.17549435e-38f) x = 0.f;
    float y = std::exp2(x);
    return std::fabs(y) < 1.17549435e-38f ? 0.f : y;
}

}  // namespace emu

#define threadIdx (::emu::cur->tid)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { ::emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::warp_barrier(); }
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int mask) {
    return ::emu::exchange(v, ::emu::cur->lane ^ mask);
}
template <typename V> inline V __shfl_sync(unsigned, V v, int src) { return ::emu::exchange(v, src & 31); }
inline unsigned __ballot_sync(unsigned, int pred) { return ::emu::ballot(pred != 0); }
inline int __any_sync(unsigned, int pred) { return ::emu::ballot(pred != 0) != 0; }
inline int __all_sync(unsigned, int pred) { return ::emu::ballot(pred == 0) == 0; }
template <typename V> inline V __shfl_down_sync(unsigned, V v, unsigned d) {
    return ::emu::exchange(v, ::emu::cur->lane + (int)d);
}
// Threads of a block never run at the same time (fibers switch only at barriers), so any add would be
// atomic here; these are real atomic operations so that ThreadSanitizer treats them as such.
inline float atomicAdd(float* p, float v) {
    uint32_t* u = (uint32_t*)p;
    uint32_t old = __atomic_load_n(u, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(u, &old, __float_as_uint(__uint_as_float(old) + v), false, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return __uint_as_float(old);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
