// driver.cpp — the kernel emulator's runtime and command-line driver (see cuda_emu.hpp).
//
// Built by tests/emu/mod.rs for one kernel module at a time:
//   c++ -std=c++17 -DBERTQA_EMU -DEMU_MODULE='"attention_tc.cu"' -DEMU_REGISTRY='"registry.inc"' -I tests/emu
//       -I kernels tests/emu/driver.cpp
// where registry.inc lists the module's entry points as EMU_KERNEL(name) lines.
//
// Usage: driver SCRIPT OUT. SCRIPT (little-endian) = "BQEMU2\0\0"; u32 buffer count, then per buffer u64 bytes,
// u32 flags (1: a table of device addresses, patched like parameters) and the bytes; u32 launch count, then per
// launch u32 name length and the name, u32 grid[3], u32 block[3], u32 dynamic shared-memory bytes, u32
// parameter bytes and the parameter struct. A parameter word (8-byte aligned) whose top nibble is 0xB is a
// buffer address: buffer (word >> 36) & 0xFFFFFF at byte offset word & (2^36 - 1), the way the Rust side
// (tests/emu/mod.rs) wrote it; so is such a word in a buffer flagged as a table. OUT receives every buffer
// after the last launch, in order (u64 bytes, the bytes). Environment: EMU_SCHED=warp|rwarp|rr (the
// interleaving), EMU_CP_ASYNC=wait|eager (when cp.async copies land, and when wgmma reads its operands).
#include "cuda_emu.hpp"

#include <cstdarg>
#include <array>
#include <csetjmp>
#include <map>
#include <new>

#include "common.cuh"
#include EMU_MODULE

namespace emu {

Fiber* cur = nullptr;
dim3 block_idx, block_dim, grid_dim;
unsigned char* smem_base = nullptr;
size_t smem_bytes = 0;
std::vector<Warp> warps;
std::vector<WarpGroup> groups;
const char* kernel_name = "?";
static unsigned char* smem_async = nullptr;  // the async proxy's view of shared memory (see cuda_emu.hpp)

static ucontext_t sched_ctx;

// Switching fibers: swapcontext saves and restores the signal mask — a system call per switch, most of the
// emulator's time. Without sanitizers, a fiber is entered once with swapcontext and from then on switched
// with _setjmp/_longjmp (no system call); under ASan/TSan, which follow swapcontext, every switch uses it.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define EMU_FAST_SWITCH 0
#else
#define EMU_FAST_SWITCH 1
static jmp_buf sched_jb;
#endif

// fiber → scheduler
EMU_UNCHECKED static void to_scheduler() {
#if EMU_FAST_SWITCH
    if (!_setjmp(cur->jb)) _longjmp(sched_jb, 1);
#else
    swapcontext(&cur->ctx, &sched_ctx);
#endif
}
// fiber exit → scheduler, for good
[[noreturn]] EMU_UNCHECKED static void exit_to_scheduler() {
#if EMU_FAST_SWITCH
    _longjmp(sched_jb, 1);
#else
    setcontext(&sched_ctx);
    std::abort();
#endif
}
// scheduler → fiber f, until it yields or exits
EMU_UNCHECKED static void enter(Fiber& f) {
#if EMU_FAST_SWITCH
    if (_setjmp(sched_jb)) return;  // back from the fiber
    if (!f.started) {
        f.started = true;
        swapcontext(&sched_ctx, &f.ctx);  // first entry (the fiber never returns through this context)
    } else {
        _longjmp(f.jb, 1);
    }
#else
    swapcontext(&sched_ctx, &f.ctx);
#endif
}
static std::vector<Fiber> fibers;
static int block_live = 0, block_arrived = 0;
static uint64_t block_gen = 0;
static bool eager_cp = false;
static int sched = 1;  // 0 rr, 1 warp, 2 rwarp (EMU_SCHED)
static std::vector<std::pair<const unsigned char*, size_t>> globals;

void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "emu: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, " (block %u,%u,%u)\n", block_idx.x, block_idx.y, block_idx.z);
    va_end(ap);
    std::exit(3);
}

// ---- ThreadSanitizer (-fsanitize=thread): fibers and happens-before edges --------------------------------
#if EMU_TSAN
static void* sched_tsan = nullptr;
// barrier sync objects: [warp][generation parity], and the block's; a thread is at most one generation ahead
static std::vector<std::array<char, 2>> warp_sync;
static std::vector<std::array<char, 2>> group_sync;
static char block_sync[2];
static char grid_sync;  // every thread's exit → every later thread's start (blocks and launches run in order)
static void to_fiber(void* f) { __tsan_switch_to_fiber(f, __tsan_switch_to_fiber_no_sync); }
#define TSAN_RELEASE(p) __tsan_release((void*)(p))
#define TSAN_ACQUIRE(p) __tsan_acquire((void*)(p))
extern "C" void __tsan_ignore_thread_begin(void);
extern "C" void __tsan_ignore_thread_end(void);
// the emulator's own shared bookkeeping (wgmma's operation records: shared_ptr counts, the product), which the
// fibers touch one at a time, is not what is checked (library code inlined here is instrumented regardless of
// EMU_UNCHECKED)
#define TSAN_IGNORE_BEGIN() __tsan_ignore_thread_begin()
#define TSAN_IGNORE_END() __tsan_ignore_thread_end()
#else
#define TSAN_IGNORE_BEGIN() (void)0
#define TSAN_IGNORE_END() (void)0
#define TSAN_RELEASE(p) (void)0
#define TSAN_ACQUIRE(p) (void)0
#endif

EMU_UNCHECKED void yield() {
#if EMU_TSAN
    to_fiber(sched_tsan);
#endif
    to_scheduler();
}

// A barrier over a group of threads (a warp or a warpgroup: live, arrived, gen), `kind` the fiber's wait state
// while it waits; `sync` its ThreadSanitizer sync objects, one per generation parity.
template <typename G>
EMU_UNCHECKED static void group_wait(G& w, std::array<char, 2>* sync_pair, int kind) {
    uint64_t g = w.gen;
#if EMU_TSAN
    void* sync = &(*sync_pair)[g & 1];
#else
    (void)sync_pair;
#endif
    TSAN_RELEASE(sync);
    if (++w.arrived == w.live) {
        w.arrived = 0;
        ++w.gen;
    } else {
        cur->wait = kind;
        cur->wait_gen = g;
        yield();
    }
    TSAN_ACQUIRE(sync);
}

#if EMU_TSAN
#define EMU_SYNC_OF(v, i) (&(v)[i])
#else
#define EMU_SYNC_OF(v, i) ((std::array<char, 2>*)nullptr)
#endif
EMU_UNCHECKED void warp_barrier() { group_wait(warps[cur->warp], EMU_SYNC_OF(warp_sync, cur->warp), 1); }
EMU_UNCHECKED static void group_barrier() { group_wait(groups[cur->warp / 4], EMU_SYNC_OF(group_sync, cur->warp / 4), 3); }

EMU_UNCHECKED void block_barrier() {
    uint64_t g = block_gen;
#if EMU_TSAN
    void* sync = &block_sync[g & 1];
#endif
    TSAN_RELEASE(sync);
    if (++block_arrived == block_live) {
        block_arrived = 0;
        ++block_gen;
    } else {
        cur->wait = 2;
        cur->wait_gen = g;
        yield();
    }
    TSAN_ACQUIRE(sync);
}

bool in_global(const void* p, size_t bytes) {
    auto q = (const unsigned char*)p;
    for (auto& [base, n] : globals)
        if (q >= base && q + bytes <= base + n) return true;
    return false;
}

static bool in_smem(const void* p, size_t bytes) {
    auto q = (const unsigned char*)p;
    return q >= smem_base && q + bytes <= smem_base + smem_bytes;
}

static float half_bits_to_float(bool bf16, uint32_t h) {
    return bf16 ? __bfloat162float(__nv_bfloat16{(uint16_t)h}) : __half2float(__half{(uint16_t)h});
}

EMU_UNCHECKED void mma_m16n8k16(bool bf16, float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    Warp& w = warps[cur->warp];
    if (w.live != 32) fail("%s: mma.sync with %d live lanes", kernel_name, w.live);
    uint64_t* s = w.slot[cur->lane];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    warp_barrier();
    // element (r, k) of A and (k, n) of B, found in the lane and register the PTX ISA puts them in
    auto A = [&](int r, int k) {
        int lane = (r % 8) * 4 + (k % 8) / 2, reg = (r / 8) + 2 * (k / 8);
        uint32_t v = (uint32_t)w.slot[lane][reg];
        return half_bits_to_float(bf16, (k & 1) ? v >> 16 : v & 0xffff);
    };
    auto B = [&](int k, int n) {
        int lane = n * 4 + (k % 8) / 2, reg = 4 + k / 8;
        uint32_t v = (uint32_t)w.slot[lane][reg];
        return half_bits_to_float(bf16, (k & 1) ? v >> 16 : v & 0xffff);
    };
    int g = cur->lane / 4, t = cur->lane % 4;
    float d[4];
    for (int i = 0; i < 4; ++i) {
        int r = g + 8 * (i / 2), n = 2 * t + (i % 2);
        double acc = 0.0;
        for (int k = 0; k < 16; ++k) acc += (double)A(r, k) * (double)B(k, n);
        d[i] = (float)((double)c[i] + acc);
    }
    warp_barrier();
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

EMU_UNCHECKED void ldmatrix(uint32_t* r, int n, bool trans, const void* p) {
    Warp& w = warps[cur->warp];
    if (w.live != 32) fail("%s: ldmatrix with %d live lanes", kernel_name, w.live);
    w.addr[cur->lane] = p;
    if (cur->lane < 8 * n) {
#if EMU_TSAN
        __tsan_read16((void*)p);  // the row this lane addresses, read by the warp
#endif
        if (!in_smem(p, 16))
            fail("%s: ldmatrix row address of lane %d (warp %d) is %td bytes into the %zu bytes of shared memory",
                 kernel_name, cur->lane, cur->warp, (const unsigned char*)p - smem_base, smem_bytes);
        if ((uintptr_t)p % 16) fail("%s: ldmatrix row address of lane %d is not 16-byte aligned", kernel_name, cur->lane);
    }
    warp_barrier();
    int l = cur->lane;
    auto elem = [&](int m, int row, int col) -> uint32_t {
        const uint16_t* rowp = (const uint16_t*)w.addr[8 * m + row];
        return rowp[col];
    };
    for (int m = 0; m < n; ++m) {
        uint32_t lo, hi;
        if (!trans) {
            lo = elem(m, l / 4, 2 * (l % 4));
            hi = elem(m, l / 4, 2 * (l % 4) + 1);
        } else {
            lo = elem(m, 2 * (l % 4), l / 4);
            hi = elem(m, 2 * (l % 4) + 1, l / 4);
        }
        r[m] = lo | (hi << 16);
    }
    warp_barrier();
}

// The copy as a write of the issuing thread (and a read of the source when valid), reported both at issue
// and where it lands: the hardware may write any time in between.
EMU_UNCHECKED static void tsan_copy(const Pending& c) {
#if EMU_TSAN
    if (c.bytes == 16) {
        __tsan_write16(c.dst);
        if (c.valid) __tsan_read16((void*)c.src);
    } else {
        __tsan_write4(c.dst);
        if (c.valid) __tsan_read4((void*)c.src);
    }
#else
    (void)c;
#endif
}

EMU_UNCHECKED static void land(const Pending& c) {
    tsan_copy(c);
    if (c.valid)
        std::memcpy(c.dst, c.src, c.bytes);
    else
        std::memset(c.dst, 0, c.bytes);
}

EMU_UNCHECKED void cp_async(void* dst, const void* src, int bytes, bool valid) {
    if (!in_smem(dst, bytes))
        fail("%s: cp.async destination %td bytes into the %zu bytes of shared memory (thread %u)", kernel_name,
             (const unsigned char*)dst - smem_base, smem_bytes, cur->tid.x);
    if (!in_global(src, bytes)) fail("%s: cp.async source outside every global buffer (thread %u)", kernel_name, cur->tid.x);
    if ((uintptr_t)dst % bytes || (uintptr_t)src % bytes) fail("%s: cp.async of %d bytes misaligned", kernel_name, bytes);
    Pending c{dst, src, bytes, valid, cur->group};
    tsan_copy(c);
    if (eager_cp)
        land(c);
    else
        cur->cp.push_back(c);
}
EMU_UNCHECKED void cp_async_commit() { ++cur->group; }
EMU_UNCHECKED void cp_async_wait(int n) {
    // groups < cur->group are committed; all but the newest n of them must be complete
    long upto = cur->group - n;
    std::vector<Pending> keep;
    for (auto& c : cur->cp) {
        if (c.group < upto)
            land(c);
        else
            keep.push_back(c);
    }
    cur->cp.swap(keep);
}

// ---- wgmma (sm_90a) -------------------------------------------------------------------------------------------
EMU_UNCHECKED uint32_t shared_addr(const void* p) {
    auto q = (const unsigned char*)p;
    if (q < smem_base || q > smem_base + smem_bytes)
        fail("%s: shared address of a pointer outside the dynamic shared memory (thread %u)", kernel_name, cur->tid.x);
    return EMU_SMEM_WINDOW + (uint32_t)(q - smem_base);
}

// Plain word copies: under -fsanitize=thread a memcpy would be intercepted and reported as this thread reading
// what others wrote; the async proxy is not the thread.
EMU_UNCHECKED static void copy_unchecked(unsigned char* dst, const unsigned char* src, size_t n) {
    for (size_t i = 0; i < n; ++i) ((volatile unsigned char*)dst)[i] = ((const volatile unsigned char*)src)[i];
}

EMU_UNCHECKED void fence_proxy_async() { copy_unchecked(smem_async, smem_base, smem_bytes); }

struct WgOp {
    int n = 0;
    bool bf16 = true, a_regs = false, trans_a = false, trans_b = false, scale_d = true;
    uint64_t adesc = 0, bdesc = 0;
    std::vector<uint32_t> a;  // with a_regs: [thread][4] fragment registers as issued
    std::vector<double> prod; // 64×n, once formed
    bool formed = false;
};

// Element (mn, k) of a 16-bit operand in shared memory, through its matrix descriptor (PTX ISA 9.7.15.5.1.2):
// bits 0-13 start address >> 4, 16-29 leading dimension byte offset (LBO) >> 4, 32-45 stride dimension byte
// offset (SBO) >> 4, 49-51 base offset, 62-63 swizzle (0 none, 1 128 B, 2 64 B, 3 32 B). The canonical
// layouts, T = 8 elements (16 bytes), W the swizzle width in bytes:
//   K-major, none:      ((8,m),(T,2k)):((1T,SBO),(1,LBO))   rows of a core matrix 16 B apart, next 8 rows at SBO, next 8 k at LBO
//   K-major, swizzled:  ((8,m),(T,2k)):((W/2,SBO),(1,T))     rows W bytes apart, next 8 rows at SBO, k along the row
//   MN-major, none:     ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) 8 mn contiguous, k rows 16 B apart, next 8 mn at SBO, next 8 k at LBO
//   MN-major, swizzled: ((T,W/16,m),(8,k)):((1,T,LBO),(W/2,SBO)) W/2 mn contiguous, k rows W bytes apart, next W/2 mn at LBO, next 8 k at SBO
// and then the swizzle, Swizzle<log2(W/16),4,3> of the byte address: bits 4.. (the 16-byte chunk) ^= bits 7.. .
EMU_UNCHECKED static float wg_elem(bool bf16, uint64_t desc, bool mn_major, int mn, int k, const char* what) {
    uint32_t start = (uint32_t)(desc & 0x3fff) << 4, lbo = (uint32_t)((desc >> 16) & 0x3fff) << 4,
             sbo = (uint32_t)((desc >> 32) & 0x3fff) << 4;
    int base = (int)((desc >> 49) & 7), mode = (int)(desc >> 62);
    if (base) fail("%s: wgmma %s descriptor with matrix base offset %d (not emulated: align the tile to its pattern)", kernel_name, what, base);
    uint32_t w = mode == 0 ? 16 : mode == 1 ? 128 : mode == 2 ? 64 : 32, off;
    if (!mn_major)
        off = mode == 0 ? (mn % 8) * 16 + (mn / 8) * sbo + (k / 8) * lbo + (k % 8) * 2
                        : (mn % 8) * w + (mn / 8) * sbo + (k / 8) * 16 + (k % 8) * 2;
    else if (mode == 0)
        off = (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo;
    else
        off = (mn % (w / 2)) * 2 + (mn / (w / 2)) * lbo + (k % 8) * w + (k / 8) * sbo;
    uint32_t addr = start + off;
    if (mode) addr ^= ((addr >> 7) & (w / 16 - 1)) << 4;
    if (addr < EMU_SMEM_WINDOW || addr - EMU_SMEM_WINDOW + 2 > smem_bytes)
        fail("%s: wgmma %s element (%d, %d) at shared address 0x%x (start 0x%x lbo %u sbo %u mode %d), outside the %zu bytes of dynamic shared memory "
             "(from 0x%x)", kernel_name, what, mn, k, addr, start, lbo, sbo, mode, smem_bytes, EMU_SMEM_WINDOW);
    uint16_t h;
    std::memcpy(&h, smem_async + (addr - EMU_SMEM_WINDOW), 2);
    return half_bits_to_float(bf16, h);
}

// A·B of the whole warpgroup: products of 16-bit inputs are exact, each sum of 16 is formed in double.
EMU_UNCHECKED static void wg_form(WgOp& op) {
    op.prod.assign(64 * (size_t)op.n, 0.0);
    std::vector<float> A(64 * 16), B(16 * (size_t)op.n);
    for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k) {
            if (op.a_regs) {
                int r = m % 16, lane = (r % 8) * 4 + (k % 8) / 2, reg = r / 8 + 2 * (k / 8);
                uint32_t v = op.a[(size_t)(32 * (m / 16) + lane) * 4 + reg];
                A[m * 16 + k] = half_bits_to_float(op.bf16, (k & 1) ? v >> 16 : v & 0xffff);
            } else {
                A[m * 16 + k] = wg_elem(op.bf16, op.adesc, op.trans_a, m, k, "A");
            }
        }
    for (int k = 0; k < 16; ++k)
        for (int j = 0; j < op.n; ++j) B[k * op.n + j] = wg_elem(op.bf16, op.bdesc, op.trans_b, j, k, "B");
    for (int m = 0; m < 64; ++m)
        for (int j = 0; j < op.n; ++j) {
            double acc = 0.0;
            for (int k = 0; k < 16; ++k) acc += (double)A[m * 16 + k] * (double)B[k * op.n + j];
            op.prod[(size_t)m * op.n + j] = acc;
        }
    op.formed = true;
}

EMU_UNCHECKED void wgmma_fence() { cur->wg_fenced = true; }
EMU_UNCHECKED void wgmma_commit() { ++cur->wg_group; }

EMU_UNCHECKED void wgmma(int n, bool bf16, float* d, const uint32_t* a, uint64_t adesc, uint64_t bdesc, bool scale_d,
                         bool trans_a, bool trans_b) {
    WarpGroup& g = groups[cur->warp / 4];
    if (g.size != 128 || g.live != 128)
        fail("%s: wgmma.mma_async in warpgroup %d with %d live threads (all 128 must issue it)", kernel_name, cur->warp / 4, g.live);
    if (n < 8 || n > 256 || n % 8) fail("%s: wgmma.mma_async with N = %d", kernel_name, n);
    if (!cur->wg_fenced)
        fail("%s: wgmma.mma_async without a wgmma.fence since thread %u's last wgmma.wait_group (or its start)", kernel_name, cur->tid.x);
    int t = (cur->warp % 4) * 32 + cur->lane;
    uint64_t* s = g.slot[t];
    for (int i = 0; i < 4; ++i) s[i] = a ? a[i] : 0;
    s[4] = a ? 0 : adesc;
    s[5] = bdesc;
    s[6] = (uint64_t)n | (uint64_t)bf16 << 16 | (uint64_t)(a != nullptr) << 17 | (uint64_t)trans_a << 18 |
           (uint64_t)trans_b << 19 | (uint64_t)scale_d << 20;
    s[7] = g.gen;  // the barrier generation this thread issues at
    group_barrier();
    TSAN_IGNORE_BEGIN();
    if (g.op_gen != g.gen) {  // the first thread past the barrier: one operation for the warpgroup
        // every thread must have issued at this generation (one that exited instead released the barrier
        // and left stale operands: a non-uniform wgmma)
        for (int u = 0; u < 128; ++u)
            if (g.slot[u][7] != g.gen - 1)
                fail("%s: thread %d of warpgroup %d did not issue this wgmma.mma_async (it exited or is elsewhere)",
                     kernel_name, u, cur->warp / 4);
        for (int u = 1; u < 128; ++u)
            for (int i = 4; i < 7; ++i)
                if (g.slot[u][i] != g.slot[0][i])
                    fail("%s: wgmma.mma_async operands differ between threads 0 and %d of warpgroup %d (word %d: 0x%llx vs 0x%llx)",
                         kernel_name, u, cur->warp / 4, i, (unsigned long long)g.slot[0][i], (unsigned long long)g.slot[u][i]);
        auto op = std::make_shared<WgOp>();
        op->n = n;
        op->bf16 = bf16;
        op->a_regs = a != nullptr;
        op->trans_a = trans_a;
        op->trans_b = trans_b;
        op->scale_d = scale_d;
        op->adesc = adesc;
        op->bdesc = bdesc;
        if (op->a_regs) {
            op->a.resize(128 * 4);
            for (int u = 0; u < 128; ++u)
                for (int i = 0; i < 4; ++i) op->a[u * 4 + i] = (uint32_t)g.slot[u][i];
        }
        if (eager_cp) wg_form(*op);
        g.op = op;
        g.op_gen = g.gen;
    }
    WgPending p;
    p.op = g.op;
    p.d = d;
    p.chained = false;
    for (auto& q : cur->wg)
        if (q.d == d) p.chained = true;
    if (!p.chained) p.snap.assign(d, d + n / 2);
    p.a = a;
    for (int i = 0; i < 4; ++i) p.a_snap[i] = a ? a[i] : 0;
    p.group = cur->wg_group;
    cur->wg.push_back(std::move(p));
    TSAN_IGNORE_END();
}

EMU_UNCHECKED void wgmma_wait(int n) {
    TSAN_IGNORE_BEGIN();
    {  // (the records' destructors run inside the ignored region)
        long upto = cur->wg_group - n;
        std::vector<WgPending> keep;
        int w = cur->warp % 4, l = cur->lane;
        for (auto& p : cur->wg) {
            if (p.group >= upto) {
                keep.push_back(std::move(p));
                continue;
            }
            WgOp& op = *p.op;
            if (!p.chained && std::memcmp(p.snap.data(), p.d, p.snap.size() * sizeof(float)) != 0)
                fail("%s: thread %u wrote its wgmma accumulator registers between wgmma.mma_async and wgmma.wait_group", kernel_name, cur->tid.x);
            if (p.a && std::memcmp(p.a_snap, p.a, sizeof p.a_snap) != 0)
                fail("%s: thread %u wrote its wgmma A-fragment registers between wgmma.mma_async and wgmma.wait_group", kernel_name, cur->tid.x);
            if (!op.formed) wg_form(op);
            for (int j = 0; j < op.n / 8; ++j)
                for (int i = 0; i < 4; ++i) {
                    int row = 16 * w + l / 4 + 8 * (i / 2), col = 8 * j + 2 * (l % 4) + i % 2;
                    float& dv = p.d[4 * j + i];
                    dv = (float)((op.scale_d ? (double)dv : 0.0) + op.prod[(size_t)row * op.n + col]);
                }
        }
        // a chained operation whose predecessors have all landed now starts from the accumulator as it stands:
        // from here on its registers must not change until its own wait either
        for (size_t i = 0; i < keep.size(); ++i) {
            if (!keep[i].chained) continue;
            bool after_another = false;
            for (size_t j = 0; j < i; ++j) after_another |= keep[j].d == keep[i].d;
            if (!after_another) {
                keep[i].chained = false;
                keep[i].snap.assign(keep[i].d, keep[i].d + keep[i].op->n / 2);
            }
        }
        cur->wg.swap(keep);
    }
    cur->wg_fenced = false;
    TSAN_IGNORE_END();
}

// ---- launching -----------------------------------------------------------------------------------------------
typedef void (*Thunk)(void* fn, const void* params, size_t bytes);
struct Entry {
    void* fn;
    Thunk thunk;
};
template <typename P> static void call(void (*f)(P), const void* params, size_t bytes) {
    if (bytes != sizeof(P)) fail("%s: parameter struct is %zu bytes here, %zu from the caller", kernel_name, sizeof(P), bytes);
    P p;
    std::memcpy(&p, params, sizeof(P));
    f(p);
}
template <typename P> static Entry entry(void (*f)(P)) {
    return Entry{(void*)f, [](void* fn, const void* params, size_t bytes) { call((void (*)(P))fn, params, bytes); }};
}

static Entry run_entry;
static const void* run_params;
static size_t run_bytes;

EMU_UNCHECKED static void fiber_main() {
    TSAN_ACQUIRE(&grid_sync);
    run_entry.thunk(run_entry.fn, run_params, run_bytes);
    // the thread exits: barriers now wait for one thread fewer
    cur->done = true;
    if (!cur->cp.empty()) cp_async_wait(0);
    if (!cur->wg.empty()) fail("%s: thread %u exited with a wgmma.mma_async in flight (no wgmma.wait_group for it)", kernel_name, cur->tid.x);
    Warp& w = warps[cur->warp];
    --w.live;
    if (w.live > 0 && w.arrived == w.live) {
        w.arrived = 0;
        ++w.gen;
    }
    WarpGroup& wg = groups[cur->warp / 4];
    --wg.live;
    if (wg.live > 0 && wg.arrived == wg.live) {
        wg.arrived = 0;
        ++wg.gen;
    }
    --block_live;
    if (block_live > 0 && block_arrived == block_live) {
        block_arrived = 0;
        ++block_gen;
    }
    TSAN_RELEASE(&grid_sync);  // everything this thread did, for the threads of later blocks and launches
#if EMU_TSAN
    to_fiber(sched_tsan);
#endif
    exit_to_scheduler();
}

// (a plain assignment in the scheduler's lambda would be instrumented: kernel code reads `cur` for threadIdx)
EMU_UNCHECKED static void set_cur(Fiber* f) { cur = f; }

EMU_UNCHECKED static void run_block(size_t stack_bytes) {
    TSAN_ACQUIRE(&grid_sync);  // the previous block's threads are done with the fibers, shared memory, ...
    unsigned n = block_dim.x * block_dim.y * block_dim.z;
    int nw = (int)((n + 31) / 32);
    warps.assign(nw, Warp{});
    for (int i = 0; i < nw; ++i) warps[i].live = warps[i].size = (int)std::min(32u, n - 32 * i);
    int ng = (nw + 3) / 4;
    groups.assign(ng, WarpGroup{});
    for (int i = 0; i < ng; ++i) {
        groups[i].live = groups[i].size = (int)std::min(128u, n - 128 * i);
        for (auto& sl : groups[i].slot) sl[7] = ~0ull;  // no generation issued yet
    }
    block_live = (int)n;
    block_arrived = 0;
    std::memset(smem_base, 0xff, smem_bytes);  // NaN in every float/bf16/f16 view
    std::memset(smem_async, 0xff, smem_bytes);
#if EMU_TSAN
    warp_sync.assign(nw, {});
    group_sync.assign(ng, {});
    sched_tsan = __tsan_get_current_fiber();
#endif
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
#if EMU_TSAN
        if (f.tsan) __tsan_destroy_fiber(f.tsan);
        f.tsan = __tsan_create_fiber(0);
#endif
        f.tid = dim3{i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        f.lane = (int)(i % 32);
        f.warp = (int)(i / 32);
        f.done = false;
        f.wait = 0;
        f.group = 0;
        f.started = false;
        f.cp.clear();
        f.wg_group = 0;
        f.wg_fenced = false;
        f.wg.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = stack_bytes;
        f.ctx.uc_link = &sched_ctx;
        makecontext(&f.ctx, fiber_main, 0);
    }
    TSAN_RELEASE(&grid_sync);  // ... and this block's threads start after the set-up above
    // Scheduling: EMU_SCHED=rr resumes every runnable thread in turn (warps advance in lockstep); warp (the
    // default) and rwarp run one warp — lowest or highest index first — as far as it can go, i.e. until all
    // its lanes wait at a block barrier or have exited, before the next: a warp that reaches shared memory
    // another warp has not finished reading, or reads what another has not written yet, does so here.
    auto runnable = [&](Fiber& f) {
        if (f.done) return false;
        if (f.wait == 1 && warps[f.warp].gen == f.wait_gen) return false;
        if (f.wait == 2 && block_gen == f.wait_gen) return false;
        if (f.wait == 3 && groups[f.warp / 4].gen == f.wait_gen) return false;
        return true;
    };
    auto resume = [&](Fiber& f) {
        f.wait = 0;
        set_cur(&f);
#if EMU_TSAN
        to_fiber(f.tsan);
#endif
        enter(f);
    };
    for (;;) {
        bool any_live = false, progressed = false;
        if (sched == 0) {
            for (unsigned i = 0; i < n; ++i) {
                any_live |= !fibers[i].done;
                if (runnable(fibers[i])) {
                    progressed = true;
                    resume(fibers[i]);
                }
            }
        } else {
            for (int k = 0; k < nw; ++k) {
                int wi = sched == 1 ? k : nw - 1 - k;
                unsigned lo = 32 * wi, hi = std::min(n, lo + 32);
                for (bool again = true; again;) {
                    again = false;
                    for (unsigned i = lo; i < hi; ++i)
                        if (runnable(fibers[i])) {
                            again = progressed = true;
                            resume(fibers[i]);
                        }
                }
                for (unsigned i = lo; i < hi; ++i) any_live |= !fibers[i].done;
            }
        }
        if (!any_live) break;
        if (!progressed) {
            std::string who;
            for (unsigned i = 0; i < n && who.size() < 400; ++i)
                if (!fibers[i].done)
                    who += " t" + std::to_string(i) + (fibers[i].wait == 1 ? "@warp" : fibers[i].wait == 3 ? "@warpgroup" : "@block");
            fail("%s: deadlock — no thread can pass its barrier; live threads:%s", kernel_name, who.c_str());
        }
    }
}

EMU_UNCHECKED static void launch(const Entry& e, const char* name, dim3 grid, dim3 block, size_t smem, const void* params, size_t bytes) {
    TSAN_ACQUIRE(&grid_sync);
    kernel_name = name;
    grid_dim = grid;
    block_dim = block;
    unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024) fail("%s: %u threads per block", name, n);
    const size_t stack_bytes = 256 * 1024;
    fibers.assign(n, Fiber{});
    std::vector<char> stacks((size_t)n * stack_bytes);
    for (unsigned i = 0; i < n; ++i) fibers[i].stack = stacks.data() + (size_t)i * stack_bytes;
    // exactly `smem` bytes, 16-byte aligned (under -fsanitize=address a read past them is reported)
    smem_base = (unsigned char*)::operator new[](smem ? smem : 1, std::align_val_t(16));
    smem_bytes = smem;
    smem_async = (unsigned char*)::operator new[](smem ? smem : 1, std::align_val_t(16));
    run_entry = e;
    run_params = params;
    run_bytes = bytes;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = dim3{x, y, z};
                run_block(stack_bytes);
            }
    TSAN_ACQUIRE(&grid_sync);  // the last block's threads are done
#if EMU_TSAN
    for (auto& f : fibers)
        if (f.tsan) __tsan_destroy_fiber(f.tsan);
#endif
    fibers.clear();
    ::operator delete[](smem_base, std::align_val_t(16));
    ::operator delete[](smem_async, std::align_val_t(16));
    smem_base = smem_async = nullptr;
}

}  // namespace emu

#define EMU_KERNEL(name) {#name, ::emu::entry(&name)},
static const std::map<std::string, emu::Entry> REGISTRY = {
#include EMU_REGISTRY
};

template <typename V> static V rd(FILE* f) {
    V v;
    if (std::fread(&v, sizeof(V), 1, f) != 1) emu::fail("script truncated");
    return v;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s SCRIPT OUT\n", argv[0]);
        return 2;
    }
    const char* mode = std::getenv("EMU_CP_ASYNC");
    emu::eager_cp = mode && std::string(mode) == "eager";
    const char* sch = std::getenv("EMU_SCHED");
    std::string sc = sch ? sch : "warp";
    if (sc == "rr")
        emu::sched = 0;
    else if (sc == "warp")
        emu::sched = 1;
    else if (sc == "rwarp")
        emu::sched = 2;
    else
        emu::fail("EMU_SCHED=%s: expected rr, warp or rwarp", sch);
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) emu::fail("cannot open %s", argv[1]);
    char magic[8];
    if (std::fread(magic, 1, 8, f) != 8 || std::memcmp(magic, "BQEMU2\0\0", 8) != 0) emu::fail("%s: not an emulator script", argv[1]);
    uint32_t nbuf = rd<uint32_t>(f);
    std::vector<uint32_t> flags(nbuf);
    for (uint32_t i = 0; i < nbuf; ++i) {
        uint64_t n = rd<uint64_t>(f);
        flags[i] = rd<uint32_t>(f);
        // exactly n bytes, 16-byte aligned like a device allocation (under -fsanitize=address an access past
        // the end is reported)
        auto p = (unsigned char*)::operator new[](n ? n : 1, std::align_val_t(16));
        if (n && std::fread(p, 1, n, f) != n) emu::fail("script truncated in a buffer");
        emu::globals.push_back({p, n});
    }
    TSAN_RELEASE(&emu::grid_sync);  // the buffers as read from the script, before any kernel thread
    // a fake device address → the real one
    auto patch = [&](unsigned char* at, const char* what, size_t o) {
        uint64_t w;
        std::memcpy(&w, at, 8);
        if (w >> 60 != 0xB) return;
        uint64_t bi = (w >> 36) & 0xFFFFFF, off = w & ((1ull << 36) - 1);
        if (bi >= nbuf || off > emu::globals[bi].second)
            emu::fail("%s: word at byte %zu names buffer %llu + %llu", what, o, (unsigned long long)bi, (unsigned long long)off);
        uint64_t real = (uint64_t)(uintptr_t)(emu::globals[bi].first + off);
        std::memcpy(at, &real, 8);
    };
    for (uint32_t i = 0; i < nbuf; ++i)
        if (flags[i] & 1)
            for (size_t o = 0; o + 8 <= emu::globals[i].second; o += 8) patch((unsigned char*)emu::globals[i].first + o, "table", o);
    uint32_t nl = rd<uint32_t>(f);
    for (uint32_t li = 0; li < nl; ++li) {
        std::string name(rd<uint32_t>(f), '\0');
        if (std::fread(name.data(), 1, name.size(), f) != name.size()) emu::fail("script truncated in a name");
        dim3 grid{rd<uint32_t>(f), rd<uint32_t>(f), rd<uint32_t>(f)};
        dim3 block{rd<uint32_t>(f), rd<uint32_t>(f), rd<uint32_t>(f)};
        uint32_t smem = rd<uint32_t>(f);
        std::vector<unsigned char> params(rd<uint32_t>(f));
        if (std::fread(params.data(), 1, params.size(), f) != params.size()) emu::fail("script truncated in parameters");
        for (size_t o = 0; o + 8 <= params.size(); o += 8) patch(&params[o], name.c_str(), o);
        auto it = REGISTRY.find(name);
        if (it == REGISTRY.end()) emu::fail("no kernel %s in this module", name.c_str());
        emu::launch(it->second, name.c_str(), grid, block, smem, params.data(), params.size());
    }
    std::fclose(f);
    TSAN_ACQUIRE(&emu::grid_sync);  // every kernel thread's writes
    FILE* o = std::fopen(argv[2], "wb");
    if (!o) emu::fail("cannot write %s", argv[2]);
    for (auto& [p, n] : emu::globals) {
        uint64_t nn = n;
        std::fwrite(&nn, 8, 1, o);
        std::fwrite(p, 1, n, o);
    }
    std::fclose(o);
    for (auto& [p, n] : emu::globals) ::operator delete[]((void*)p, std::align_val_t(16));
    return 0;
}
