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

#ifdef NT3_SELECT_MASK
// Benchmark variant NT3_SELECT_MASK (not the default): acc[i] for a run-time i without moving
// the accumulators to local memory (each case reads one fixed register).
__device__ __forceinline__ float nt3_pick(const float (&acc)[WG_NACC], int i) {
    switch (i) {
    case 0: return acc[0];
    case 1: return acc[1];
    case 2: return acc[2];
    case 3: return acc[3];
    case 4: return acc[4];
    case 5: return acc[5];
    case 6: return acc[6];
    case 7: return acc[7];
    case 8: return acc[8];
    case 9: return acc[9];
    case 10: return acc[10];
    case 11: return acc[11];
    case 12: return acc[12];
    case 13: return acc[13];
    case 14: return acc[14];
    case 15: return acc[15];
    case 16: return acc[16];
    case 17: return acc[17];
    case 18: return acc[18];
    case 19: return acc[19];
    case 20: return acc[20];
    case 21: return acc[21];
    case 22: return acc[22];
    case 23: return acc[23];
    case 24: return acc[24];
    case 25: return acc[25];
    case 26: return acc[26];
    case 27: return acc[27];
    case 28: return acc[28];
    case 29: return acc[29];
    case 30: return acc[30];
    case 31: return acc[31];
    case 32: return acc[32];
    case 33: return acc[33];
    case 34: return acc[34];
    case 35: return acc[35];
    case 36: return acc[36];
    case 37: return acc[37];
    case 38: return acc[38];
    case 39: return acc[39];
    case 40: return acc[40];
    case 41: return acc[41];
    case 42: return acc[42];
    case 43: return acc[43];
    case 44: return acc[44];
    case 45: return acc[45];
    case 46: return acc[46];
    case 47: return acc[47];
    case 48: return acc[48];
    case 49: return acc[49];
    case 50: return acc[50];
    case 51: return acc[51];
    case 52: return acc[52];
    case 53: return acc[53];
    case 54: return acc[54];
    case 55: return acc[55];
    case 56: return acc[56];
    case 57: return acc[57];
    case 58: return acc[58];
    case 59: return acc[59];
    case 60: return acc[60];
    case 61: return acc[61];
    case 62: return acc[62];
    case 63: return acc[63];
    case 64: return acc[64];
    case 65: return acc[65];
    case 66: return acc[66];
    case 67: return acc[67];
    case 68: return acc[68];
    case 69: return acc[69];
    case 70: return acc[70];
    case 71: return acc[71];
    case 72: return acc[72];
    case 73: return acc[73];
    case 74: return acc[74];
    case 75: return acc[75];
    case 76: return acc[76];
    case 77: return acc[77];
    case 78: return acc[78];
    case 79: return acc[79];
    case 80: return acc[80];
    case 81: return acc[81];
    case 82: return acc[82];
    case 83: return acc[83];
    case 84: return acc[84];
    case 85: return acc[85];
    case 86: return acc[86];
    case 87: return acc[87];
    case 88: return acc[88];
    case 89: return acc[89];
    case 90: return acc[90];
    case 91: return acc[91];
    case 92: return acc[92];
    case 93: return acc[93];
    case 94: return acc[94];
    case 95: return acc[95];
    case 96: return acc[96];
    case 97: return acc[97];
    case 98: return acc[98];
    case 99: return acc[99];
    case 100: return acc[100];
    case 101: return acc[101];
    case 102: return acc[102];
    case 103: return acc[103];
    case 104: return acc[104];
    case 105: return acc[105];
    case 106: return acc[106];
    case 107: return acc[107];
    case 108: return acc[108];
    case 109: return acc[109];
    case 110: return acc[110];
    case 111: return acc[111];
    case 112: return acc[112];
    case 113: return acc[113];
    case 114: return acc[114];
    case 115: return acc[115];
    case 116: return acc[116];
    case 117: return acc[117];
    case 118: return acc[118];
    case 119: return acc[119];
    case 120: return acc[120];
    case 121: return acc[121];
    case 122: return acc[122];
    case 123: return acc[123];
    case 124: return acc[124];
    case 125: return acc[125];
    case 126: return acc[126];
    case 127: return acc[127];
    default: return __int_as_float(0x7f800000);
    }
}

// nt3_insert for candidates whose catalogue rows differ per lane (`col`).
__device__ __noinline__ void nt3_insert_cols(u32 want, float key, u32 col, int rbase,
                                             float *lkeys, u32 *lidx, int lane) {
    while (want) {
        const int src = __ffs(want) - 1;
        want &= want - 1;
        const float ck = __shfl_sync(NT3_FULL, key, src);
        const u32 cix = __shfl_sync(NT3_FULL, col, src);
        float *lk = lkeys + (rbase + (src >> 2)) * NTC_LIST;
        u32 *li = lidx + (rbase + (src >> 2)) * NTC_LIST;
        const float Lk = lk[lane];
        const u32 Li = li[lane];
        const int pos = __popc(__ballot_sync(NT3_FULL, nt3_before(Lk, Li, ck, cix)));
        if (pos < NTC_LIST) {
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
#endif

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)
nearest_tc_candidates_v3(const u16 *__restrict__ q16, const u16 *__restrict__ c16,
                         const NtInfo *__restrict__ qinfo, const NtInfo *__restrict__ cinfo,
                         int b, int n, int d, int tiles_per_slice, float *__restrict__ out_key,
                         u32 *__restrict__ out_idx) {
    extern __shared__ __align__(1024) unsigned char nt3_smem[];
    const u32 smem = (wg_smem_addr(nt3_smem) + 1023u) & ~1023u;
    float *lkeys = reinterpret_cast<float *>(nt3_smem + NT3_LIST_OFFSET);  // [BM][32]
    u32 *lidx = reinterpret_cast<u32 *>(lkeys + WG_BM * NTC_LIST);         // [BM][32]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * WG_BM, slice = blockIdx.y;
    const int ctiles = (n + WG_BN - 1) / WG_BN;
    const int ct_begin = slice * tiles_per_slice;
    const int ct_end = min(ct_begin + tiles_per_slice, ctiles);

    // Visible to every warp at the main loop's first __syncthreads, before any epilogue.
    for (int e = tid; e < WG_BM * NTC_LIST; e += WG_THREADS) {
        lkeys[e] = NT3_POS_INF;
        lidx[e] = NT3_NONE;
    }

    // This thread's 2 query rows (local warp * 16 + g + 8 h): Q and 2/s_q. Rows past b get
    // Q = 0, 2/s_q = 0: finite keys, lists never written out.
    float qQ[2], qm2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int q = row0 + warp * 16 + 8 * h + g;
        qQ[h] = q < b ? qinfo[q].bound : 0.f;
        qm2[h] = q < b ? 2.f * qinfo[q].inv : 0.f;
    }

    wg_main_loop<false>(smem, q16, c16, b, n, d, row0, ct_begin, ct_end,
                        [&](float (&acc)[WG_NACC], int ct) {
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
#ifdef NT3_SELECT_MASK
        // Benchmark variant: a branch-free pass builds each lane's candidate bitmask (bit 2 j +
        // e of mask[h]: the value beats its row's 32nd key at the tile's start), then rounds in
        // which every lane offers its next candidate still below the row's current 32nd key
        // (read through nt3_pick, registers only) and the warp inserts the offers.
        unsigned long long mask[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float thr0 = lkeys[(warp * 16 + 8 * h + g) * NTC_LIST + NTC_LIST - 1];
            u32 lo = 0, hi = 0;
#pragma unroll
            for (int j = 0; j < WG_BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const u32 bit = acc[4 * j + 2 * h + e] < thr0 ? 1u : 0u;
                    if (j < WG_BN / 16) lo |= bit << (2 * j + e);
                    else hi |= bit << (2 * j + e - 32);
                }
            mask[h] = ((unsigned long long)hi << 32) | lo;
        }
        if (__any_sync(NT3_FULL, (mask[0] | mask[1]) != 0ull)) {
#pragma unroll 1
            for (int h = 0; h < 2; ++h) {
                const int rbase = warp * 16 + 8 * h;
                const float *my_thr = lkeys + (rbase + g) * NTC_LIST + NTC_LIST - 1;
                unsigned long long m = mask[h];
                while (true) {
                    const float thr = *my_thr;
                    float key = NT3_POS_INF;
                    u32 col = 0;
                    bool has = false;
                    while (m) {
                        const int p = __ffsll((long long)m) - 1;  // 2 j + e
                        m &= m - 1;
                        const float kk = nt3_pick(acc, 4 * (p >> 1) + 2 * h + (p & 1));
                        if (kk < thr) {
                            key = kk;
                            col = (u32)(col0 + 8 * (p >> 1) + 2 * t + (p & 1));
                            has = true;
                            break;
                        }
                    }
                    const u32 want = __ballot_sync(NT3_FULL, has);
                    if (!want) break;
                    nt3_insert_cols(want, key, col, rbase, lkeys, lidx, lane);
                }
            }
        }
#else
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
#endif
    });
    __syncthreads();  // every warp's last insertions done
    for (int e = tid; e < WG_BM * NTC_LIST; e += WG_THREADS) {
        const int q = row0 + e / NTC_LIST;
        if (q < b) {
            const u64 o = ((u64)slice * b + q) * NTC_LIST + (e % NTC_LIST);
            out_key[o] = lkeys[e];
            out_idx[o] = lidx[e];
        }
    }
}
