// Shared machinery of the sm_90a (Hopper) kernels: item_loglik_fused_v3.cu and
// nearest_tc_v3.cu. NVRTC gets no include files (the binary embeds the sources), so the Rust
// side compiles this text followed by the kernel's own file (sources.rs, `sm90a_source`);
// jobs/sim/ptxas_report.py does the same.
//
// The main loop these kernels share: a block of 2 warpgroups (256 threads) computes a
// 128-row x 256-column tile C = A B^T over the depth, A [rows, d] and B [cols, d] both 16-bit
// and K-major (d contiguous), in 64-deep steps:
//   - global -> shared by cp.async.cg (16 B, L2 only) into a ring of WG_STAGES stages; a
//     stage holds A (128 rows x 128 B) then B (256 rows x 128 B); chunk c (16 B) of row r is
//     stored at chunk c ^ (r & 7), which with 1024-byte aligned tiles is exactly wgmma's
//     128-byte swizzle for K-major operands (address bits [4:6] XOR bits [7:9]);
//   - wgmma.mma_async.m64n256k16 (f32 accumulate) from shared-memory descriptors (stride
//     1024 B per 8-row group, 128-byte swizzle; the k-th 16-deep slice of a stage starts 32 k
//     bytes past the tile base and the hardware applies the XOR); warpgroup w multiplies A
//     rows [64 w, 64 w + 64) by all 256 B rows; 128 f32 accumulators per thread: acc[4 j + 2 h
//     + e] is row 16 (warp % 4) + (lane / 4) + 8 h, column 8 j + 2 (lane % 4) + e of the
//     warpgroup's 64 x 256 tile;
//   - copies run WG_STAGES - 2 steps ahead: step s waits for its copies (cp.async.wait_group
//     1), fences them into the async proxy (fence.proxy.async), __syncthreads (all copies of
//     step s visible; both warpgroups retired the products of step s - 2, whose stage the
//     copies of step s + 2 overwrite next), issues those copies, the 4 wgmma of step s,
//     commits, and waits until step s - 1's products are retired (wgmma.wait_group 1).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WG_BM 128
#define WG_BN 256
#define WG_BK 64
#ifndef WG_STAGES
#define WG_STAGES 4
#endif
#define WG_THREADS 256
#define WG_NACC 128
#define WG_A_BYTES (WG_BM * WG_BK * 2)
#define WG_B_BYTES (WG_BN * WG_BK * 2)
#define WG_STAGE_BYTES (WG_A_BYTES + WG_B_BYTES)
#define WG_AHEAD (WG_STAGES - 2)
// The ring plus 1 KB to align it to 1024 B.
#define WG_RING_BYTES (WG_STAGES * WG_STAGE_BYTES + 1024)

static_assert(WG_STAGES >= 3, "copies run STAGES - 2 steps ahead");
static_assert(WG_STAGE_BYTES % 1024 == 0 && WG_A_BYTES % 1024 == 0, "1024-aligned tiles");

__device__ __forceinline__ u32 wg_smem_addr(const void *p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, bypassing L1; src_bytes = 0 reads nothing and writes 16 zeros.
__device__ __forceinline__ void wg_cp_async16(u32 dst, const void *src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void wg_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
// Generic-proxy writes (the cp.async copies) made visible to the async proxy (wgmma's reads).
__device__ __forceinline__ void wg_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void wg_mma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_mma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_mma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Pin the accumulators after a wait: reads cannot be hoisted above it (as CUTLASS's
// warpgroup_fence_operand). Only after wait_group 0: touching registers of an in-flight wgmma
// makes ptxas serialise (it injects a wait).
__device__ __forceinline__ void wg_fence_acc(float (&d)[WG_NACC]) {
#pragma unroll
    for (int i = 0; i < WG_NACC; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: start address
// >> 4 (bits 0-13), leading byte offset (unused for swizzled K-major: 1), stride byte offset
// 1024 >> 4 (bits 32-45: the next 8-row group), layout type 1 = 128-byte swizzle (bits 62-63).
__device__ __forceinline__ u64 wg_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) |
           ((u64)1 << 62);
}

// D[64 x 256] (+)= A[64 x 16] B[16 x 256]: both operands K-major in shared memory; scale_d = 0
// starts from zero. BF16: bf16 inputs, else f16.
template <bool BF16>
__device__ __forceinline__ void wg_mma(float (&d)[WG_NACC], u64 da, u64 db, u32 scale_d) {
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
            "%128, %129, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
            : "l"(da), "l"(db), "r"(scale_d));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
            "%128, %129, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
            : "l"(da), "l"(db), "r"(scale_d));
    }
}

__device__ __forceinline__ u32 wg_swz(int r, int ch) {
    return (u32)(r * (WG_BK * 2) + ((ch ^ (r & 7)) << 4));
}

// The copies of one step into the stage at shared address `stage`: chunk (tid & 7) of A rows
// (tid >> 3) + 32 i, i < 4, and of B rows (tid >> 3) + 32 i, i < 8. `a_src`/`b_src` point at
// that chunk of the thread's first A / B row of the tile, `stride32` = 32 rows; rows past the
// matrix (a_rows_left / b_rows_left <= 32 i) and depth past d (!k_ok) are zero-filled
// (src-size 0: nothing read from the clamped address `a_any` / `b_any`).
__device__ __forceinline__ void wg_load_step(u32 stage, const u16 *a_src, const u16 *b_src,
                                             const u16 *a_any, const u16 *b_any, u64 stride32,
                                             int a_rows_left, int b_rows_left, int k0,
                                             bool k_ok, int tid) {
    const u32 dst = stage + wg_swz(tid >> 3, tid & 7);
#pragma unroll
    for (int i = 0; i < WG_BM / 32; ++i) {
        const bool ok = k_ok && 32 * i < a_rows_left;
        wg_cp_async16(dst + i * 32 * (WG_BK * 2), ok ? a_src + i * stride32 + k0 : a_any,
                      ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < WG_BN / 32; ++i) {
        const bool ok = k_ok && 32 * i < b_rows_left;
        wg_cp_async16(dst + WG_A_BYTES + i * 32 * (WG_BK * 2),
                      ok ? b_src + i * stride32 + k0 : b_any, ok ? 16u : 0u);
    }
}

// The main loop's producer side: where the next copies come from, advanced step by step
// across the tiles x k-steps (the matrix bases, d and the step count stay kernel parameters or
// loop constants, not loader state: registers are scarce next to 128 accumulators).
struct WgLoader {
    const u16 *a_src, *b_src;  // chunk (tid & 7) of the thread's first A / B row of the tile
    int a_rows_left, b_rows_left, kt;
};

__device__ __forceinline__ WgLoader wg_loader(const u16 *__restrict__ a, const u16 *__restrict__ b,
                                              int a_rows, int b_rows, int d, int row0,
                                              int t_begin, int tid) {
    WgLoader L;
    const int r = tid >> 3;
    L.a_src = a + (u64)(row0 + r) * (u64)d + (tid & 7) * 8;
    L.b_src = b + (u64)(t_begin * WG_BN + r) * (u64)d + (tid & 7) * 8;
    L.a_rows_left = a_rows - row0 - r;
    L.b_rows_left = b_rows - t_begin * WG_BN - r;
    L.kt = 0;
    return L;
}

// Issue the copies of the loader's current step into `stage` and advance it.
__device__ __forceinline__ void wg_load_next(WgLoader &L, const u16 *__restrict__ a,
                                             const u16 *__restrict__ b, int d, int ksteps,
                                             u32 stage, int tid) {
    const int k0 = L.kt * WG_BK;
    wg_load_step(stage, L.a_src, L.b_src, a, b, 32ull * (u64)d, L.a_rows_left, L.b_rows_left,
                 k0, k0 + (tid & 7) * 8 < d, tid);
    if (++L.kt == ksteps) {
        L.kt = 0;
        L.b_rows_left -= WG_BN;
        L.b_src += (u64)WG_BN * (u64)d;
    }
}

// The main loop over tiles [t_begin, t_end) of B (256 rows each) against the 128 A rows from
// row0, calling epi(acc, tile) after the last depth step of each tile (all products retired,
// acc as described above; the next tile starts from zero). `smem` is the 1024-aligned ring.
template <bool BF16, typename Epi>
__device__ __forceinline__ void wg_main_loop(u32 smem, const u16 *__restrict__ a,
                                             const u16 *__restrict__ b, int a_rows, int b_rows,
                                             int d, int row0, int t_begin, int t_end,
                                             Epi &&epi) {
    const int tid = threadIdx.x, wg = tid >> 7;
    const int ksteps = (d + WG_BK - 1) / WG_BK;
    const int total = (t_end - t_begin) * ksteps;
    WgLoader L = wg_loader(a, b, a_rows, b_rows, d, row0, t_begin, tid);
    int st_write = 0;
#pragma unroll
    for (int p = 0; p < WG_AHEAD; ++p) {
        if (p < total) wg_load_next(L, a, b, d, ksteps, smem + st_write * WG_STAGE_BYTES, tid);
        wg_cp_async_commit();
        st_write = st_write + 1 == WG_STAGES ? 0 : st_write + 1;
    }
    const u32 a_base = smem + wg * 64 * (WG_BK * 2);
    const u32 b_base = smem + WG_A_BYTES;
    float acc[WG_NACC];
#pragma unroll
    for (int i = 0; i < WG_NACC; ++i) acc[i] = 0.f;
    int st_read = 0, tile = t_begin, kt = 0;
    for (int s = 0; s < total; ++s) {
        wg_cp_async_wait<WG_AHEAD - 1>();
        wg_fence_proxy_async();
        __syncthreads();
        if (s + WG_AHEAD < total)
            wg_load_next(L, a, b, d, ksteps, smem + st_write * WG_STAGE_BYTES, tid);
        wg_cp_async_commit();
        st_write = st_write + 1 == WG_STAGES ? 0 : st_write + 1;

        const u32 off = st_read * WG_STAGE_BYTES;
        wg_mma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk)
            wg_mma<BF16>(acc, wg_desc(a_base + off + kk * 32), wg_desc(b_base + off + kk * 32),
                         (kt > 0 || kk > 0) ? 1u : 0u);
        wg_mma_commit();
        wg_mma_wait<1>();
        st_read = st_read + 1 == WG_STAGES ? 0 : st_read + 1;

        if (++kt == ksteps) {
            wg_mma_wait<0>();
            wg_fence_acc(acc);
            epi(acc, tile);
            kt = 0;
            ++tile;
        }
    }
    wg_mma_wait<0>();  // every tile ended in a wait already; says so to ptxas
    wg_cp_async_wait<0>();
}

// ---- v4: the same tile with the two warpgroups staggered (benchmark/opt-in, not the default)
//
// v3's warpgroups run in lockstep (one __syncthreads per step), so both run their epilogue at
// the same time and the tensor cores wait (18% of the time at d = 576). Here each warpgroup
// has its own ring of A slots (its 64 rows) and its own named barrier; the B tile (256 rows)
// is shared through a ring of WG4_NB slots guarded by mbarriers: warpgroup 0 copies B and
// signals "full" with cp.async.mbarrier.arrive (its 128 threads); every warp signals "empty"
// once the step's products retired; warpgroup 0 waits "empty" before refilling a slot.
// Warpgroup 1 starts WG4_LAG steps late (an mbarrier "go"), so while one warpgroup runs its
// epilogue the other keeps the tensor cores busy; the B ring lets it lag by up to
// WG4_NB - WG_AHEAD - 1 steps.

#ifndef WG4_NB
#define WG4_NB 5
#endif
#define WG4_NA 4
#define WG4_LAG 1
#define WG4_A_SLOT (64 * WG_BK * 2)
#define WG4_A_OFF (WG4_NB * WG_B_BYTES)
#define WG4_BAR_OFF (WG4_A_OFF + 2 * WG4_NA * WG4_A_SLOT)
// B ring, 2 A rings, 2 x WG4_NB + 1 mbarriers (padded to 128 B), 1 KB of alignment slack.
#define WG4_SMEM (WG4_BAR_OFF + 128 + 1024)
static_assert(2 * WG4_NB + 1 <= 16, "mbarriers fit in 128 B");
static_assert(WG4_NB >= WG_AHEAD + 2 && WG4_NA >= WG_AHEAD + 2, "ring depths");

__device__ __forceinline__ void wg_mbar_init(u32 addr, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(addr), "r"(count) : "memory");
}
__device__ __forceinline__ void wg_mbar_arrive(u32 addr) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n"
                 :: "r"(addr) : "memory");
}
// Arrive once every cp.async this thread issued so far has landed (the count was set for it).
__device__ __forceinline__ void wg_cp_async_mbar_arrive(u32 addr) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(addr) : "memory");
}
// Wait until the phase with this parity has completed.
__device__ __forceinline__ void wg_mbar_wait(u32 addr, u32 parity) {
    asm volatile("{\n.reg .pred P1;\nLAB_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
                 "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n"
                 :: "r"(addr), "r"(parity) : "memory");
}
// Named barrier for one warpgroup (ids 1, 2; __syncthreads is 0).
__device__ __forceinline__ void wg_bar_sync_group(int wg) {
    asm volatile("bar.sync %0, 128;\n" :: "r"(1 + wg) : "memory");
}

template <bool BF16, typename Epi>
__device__ __forceinline__ void wg_main_loop_staggered(u32 smem, const u16 *__restrict__ a,
                                                       const u16 *__restrict__ b, int a_rows,
                                                       int b_rows, int d, int row0,
                                                       int t_begin, int t_end, Epi &&epi) {
    const int tid = threadIdx.x, wg = tid >> 7, tw = tid & 127, lane = tid & 31;
    const int ksteps = (d + WG_BK - 1) / WG_BK;
    const int total = (t_end - t_begin) * ksteps;
    const u32 full0 = smem + WG4_BAR_OFF, empty0 = full0 + 8 * WG4_NB, go = empty0 + 8 * WG4_NB;
    if (tid == 0) {
        for (int s = 0; s < WG4_NB; ++s) {
            wg_mbar_init(full0 + 8 * s, 128);  // warpgroup 0's threads, via cp.async
            wg_mbar_init(empty0 + 8 * s, 8);   // one arrival per warp
        }
        wg_mbar_init(go, 1);
    }
    __syncthreads();

    const u32 a_ring = smem + WG4_A_OFF + wg * (WG4_NA * WG4_A_SLOT);
    const int r = tw >> 3, ch = tw & 7;
    const u32 swz = (u32)(r * (WG_BK * 2) + ((ch ^ (r & 7)) << 4));
    const u64 stride16 = 16ull * (u64)d;
    const u16 *a_src = a + (u64)(row0 + 64 * wg + r) * (u64)d + ch * 8;
    const int a_left = a_rows - row0 - 64 * wg - r;
    const u16 *b_src = b + (u64)(t_begin * WG_BN + r) * (u64)d + ch * 8;
    int b_left = b_rows - t_begin * WG_BN - r;
    int ld_kt = 0;
    // Copies of step j (issued in step order): this warpgroup's A rows; warpgroup 0 also B.
    auto load = [&](int j) {
        const int k0 = ld_kt * WG_BK;
        const bool k_ok = k0 + ch * 8 < d;
        const u32 dst_a = a_ring + (u32)(j % WG4_NA) * WG4_A_SLOT + swz;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const bool ok = k_ok && 16 * i < a_left;
            wg_cp_async16(dst_a + i * 16 * (WG_BK * 2), ok ? a_src + i * stride16 + k0 : a,
                          ok ? 16u : 0u);
        }
        if (wg == 0) {
            const u32 dst_b = smem + (u32)(j % WG4_NB) * WG_B_BYTES + swz;
#pragma unroll
            for (int i = 0; i < WG_BN / 16; ++i) {
                const bool ok = k_ok && 16 * i < b_left;
                wg_cp_async16(dst_b + i * 16 * (WG_BK * 2), ok ? b_src + i * stride16 + k0 : b,
                              ok ? 16u : 0u);
            }
            wg_cp_async_mbar_arrive(full0 + 8 * (j % WG4_NB));
        }
        if (++ld_kt == ksteps) {
            ld_kt = 0;
            b_left -= WG_BN;
            b_src += (u64)WG_BN * (u64)d;
        }
    };

#pragma unroll
    for (int p = 0; p < WG_AHEAD; ++p) {
        if (p < total) load(p);
        wg_cp_async_commit();
    }
    if (wg == 1) wg_mbar_wait(go, 0);

    float acc[WG_NACC];
#pragma unroll
    for (int i = 0; i < WG_NACC; ++i) acc[i] = 0.f;
    int tile = t_begin, kt = 0;
    for (int s = 0; s < total; ++s) {
        wg_cp_async_wait<WG_AHEAD - 1>();
        wg_fence_proxy_async();
        // This warpgroup's copies of step s are visible to it, and its products of step s - 2
        // retired (the A slot refilled next).
        wg_bar_sync_group(wg);
        if (s + WG_AHEAD < total) {
            const int j = s + WG_AHEAD;
            // Both warpgroups released the B slot's previous step (j - WG4_NB).
            if (wg == 0 && j >= WG4_NB) wg_mbar_wait(empty0 + 8 * (j % WG4_NB), ((j / WG4_NB) - 1) & 1);
            load(j);
        }
        wg_cp_async_commit();
        wg_mbar_wait(full0 + 8 * (s % WG4_NB), (s / WG4_NB) & 1);  // B of step s landed
        wg_fence_proxy_async();
        const u32 off_a = (u32)(s % WG4_NA) * WG4_A_SLOT, off_b = (u32)(s % WG4_NB) * WG_B_BYTES;
        wg_mma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk)
            wg_mma<BF16>(acc, wg_desc(a_ring + off_a + kk * 32), wg_desc(smem + off_b + kk * 32),
                         (kt > 0 || kk > 0) ? 1u : 0u);
        wg_mma_commit();
        wg_mma_wait<1>();
        // Step s - 1's products retired: its B slot may be refilled as far as this warp goes.
        if (s >= 1 && lane == 0) wg_mbar_arrive(empty0 + 8 * ((s - 1) % WG4_NB));
        if (wg == 0 && tw == 0 && s == WG4_LAG - 1) wg_mbar_arrive(go);
        if (++kt == ksteps) {
            wg_mma_wait<0>();
            wg_fence_acc(acc);
            epi(acc, tile);
            kt = 0;
            ++tile;
        }
    }
    if (wg == 0 && tw == 0 && total < WG4_LAG) wg_mbar_arrive(go);  // never leave it waiting
    wg_mma_wait<0>();
    wg_cp_async_wait<0>();
}

// ---- v5: warp-specialised (a TMA producer warpgroup, two consumer warpgroups; opt-in)
//
// v3 and v4 make the consumers issue their own copies (cp.async, 8-16 per thread per step,
// plus the address arithmetic) and, in v4, make warpgroup 0 wait for warpgroup 1 before it
// may refill a slot, so neither overlaps one warpgroup's epilogue with the other's products
// for long. Here a third warpgroup (threads 0-127; one thread works) streams each step's A
// (128 rows) and B (256 rows) tiles with two TMA copies (cp.async.bulk.tensor, 128-byte
// swizzle: the same layout as wg_swz, written by the copy engine) into a ring of WG5_STAGES
// slots: `full[s]` (count 1: the producer's arrive.expect_tx, completed by the copies' bytes)
// and `empty[s]` (count 8: lane 0 of each consumer warp once the step's products retired).
// Consumer warpgroup c (threads 128 + 128 c ..) multiplies A rows [64 c, 64 c + 64) by the 256
// B rows, exactly as v3's warpgroup c, and waits only for `full`: while one runs its epilogue
// the other has the tensor cores to itself, up to WG5_STAGES - 1 steps ahead (the producer,
// not a consumer, waits for the slower one). setmaxnreg moves registers from the producer to
// the consumers (128 x 40 + 256 x 232 <= 64K). The ring protocol is modelled in
// jobs/sim/ws_ring.py (random interleavings: no deadlock, no stale or overwritten slot).

#define WG5_THREADS 384
// The ring's depth; 4 by default (launch.rs's FUSED5_SMEM / NTC5_SMEM are sized for 4, so a
// build with fewer stages (-DWG5_STAGES=3, nearest_tc_v3.cu's NT3_RECORDS_SMEM) fits the
// same launch).
#ifndef WG5_STAGES
#define WG5_STAGES 4
#endif
static_assert(WG5_STAGES >= 2 && WG5_STAGES <= 4, "the ring and the launch's shared memory");
#define WG5_BAR_OFF (WG5_STAGES * WG_STAGE_BYTES)
// The ring, 2 x WG5_STAGES mbarriers (padded to 128 B), 1 KB of alignment slack.
#define WG5_SMEM (WG5_BAR_OFF + 128 + 1024)
#ifndef WG5_PRODUCER_REGS
#define WG5_PRODUCER_REGS 40
#endif
#ifndef WG5_CONSUMER_REGS
#define WG5_CONSUMER_REGS 232
#endif
static_assert(2 * WG5_STAGES <= 16, "mbarriers fit in 128 B");
static_assert(128 * WG5_PRODUCER_REGS + 256 * WG5_CONSUMER_REGS <= 65536, "register file");

// A driver tensor map (CUtensorMap: 128 opaque bytes), passed by value as a __grid_constant__
// kernel parameter; crates/kernels/src/cuda.rs encodes it (cuTensorMapEncodeTiled).
struct __align__(64) WgTensorMap {
    u64 opaque[16];
};

__device__ __forceinline__ void wg_mbar_expect_tx(u32 addr, u32 bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n"
                 :: "r"(addr), "r"(bytes) : "memory");
}
// mbarrier initialisation made visible to the async proxy (the copy engine's complete_tx).
__device__ __forceinline__ void wg_fence_mbar_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// The 2-d box at (inner coordinate c0, row c1) of `map` into shared `dst`; its bytes complete
// the transaction of mbarrier `mbar`. Out-of-range elements are written as zeros.
__device__ __forceinline__ void wg_tma_load_2d(u32 dst, const WgTensorMap *map, int c0, int c1,
                                               u32 mbar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n"
        :: "r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(mbar)
        : "memory");
}
template <int N>
__device__ __forceinline__ void wg_setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N));
}
template <int N>
__device__ __forceinline__ void wg_setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N));
}

#ifndef WG5_HANG_SPINS
#define WG5_HANG_SPINS (1u << 22)
#endif
__device__ __forceinline__ bool wg_mbar_try_wait(u32 addr, u32 parity) {
    u32 ok;
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(ok) : "r"(addr), "r"(parity) : "memory");
    return ok != 0;
}
// v5's barrier wait. With -DWG5_HANG_CHECK (LLM4DSR_WG5_HANG_CHECK=1: how the GPU check
// diagnoses a v5 that hung) a wait gives up after WG5_HANG_SPINS tries and prints which
// barrier, step and thread it was (the results are then wrong, but the kernel ends and the
// lines reach stdout at the next synchronisation).
__device__ __forceinline__ void wg5_wait(u32 addr, u32 parity, const char *who, int step) {
#ifdef WG5_HANG_CHECK
    for (u32 i = 0; i < WG5_HANG_SPINS; ++i)
        if (wg_mbar_try_wait(addr, parity)) return;
    if ((threadIdx.x & 127) == 0)  // one line per warpgroup
        printf("wg5 hang: block (%u, %u) thread %u: %s barrier at smem 0x%x, parity %u, step %d\n",
               blockIdx.x, blockIdx.y, threadIdx.x, who, addr, parity, step);
#else
    (void)who;
    (void)step;
    wg_mbar_wait(addr, parity);
#endif
}

// ---- v6: v5 on a cluster of WG6_CLUSTER = 2 blocks (adjacent along the grid's x: the two
// row / query blocks of one slice) with the B tile multicast. In v5 every block copies its
// own 48 KB per step from L2; at ~80% of the tensor-core floor that is ~7 TB/s over 132 SMs,
// where the L2 serves about that much. Here both blocks of a cluster need the same B tile:
// block r of the pair copies rows [128 r, 128 r + 128) of it (16 KB) with
// `.multicast::cluster` into the same offset of both blocks' slot, completing the
// transaction on both blocks' `full` barrier (same offset too), so each block still
// receives 48 KB per step (A 16 KB of its own, B from itself and its peer) while reading
// 32 KB from L2. A slot may be refilled only when BOTH blocks' consumers released it (the
// peer writes into it): `empty` counts 8 x WG6_CLUSTER warps, and each consumer warp
// arrives on its own block's and its peer's barrier (`mapa` + a remote
// `mbarrier.arrive.shared::cluster`). The barriers are initialised and fenced before a
// cluster-wide barrier; the producer ends with a tail (it waits until both blocks released
// every slot) and no thread of either block exits before a last cluster-wide barrier (a
// peer may still arrive on this block's barriers until then). The kernels carry
// `__cluster_dims__(2, 1, 1)`, so a plain launch forms the pairs; the plans pad the grid's
// x to an even count (the padding block's rows lie past the problem: zeros from the tensor
// map's bounds, no output). The protocol is modelled in jobs/sim/ws_ring.py (its cl = 2
// runs).
#define WG6_CLUSTER 2

__device__ __forceinline__ u32 wg_cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
// Every thread of the cluster's blocks (release / acquire: shared memory writes and
// barrier operations before it are visible to the cluster after it).
__device__ __forceinline__ void wg_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// Arrive on the mbarrier at shared offset `addr` of block `rank` of the cluster. The default
// semantics (release at CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id): what it
// orders is this warp's wgmma reads of the slot, already retired by wgmma.wait_group, before
// the peer's copy into it. An explicit `.release.cluster` costs a MEMBAR.ALL.GPU per
// arrival in the SASS (twice per step and warp here).
__device__ __forceinline__ void wg_mbar_arrive_cluster(u32 addr, u32 rank) {
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
                 "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n"
                 :: "r"(addr), "r"(rank) : "memory");
}
// The 2-d box at (c0, c1) of `map` into shared `dst` of every block in `mask` (the same
// offset in each), completing the transaction of the mbarrier at offset `mbar` in each.
__device__ __forceinline__ void wg_tma_load_2d_multicast(u32 dst, const WgTensorMap *map, int c0,
                                                         int c1, u32 mbar, unsigned short mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n"
        :: "r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(mbar), "h"(mask)
        : "memory");
}

// All 384 threads: initialise the ring's barriers (before any role runs). CL blocks per
// cluster (1: v5, 2: v6): `empty` counts the consumer warps of all of them, and the barriers
// are visible to the peer before anyone copies into or arrives on them.
template <int CL = 1>
__device__ __forceinline__ void wg5_init(u32 smem) {
    const u32 full0 = smem + WG5_BAR_OFF, empty0 = full0 + 8 * WG5_STAGES;
    if (threadIdx.x == 0) {
        for (int s = 0; s < WG5_STAGES; ++s) {
            wg_mbar_init(full0 + 8 * s, 1);        // the producer's arrive.expect_tx
            wg_mbar_init(empty0 + 8 * s, 8 * CL);  // lane 0 of each consumer warp of the cluster
        }
        wg_fence_mbar_init();
    }
    if (CL > 1) {
        wg_cluster_sync();
    } else {
        __syncthreads();
    }
}

// The roles of a v5 / v6 block (all 384 threads call it, after any shared-memory setup of
// their own): initialise the ring, move registers, and run the producer in thread 0 of
// warpgroup 0. Returns true in the two consumer warpgroups (threads 128-383), which go on to
// wg5_consume and end with wg5_finish; false in the producer warpgroup, whose threads then
// return (v6: after the last cluster-wide barrier).
template <int PRODUCER_REGS, int CONSUMER_REGS, int CL = 1>
__device__ __forceinline__ bool wg5_roles(u32 smem, const WgTensorMap *map_a,
                                          const WgTensorMap *map_b, int d, int row0,
                                          int t_begin, int t_end);

// The producer (one thread): step s's A box (64 deep x 128 rows from row0) and B box (64 deep
// x 256 rows of tile t; v6: this block's 128-row half, multicast to the pair) into slot
// s % WG5_STAGES, once the consumers (v6: of both blocks) released the slot's previous step.
// A fresh barrier counts as having completed the phase before its first, so the first
// round's waits (parity 1) pass at once.
template <int CL = 1>
__device__ __forceinline__ void wg5_produce(u32 smem, const WgTensorMap *map_a,
                                            const WgTensorMap *map_b, int d, int row0,
                                            int t_begin, int t_end) {
    const int ksteps = (d + WG_BK - 1) / WG_BK;
    const int total = (t_end - t_begin) * ksteps;
    const u32 full0 = smem + WG5_BAR_OFF, empty0 = full0 + 8 * WG5_STAGES;
    const u32 rank = CL > 1 ? wg_cluster_rank() : 0u;
    int kt = 0, tile = t_begin, slot = 0;
    u32 round = 0;
    for (int s = 0; s < total; ++s) {
        wg5_wait(empty0 + 8 * slot, (round & 1) ^ 1, "producer: empty", s);
        const u32 stage = smem + slot * WG_STAGE_BYTES, full = full0 + 8 * slot;
        wg_mbar_expect_tx(full, WG_STAGE_BYTES);  // v6 too: A, and B from both blocks
        wg_tma_load_2d(stage, map_a, kt * WG_BK, row0, full);
        if (CL > 1) {
            const u32 half = rank * (WG_B_BYTES / CL);
            wg_tma_load_2d_multicast(stage + WG_A_BYTES + half, map_b, kt * WG_BK,
                                     tile * WG_BN + (int)rank * (WG_BN / CL), full,
                                     (unsigned short)((1u << CL) - 1u));
        } else {
            wg_tma_load_2d(stage + WG_A_BYTES, map_b, kt * WG_BK, tile * WG_BN, full);
        }
        if (++kt == ksteps) {
            kt = 0;
            ++tile;
        }
        if (++slot == WG5_STAGES) {
            slot = 0;
            ++round;
        }
    }
    // v6: the producer's tail (CUTLASS's producer_tail): wait, as for WG5_STAGES more steps,
    // until both blocks' consumers released every slot, so that no peer's arrival on this
    // block's barriers is still on its way when the block reaches its final cluster barrier.
    if (CL > 1) {
        for (int i = 0; i < WG5_STAGES; ++i) {
            wg5_wait(empty0 + 8 * slot, (round & 1) ^ 1, "producer tail: empty", total + i);
            if (++slot == WG5_STAGES) {
                slot = 0;
                ++round;
            }
        }
    }
}

// The end of a v6 block's threads (the consumers after their last output, the producer
// warpgroup after its copies): no block leaves while its peer may still use its shared
// memory. Nothing for v5.
template <int CL = 1>
__device__ __forceinline__ void wg5_finish() {
    if (CL > 1) wg_cluster_sync();
}

template <int PRODUCER_REGS, int CONSUMER_REGS, int CL>
__device__ __forceinline__ bool wg5_roles(u32 smem, const WgTensorMap *map_a,
                                          const WgTensorMap *map_b, int d, int row0,
                                          int t_begin, int t_end) {
    wg5_init<CL>(smem);
    if (threadIdx.x < 128) {
        wg_setmaxnreg_dec<PRODUCER_REGS>();
        if (threadIdx.x == 0) wg5_produce<CL>(smem, map_a, map_b, d, row0, t_begin, t_end);
        wg5_finish<CL>();
        return false;
    }
    wg_setmaxnreg_inc<CONSUMER_REGS>();
    return true;
}

// Release slot `addr`'s step: v5 on this block's barrier; v6 on both blocks' (the peer's
// producer multicasts into this block's slot too).
template <int CL>
__device__ __forceinline__ void wg5_release(u32 addr) {
    if (CL > 1) {
#pragma unroll
        for (u32 r = 0; r < (u32)CL; ++r) wg_mbar_arrive_cluster(addr, r);
    } else {
        wg_mbar_arrive(addr);
    }
}

// Consumer warpgroup `cw` (0 or 1): v3's products for its 64 rows, calling epi(acc, tile)
// after each tile's last step, as wg_main_loop does. Step s - 1 is released once step s's
// wait_group 1 retired it; a tile's last step right after its wait_group 0 (before the
// epilogue, so the producer refills while the epilogue runs).
template <bool BF16, int CL = 1, typename Epi>
__device__ __forceinline__ void wg5_consume(u32 smem, int cw, int d, int t_begin, int t_end,
                                            Epi &&epi) {
    const int ksteps = (d + WG_BK - 1) / WG_BK;
    const int total = (t_end - t_begin) * ksteps;
    const u32 full0 = smem + WG5_BAR_OFF, empty0 = full0 + 8 * WG5_STAGES;
    const bool leader = (threadIdx.x & 31) == 0;
    const u32 a_off = (u32)cw * 64 * (WG_BK * 2);
    float acc[WG_NACC];
#pragma unroll
    for (int i = 0; i < WG_NACC; ++i) acc[i] = 0.f;
    int tile = t_begin, kt = 0, slot = 0, prev = WG5_STAGES - 1;
    u32 round = 0;
    for (int s = 0; s < total; ++s) {
        wg5_wait(full0 + 8 * slot, round & 1, "consumer: full", s);
        const u32 stage = smem + slot * WG_STAGE_BYTES;
        wg_mma_fence();
#pragma unroll
        for (int kk = 0; kk < WG_BK / 16; ++kk)
            wg_mma<BF16>(acc, wg_desc(stage + a_off + kk * 32),
                         wg_desc(stage + WG_A_BYTES + kk * 32), (kt > 0 || kk > 0) ? 1u : 0u);
        wg_mma_commit();
        wg_mma_wait<1>();
        if (kt > 0 && leader) wg5_release<CL>(empty0 + 8 * prev);  // step s - 1, same tile
        prev = slot;
        if (++slot == WG5_STAGES) {
            slot = 0;
            ++round;
        }
        if (++kt == ksteps) {
            wg_mma_wait<0>();
            if (leader) wg5_release<CL>(empty0 + 8 * prev);  // this step
            wg_fence_acc(acc);
            epi(acc, tile);
            kt = 0;
            ++tile;
        }
    }
    wg_mma_wait<0>();
}
