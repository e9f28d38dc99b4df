// Fused item log-likelihood, version 3: the computation and outputs of v1/v2a's tensor-core
// kernels (online log-sum-exp over the vocabulary, one (max, sum-exp) partial per row per
// vocabulary slice, merged by v1's item_loglik_combine), with the products on Hopper's
// warpgroup tensor-core instructions (wgmma.mma_async, sm_90a only).
//
// What changed from v2a (36.7-46.1% of the floor on an H200, docs/kernels.md section 8b):
//   - wgmma.mma_async.m64nNk16 reads both operands straight from shared memory through matrix
//     descriptors (no ldmatrix, no fragment registers) and runs asynchronously: the products of
//     step s run while the warps issue the copies of step s + 2 and wait for step s - 1.
//   - 128 rows x FUSED3_BN (256) vocabulary per block: 2 warpgroups, each 64 rows x 256
//     columns (128 f32 accumulators per thread). 85 FLOP per byte loaded from L2 (v2a's
//     128 x 128: 64), the bound v2a sat on (5.7 TB/s of L2 -> SM traffic at 364 TFLOP/s).
//   - Every warp owns whole rows of the tile (16 rows x 256 columns), so the epilogue's
//     (max, sum-exp) merge is 2 shuffles, no shared memory; exp() as ex2.approx of one FMA.
//   - The shared layout is v2a's: rows of 64 elements = 128 B = 8 chunks of 16 B, chunk c of
//     row r stored at chunk c ^ (r & 7), filled by cp.async.cg; with 1024-byte aligned tiles
//     this is exactly wgmma's 128-byte swizzle for K-major operands (address bits [4:6] XOR
//     bits [7:9]), descriptor stride 1024 B per 8-row group, and the k-th 16-deep slice of a
//     stage starts 32 k bytes past the tile base (the hardware applies the XOR).
//   - Ring of FUSED3_STAGES (4) stages of 64 deep; copies run 2 steps ahead. Step s:
//     cp.async.wait_group 1 (step s landed), fence.proxy.async (make the generic-proxy copies
//     visible to wgmma's async proxy), __syncthreads (all copies of step s visible; every
//     warpgroup has retired the wgmma of step s - 2, whose stage the copies of step s + 2 now
//     overwrite), copies of step s + 2, wgmma of step s (4 x k16), commit, wait_group 1 (step
//     s - 1's products retired). The last step of a vocabulary tile waits for all products and
//     runs the epilogue; the next tile's first wgmma starts from zero (scale-d = 0).
//
// Launch (crates/kernels/src/launch.rs, FusedVersion::V3): grid = (vocabulary slices, row
// blocks), FUSED3_THREADS threads, FUSED3_SMEM bytes of dynamic shared memory (the ring plus
// 1 KB to align it to 1024 B). Needs sm_90a: NVRTC --gpu-architecture=compute_90a. No headers.
//
// Generated from an authoring template (the wgmma asm blocks list every accumulator register);
// edit this file directly.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef FUSED3_BM
#define FUSED3_BM 128
#endif
#ifndef FUSED3_BN
#define FUSED3_BN 256
#endif
#ifndef FUSED3_BK
#define FUSED3_BK 64
#endif
#ifndef FUSED3_STAGES
#define FUSED3_STAGES 4
#endif
#ifndef FUSED3_THREADS
#define FUSED3_THREADS 256
#endif

static_assert(FUSED3_BM == 128 && FUSED3_THREADS == 256, "2 warpgroups of 64 rows");
static_assert(FUSED3_BN == 256 || FUSED3_BN == 128, "wgmma n = 256 or 128");
static_assert(FUSED3_BK == 64, "128-byte rows: the 128-byte swizzle");
static_assert(FUSED3_STAGES >= 3, "copies run STAGES - 2 steps ahead");

#define F3_A_BYTES (FUSED3_BM * FUSED3_BK * 2)
#define F3_B_BYTES (FUSED3_BN * FUSED3_BK * 2)
#define F3_STAGE_BYTES (F3_A_BYTES + F3_B_BYTES)
#define F3_AHEAD (FUSED3_STAGES - 2)
#define FUSED3_SMEM (FUSED3_STAGES * F3_STAGE_BYTES + 1024)
#define F3_NACC (FUSED3_BN / 2)  // f32 accumulators per thread: 64 x BN / 128 threads

static_assert(F3_STAGE_BYTES % 1024 == 0 && F3_A_BYTES % 1024 == 0, "1024-aligned tiles");

#define F3_NEG_INF __int_as_float(0xff800000)
#define F3_NO_TARGET 0xffffffffu
#define F3_LOG2E 1.4426950408889634f

__device__ __forceinline__ void f3_lse_merge(float &m, float &s, float om, float os) {
    float M = fmaxf(m, om);
    if (M == F3_NEG_INF) { m = M; s = 0.f; return; }
    s = s * __expf(m - M) + os * __expf(om - M);
    m = M;
}

__device__ __forceinline__ float f3_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ u32 f3_smem_addr(const void *p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void f3_cp_async16(u32 dst, const void *src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void f3_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void f3_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ void f3_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void f3_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void f3_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void f3_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Pin the accumulators in place around the asynchronous products: reads after a wait cannot be
// hoisted above it (the same role as CUTLASS's warpgroup_fence_operand).
__device__ __forceinline__ void f3_fence_acc(float (&d)[F3_NACC]) {
#pragma unroll
    for (int i = 0; i < F3_NACC; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: start address,
// leading byte offset (unused for swizzled K-major; 1 by convention), stride byte offset 1024
// (the next 8-row group), layout type 1 = 128-byte swizzle in bits 62-63.
__device__ __forceinline__ u64 f3_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) |
           ((u64)1 << 62);
}

// D[64 x BN] (+)= A[64 x 16] * B[16 x BN], both operands K-major in shared memory.
template <bool BF16>
__device__ __forceinline__ void f3_wgmma(float (&d)[F3_NACC], u64 da, u64 db, u32 scale_d) {
#if FUSED3_BN == 256
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
#else
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "%64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(da), "l"(db), "r"(scale_d));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
            "%64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(da), "l"(db), "r"(scale_d));
    }
#endif
}

__device__ __forceinline__ u32 f3_swz(int r, int ch) {
    return (u32)(r * (FUSED3_BK * 2) + ((ch ^ (r & 7)) << 4));
}

// The copies of one step: chunk (tid & 7) of hidden rows (tid >> 3) + 32 i, i < BM / 32, and
// of head rows (tid >> 3) + 32 i, i < BN / 32; rows past n (v) and depth past d zero-filled.
__device__ __forceinline__ void f3_load_step(u32 stage, const u16 *a_src, const u16 *b_src,
                                             const u16 *__restrict__ hidden,
                                             const u16 *__restrict__ head, u64 stride32,
                                             int a_rows_left, int b_rows_left, int k0,
                                             bool k_ok, int tid) {
    const u32 dst = stage + f3_swz(tid >> 3, tid & 7);
#pragma unroll
    for (int i = 0; i < FUSED3_BM / 32; ++i) {
        const bool ok = k_ok && 32 * i < a_rows_left;
        f3_cp_async16(dst + i * 32 * (FUSED3_BK * 2), ok ? a_src + i * stride32 + k0 : hidden,
                      ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < FUSED3_BN / 32; ++i) {
        const bool ok = k_ok && 32 * i < b_rows_left;
        f3_cp_async16(dst + F3_A_BYTES + i * 32 * (FUSED3_BK * 2),
                      ok ? b_src + i * stride32 + k0 : head, ok ? 16u : 0u);
    }
}

// Fold one row's values of a tile into its running (max, sum-exp). acc[4 j + 2 h + e] is row
// h (0: g, 1: g + 8) and column 8 j + 2 t + e of the warp's tile; `lim` = valid columns of the
// tile minus 2 t (FULL: all valid).
template <bool FULL>
__device__ __forceinline__ void f3_fold_row(float &m, float &s, const float (&acc)[F3_NACC],
                                            int h, int lim) {
    float lmax = F3_NEG_INF;
#pragma unroll
    for (int j = 0; j < FUSED3_BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
            if (FULL || 8 * j + e < lim) lmax = fmaxf(lmax, acc[4 * j + 2 * h + e]);
    const float M = fmaxf(m, lmax);
    if (M == F3_NEG_INF) return;
    const float mb = -M * F3_LOG2E;
    float sum = s * f3_ex2(fmaf(m, F3_LOG2E, mb));  // m = -inf: ex2(-inf) = 0
#pragma unroll
    for (int j = 0; j < FUSED3_BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
            if (FULL || 8 * j + e < lim) sum += f3_ex2(fmaf(acc[4 * j + 2 * h + e], F3_LOG2E, mb));
    s = sum;
    m = M;
}

template <bool BF16>
__device__ __forceinline__ void fused_tc_v3(const u16 *__restrict__ hidden,
                                            const u16 *__restrict__ head,
                                            const u32 *__restrict__ targets, int n, int v,
                                            int d, int tiles_per_slice,
                                            float *__restrict__ part_m,
                                            float *__restrict__ part_s,
                                            float *__restrict__ tgt_logit,
                                            float *__restrict__ logits_out) {
    extern __shared__ __align__(1024) unsigned char f3_smem[];
    const u32 smem = (f3_smem_addr(f3_smem) + 1023u) & ~1023u;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = warp >> 2, wq = warp & 3;  // warpgroup (64-row half), warp within it
    const int g = lane >> 2, t = lane & 3;
    const int slice = blockIdx.x, row0 = blockIdx.y * FUSED3_BM;
    const int vtiles = (v + FUSED3_BN - 1) / FUSED3_BN;
    const int vt_begin = slice * tiles_per_slice;
    const int vt_end = min(vt_begin + tiles_per_slice, vtiles);
    const int ksteps = (d + FUSED3_BK - 1) / FUSED3_BK;
    const int total = (vt_end - vt_begin) * ksteps;

    // The two rows of this thread: h = 0 -> r_lo, h = 1 -> r_lo + 8.
    const int r_lo = row0 + wg * 64 + wq * 16 + g;
    float run_m[2] = {F3_NEG_INF, F3_NEG_INF}, run_s[2] = {0.f, 0.f};
    u32 tgt[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r_lo + 8 * h;
        const u32 tv = row < n ? targets[row] : F3_NO_TARGET;
        tgt[h] = tv < (u32)v ? tv : F3_NO_TARGET;
    }

    float acc[F3_NACC];
#pragma unroll
    for (int i = 0; i < F3_NACC; ++i) acc[i] = 0.f;

    const int ld_r = tid >> 3, ld_ch = tid & 7;
    const u64 stride32 = 32ull * (u64)d;
    const u16 *a_src = hidden + (u64)(row0 + ld_r) * (u64)d + ld_ch * 8;
    const int a_rows_left = n - row0 - ld_r;
    int ld_vt = vt_begin, ld_kt = 0;
    const u16 *b_src = head + (u64)(ld_vt * FUSED3_BN + ld_r) * (u64)d + ld_ch * 8;
    int st_write = 0;
#pragma unroll
    for (int p = 0; p < F3_AHEAD; ++p) {
        if (p < total) {
            f3_load_step(smem + st_write * F3_STAGE_BYTES, a_src, b_src, hidden, head, stride32,
                         a_rows_left, v - ld_vt * FUSED3_BN - ld_r, ld_kt * FUSED3_BK,
                         ld_kt * FUSED3_BK + ld_ch * 8 < d, tid);
            if (++ld_kt == ksteps) { ld_kt = 0; ++ld_vt; b_src += FUSED3_BN * (u64)d; }
        }
        f3_cp_async_commit();
        st_write = st_write + 1 == FUSED3_STAGES ? 0 : st_write + 1;
    }

    // Descriptor bases of this warpgroup's A rows and of the B tile in stage 0.
    const u32 a_base = smem + wg * 64 * (FUSED3_BK * 2);
    const u32 b_base = smem + F3_A_BYTES;

    int st_read = 0, vt = vt_begin, kt = 0;
    for (int s = 0; s < total; ++s) {
        f3_cp_async_wait<F3_AHEAD - 1>();
        f3_fence_proxy_async();
        __syncthreads();
        if (s + F3_AHEAD < total) {
            f3_load_step(smem + st_write * F3_STAGE_BYTES, a_src, b_src, hidden, head, stride32,
                         a_rows_left, v - ld_vt * FUSED3_BN - ld_r, ld_kt * FUSED3_BK,
                         ld_kt * FUSED3_BK + ld_ch * 8 < d, tid);
            if (++ld_kt == ksteps) { ld_kt = 0; ++ld_vt; b_src += FUSED3_BN * (u64)d; }
        }
        f3_cp_async_commit();
        st_write = st_write + 1 == FUSED3_STAGES ? 0 : st_write + 1;

        const u32 off = st_read * F3_STAGE_BYTES;
        f3_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FUSED3_BK / 16; ++kk) {
            f3_wgmma<BF16>(acc, f3_desc(a_base + off + kk * 32), f3_desc(b_base + off + kk * 32),
                           (kt > 0 || kk > 0) ? 1u : 0u);
        }
        f3_wgmma_commit();
        f3_wgmma_wait<1>();
        st_read = st_read + 1 == FUSED3_STAGES ? 0 : st_read + 1;

        if (++kt == ksteps) {
            f3_wgmma_wait<0>();
            f3_fence_acc(acc);
            const int col0 = vt * FUSED3_BN;
            const int lim = v - col0 - 2 * t;
            if (col0 + FUSED3_BN <= v) {
                f3_fold_row<true>(run_m[0], run_s[0], acc, 0, lim);
                f3_fold_row<true>(run_m[1], run_s[1], acc, 1, lim);
            } else {
                f3_fold_row<false>(run_m[0], run_s[0], acc, 0, lim);
                f3_fold_row<false>(run_m[1], run_s[1], acc, 1, lim);
            }
            // Target logits: column c of the tile belongs to the thread with t = (c >> 1) & 3,
            // at j = c >> 3, e = c & 1; the select loop runs only in warps with a target here.
            int rel[2];
            bool hit[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int c = (int)(tgt[h] - (u32)col0);  // F3_NO_TARGET: never in range
                hit[h] = tgt[h] != F3_NO_TARGET && tgt[h] >= (u32)col0 &&
                         c < FUSED3_BN && ((c >> 1) & 3) == t;
                rel[h] = c - 2 * t;
            }
            if (__any_sync(0xffffffffu, hit[0] || hit[1])) {
#pragma unroll
                for (int j = 0; j < FUSED3_BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
#pragma unroll
                        for (int h = 0; h < 2; ++h)
                            if (hit[h] && rel[h] == 8 * j + e)
                                tgt_logit[r_lo + 8 * h] = acc[4 * j + 2 * h + e];
            }
            if (logits_out) {
#pragma unroll
                for (int j = 0; j < FUSED3_BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int row = r_lo + 8 * h, col = col0 + 8 * j + 2 * t + e;
                            if (row < n && col < v)
                                logits_out[(u64)row * (u64)v + col] = acc[4 * j + 2 * h + e];
                        }
            }
            kt = 0;
            ++vt;
        }
    }
    f3_wgmma_wait<0>();  // every tile ended in a wait already; says so to ptxas
    f3_cp_async_wait<0>();

    // Merge the 4 threads of a quad (same rows, different columns) and write the partials.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int o = 1; o <= 2; o <<= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, run_m[h], o);
            const float os = __shfl_xor_sync(0xffffffffu, run_s[h], o);
            f3_lse_merge(run_m[h], run_s[h], om, os);
        }
        const int row = r_lo + 8 * h;
        if (t == 0 && row < n) {
            part_m[(u64)slice * n + row] = run_m[h];
            part_s[(u64)slice * n + row] = run_s[h];
        }
    }
}

// Same signature as v1's and v2a's tensor-core kernels; the partials go to item_loglik_combine.
extern "C" __global__ void __launch_bounds__(FUSED3_THREADS, 1)
item_loglik_fused_v3_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                          const u32 *__restrict__ targets, int n, int v, int d,
                          int tiles_per_slice, float *__restrict__ part_m,
                          float *__restrict__ part_s, float *__restrict__ tgt_logit,
                          float *__restrict__ logits_out) {
    fused_tc_v3<true>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s, tgt_logit,
                      logits_out);
}

extern "C" __global__ void __launch_bounds__(FUSED3_THREADS, 1)
item_loglik_fused_v3_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                         const u32 *__restrict__ targets, int n, int v, int d,
                         int tiles_per_slice, float *__restrict__ part_m,
                         float *__restrict__ part_s, float *__restrict__ tgt_logit,
                         float *__restrict__ logits_out) {
    fused_tc_v3<false>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s, tgt_logit,
                       logits_out);
}
