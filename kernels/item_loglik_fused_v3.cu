// Fused item log-likelihood, version 3: the computation and outputs of v1/v2a's tensor-core
// kernels (online log-sum-exp over the vocabulary, one (max, sum-exp) partial per row per
// vocabulary slice, merged by v1's item_loglik_combine), with the products on Hopper's
// warpgroup tensor-core instructions (wgmma.mma_async, sm_90a only). Compiled after
// wgmma_common.cuh (its main loop, descriptors and copies; the Rust side concatenates).
//
// What changed from v2a (36-46% of the floor on an H200, docs/kernels.md section 8b):
//   - wgmma.mma_async.m64n256k16 reads both operands straight from shared memory through
//     matrix descriptors (no ldmatrix, no fragment registers) and runs asynchronously: the
//     products of step s run while the warps issue the copies of step s + 2.
//   - 128 rows x 256 vocabulary per block, 2 warpgroups of 64 rows x 256 columns (128 f32
//     accumulators per thread): 85 FLOP per byte loaded from L2 (v2a's 128 x 128: 64), the
//     bound v2a sat on.
//   - Every warp owns whole rows of the tile (16 rows x 256 columns), so the (max, sum-exp)
//     merge is 2 shuffles, no shared memory; exp() is ex2.approx of one FMA.
//   - grid = (row blocks, vocabulary slices): the row blocks of a slice are adjacent in
//     launch order, so the blocks running together share the head slice they stream through
//     L2, and the LM head is read from DRAM about once (the hidden rows, a few MB, stay in L2).
//
// Launch (crates/kernels/src/launch.rs, FusedVersion::V3): grid = (row blocks, slices),
// WG_THREADS threads, FUSED3_SMEM bytes of dynamic shared memory. Needs sm_90a: NVRTC
// --gpu-architecture=compute_90a. No headers.

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

static_assert(FUSED3_BM == WG_BM && FUSED3_BN == WG_BN && FUSED3_BK == WG_BK, "tile");
static_assert(FUSED3_STAGES == WG_STAGES && FUSED3_THREADS == WG_THREADS, "ring, threads");

#define F3_A_BYTES (FUSED3_BM * FUSED3_BK * 2)
#define F3_B_BYTES (FUSED3_BN * FUSED3_BK * 2)
#define F3_STAGE_BYTES (F3_A_BYTES + F3_B_BYTES)
#define FUSED3_SMEM (FUSED3_STAGES * F3_STAGE_BYTES + 1024)
static_assert(FUSED3_SMEM == WG_RING_BYTES, "the ring is all of v3's shared memory");

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

// Fold the tile into this thread's two running (max, sum-exp) pairs (row h = 0: g, 1: g + 8):
// acc[4 j + 2 h + e] is column 8 j + 2 t + e; `lim` = valid columns of the tile minus 2 t (FULL:
// all valid). Four partial maxima and sums per row (by j % 4) instead of one chain: with 2
// warps per scheduler there is little else to hide a 64-long chain of dependent FMNMX / FADD
// behind, and the epilogue runs while the tensor cores wait.
template <bool FULL>
__device__ __forceinline__ void f3_fold(float (&m)[2], float (&s)[2], const float (&acc)[WG_NACC],
                                        int lim) {
    float mx[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 4; ++q) mx[h][q] = F3_NEG_INF;
#pragma unroll
    for (int j = 0; j < FUSED3_BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                if (FULL || 8 * j + e < lim)
                    mx[h][j & 3] = fmaxf(mx[h][j & 3], acc[4 * j + 2 * h + e]);
    float M[2], mb[2], sum[2][4];
    bool live[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        M[h] = fmaxf(fmaxf(m[h], fmaxf(mx[h][0], mx[h][1])), fmaxf(mx[h][2], mx[h][3]));
        live[h] = M[h] != F3_NEG_INF;  // false only when this thread saw no valid column yet
        mb[h] = live[h] ? -M[h] * F3_LOG2E : 0.f;
        sum[h][0] = live[h] ? s[h] * f3_ex2(fmaf(m[h], F3_LOG2E, mb[h])) : 0.f;  // m = -inf: 0
        sum[h][1] = sum[h][2] = sum[h][3] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < FUSED3_BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                if (FULL || 8 * j + e < lim)
                    sum[h][j & 3] += f3_ex2(fmaf(acc[4 * j + 2 * h + e], F3_LOG2E, mb[h]));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (live[h]) {
            s[h] = (sum[h][0] + sum[h][1]) + (sum[h][2] + sum[h][3]);
            m[h] = M[h];
        }
    }
}

// The main loop (same epilogue and outputs for all three): F3_LOCKSTEP v3 (wg_main_loop),
// F3_STAGGERED v4 (wg_main_loop_staggered; opt-in, slower on an H200), F3_SPECIALISED v5
// (a TMA producer warpgroup and two consumers, wg5_produce / wg5_consume; opt-in, takes the
// tensor maps of hidden [n, d] (box 64 x 128) and head [v, d] (box 64 x 256)).
#define F3_LOCKSTEP 0
#define F3_STAGGERED 1
#define F3_SPECIALISED 2
// v6: v5 on a pair of blocks (the two row blocks of one vocabulary slice) with the head tile
// multicast (wgmma_common.cuh, WG6_CLUSTER).
#define F3_CLUSTERED 3
template <bool BF16, int LOOP>
__device__ __forceinline__ void fused_tc_v3(const u16 *__restrict__ hidden,
                                            const u16 *__restrict__ head,
                                            const u32 *__restrict__ targets, int n, int v,
                                            int d, int tiles_per_slice,
                                            float *__restrict__ part_m,
                                            float *__restrict__ part_s,
                                            float *__restrict__ tgt_logit,
                                            float *__restrict__ logits_out,
                                            const WgTensorMap *map_a = nullptr,
                                            const WgTensorMap *map_b = nullptr) {
    extern __shared__ __align__(1024) unsigned char f3_smem[];
    const u32 smem = (wg_smem_addr(f3_smem) + 1023u) & ~1023u;
    constexpr bool WS = LOOP == F3_SPECIALISED || LOOP == F3_CLUSTERED;  // warp-specialised
    constexpr int CL = LOOP == F3_CLUSTERED ? WG6_CLUSTER : 1;           // blocks per cluster

    const int row0 = blockIdx.x * FUSED3_BM, slice = blockIdx.y;
    const int vtiles = (v + FUSED3_BN - 1) / FUSED3_BN;
    const int vt_begin = slice * tiles_per_slice;
    const int vt_end = min(vt_begin + tiles_per_slice, vtiles);
    // v5, v6: the producer warpgroup streams the tiles and leaves; the consumers go on.
    if (WS && !wg5_roles<WG5_PRODUCER_REGS, WG5_CONSUMER_REGS, CL>(smem, map_a, map_b, d, row0,
                                                                  vt_begin, vt_end))
        return;
    // Consumer-relative thread: warps 0-3 own rows 0-63 of the tile, warps 4-7 rows 64-127.
    const int tid = WS ? (int)threadIdx.x - 128 : (int)threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;

    // The two rows of this thread: h = 0 -> r_lo, h = 1 -> r_lo + 8 (warp w: rows 16 w ..).
    const int r_lo = row0 + warp * 16 + g;
    float run_m[2] = {F3_NEG_INF, F3_NEG_INF}, run_s[2] = {0.f, 0.f};
    u32 tgt[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = r_lo + 8 * h;
        const u32 tv = row < n ? targets[row] : F3_NO_TARGET;
        tgt[h] = tv < (u32)v ? tv : F3_NO_TARGET;
    }

    auto epilogue = [&](const float (&acc)[WG_NACC], int vt) {
#ifdef F3_DIAG_NO_EPILOGUE
        // Benchmark diagnostic only (benches/kernels.rs): the main loop alone; a sum keeps
        // every product alive (ptxas narrows a wgmma whose outputs are dead). Outputs wrong.
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < WG_NACC; ++i) sum += acc[i];
        run_m[0] = fmaxf(run_m[0], sum + (float)vt);
        return;
#endif
        const int col0 = vt * FUSED3_BN;
        const int lim = v - col0 - 2 * t;
        if (col0 + FUSED3_BN <= v) {
            f3_fold<true>(run_m, run_s, acc, lim);
        } else {
            f3_fold<false>(run_m, run_s, acc, lim);
        }
        // Target logits: column c of the tile belongs to the thread with t = (c >> 1) & 3, at
        // j = c >> 3, e = c & 1; the select loop runs only in warps with a target here.
        int rel[2];
        bool hit[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int c = (int)(tgt[h] - (u32)col0);  // F3_NO_TARGET: never in range
            hit[h] = tgt[h] != F3_NO_TARGET && tgt[h] >= (u32)col0 && c < FUSED3_BN &&
                     ((c >> 1) & 3) == t;
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
    };
    if (WS) {
        wg5_consume<BF16, CL>(smem, warp >> 2, d, vt_begin, vt_end, epilogue);
    } else if (LOOP == F3_STAGGERED) {
        wg_main_loop_staggered<BF16>(smem, hidden, head, n, v, d, row0, vt_begin, vt_end,
                                     epilogue);
    } else {
        wg_main_loop<BF16>(smem, hidden, head, n, v, d, row0, vt_begin, vt_end, epilogue);
    }

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
    if (WS) wg5_finish<CL>();
}

// Same signature as v1's and v2a's tensor-core kernels; the partials go to item_loglik_combine.
extern "C" __global__ void __launch_bounds__(FUSED3_THREADS, 1)
item_loglik_fused_v3_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                          const u32 *__restrict__ targets, int n, int v, int d,
                          int tiles_per_slice, float *__restrict__ part_m,
                          float *__restrict__ part_s, float *__restrict__ tgt_logit,
                          float *__restrict__ logits_out) {
    fused_tc_v3<true, F3_LOCKSTEP>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s,
                             tgt_logit, logits_out);
}

extern "C" __global__ void __launch_bounds__(FUSED3_THREADS, 1)
item_loglik_fused_v3_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                         const u32 *__restrict__ targets, int n, int v, int d,
                         int tiles_per_slice, float *__restrict__ part_m,
                         float *__restrict__ part_s, float *__restrict__ tgt_logit,
                         float *__restrict__ logits_out) {
    fused_tc_v3<false, F3_LOCKSTEP>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s,
                              tgt_logit, logits_out);
}

// v4 (opt-in, LLM4DSR_FUSED_VERSION=v4; correct and slower than v3 on an H200): the same
// kernel on the staggered main loop. Dynamic shared memory FUSED4_SMEM (= WG4_SMEM).
#define FUSED4_SMEM WG4_SMEM

extern "C" __global__ void __launch_bounds__(FUSED3_THREADS, 1)
item_loglik_fused_v4_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                          const u32 *__restrict__ targets, int n, int v, int d,
                          int tiles_per_slice, float *__restrict__ part_m,
                          float *__restrict__ part_s, float *__restrict__ tgt_logit,
                          float *__restrict__ logits_out) {
    fused_tc_v3<true, F3_STAGGERED>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s,
                            tgt_logit, logits_out);
}

extern "C" __global__ void __launch_bounds__(FUSED3_THREADS, 1)
item_loglik_fused_v4_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                         const u32 *__restrict__ targets, int n, int v, int d,
                         int tiles_per_slice, float *__restrict__ part_m,
                         float *__restrict__ part_s, float *__restrict__ tgt_logit,
                         float *__restrict__ logits_out) {
    fused_tc_v3<false, F3_STAGGERED>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s,
                             tgt_logit, logits_out);
}

// v5 (the default on compute capability 9.0 since the H200 run of docs/kernels.md 8e):
// warp-specialised, WG5_THREADS threads (a producer warpgroup and two consumers), FUSED5_SMEM
// bytes of dynamic shared memory.
// v3's parameters (hidden and head are read through the maps; the pointers stay for the
// signature) followed by the tensor maps of hidden and head.
#define FUSED5_SMEM WG5_SMEM

extern "C" __global__ void __launch_bounds__(WG5_THREADS, 1)
item_loglik_fused_v5_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                          const u32 *__restrict__ targets, int n, int v, int d,
                          int tiles_per_slice, float *__restrict__ part_m,
                          float *__restrict__ part_s, float *__restrict__ tgt_logit,
                          float *__restrict__ logits_out, const __grid_constant__ WgTensorMap map_a,
                          const __grid_constant__ WgTensorMap map_b) {
    fused_tc_v3<true, F3_SPECIALISED>(hidden, head, targets, n, v, d, tiles_per_slice, part_m,
                                      part_s, tgt_logit, logits_out, &map_a, &map_b);
}

extern "C" __global__ void __launch_bounds__(WG5_THREADS, 1)
item_loglik_fused_v5_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                         const u32 *__restrict__ targets, int n, int v, int d,
                         int tiles_per_slice, float *__restrict__ part_m,
                         float *__restrict__ part_s, float *__restrict__ tgt_logit,
                         float *__restrict__ logits_out, const __grid_constant__ WgTensorMap map_a,
                         const __grid_constant__ WgTensorMap map_b) {
    fused_tc_v3<false, F3_SPECIALISED>(hidden, head, targets, n, v, d, tiles_per_slice, part_m,
                                       part_s, tgt_logit, logits_out, &map_a, &map_b);
}

// v6 (opt-in, LLM4DSR_FUSED_VERSION=v6; correct on an H200, no faster than v5, 8e): v5 on
// clusters of two blocks along x (two row blocks of one vocabulary slice; the plan pads the
// row blocks to an even count), the head tile multicast. v5's parameters; the head's tensor map has boxes of 64 x
// 128 (each block copies one half of the 256-row tile).
extern "C" __global__ void __cluster_dims__(WG6_CLUSTER, 1, 1) __launch_bounds__(WG5_THREADS, 1)
item_loglik_fused_v6_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                          const u32 *__restrict__ targets, int n, int v, int d,
                          int tiles_per_slice, float *__restrict__ part_m,
                          float *__restrict__ part_s, float *__restrict__ tgt_logit,
                          float *__restrict__ logits_out, const __grid_constant__ WgTensorMap map_a,
                          const __grid_constant__ WgTensorMap map_b) {
    fused_tc_v3<true, F3_CLUSTERED>(hidden, head, targets, n, v, d, tiles_per_slice, part_m,
                                    part_s, tgt_logit, logits_out, &map_a, &map_b);
}

extern "C" __global__ void __cluster_dims__(WG6_CLUSTER, 1, 1) __launch_bounds__(WG5_THREADS, 1)
item_loglik_fused_v6_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                         const u32 *__restrict__ targets, int n, int v, int d,
                         int tiles_per_slice, float *__restrict__ part_m,
                         float *__restrict__ part_s, float *__restrict__ tgt_logit,
                         float *__restrict__ logits_out, const __grid_constant__ WgTensorMap map_a,
                         const __grid_constant__ WgTensorMap map_b) {
    fused_tc_v3<false, F3_CLUSTERED>(hidden, head, targets, n, v, d, tiles_per_slice, part_m,
                                     part_s, tgt_logit, logits_out, &map_a, &map_b);
}
