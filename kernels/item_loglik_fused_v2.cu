// Fused item log-likelihood, version 2a: the same computation and outputs as
// item_loglik_fused.cu's tensor-core kernels (v1), with the GEMM restructured to feed the
// tensor cores: hidden [n, d] x LM head [v, d]^T tile by tile with an online log-sum-exp over
// the vocabulary, one (max, sum-exp) partial per row per vocabulary slice, merged by v1's
// item_loglik_combine (same partial layout, same launch of the combine).
//
// What changed from v1 (which ran at ~5% of its floor on an H200, docs/kernels.md section 8):
//   - 128 rows x 128 vocabulary per block (v1: 64 x 64), 8 warps as 4 (rows) x 2 (columns),
//     each warp 32 rows x 64 columns = 2 x 8 mma.m16n8k16 per 16-deep step: 2x the FLOPs per
//     byte of shared memory read and 4x per byte of global/L2 traffic.
//   - global -> shared by cp.async.cg (16 B, L2 only) in a FUSED2_STAGES-deep ring over the
//     depth dimension (BK = 64 per stage): while the tensor cores work on stage s, stages s+1
//     and s+2 are in flight. The ring runs across vocabulary tiles (the step sequence is
//     (tile, k-step) flattened), so it never drains between tiles; the epilogue of a tile
//     overlaps the next tile's first loads.
//   - fragments by ldmatrix.x4 from an XOR-swizzled layout: a 64-deep row is 128 B = 8 chunks
//     of 16 B, chunk c of row r is stored at chunk c ^ (r & 7), so the 8 row addresses of each
//     8x8 matrix of an ldmatrix hit 8 distinct chunk columns = all 32 banks once (and the
//     cp.async writes of 8 consecutive chunks of one row likewise).
//   - rows past n, columns past v and depth past d are zero-filled by cp.async's src-size
//     operand (0 bytes read), so d needs only d % 8 == 0 (one 16-byte chunk is all in or
//     all out), not d % 64 == 0.
//
// Launch (crates/kernels/src/launch.rs, fused_plan_v2): grid = (vocabulary slices, row
// blocks), FUSED2_THREADS threads, dynamic shared memory FUSED2_SMEM bytes (over 48 KB: the
// wrapper sets CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first). Needs sm_80+ (cp.async,
// ldmatrix, bf16 mma). No headers, as v1: NVRTC needs nothing from a CUDA toolkit.
//
// Emulated lane by lane (ldmatrix, swizzle, the stage ring, epilogue) in
// jobs/sim/fused_tc_v2.py.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef FUSED2_BM
#define FUSED2_BM 128
#endif
#ifndef FUSED2_BN
#define FUSED2_BN 128
#endif
#ifndef FUSED2_BK
#define FUSED2_BK 64
#endif
#ifndef FUSED2_STAGES
#define FUSED2_STAGES 3
#endif
#ifndef FUSED2_THREADS
#define FUSED2_THREADS 256
#endif
// Resident blocks per SM the register allocation is capped for (__launch_bounds__): Hopper
// (228 KB of shared memory per SM) fits two blocks of ~98 KB, so cap at 128 registers; sm_80
// (164 KB) and sm_86/89 (100 KB) fit one, so let ptxas use more (no spills there either).
#ifndef FUSED2_MIN_BLOCKS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FUSED2_MIN_BLOCKS 2
#else
#define FUSED2_MIN_BLOCKS 1
#endif
#endif

// The warp tiling below is written for these values (4 x 2 warps of 32 x 64, 8 chunks/row).
static_assert(FUSED2_BM == 128 && FUSED2_BN == 128, "v2 warp tiling assumes 128 x 128");
static_assert(FUSED2_BK == 64, "the XOR swizzle assumes 8 chunks of 16 B per row");
static_assert(FUSED2_THREADS == 256, "8 warps");
static_assert(FUSED2_STAGES >= 2, "a ring needs two stages");

#define F2_A_BYTES (FUSED2_BM * FUSED2_BK * 2)
#define F2_B_BYTES (FUSED2_BN * FUSED2_BK * 2)
#define F2_STAGE_BYTES (F2_A_BYTES + F2_B_BYTES)
// Dynamic shared memory: the stage ring, then the per-row (max, sum-exp) of the 2 column warps.
#define F2_RED_OFFSET (FUSED2_STAGES * F2_STAGE_BYTES)
#define FUSED2_SMEM (F2_RED_OFFSET + 2 * 2 * FUSED2_BM * 4)

#define F2_NEG_INF __int_as_float(0xff800000)
#define F2_NO_TARGET 0xffffffffu

// (max, sum-exp) helpers: the same arithmetic as v1's lse_merge / lse_fold.
__device__ __forceinline__ void f2_lse_merge(float &m, float &s, float om, float os) {
    float M = fmaxf(m, om);
    if (M == F2_NEG_INF) { m = M; s = 0.f; return; }
    s = s * __expf(m - M) + os * __expf(om - M);
    m = M;
}

template <int CNT>
__device__ __forceinline__ void f2_lse_fold(float &m, float &s, const float (&x)[CNT],
                                            const bool (&ok)[CNT]) {
    float lmax = F2_NEG_INF;
#pragma unroll
    for (int e = 0; e < CNT; ++e) if (ok[e]) lmax = fmaxf(lmax, x[e]);
    float M = fmaxf(m, lmax);
    if (M == F2_NEG_INF) return;
    float acc = s * __expf(m - M);
#pragma unroll
    for (int e = 0; e < CNT; ++e) if (ok[e]) acc += __expf(x[e] - M);
    s = acc;
    m = M;
}

__device__ __forceinline__ u32 f2_smem_addr(const void *p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 reads nothing and writes 16 zeros.
__device__ __forceinline__ void f2_cp_async16(u32 dst, const void *src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void f2_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void f2_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

__device__ __forceinline__ void f2_ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr) : "memory");
}

template <bool BF16>
__device__ __forceinline__ void f2_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Byte offset of 16-byte chunk `ch` (0..7) of tile row `r` in the swizzled layout.
__device__ __forceinline__ u32 f2_swz(int r, int ch) {
    return (u32)(r * (FUSED2_BK * 2) + ((ch ^ (r & 7)) << 4));
}

// The cp.async copies of one step (depth slice k0 of the block's rows and of vocabulary tile
// col0) into the stage at shared address `stage`: 128 rows x 8 chunks of hidden, then of head.
// Thread tid copies chunk (tid & 7) of rows (tid >> 3) + 32 i, i < 4, of both: 8 consecutive
// threads fill one 128-byte row. `a_src`/`b_src` point at chunk (tid & 7) of the thread's
// first hidden row / first head row of the tile, `stride32` = 32 rows; rows past n (or v)
// and chunks past d are zero-filled (src-size 0, nothing read from the clamped address).
__device__ __forceinline__ void f2_load_step(u32 stage, const u16 *a_src, const u16 *b_src,
                                             const u16 *__restrict__ hidden,
                                             const u16 *__restrict__ head, u64 stride32,
                                             int a_rows_left, int b_rows_left, int k0,
                                             bool k_ok, int tid) {
    const u32 dst = stage + f2_swz(tid >> 3, tid & 7);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bool ok = k_ok && 32 * i < a_rows_left;
        f2_cp_async16(dst + i * 32 * (FUSED2_BK * 2), ok ? a_src + i * stride32 + k0 : hidden,
                      ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bool ok = k_ok && 32 * i < b_rows_left;
        f2_cp_async16(dst + F2_A_BYTES + i * 32 * (FUSED2_BK * 2),
                      ok ? b_src + i * stride32 + k0 : head, ok ? 16u : 0u);
    }
}

template <bool BF16>
__device__ __forceinline__ void fused_tc_v2(const u16 *__restrict__ hidden,
                                            const u16 *__restrict__ head,
                                            const u32 *__restrict__ targets, int n, int v,
                                            int d, int tiles_per_slice,
                                            float *__restrict__ part_m,
                                            float *__restrict__ part_s,
                                            float *__restrict__ tgt_logit,
                                            float *__restrict__ logits_out) {
    extern __shared__ __align__(128) unsigned char f2_smem[];
    const u32 smem = f2_smem_addr(f2_smem);
    float *red_m = reinterpret_cast<float *>(f2_smem + F2_RED_OFFSET);  // [2][BM]
    float *red_s = red_m + 2 * FUSED2_BM;                                // [2][BM]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // 32-row band (0..3), 64-column band (0..1)
    const int g = lane >> 2, t = lane & 3;    // mma group id, thread in group
    const int slice = blockIdx.x, row0 = blockIdx.y * FUSED2_BM;
    const int vtiles = (v + FUSED2_BN - 1) / FUSED2_BN;
    const int vt_begin = slice * tiles_per_slice;
    const int vt_end = min(vt_begin + tiles_per_slice, vtiles);
    const int ksteps = (d + FUSED2_BK - 1) / FUSED2_BK;
    const int total = (vt_end - vt_begin) * ksteps;  // steps = (tile, k-step) pairs

    // ldmatrix row addresses of this lane (byte offsets within a stage, chunk 0 before the
    // swizzle; the XOR term is lane & 7 for both because every row base is a multiple of 8).
    //   A, matrix j = lane >> 3: rows (j & 1) * 8 + (lane & 7) of the 16-row fragment, chunk
    //   j >> 1 of the 16-deep step -> a[0..3] = (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15),
    //   (8-15, 8-15), the m16n8k16 A-fragment order.
    //   B, matrix j: vocabulary rows (j >> 1) * 8 + (lane & 7), chunk j & 1 -> (b0, b1) of
    //   n8-tile 2p, then (b0, b1) of n8-tile 2p + 1.
    const u32 swz = lane & 7;
    const u32 a_row_off = (u32)((wm * 32 + (lane & 15)) * (FUSED2_BK * 2));
    const u32 a_ch = lane >> 4;
    const u32 b_row_off = (u32)((wn * 64 + ((lane >> 4) << 3) + (lane & 7)) * (FUSED2_BK * 2));
    const u32 b_ch = (lane >> 3) & 1;

    // Rows this thread owns in the epilogue: ri = mi * 2 + h -> wm*32 + mi*16 + h*8 + g.
    float run_m[4], run_s[4];
    u32 tgt[4];
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
        const int row = row0 + wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g;
        run_m[ri] = F2_NEG_INF;
        run_s[ri] = 0.f;
        tgt[ri] = row < n ? targets[row] : F2_NO_TARGET;
    }

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    // Producer position (the step whose copies are issued next) and ring slots.
    static_assert(FUSED2_BM * 8 == 4 * FUSED2_THREADS && FUSED2_BN * 8 == 4 * FUSED2_THREADS,
                  "4 + 4 chunks per thread per step");
    const int ld_r = tid >> 3, ld_ch = tid & 7;
    const u64 stride32 = 32ull * (u64)d;
    const u16 *a_src = hidden + (u64)(row0 + ld_r) * (u64)d + ld_ch * 8;
    const int a_rows_left = n - row0 - ld_r;
    int ld_vt = vt_begin, ld_kt = 0;
    const u16 *b_src = head + (u64)(ld_vt * FUSED2_BN + ld_r) * (u64)d + ld_ch * 8;
    int st_read = 0, st_write = FUSED2_STAGES - 1;
    // Prologue: steps 0 .. STAGES-2 into stages 0 .. STAGES-2, one commit group each (empty
    // groups when there are fewer steps, so that the group count per step stays uniform).
#pragma unroll
    for (int p = 0; p < FUSED2_STAGES - 1; ++p) {
        if (p < total) {
            f2_load_step(smem + p * F2_STAGE_BYTES, a_src, b_src, hidden, head, stride32,
                         a_rows_left, v - ld_vt * FUSED2_BN - ld_r, ld_kt * FUSED2_BK,
                         ld_kt * FUSED2_BK + ld_ch * 8 < d, tid);
            if (++ld_kt == ksteps) { ld_kt = 0; ++ld_vt; b_src += FUSED2_BN * (u64)d; }
        }
        f2_cp_async_commit();
    }

    int vt = vt_begin, kt = 0;
    for (int s = 0; s < total; ++s) {
        // Step s's group is complete once at most STAGES-2 newer groups are pending; the
        // barrier makes every thread's copies visible and ends every warp's reads of the stage
        // read at step s-1, which is the one overwritten next.
        f2_cp_async_wait<FUSED2_STAGES - 2>();
        __syncthreads();
        if (s + FUSED2_STAGES - 1 < total) {
            f2_load_step(smem + st_write * F2_STAGE_BYTES, a_src, b_src, hidden, head,
                         stride32, a_rows_left, v - ld_vt * FUSED2_BN - ld_r, ld_kt * FUSED2_BK,
                         ld_kt * FUSED2_BK + ld_ch * 8 < d, tid);
            if (++ld_kt == ksteps) { ld_kt = 0; ++ld_vt; b_src += FUSED2_BN * (u64)d; }
        }
        f2_cp_async_commit();

        const u32 sa = smem + st_read * F2_STAGE_BYTES;
        const u32 sb = sa + F2_A_BYTES;
#pragma unroll
        for (int kk = 0; kk < FUSED2_BK / 16; ++kk) {
            u32 a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                f2_ldmatrix_x4(a[mi], sa + a_row_off + mi * 16 * (FUSED2_BK * 2) +
                                          (((kk * 2 + a_ch) ^ swz) << 4));
            // B one x4 (two n8 tiles) at a time: 4 live registers instead of 16.
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                u32 b[4];
                f2_ldmatrix_x4(b, sb + b_row_off + p * 16 * (FUSED2_BK * 2) +
                                      (((kk * 2 + b_ch) ^ swz) << 4));
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    f2_mma<BF16>(acc[mi][2 * p], a[mi], b[0], b[1]);
                    f2_mma<BF16>(acc[mi][2 * p + 1], a[mi], b[2], b[3]);
                }
            }
        }
        st_read = st_read + 1 == FUSED2_STAGES ? 0 : st_read + 1;
        st_write = st_write + 1 == FUSED2_STAGES ? 0 : st_write + 1;

        if (++kt == ksteps) {
            // Epilogue of tile vt (registers only, while the next steps' copies fly):
            // acc[mi][ni][h*2+e] is row wm*32+mi*16+h*8+g, column col0+wn*64+ni*8+2t+e.
            const int col0 = vt * FUSED2_BN;
#pragma unroll
            for (int ri = 0; ri < 4; ++ri) {
                const int mi = ri >> 1, h = ri & 1;
                const int row = row0 + wm * 32 + mi * 16 + h * 8 + g;
                float x[16];
                bool ok[16];
#pragma unroll
                for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = col0 + wn * 64 + ni * 8 + 2 * t + e;
                        const float val = acc[mi][ni][h * 2 + e];
                        x[ni * 2 + e] = val;
                        ok[ni * 2 + e] = col < v;
                        if (row < n && col < v) {
                            if ((u32)col == tgt[ri]) tgt_logit[row] = val;
                            if (logits_out) logits_out[(u64)row * (u64)v + col] = val;
                        }
                    }
                f2_lse_fold<16>(run_m[ri], run_s[ri], x, ok);
            }
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
            kt = 0;
            ++vt;
        }
    }
    f2_cp_async_wait<0>();  // only empty groups can remain; leave none behind

    // Merge the 4 threads of a group (same rows, different columns), then the 2 column warps.
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, run_m[ri], off);
            const float os = __shfl_xor_sync(0xffffffffu, run_s[ri], off);
            f2_lse_merge(run_m[ri], run_s[ri], om, os);
        }
        if (t == 0) {
            const int r = wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g;
            red_m[wn * FUSED2_BM + r] = run_m[ri];
            red_s[wn * FUSED2_BM + r] = run_s[ri];
        }
    }
    __syncthreads();
    for (int r = tid; r < FUSED2_BM; r += FUSED2_THREADS) {
        const int row = row0 + r;
        if (row < n) {
            float m = red_m[r], s = red_s[r];
            f2_lse_merge(m, s, red_m[FUSED2_BM + r], red_s[FUSED2_BM + r]);
            part_m[(u64)slice * n + row] = m;
            part_s[(u64)slice * n + row] = s;
        }
    }
}

// Same signature as v1's item_loglik_fused_bf16/_f16 (the wrapper's launch code is shared);
// the partials go to v1's item_loglik_combine.
extern "C" __global__ void __launch_bounds__(FUSED2_THREADS, FUSED2_MIN_BLOCKS)
item_loglik_fused_v2_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                          const u32 *__restrict__ targets, int n, int v, int d,
                          int tiles_per_slice, float *__restrict__ part_m,
                          float *__restrict__ part_s, float *__restrict__ tgt_logit,
                          float *__restrict__ logits_out) {
    fused_tc_v2<true>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s, tgt_logit,
                      logits_out);
}

extern "C" __global__ void __launch_bounds__(FUSED2_THREADS, FUSED2_MIN_BLOCKS)
item_loglik_fused_v2_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                         const u32 *__restrict__ targets, int n, int v, int d,
                         int tiles_per_slice, float *__restrict__ part_m,
                         float *__restrict__ part_s, float *__restrict__ tgt_logit,
                         float *__restrict__ logits_out) {
    fused_tc_v2<false>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s, tgt_logit,
                       logits_out);
}
