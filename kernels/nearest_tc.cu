// Grounding search on tensor cores (version "tc", opt-in: LLM4DSR_NEAREST_VERSION=tc): the exact
// top-k L2 search of nearest.cu, with the distance GEMM on tensor cores and exactness proved per
// query by a certificate; queries the certificate does not cover go through nearest.cu's f32
// kernel (the wrapper, crates/kernels/src/cuda.rs, does that and counts them).
//
// Kernels (launch shapes: crates/kernels/src/launch.rs; the bound coefficients:
// crates/kernels/src/nearest_tc.rs, which also holds a CPU model of the whole scheme):
//   nearest_tc_prep: per row (queries or catalogue) a power-of-two scale s = 2^(15 - E) with
//     max|x| in [2^(E-1), 2^E), the row x*s rounded to f16 (u = 2^-11: 8x tighter than bf16,
//     and the power of two is exact), and an info record {norm, bound coefficient, 1/s, flag}.
//     norm = |x|^2 from nearest.cu's row_sq_norms (the f32 kernel's own norms; +inf for
//     excluded rows), coefficient = coef * sqrt(norm), flag = 1 when E left [-40, 40] (the scale
//     was clamped: the row takes the f32 path).
//   nearest_tc_candidates: grid = (query blocks, catalogue slices) (query blocks fastest: the 8
//     query blocks of a slice run side by side and share each catalogue tile through L2).
//     The main loop is item_loglik_fused_v2.cu's (v2a): 128 queries x 128 catalogue rows per
//     tile, 8 warps as 4 x 2, each 32 x 64 = 2 x 8 mma.m16n8k16 (f16, f32 accumulate), a
//     3-stage cp.async ring over 64-deep stages, ldmatrix.x4 from the XOR-swizzled layout; the
//     address arithmetic is copied line for line (jobs/sim/nearest_tc.py emulates both through
//     the same code). The epilogue turns each dot product into a LOWER BOUND on the distance
//     minus |q|^2:
//         key = |c|^2 - Q e_c - 2 (acc / (s_q s_c)),   Q = |q| (inflated), e_c = coef |c|
//     (two FMAs; 2/(s_q s_c) is a power of two, so the scaling is exact), and keeps per query
//     the 32 smallest (key, row) pairs of the block's slice in shared memory (one list per
//     query; an entry per lane, warp-wide insertion as nearest.cu's top-k; the two column
//     warps of a query band insert one after the other, ordered by a named barrier). Output:
//     [slice][query][32] keys and rows.
//   nearest_tc_rerank: one warp per query: the best 32 of all slices' candidates by key, their
//     f32 distances with nearest.cu's arithmetic (fmaf over the depth in order, each lane's
//     row staged through shared memory by cp.async, nt_dot_in_order; then
//     fmaxf(|q|^2 + |c|^2 - 2 dot, 0): bit for bit what the f32 kernel computes), sorted by
//     (distance, row); and the certificate:
//         |q|^2 + T - slack > d_k  (compared in f64),
//     T = the smallest of (each slice list's 32nd key, the 32nd selected key): every row that
//     was not re-ranked has key >= T, and key lower-bounds (the f32 kernel's distance - |q|^2)
//     up to `slack` = 2^-20 (|q|^2 + max|c|^2) of f32 roundings. So no row outside the re-ranked
//     32 can reach the k-th distance: the top-k equals the f32 kernel's, ties included.
//     Writes the top-k, the margin (diagnostic) and status 1 (certified) or 0 (fall back).
//   nearest_tc_rerank_all: the second level, for the queries the first did not certify: one
//     block per query re-ranks every list entry of every slice (slices x 32), T = the smallest
//     slice-list 32nd key (rows outside every list are all that is left to bound). Queries
//     that fail here too take the f32 kernel.
//   nearest_tc_gather: rows of a matrix by index (the fallback queries and their norms).
// The error bound behind coef (derived in docs/kernels.md and nearest_tc.rs): f16 rounding of
// both operands, the tensor core's accumulation (each m16n8k16 step's alignment truncation,
// modelled as <= 2^-22 d relative to the sum of |products|, 2x the Fasi et al. 2021 model),
// and the f32 kernel's own dot-product error, all through Cauchy-Schwarz per (query, row).
//
// Needs sm_80+ (cp.async, ldmatrix, f16 mma) and dynamic shared memory: NTC_SMEM = 128 KB for
// the candidates, NTC_RERANK_SMEM = 111 KB for the re-rank kernels (the wrapper opts in). No
// headers: NVRTC needs nothing from a CUDA toolkit.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef NTC_BM
#define NTC_BM 128
#endif
#ifndef NTC_BN
#define NTC_BN 128
#endif
#ifndef NTC_BK
#define NTC_BK 64
#endif
#ifndef NTC_STAGES
#define NTC_STAGES 3
#endif
#ifndef NTC_THREADS
#define NTC_THREADS 256
#endif
#ifndef NTC_LIST
#define NTC_LIST 32
#endif
#ifndef NTC_RERANK_WARPS
#define NTC_RERANK_WARPS 8
#endif

static_assert(NTC_BM == 128 && NTC_BN == 128, "the v2a warp tiling assumes 128 x 128");
static_assert(NTC_BK == 64, "the XOR swizzle assumes 8 chunks of 16 B per row");
static_assert(NTC_THREADS == 256, "8 warps");
static_assert(NTC_STAGES >= 2, "a ring needs two stages");
static_assert(NTC_LIST == 32, "one list entry per lane");

#define NT_A_BYTES (NTC_BM * NTC_BK * 2)
#define NT_B_BYTES (NTC_BN * NTC_BK * 2)
#define NT_STAGE_BYTES (NT_A_BYTES + NT_B_BYTES)
// Dynamic shared memory: the stage ring, then the candidate lists (keys, then rows).
#define NT_LIST_OFFSET (NTC_STAGES * NT_STAGE_BYTES)
#define NTC_SMEM (NT_LIST_OFFSET + 2 * NTC_BM * NTC_LIST * 4)

#define NT_POS_INF __int_as_float(0x7f800000)
#define NT_NONE 0xffffffffu
#define NT_FULL 0xffffffffu

// Per-row record written by nearest_tc_prep (16 bytes, one vector load).
struct __align__(16) NtInfo {
    float norm;   // |x|^2 (f32, row_sq_norms), +inf for excluded rows
    float bound;  // coef * sqrt(norm): queries Q, catalogue e_c; 0 when norm is not finite
    float inv;    // 1/s = 2^(E - 15), exact
    float flag;   // 1 when the scale was clamped (the row must take the f32 path)
};

struct __align__(16) NtF4 {
    float x, y, z, w;
};

// (d1, i1) < (d2, i2) lexicographically (as nearest.cu).
__device__ __forceinline__ bool nt_before(float d1, u32 i1, float d2, u32 i2) {
    return d1 < d2 || (d1 == d2 && i1 < i2);
}

// Merge one candidate per lane, (v, i) (none where i == NT_NONE), into the warp's register
// list (L, Li): one entry per lane, sorted by (value, row). The lanes whose candidate beats
// the list's 32nd entry as it was on entry insert theirs in lane order; each insertion shifts
// the tail up by one and drops the 33rd. Used by both re-rank levels (merging slice lists and
// warps' lists, and inserting re-ranked distances).
__device__ __forceinline__ void nt_list_merge(float &L, u32 &Li, float v, u32 i, int lane) {
    const float thv = __shfl_sync(NT_FULL, L, 31);
    const u32 thi = __shfl_sync(NT_FULL, Li, 31);
    u32 want = __ballot_sync(NT_FULL, i != NT_NONE && nt_before(v, i, thv, thi));
    while (want) {
        const int src = __ffs(want) - 1;
        want &= want - 1;
        const float sv = __shfl_sync(NT_FULL, v, src);
        const u32 sx = __shfl_sync(NT_FULL, i, src);
        const int pos = __popc(__ballot_sync(NT_FULL, nt_before(L, Li, sv, sx)));
        const float uv = __shfl_up_sync(NT_FULL, L, 1);
        const u32 ui = __shfl_up_sync(NT_FULL, Li, 1);
        if (pos < 32) {
            if (lane > pos) {
                L = uv;
                Li = ui;
            } else if (lane == pos) {
                L = sv;
                Li = sx;
            }
        }
    }
}

__device__ __forceinline__ u16 nt_f32_to_f16(float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// ---- the v2a main-loop machinery (item_loglik_fused_v2.cu, same arithmetic) ----

__device__ __forceinline__ u32 nt_smem_addr(const void *p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void nt_cp_async16(u32 dst, const void *src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void nt_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void nt_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

__device__ __forceinline__ void nt_ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr) : "memory");
}

__device__ __forceinline__ void nt_mma_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Named barrier between the two column warps of a query band: the second waits (sync), the
// first signals (arrive). Both make the first warp's list writes visible to the second.
__device__ __forceinline__ void nt_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void nt_bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ u32 nt_swz(int r, int ch) {
    return (u32)(r * (NTC_BK * 2) + ((ch ^ (r & 7)) << 4));
}

// f2_load_step of v2a: queries play the hidden rows (A), catalogue rows the head rows (B).
__device__ __forceinline__ void nt_load_step(u32 stage, const u16 *a_src, const u16 *b_src,
                                             const u16 *__restrict__ qbase,
                                             const u16 *__restrict__ cbase, u64 stride32,
                                             int a_rows_left, int b_rows_left, int k0,
                                             bool k_ok, int tid) {
    const u32 dst = stage + nt_swz(tid >> 3, tid & 7);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bool ok = k_ok && 32 * i < a_rows_left;
        nt_cp_async16(dst + i * 32 * (NTC_BK * 2), ok ? a_src + i * stride32 + k0 : qbase,
                      ok ? 16u : 0u);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const bool ok = k_ok && 32 * i < b_rows_left;
        nt_cp_async16(dst + NT_A_BYTES + i * 32 * (NTC_BK * 2),
                      ok ? b_src + i * stride32 + k0 : cbase, ok ? 16u : 0u);
    }
}

// ---- prep ----

// One warp per row, 8 rows per block. `norms` from row_sq_norms (after mark_excluded).
extern "C" __global__ void __launch_bounds__(256)
nearest_tc_prep(const float *__restrict__ x, const float *__restrict__ norms, int rows, int d,
                float coef, u16 *__restrict__ out16, NtInfo *__restrict__ info) {
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float *r = x + (u64)row * d;
    float mx = 0.f;
    for (int c = lane; c < d; c += 32) mx = fmaxf(mx, fabsf(r[c]));
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(NT_FULL, mx, off));
    // mx = m 2^E, m in [0.5, 1) (E = biased exponent - 126 for a normal mx); zero rows: s = 1.
    int E = 15;
    float flag = 0.f;
    if (mx > 0.f) {
        E = (int)((__float_as_uint(mx) >> 23) & 0xff) - 126;
        if (E < -40 || E > 40) {
            flag = 1.f;
            E = E < -40 ? -40 : 40;
        }
    }
    const float s = __uint_as_float((u32)(15 - E + 127) << 23);    // 2^(15-E), exact
    const float inv = __uint_as_float((u32)(E - 15 + 127) << 23);  // 2^(E-15), exact
    u16 *o = out16 + (u64)row * d;
    for (int c = lane; c < d; c += 32) o[c] = nt_f32_to_f16(r[c] * s);
    if (lane == 0) {
        const float nrm = norms[row];
        NtInfo inf;
        inf.norm = nrm;
        inf.bound = nrm < NT_POS_INF ? coef * sqrtf(nrm) : 0.f;
        inf.inv = inv;
        inf.flag = flag;
        info[row] = inf;
    }
}

// ---- candidates ----

extern "C" __global__ void __launch_bounds__(NTC_THREADS, 1)
nearest_tc_candidates(const u16 *__restrict__ q16, const u16 *__restrict__ c16,
                      const NtInfo *__restrict__ qinfo, const NtInfo *__restrict__ cinfo, int b,
                      int n, int d, int tiles_per_slice, float *__restrict__ out_key,
                      u32 *__restrict__ out_idx) {
    extern __shared__ __align__(128) unsigned char nt_smem[];
    const u32 smem = nt_smem_addr(nt_smem);
    float *lkeys = reinterpret_cast<float *>(nt_smem + NT_LIST_OFFSET);  // [BM][32]
    u32 *lidx = reinterpret_cast<u32 *>(lkeys + NTC_BM * NTC_LIST);      // [BM][32]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * NTC_BM, slice = blockIdx.y;
    const int ctiles = (n + NTC_BN - 1) / NTC_BN;
    const int ct_begin = slice * tiles_per_slice;
    const int ct_end = min(ct_begin + tiles_per_slice, ctiles);
    const int ksteps = (d + NTC_BK - 1) / NTC_BK;
    const int total = (ct_end - ct_begin) * ksteps;

    for (int e = tid; e < NTC_BM * NTC_LIST; e += NTC_THREADS) {
        lkeys[e] = NT_POS_INF;
        lidx[e] = NT_NONE;
    }

    const u32 swz = lane & 7;
    const u32 a_row_off = (u32)((wm * 32 + (lane & 15)) * (NTC_BK * 2));
    const u32 a_ch = lane >> 4;
    const u32 b_row_off = (u32)((wn * 64 + ((lane >> 4) << 3) + (lane & 7)) * (NTC_BK * 2));
    const u32 b_ch = (lane >> 3) & 1;

    // The thread's 4 query rows (ri = mi * 2 + h -> local row wm*32 + mi*16 + h*8 + g): Q and
    // 2/s_q. Rows past b get Q = 0, 2/s_q = 0: finite keys, lists never written out.
    float qQ[4], qm2[4];
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
        const int q = row0 + wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g;
        qQ[ri] = q < b ? qinfo[q].bound : 0.f;
        qm2[ri] = q < b ? 2.f * qinfo[q].inv : 0.f;
    }

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 8; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

    const int ld_r = tid >> 3, ld_ch = tid & 7;
    const u64 stride32 = 32ull * (u64)d;
    const u16 *a_src = q16 + (u64)(row0 + ld_r) * (u64)d + ld_ch * 8;
    const int a_rows_left = b - row0 - ld_r;
    int ld_ct = ct_begin, ld_kt = 0;
    const u16 *b_src = c16 + (u64)(ld_ct * NTC_BN + ld_r) * (u64)d + ld_ch * 8;
    int st_read = 0, st_write = NTC_STAGES - 1;
#pragma unroll
    for (int p = 0; p < NTC_STAGES - 1; ++p) {
        if (p < total) {
            nt_load_step(smem + p * NT_STAGE_BYTES, a_src, b_src, q16, c16, stride32,
                         a_rows_left, n - ld_ct * NTC_BN - ld_r, ld_kt * NTC_BK,
                         ld_kt * NTC_BK + ld_ch * 8 < d, tid);
            if (++ld_kt == ksteps) { ld_kt = 0; ++ld_ct; b_src += NTC_BN * (u64)d; }
        }
        nt_cp_async_commit();
    }

    int ct = ct_begin, kt = 0;
    for (int s = 0; s < total; ++s) {
        nt_cp_async_wait<NTC_STAGES - 2>();
        __syncthreads();
        if (s + NTC_STAGES - 1 < total) {
            nt_load_step(smem + st_write * NT_STAGE_BYTES, a_src, b_src, q16, c16, stride32,
                         a_rows_left, n - ld_ct * NTC_BN - ld_r, ld_kt * NTC_BK,
                         ld_kt * NTC_BK + ld_ch * 8 < d, tid);
            if (++ld_kt == ksteps) { ld_kt = 0; ++ld_ct; b_src += NTC_BN * (u64)d; }
        }
        nt_cp_async_commit();

        const u32 sa = smem + st_read * NT_STAGE_BYTES;
        const u32 sb = sa + NT_A_BYTES;
#pragma unroll
        for (int kk = 0; kk < NTC_BK / 16; ++kk) {
            u32 a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                nt_ldmatrix_x4(a[mi], sa + a_row_off + mi * 16 * (NTC_BK * 2) +
                                          (((kk * 2 + a_ch) ^ swz) << 4));
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                u32 bb[4];
                nt_ldmatrix_x4(bb, sb + b_row_off + p * 16 * (NTC_BK * 2) +
                                       (((kk * 2 + b_ch) ^ swz) << 4));
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    nt_mma_f16(acc[mi][2 * p], a[mi], bb[0], bb[1]);
                    nt_mma_f16(acc[mi][2 * p + 1], a[mi], bb[2], bb[3]);
                }
            }
        }
        st_read = st_read + 1 == NTC_STAGES ? 0 : st_read + 1;
        st_write = st_write + 1 == NTC_STAGES ? 0 : st_write + 1;

        if (++kt == ksteps) {
            // Epilogue of tile ct: acc[mi][ni][h*2+e] is query row wm*32+mi*16+h*8+g, catalogue
            // row col0+wn*64+ni*8+2t+e; it becomes that pair's key (in place).
            const int col0 = ct * NTC_BN;
#pragma unroll
            for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + wn * 64 + ni * 8 + 2 * t + e;
                    NtInfo ci;
                    if (col < n) {
                        ci = cinfo[col];
                    } else {
                        ci.norm = NT_POS_INF; ci.bound = 0.f; ci.inv = 0.f; ci.flag = 0.f;
                    }
#pragma unroll
                    for (int ri = 0; ri < 4; ++ri) {
                        float &x = acc[ri >> 1][ni][(ri & 1) * 2 + e];
                        const float base = fmaf(-qQ[ri], ci.bound, ci.norm);
                        x = fmaf(-(qm2[ri] * ci.inv), x, base);
                    }
                }
            // Selection: warp (wm, 0) inserts first, warp (wm, 1) after the named barrier.
            if (wn == 1) nt_bar_sync(1 + wm, 64);
            float thr[4];
            bool any = false;
#pragma unroll
            for (int ri = 0; ri < 4; ++ri) {
                thr[ri] = lkeys[(wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g) * NTC_LIST +
                                NTC_LIST - 1];
#pragma unroll
                for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        any |= acc[ri >> 1][ni][(ri & 1) * 2 + e] < thr[ri];
            }
            if (__any_sync(NT_FULL, any)) {
#pragma unroll
                for (int ri = 0; ri < 4; ++ri) {
                    const int rbase = wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8;
#pragma unroll
                    for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float key = acc[ri >> 1][ni][(ri & 1) * 2 + e];
                            u32 want = __ballot_sync(NT_FULL, key < thr[ri]);
                            const u32 cbase = (u32)(col0 + wn * 64 + ni * 8 + e);
                            while (want) {
                                const int src = __ffs(want) - 1;
                                want &= want - 1;
                                const float ck = __shfl_sync(NT_FULL, key, src);
                                const u32 cix = cbase + 2 * (src & 3);
                                float *lk = lkeys + (rbase + (src >> 2)) * NTC_LIST;
                                u32 *li = lidx + (rbase + (src >> 2)) * NTC_LIST;
                                const float Lk = lk[lane];
                                const u32 Li = li[lane];
                                const int pos =
                                    __popc(__ballot_sync(NT_FULL, nt_before(Lk, Li, ck, cix)));
                                if (pos < NTC_LIST) {  // uniform across the warp
                                    const float uk = __shfl_up_sync(NT_FULL, Lk, 1);
                                    const u32 ui = __shfl_up_sync(NT_FULL, Li, 1);
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
                    // The lists of this band's rows may have tightened: re-read the threshold.
                    thr[ri] = lkeys[(rbase + g) * NTC_LIST + NTC_LIST - 1];
                }
            }
            if (wn == 0) nt_bar_arrive(1 + wm, 64);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                for (int ni = 0; ni < 8; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
            kt = 0;
            ++ct;
        }
    }
    nt_cp_async_wait<0>();
    __syncthreads();  // every warp's last insertions done
    for (int e = tid; e < NTC_BM * NTC_LIST; e += NTC_THREADS) {
        const int q = row0 + e / NTC_LIST;
        if (q < b) {
            const u64 o = ((u64)slice * b + q) * NTC_LIST + (e % NTC_LIST);
            out_key[o] = lkeys[e];
            out_idx[o] = lidx[e];
        }
    }
}

// ---- re-rank and certificate ----

// The f32 kernel's dot product of a query row and a catalogue row (n4 float4 each): fmaf over
// the depth in order, so the distance is bit for bit nearest_topk's. Each lane walks its own
// catalogue row (16 KB at d = 4096; 32 rows a warp), so the walk is bound by the bytes in
// flight. Written as a plain loop, ptxas issues each float4 load one or two FMA groups before
// its use (~48 B in flight per lane, ~12 KB per SM with the re-rank's 8 warps a block, one
// block per SM at 1,024 queries): latency-bound. Explicit register batches do not help (ptxas
// sinks each load back next to its use), so the rows are staged through shared memory with
// cp.async: a ring of NT_DOT_STAGES buffers of NT_DOT_BATCH float4 per lane, STAGES - 1 of
// them in flight ahead of the FMAs (2 x 8 x 16 B = 256 B a lane: 64 KB per SM), the FMAs
// unchanged and in order.
// NT_DOT_STAGES=0 is the plain loop (the bench's diagnostic build).
#ifndef NT_DOT_STAGES
#define NT_DOT_STAGES 3
#endif
#ifndef NT_DOT_BATCH
#define NT_DOT_BATCH 8
#endif
static_assert(NT_DOT_STAGES == 0 || NT_DOT_STAGES >= 2, "a ring needs two stages");
static_assert(NT_DOT_BATCH >= 2 && NT_DOT_BATCH <= 32 && NT_DOT_BATCH % 2 == 0,
              "an even batch of 2 to 32 float4 a lane (an odd slot stride: no bank conflicts)");
// A warp's stage: 32 lanes' slots of NT_DOT_BATCH float4 and one of padding (an odd stride
// in float4, 36 words at 8: lane l's float4 u starts at bank 4 (l + u) mod 32, so each
// quarter warp's LDS.128 is conflict-free; jobs/sim/rerank_stage.py checks), then the
// query's NT_DOT_BATCH float4 (read by every lane: a broadcast), copied by the first
// NT_DOT_BATCH lanes.
#define NT_DOT_SLOT (NT_DOT_BATCH + 1)
#define NT_DOT_STAGE_F4 (32 * NT_DOT_SLOT + NT_DOT_BATCH)
#define NT_DOT_WARP_BYTES (NT_DOT_STAGES * NT_DOT_STAGE_F4 * 16)
// The re-rank kernels' dynamic shared memory (launch.rs: NTC_RERANK_SMEM, 111 KB).
#define NTC_RERANK_SMEM (NTC_RERANK_WARPS * NT_DOT_WARP_BYTES)

// Every lane of the warp calls it with the same n4 (the loop is warp-uniform and synchronises
// the warp); `cr` null: this lane has no row (it still copies its part of the query) and gets
// 0. `buf`: the warp's NT_DOT_WARP_BYTES of shared memory.
__device__ __forceinline__ float nt_dot_in_order(const NtF4 *__restrict__ qr,
                                                 const NtF4 *__restrict__ cr, int n4,
                                                 NtF4 *buf, int lane) {
    float dot = 0.f;
    int i = 0;
#if NT_DOT_STAGES > 0
    const int nb = n4 / NT_DOT_BATCH;
    const u32 base = nt_smem_addr(buf);
#define NT_DOT_ISSUE(j)                                                                     \
    {                                                                                       \
        const u32 st = base + ((j) % NT_DOT_STAGES) * (NT_DOT_STAGE_F4 * 16);              \
        const int i0 = (j) * NT_DOT_BATCH;                                                  \
        if (cr != nullptr) {                                                                \
            _Pragma("unroll") for (int u = 0; u < NT_DOT_BATCH; ++u)                        \
                nt_cp_async16(st + (lane * NT_DOT_SLOT + u) * 16, cr + i0 + u, 16);        \
        }                                                                                   \
        if (lane < NT_DOT_BATCH)                                                            \
            nt_cp_async16(st + (32 * NT_DOT_SLOT + lane) * 16, qr + i0 + lane, 16);        \
    }
#pragma unroll 1
    for (int j = 0; j < NT_DOT_STAGES - 1; ++j) {
        if (j < nb) NT_DOT_ISSUE(j)
        nt_cp_async_commit();
    }
#pragma unroll 1
    for (int j = 0; j < nb; ++j) {
        __syncwarp();  // every lane is done with the stage batch j + STAGES - 1 reuses
        if (j + NT_DOT_STAGES - 1 < nb) NT_DOT_ISSUE(j + NT_DOT_STAGES - 1)
        nt_cp_async_commit();
        nt_cp_async_wait<NT_DOT_STAGES - 1>();  // this lane's copies of batch j landed
        __syncwarp();                           // and every lane's (the query's chunk)
        if (cr != nullptr) {
            const NtF4 *st = buf + (j % NT_DOT_STAGES) * NT_DOT_STAGE_F4;
#pragma unroll
            for (int u = 0; u < NT_DOT_BATCH; ++u) {
                const NtF4 a = st[32 * NT_DOT_SLOT + u], c = st[lane * NT_DOT_SLOT + u];
                dot = fmaf(a.x, c.x, dot);
                dot = fmaf(a.y, c.y, dot);
                dot = fmaf(a.z, c.z, dot);
                dot = fmaf(a.w, c.w, dot);
            }
        }
    }
#undef NT_DOT_ISSUE
    __syncwarp();  // the buffer is free for the warp's next call
    i = nb * NT_DOT_BATCH;
#endif
    if (cr == nullptr) return 0.f;
    for (; i < n4; ++i) {
        const NtF4 a = qr[i], c = cr[i];
        dot = fmaf(a.x, c.x, dot);
        dot = fmaf(a.y, c.y, dot);
        dot = fmaf(a.z, c.z, dot);
        dot = fmaf(a.w, c.w, dot);
    }
    return dot;
}

// One warp per query (NTC_RERANK_WARPS per block). `queries`, `catalog`: the f32 rows;
// `qnorm`, `cnorm`: row_sq_norms (cnorm with +inf at excluded rows); `qinfo`: the queries'
// prep records (flag); cand_*: [slices][b][32] from nearest_tc_candidates; c2max >= every
// finite |c|^2. Outputs [b][k] distances and rows (sorted by (distance, row)), per query the
// certificate margin (f64 difference, as f32) and status (1 certified, 0 fall back).
// Dynamic shared memory: NTC_RERANK_SMEM (each warp's staging ring, nt_dot_in_order).
extern "C" __global__ void __launch_bounds__(NTC_RERANK_WARPS * 32)
nearest_tc_rerank(const float *__restrict__ queries, const float *__restrict__ catalog,
                  const float *__restrict__ qnorm, const float *__restrict__ cnorm,
                  const NtInfo *__restrict__ qinfo, const float *__restrict__ cand_key,
                  const u32 *__restrict__ cand_idx, int b, int d, int k, int slices,
                  float c2max, float *__restrict__ out_d, u32 *__restrict__ out_i,
                  float *__restrict__ out_margin, u32 *__restrict__ out_status) {
    __shared__ float sd[NTC_RERANK_WARPS][32];
    __shared__ u32 si[NTC_RERANK_WARPS][32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int q = blockIdx.x * NTC_RERANK_WARPS + w;
    if (q >= b) return;  // uniform per warp

    // 1. The 32 smallest (key, row) of all slices' lists; T = min of every list's 32nd key.
    float Lk = NT_POS_INF, tl = NT_POS_INF;
    u32 Li = NT_NONE;
    for (int s = 0; s < slices; ++s) {
        const u64 base = ((u64)s * b + q) * NTC_LIST;
        const float ck = cand_key[base + lane];
        const u32 ci = cand_idx[base + lane];
        tl = fminf(tl, __shfl_sync(NT_FULL, ck, NTC_LIST - 1));
        nt_list_merge(Lk, Li, ck, ci, lane);
    }
    const float T = fminf(tl, __shfl_sync(NT_FULL, Lk, 31));

    // 2. f32 distance of this lane's candidate, with nearest_topk's arithmetic.
    const float qn = qnorm[q];
    float dist = NT_POS_INF;
    {
        extern __shared__ __align__(128) unsigned char nt_smem[];
        NtF4 *buf = reinterpret_cast<NtF4 *>(nt_smem + w * NT_DOT_WARP_BYTES);
        const NtF4 *qr = reinterpret_cast<const NtF4 *>(queries + (u64)q * d);
        const NtF4 *cr =
            Li != NT_NONE ? reinterpret_cast<const NtF4 *>(catalog + (u64)Li * d) : nullptr;
        const float dot = nt_dot_in_order(qr, cr, d / 4, buf, lane);
        if (Li != NT_NONE) {
            dist = fmaxf(qn + cnorm[Li] - 2.f * dot, 0.f);
            if (!(dist < NT_POS_INF)) dist = NT_POS_INF;
        }
    }
    const u32 id = Li;

    // 3. Sort the 32 by (distance, row): position = how many lanes come before.
    sd[w][lane] = NT_POS_INF;
    si[w][lane] = NT_NONE;
    __syncwarp();
    int pos = 0;
    for (int l = 0; l < 32; ++l) {
        const float dl = __shfl_sync(NT_FULL, dist, l);
        const u32 il = __shfl_sync(NT_FULL, id, l);
        pos += nt_before(dl, il, dist, id) ? 1 : 0;
    }
    if (id != NT_NONE) {
        sd[w][pos] = dist;
        si[w][pos] = id;
    }
    __syncwarp();
    if (lane < k) {
        out_d[(u64)q * k + lane] = sd[w][lane];
        out_i[(u64)q * k + lane] = si[w][lane];
    }
    // 4. The certificate, in f64 (exact for these f32 operands up to 2^-53).
    if (lane == 0) {
        const double dk = (double)sd[w][k - 1];
        const double slack = 9.5367431640625e-07 * ((double)qn + (double)c2max);  // 2^-20
        const double lhs = (double)qn + (double)T - slack;
        const bool ok = lhs > dk && qinfo[q].flag == 0.f;
        out_margin[q] = (float)(lhs - dk);
        out_status[q] = ok ? 1u : 0u;
    }
}

// Second level, for the queries nearest_tc_rerank did not certify (`rows`, m of them): one
// block per query re-ranks EVERY list entry of every slice (slices x 32 candidates, not the
// best 32), so that T = min over the slice lists of their 32nd key: rows outside all lists are
// all that is left to bound, and that key is much deeper in the ranking than the 32nd overall.
// Warp w takes slices w, w + 8, ...: f32 distances (nearest_topk's arithmetic, as above), a
// running 32-entry list by (distance, row); warp 0 merges the 8 lists. Overwrites the query's
// top-k, margin and status (1 certified here, 0: the f32 kernel must run).
extern "C" __global__ void __launch_bounds__(NTC_RERANK_WARPS * 32)
nearest_tc_rerank_all(const float *__restrict__ queries, const float *__restrict__ catalog,
                      const float *__restrict__ qnorm, const float *__restrict__ cnorm,
                      const NtInfo *__restrict__ qinfo, const float *__restrict__ cand_key,
                      const u32 *__restrict__ cand_idx, const u32 *__restrict__ rows, int m,
                      int b, int d, int k, int slices, float c2max, float *__restrict__ out_d,
                      u32 *__restrict__ out_i, float *__restrict__ out_margin,
                      u32 *__restrict__ out_status) {
    __shared__ float sd[NTC_RERANK_WARPS][32];
    __shared__ u32 si[NTC_RERANK_WARPS][32];
    __shared__ float stl[NTC_RERANK_WARPS];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if ((int)blockIdx.x >= m) return;
    const int q = (int)rows[blockIdx.x];
    const float qn = qnorm[q];
    const NtF4 *qr = reinterpret_cast<const NtF4 *>(queries + (u64)q * d);
    extern __shared__ __align__(128) unsigned char nt_smem[];
    NtF4 *buf = reinterpret_cast<NtF4 *>(nt_smem + w * NT_DOT_WARP_BYTES);
    float Ld = NT_POS_INF, tl = NT_POS_INF;
    u32 Li = NT_NONE;
    for (int s = w; s < slices; s += NTC_RERANK_WARPS) {
        const u64 base = ((u64)s * b + q) * NTC_LIST;
        const u32 ci = cand_idx[base + lane];
        tl = fminf(tl, __shfl_sync(NT_FULL, cand_key[base + lane], NTC_LIST - 1));
        float dist = NT_POS_INF;
        const NtF4 *cr =
            ci != NT_NONE ? reinterpret_cast<const NtF4 *>(catalog + (u64)ci * d) : nullptr;
        const float dot = nt_dot_in_order(qr, cr, d / 4, buf, lane);
        if (ci != NT_NONE) {
            dist = fmaxf(qn + cnorm[ci] - 2.f * dot, 0.f);
            if (!(dist < NT_POS_INF)) dist = NT_POS_INF;
        }
        nt_list_merge(Ld, Li, dist, ci, lane);
    }
    sd[w][lane] = Ld;
    si[w][lane] = Li;
    if (lane == 0) stl[w] = tl;
    __syncthreads();
    if (w != 0) return;
    // Warp 0 merges the other warps' lists into its own (already sorted) list.
    for (int v = 1; v < NTC_RERANK_WARPS; ++v) {
        const float cd = sd[v][lane];
        const u32 ci = si[v][lane];
        tl = fminf(tl, stl[v]);
        nt_list_merge(Ld, Li, cd, ci, lane);
    }
    if (lane < k) {
        out_d[(u64)q * k + lane] = Ld;
        out_i[(u64)q * k + lane] = Li;
    }
    const float dkf = __shfl_sync(NT_FULL, Ld, k - 1);
    if (lane == 0) {
        const double dk = (double)dkf;
        const double slack = 9.5367431640625e-07 * ((double)qn + (double)c2max);  // 2^-20
        const double lhs = (double)qn + (double)tl - slack;
        const bool ok = lhs > dk && qinfo[q].flag == 0.f;
        out_margin[q] = (float)(lhs - dk);
        out_status[q] = ok ? 1u : 0u;
    }
}

// dst[i, :] = src[rows[i], :] (the fallback queries and their norms).
extern "C" __global__ void nearest_tc_gather(const float *__restrict__ src,
                                             const u32 *__restrict__ rows, int count, int d,
                                             float *__restrict__ dst) {
    const u64 total = (u64)count * d;
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < total;
         e += (u64)gridDim.x * blockDim.x) {
        const u64 i = e / d, c = e % d;
        dst[e] = src[(u64)rows[i] * d + c];
    }
}
