// Tensor-core grounding, candidate kernel version 3 (sm_90a): nearest_tc.cu's
// nearest_tc_candidates with the products on wgmma (wgmma_common.cuh's main loop, compiled in
// front of this file) instead of v2a's mma.sync loop. Same inputs (nearest_tc_prep's f16 rows
// and records), same key arithmetic, same output ([slice][query][NTC_LIST] keys and rows, the
// 32 smallest keys of the block's catalogue slice per query), so nearest_tc.cu's re-rank,
// certificate and fallback run unchanged on its lists. The certificate does not depend on the
// tile width: T is built from each slice list's last key whatever the slices are.
//
// What differs from nearest_tc_candidates: 128 queries x 256 catalogue rows per tile (2
// warpgroups of 64 x 256, wgmma.m64n256k16 f16 -> f32), a 4-stage ring; every warp owns 16
// whole query rows of the tile, so each query's list is written by one warp only and the
// named barriers that ordered v2a's two column warps are gone. The f16 products go through
// the same k16 tensor-core accumulation as mma.m16n8k16's, which is what the bound models.
//
// Launch (crates/kernels/src/launch.rs, nearest_tc_plan with TcCandidates::V3): grid = (query
// blocks, catalogue slices of 256-row tiles), WG_THREADS threads, NTC3_SMEM bytes of dynamic
// shared memory (the ring, then the lists). Needs sm_90a (NVRTC compute_90a).

#ifndef NTC_LIST
#define NTC_LIST 32
#endif
static_assert(NTC_LIST == 32, "one list entry per lane");

// Dynamic shared memory: wgmma_common.cuh's ring (aligned inside its own 1 KB of slack), then
// the candidate lists (keys, then rows) of the block's 128 queries.
#define NT3_LIST_OFFSET WG_RING_BYTES
#define NTC3_SMEM (NT3_LIST_OFFSET + 2 * WG_BM * NTC_LIST * 4)
// v4 (opt-in; correct, no faster than v3 on an H200): the same kernel on
// wg_main_loop_staggered, compiled with -DWG4_NB=4 (a B ring of 4 slots, so that the lists
// still fit): its lists follow that ring.
#define NT4_LIST_OFFSET WG4_SMEM
#define NTC4_SMEM (NT4_LIST_OFFSET + 2 * WG_BM * NTC_LIST * 4)
// v5 (the default on compute capability 9.0): the same kernel warp-specialised (wg5_produce /
// wg5_consume: a TMA producer warpgroup, two consumer warpgroups, each selecting while the
// other's products run); its lists follow its ring.
#define NT5_LIST_OFFSET WG5_SMEM
#define NTC5_SMEM (NT5_LIST_OFFSET + 2 * WG_BM * NTC_LIST * 4)
#ifdef NT3_RECORDS_SMEM
// Opt-in (LLM4DSR_NEAREST_TC_RECORDS=smem; v5 / v6 only): each consumer warpgroup copies its
// tile's 256 catalogue row records (16 B each) into its own shared buffer after the lists
// while the tile's products run (cp.async, two per thread), instead of 64 16-byte global
// loads per thread in the epilogue. Needs a 3-stage ring (-DWG5_STAGES=3) to fit.
#define NT5_REC_OFFSET NTC5_SMEM
#define NT5_REC_BYTES (2 * WG_BN * 16)
static_assert(NT5_REC_OFFSET + NT5_REC_BYTES <=
                  4 * WG_STAGE_BYTES + 128 + 1024 + 2 * WG_BM * NTC_LIST * 4,
              "the records fit in the shared memory launch.rs gives v5 (NTC5_SMEM at 4 stages)");
#endif

#define NT3_POS_INF __int_as_float(0x7f800000)
#define NT3_NONE 0xffffffffu
#define NT3_FULL 0xffffffffu

// nearest_tc.cu's per-row record (same layout: 4 f32, one 16-byte load).
struct __align__(16) NtInfo {
    float norm;   // |x|^2 (f32, row_sq_norms), +inf for excluded rows
    float bound;  // coef * sqrt(norm): queries Q, catalogue e_c; 0 when norm is not finite
    float inv;    // 1/s = 2^(E - 15), exact
    float flag;   // 1 when the scale was clamped (the row must take the f32 path)
};

__device__ __forceinline__ bool nt3_before(float d1, u32 i1, float d2, u32 i2) {
    return d1 < d2 || (d1 == d2 && i1 < i2);
}

// Insert the candidates of one position into their rows' sorted lists, one lane's value at a
// time (warp-wide): `want` = the lanes with a candidate, lane src's value `key` is row
// rbase + src / 4, catalogue row cbase + 2 (src % 4). Each list is one entry per lane, sorted
// by (key, row); the insertion shifts the tail up by one and drops the 33rd.
__device__ __noinline__ void nt3_insert(u32 want, float key, u32 cbase, int rbase,
                                        float *lkeys, u32 *lidx, int lane) {
    while (want) {
        const int src = __ffs(want) - 1;
        want &= want - 1;
        const float ck = __shfl_sync(NT3_FULL, key, src);
        const u32 cix = cbase + 2 * (src & 3);
        float *lk = lkeys + (rbase + (src >> 2)) * NTC_LIST;
        u32 *li = lidx + (rbase + (src >> 2)) * NTC_LIST;
        const float Lk = lk[lane];
        const u32 Li = li[lane];
        const int pos = __popc(__ballot_sync(NT3_FULL, nt3_before(Lk, Li, ck, cix)));
        if (pos < NTC_LIST) {  // uniform across the warp
            const float uk = __shfl_up_sync(NT3_FULL, Lk, 1);
            const u32 ui = __shfl_up_sync(NT3_FULL, Li, 1);
            if (lane > pos) {
                lk[lane] = uk;
                li[lane] = ui;
            } else if (lane == pos) {
                lk[lane] = ck;
                li[lane] = cix;
            }
        }
        __syncwarp();
    }
}

// acc[i] for a warp-uniform i (NT3_SELECT_COMPACT): a switch, so that the accumulators stay
// in registers (an indexed read would move the whole array to local memory).
#define NT3_CASE(k) \
    case k:         \
        return acc[k];
#define NT3_CASE4(k) NT3_CASE(k) NT3_CASE(k + 1) NT3_CASE(k + 2) NT3_CASE(k + 3)
#define NT3_CASE16(k) NT3_CASE4(k) NT3_CASE4(k + 4) NT3_CASE4(k + 8) NT3_CASE4(k + 12)
#define NT3_CASE64(k) NT3_CASE16(k) NT3_CASE16(k + 16) NT3_CASE16(k + 32) NT3_CASE16(k + 48)
__device__ __forceinline__ float nt3_pick(const float (&acc)[WG_NACC], int i) {
    static_assert(WG_NACC == 128, "128 cases");
    switch (i) {
        NT3_CASE64(0)
        NT3_CASE64(64)
        default:
            return 0.f;
    }
}

// The main loop: NT3_LOCKSTEP v3 (wg_main_loop), NT3_STAGGERED v4 (wg_main_loop_staggered),
// NT3_SPECIALISED v5 (wg5_produce / wg5_consume; takes the tensor maps of the f16 queries
// [b, d] (box 64 x 128) and catalogue [n, d] (box 64 x 256)).
#define NT3_LOCKSTEP 0
#define NT3_STAGGERED 1
#define NT3_SPECIALISED 2
// v6: v5 on a pair of blocks (the two query blocks of one catalogue slice), the catalogue
// tile multicast (wgmma_common.cuh, WG6_CLUSTER); v5's shared memory layout.
#define NT3_CLUSTERED 3
template <int LOOP>
__device__ __forceinline__ void nt3_candidates(const u16 *__restrict__ q16,
                                               const u16 *__restrict__ c16,
                                               const NtInfo *__restrict__ qinfo,
                                               const NtInfo *__restrict__ cinfo, int b, int n,
                                               int d, int tiles_per_slice,
                                               float *__restrict__ out_key,
                                               u32 *__restrict__ out_idx,
                                               const WgTensorMap *map_q = nullptr,
                                               const WgTensorMap *map_c = nullptr) {
    extern __shared__ __align__(1024) unsigned char nt3_smem[];
    const u32 smem = (wg_smem_addr(nt3_smem) + 1023u) & ~1023u;
    constexpr bool WS = LOOP == NT3_SPECIALISED || LOOP == NT3_CLUSTERED;  // warp-specialised
    constexpr int CL = LOOP == NT3_CLUSTERED ? WG6_CLUSTER : 1;            // blocks per cluster
    float *lkeys = reinterpret_cast<float *>(
        nt3_smem + (WS ? NT5_LIST_OFFSET
                    : LOOP == NT3_STAGGERED ? NT4_LIST_OFFSET
                                            : NT3_LIST_OFFSET));  // [BM][32]
    u32 *lidx = reinterpret_cast<u32 *>(lkeys + WG_BM * NTC_LIST);  // [BM][32]
    const int threads = WS ? WG5_THREADS : WG_THREADS;

    const int row0 = blockIdx.x * WG_BM, slice = blockIdx.y;
    const int ctiles = (n + WG_BN - 1) / WG_BN;
    const int ct_begin = slice * tiles_per_slice;
    const int ct_end = min(ct_begin + tiles_per_slice, ctiles);

    // Visible to every warp at the main loop's first __syncthreads (v5: wg5_init's), before
    // any epilogue.
    for (int e = threadIdx.x; e < WG_BM * NTC_LIST; e += threads) {
        lkeys[e] = NT3_POS_INF;
        lidx[e] = NT3_NONE;
    }
    // v5, v6: the producer warpgroup streams the tiles and leaves; the consumers go on.
    if (WS && !wg5_roles<WG5_PRODUCER_REGS, WG5_CONSUMER_REGS, CL>(smem, map_q, map_c, d, row0,
                                                                  ct_begin, ct_end))
        return;
    // Consumer-relative thread: warps 0-3 own query rows 0-63 of the tile, warps 4-7 64-127.
    const int tid = WS ? (int)threadIdx.x - 128 : (int)threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;

    // This thread's 2 query rows (local warp * 16 + g + 8 h): Q and 2/s_q. Rows past b get
    // Q = 0, 2/s_q = 0: finite keys, lists never written out.
    float qQ[2], qm2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int q = row0 + warp * 16 + 8 * h + g;
        qQ[h] = q < b ? qinfo[q].bound : 0.f;
        qm2[h] = q < b ? 2.f * qinfo[q].inv : 0.f;
    }

    // Where the epilogue reads the catalogue rows' records (norm, bound, 1/s) from: global
    // memory by default; two opt-in forms (LLM4DSR_NEAREST_TC_RECORDS, docs/kernels.md 8e: an
    // H200 profile of v5 puts ~7% of its warp samples on the epilogue's waits for them).
#if defined(NT3_PREFETCH_INFO) || defined(NT3_RECORDS_SMEM)
    const int wg_tid = tid & 127;
#endif
#ifdef NT3_PREFETCH_INFO
    // `prefetch`: the next tile's 32 lines of records prefetched into L1 a tile ahead, the
    // first tile's here, each next one at the start of the epilogue before it (the first warp
    // of each consumer warpgroup, one line per lane).
    auto prefetch_info = [&](int ct) {
        const int col = ct * WG_BN + 8 * wg_tid;
        if (wg_tid < WG_BN / 8 && ct < ct_end && col < n)
            asm volatile("prefetch.global.L1 [%0];\n" ::"l"(cinfo + col));
    };
    prefetch_info(ct_begin);
#endif
#ifdef NT3_RECORDS_SMEM
    // `smem` (v5 / v6): tile ct's records in this warpgroup's shared buffer, copied while the
    // tile's products run; rows past n get the excluded row's record (norm +inf). Waited for
    // (cp.async.wait_all + the warpgroup's named barrier) at the start of the epilogue; the
    // next tile's copies start once every warp of the warpgroup has its keys (a second
    // barrier), so the buffer is never overwritten while read.
    NtInfo *srec =
        reinterpret_cast<NtInfo *>(nt3_smem + NT5_REC_OFFSET) + (tid >> 7) * WG_BN;
    const int rec_bar = 2 + (tid >> 7);  // named barriers 2, 3 (1: the 256 consumers)
    auto stage_records = [&](int ct) {
        if (ct >= ct_end) return;  // no copy left pending when the block ends
#pragma unroll
        for (int r = wg_tid; r < WG_BN; r += 128) {
            const int col = ct * WG_BN + r;
            if (col < n) {
                asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(
                                 wg_smem_addr(srec + r)),
                             "l"(cinfo + col)
                             : "memory");
            } else {
                srec[r].norm = NT3_POS_INF;
                srec[r].bound = 0.f;
                srec[r].inv = 0.f;
                srec[r].flag = 0.f;
            }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    if (WS) stage_records(ct_begin);
#endif
    auto epilogue = [&](float (&acc)[WG_NACC], int ct) {
#ifdef NT3_PREFETCH_INFO
        prefetch_info(ct + 1);
#endif
#ifdef NT3_RECORDS_SMEM
        if (WS) {
            asm volatile("cp.async.wait_all;\n" ::: "memory");
            asm volatile("bar.sync %0, 128;\n" ::"r"(rec_bar) : "memory");
        }
#endif
#ifdef NT3_DIAG_NO_EPILOGUE
        // Benchmark diagnostic only (benches/kernels.rs): the main loop alone; a sum keeps
        // every product alive (ptxas narrows a wgmma whose outputs are dead). Lists wrong.
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < WG_NACC; ++i) sum += acc[i];
        if (sum == 1.2345f) lkeys[tid] = (float)ct;
        return;
#endif
        // acc[4 j + 2 h + e] is query row warp*16 + 8h + g, catalogue row col0 + 8j + 2t + e;
        // it becomes that pair's key in place (nearest_tc.cu's two FMAs).
        const int col0 = ct * WG_BN;
#pragma unroll
        for (int j = 0; j < WG_BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = col0 + 8 * j + 2 * t + e;
                NtInfo ci;
#ifdef NT3_RECORDS_SMEM
                if (WS) {
                    ci = srec[col - col0];
                } else
#endif
                if (col < n) {
                    ci = cinfo[col];
                } else {
                    ci.norm = NT3_POS_INF; ci.bound = 0.f; ci.inv = 0.f; ci.flag = 0.f;
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float &x = acc[4 * j + 2 * h + e];
                    const float base = fmaf(-qQ[h], ci.bound, ci.norm);
                    x = fmaf(-(qm2[h] * ci.inv), x, base);
                }
            }
#ifdef NT3_RECORDS_SMEM
        // Every warp of this warpgroup has its keys: the buffer may take the next tile's.
        if (WS) {
            asm volatile("bar.sync %0, 128;\n" ::"r"(rec_bar) : "memory");
            stage_records(ct + 1);
        }
#endif
#ifdef NT3_DIAG_NO_SELECT
        // Benchmark diagnostic only: keys without the selection (lists come out wrong).
        {
            float mn = NT3_POS_INF;
#pragma unroll
            for (int i = 0; i < WG_NACC; ++i) mn = fminf(mn, acc[i]);
            if (mn == 1.2345f) lkeys[tid] = mn;
            return;
        }
#endif
        // Selection into the warp's own rows' lists (no other warp touches them): per
        // position (h, j, e), a ballot of the lanes whose value beats their row's current
        // 32nd key, and for those one call of nt3_insert. The insertion loop is out of line
        // on purpose: inlined at all 128 positions (v2's form) it is ~128 KB of code that
        // missed the instruction cache on every tile, and staging the keys in a local array
        // instead costs 128 KB of L2 traffic per tile; the call costs a few moves (ptxas passes
        // the arguments in registers that are free at that point).
        float thr[2];
#pragma unroll
        for (int h = 0; h < 2; ++h)
            thr[h] = lkeys[(warp * 16 + 8 * h + g) * NTC_LIST + NTC_LIST - 1];
#ifdef NT3_SELECT_COMPACT
        // The same selection with ~1/5 of the code (LLM4DSR_NEAREST_TC_SELECT=compact): the
        // unrolled form below is 128 ballot sites, ~46 KB of SASS run on every tile. Here one
        // unrolled pass sets bit p = 64 h + 2 j + e of this thread's mask where its key beats
        // its row's 32nd key at the start of the epilogue; a rolled loop then visits, in the
        // same order (h, j, e), only the positions where some lane's bit is set, fetches the
        // key with a uniform switch and runs the same ballot against the current 32nd key.
        // The positions skipped have no key below the starting threshold, so none below the
        // current one (the threshold only falls): the insertions, in order, are the unrolled
        // form's, and so are the lists.
        {
            u32 m[4] = {0u, 0u, 0u, 0u};
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < WG_BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (acc[4 * j + 2 * h + e] < thr[h])
                            m[2 * h + (j >> 4)] |= 1u << ((2 * j + e) & 31);
            // Rolled (one copy of the switch's compare tree, not four).
#pragma unroll 1
            for (int w = 0; w < 4; ++w) {
                const int h = w >> 1, rbase = warp * 16 + 8 * h;
                const u32 mw = w == 0 ? m[0] : w == 1 ? m[1] : w == 2 ? m[2] : m[3];
                float th = h ? thr[1] : thr[0];
                u32 todo = __reduce_or_sync(NT3_FULL, mw);  // warp-uniform
                while (todo) {
                    const int p = 32 * w + __ffs(todo) - 1;
                    todo &= todo - 1;
                    const int j = (p & 63) >> 1, e = p & 1;
                    const float key = nt3_pick(acc, 4 * j + 2 * h + e);
                    const u32 want = __ballot_sync(NT3_FULL, key < th);
                    if (want) {
                        nt3_insert(want, key, (u32)(col0 + 8 * j + e), rbase, lkeys, lidx, lane);
                        th = lkeys[(rbase + g) * NTC_LIST + NTC_LIST - 1];
                    }
                }
                if (h) {
                    thr[1] = th;
                } else {
                    thr[0] = th;
                }
            }
            return;
        }
#endif
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int rbase = warp * 16 + 8 * h;
#pragma unroll
            for (int j = 0; j < WG_BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float key = acc[4 * j + 2 * h + e];
                    const u32 want = __ballot_sync(NT3_FULL, key < thr[h]);
                    if (want) {  // warp-uniform
                        nt3_insert(want, key, (u32)(col0 + 8 * j + e), rbase, lkeys, lidx, lane);
                        // The lists of these rows may have tightened: the next position is
                        // tested against the fresh 32nd key.
                        thr[h] = lkeys[(rbase + g) * NTC_LIST + NTC_LIST - 1];
                    }
                }
        }
    };
    if (WS) {
        wg5_consume<false, CL>(smem, warp >> 2, d, ct_begin, ct_end, epilogue);
        // Every consumer warp's last insertions done (the producer warpgroup has left: a
        // named barrier over the 256 consumer threads).
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
    } else {
        if (LOOP == NT3_STAGGERED) {
            wg_main_loop_staggered<false>(smem, q16, c16, b, n, d, row0, ct_begin, ct_end,
                                          epilogue);
        } else {
            wg_main_loop<false>(smem, q16, c16, b, n, d, row0, ct_begin, ct_end, epilogue);
        }
        __syncthreads();  // every warp's last insertions done
    }
    for (int e = tid; e < WG_BM * NTC_LIST; e += WG_THREADS) {
        const int q = row0 + e / NTC_LIST;
        if (q < b) {
            const u64 o = ((u64)slice * b + q) * NTC_LIST + (e % NTC_LIST);
            out_key[o] = lkeys[e];
            out_idx[o] = lidx[e];
        }
    }
    if (WS) wg5_finish<CL>();
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
nearest_tc_candidates_v3(const u16 *__restrict__ q16, const u16 *__restrict__ c16,
                         const NtInfo *__restrict__ qinfo, const NtInfo *__restrict__ cinfo,
                         int b, int n, int d, int tiles_per_slice, float *__restrict__ out_key,
                         u32 *__restrict__ out_idx) {
    nt3_candidates<NT3_LOCKSTEP>(q16, c16, qinfo, cinfo, b, n, d, tiles_per_slice, out_key, out_idx);
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
nearest_tc_candidates_v4(const u16 *__restrict__ q16, const u16 *__restrict__ c16,
                         const NtInfo *__restrict__ qinfo, const NtInfo *__restrict__ cinfo,
                         int b, int n, int d, int tiles_per_slice, float *__restrict__ out_key,
                         u32 *__restrict__ out_idx) {
    nt3_candidates<NT3_STAGGERED>(q16, c16, qinfo, cinfo, b, n, d, tiles_per_slice, out_key, out_idx);
}

// v5 (the default on compute capability 9.0 since the H200 run of docs/kernels.md 8e):
// WG5_THREADS threads, NTC5_SMEM bytes of dynamic shared memory; v3's parameters (the f16 rows
// are read through the maps) followed by the tensor maps of the queries and the catalogue.
extern "C" __global__ void __launch_bounds__(WG5_THREADS, 1)
nearest_tc_candidates_v5(const u16 *__restrict__ q16, const u16 *__restrict__ c16,
                         const NtInfo *__restrict__ qinfo, const NtInfo *__restrict__ cinfo,
                         int b, int n, int d, int tiles_per_slice, float *__restrict__ out_key,
                         u32 *__restrict__ out_idx, const __grid_constant__ WgTensorMap map_q,
                         const __grid_constant__ WgTensorMap map_c) {
    nt3_candidates<NT3_SPECIALISED>(q16, c16, qinfo, cinfo, b, n, d, tiles_per_slice, out_key,
                                    out_idx, &map_q, &map_c);
}

// v6 (opt-in, LLM4DSR_NEAREST_TC_CANDIDATES=v6; correct on an H200, no faster than v5, 8e):
// v5 on clusters of two blocks along x (two query blocks of one catalogue slice; the plan
// pads the query blocks to an even count), the catalogue tile multicast. v5's parameters; the catalogue's tensor map
// has boxes of 64 x 128 (each block copies one half of the 256-row tile).
extern "C" __global__ void __cluster_dims__(WG6_CLUSTER, 1, 1) __launch_bounds__(WG5_THREADS, 1)
nearest_tc_candidates_v6(const u16 *__restrict__ q16, const u16 *__restrict__ c16,
                         const NtInfo *__restrict__ qinfo, const NtInfo *__restrict__ cinfo,
                         int b, int n, int d, int tiles_per_slice, float *__restrict__ out_key,
                         u32 *__restrict__ out_idx, const __grid_constant__ WgTensorMap map_q,
                         const __grid_constant__ WgTensorMap map_c) {
    nt3_candidates<NT3_CLUSTERED>(q16, c16, qinfo, cinfo, b, n, d, tiles_per_slice, out_key,
                                  out_idx, &map_q, &map_c);
}
