// Grounding search: exact top-k L2-nearest catalogue rows for a batch of f32 queries, tiled,
// with a running top-k per query, never storing the [queries, items] distance matrix.
//
// nearest_topk: grid = (catalogue slices, query blocks) (launch.rs owns the shape). A block
//   takes BQ = 32 queries and sweeps its slice of the catalogue in BI = 64-row tiles:
//   dots by CUDA-core FMAs (256 threads, 2 queries x 4 rows each, k-major shared tiles),
//   distance = |q|^2 + |c|^2 - 2 q.c (clamped at 0) into a shared [BQ, BI] tile, then each
//   warp updates the top-k lists of its 4 queries. A list lives in registers, entry p in lane
//   p % 32 of slot p / 32 (k <= 64), sorted by (distance, index); a candidate enters when it
//   is below the k-th entry: its position is a ballot count, the tail shifts by one lane.
//   Each block writes its k best per query; the host merges slices (merge_candidates).
// row_sq_norms: one warp per row, |x|^2 in f32.
// mark_excluded: norm of an excluded row := +inf, so its distance is +inf and never admitted.
//
// Rows past the catalogue and excluded rows get distance +inf; lists start full of
// (+inf, 0xffffffff) and only finite distances are admitted, so they never appear.

typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef NEAREST_BQ
#define NEAREST_BQ 32
#endif
#ifndef NEAREST_BI
#define NEAREST_BI 64
#endif
#ifndef NEAREST_BK
#define NEAREST_BK 16
#endif
#ifndef NEAREST_THREADS
#define NEAREST_THREADS 256
#endif

#define BQ NEAREST_BQ
#define BI NEAREST_BI
#define POS_INF __int_as_float(0x7f800000)
#define NONE 0xffffffffu
#define QPW (BQ / (NEAREST_THREADS / 32))  // queries per warp in the top-k phase: 4

// (d1, i1) < (d2, i2) lexicographically.
__device__ __forceinline__ bool before(float d1, u32 i1, float d2, u32 i2) {
    return d1 < d2 || (d1 == d2 && i1 < i2);
}

// Insert (cd, ci) into the warp's sorted list (L0 = entries 0..31, L1 = 32..63) if it
// belongs to the first k. All lanes call this with the same candidate.
__device__ __forceinline__ void topk_insert(float &L0d, u32 &L0i, float &L1d, u32 &L1i,
                                            float cd, u32 ci, int k, int lane) {
    const u32 b0 = __ballot_sync(0xffffffffu, before(L0d, L0i, cd, ci));
    const u32 b1 = __ballot_sync(0xffffffffu, before(L1d, L1i, cd, ci));
    const int pos = __popc(b0) + __popc(b1);
    if (pos >= k) return;  // uniform across the warp
    const float up0d = __shfl_up_sync(0xffffffffu, L0d, 1);
    const u32 up0i = __shfl_up_sync(0xffffffffu, L0i, 1);
    const float up1d = __shfl_up_sync(0xffffffffu, L1d, 1);
    const u32 up1i = __shfl_up_sync(0xffffffffu, L1i, 1);
    const float last0d = __shfl_sync(0xffffffffu, L0d, 31);
    const u32 last0i = __shfl_sync(0xffffffffu, L0i, 31);
    // Slot 1 first (it reads slot 0's old values through the shuffles above).
    const int p1 = 32 + lane;
    if (p1 > pos) {
        L1d = lane == 0 ? last0d : up1d;
        L1i = lane == 0 ? last0i : up1i;
    } else if (p1 == pos) {
        L1d = cd;
        L1i = ci;
    }
    if (lane > pos) {
        L0d = up0d;
        L0i = up0i;
    } else if (lane == pos) {
        L0d = cd;
        L0i = ci;
    }
}

// The k-th entry (the admission threshold).
__device__ __forceinline__ void topk_last(float L0d, u32 L0i, float L1d, u32 L1i, int k,
                                          float &td, u32 &ti) {
    const int p = k - 1;
    const float a = __shfl_sync(0xffffffffu, L0d, p & 31);
    const u32 ai = __shfl_sync(0xffffffffu, L0i, p & 31);
    const float b = __shfl_sync(0xffffffffu, L1d, p & 31);
    const u32 bi = __shfl_sync(0xffffffffu, L1i, p & 31);
    td = p < 32 ? a : b;
    ti = p < 32 ? ai : bi;
}

extern "C" __global__ void __launch_bounds__(NEAREST_THREADS)
nearest_topk(const float *__restrict__ queries, const float *__restrict__ catalog,
             const float *__restrict__ qnorm, const float *__restrict__ cnorm, int b, int n,
             int d, int k, int tiles_per_slice, float *__restrict__ out_d,
             u32 *__restrict__ out_i) {
    __shared__ float Qs[NEAREST_BK][BQ + 1];
    __shared__ float Cs[NEAREST_BK][BI + 4];
    __shared__ float D[BQ][BI + 1];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int tq = tid >> 4, ti = tid & 15;  // compute phase: queries tq, tq+16; rows ti+16j
    const int slice = blockIdx.x, q0 = blockIdx.y * BQ;
    const int ctiles = (n + BI - 1) / BI;
    const int ct_begin = slice * tiles_per_slice;
    const int ct_end = min(ct_begin + tiles_per_slice, ctiles);

    float L0d[QPW], L1d[QPW];
    u32 L0i[QPW], L1i[QPW];
#pragma unroll
    for (int w = 0; w < QPW; ++w) {
        L0d[w] = POS_INF; L1d[w] = POS_INF; L0i[w] = NONE; L1i[w] = NONE;
    }

    for (int ct = ct_begin; ct < ct_end; ++ct) {
        const int c0 = ct * BI;
        float acc[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
        for (int k0 = 0; k0 < d; k0 += NEAREST_BK) {
            for (int e = tid; e < BQ * NEAREST_BK; e += NEAREST_THREADS) {
                const int r = e / NEAREST_BK, kk = e % NEAREST_BK;
                const int gq = q0 + r, gk = k0 + kk;
                Qs[kk][r] = (gq < b && gk < d) ? queries[(u64)gq * d + gk] : 0.f;
            }
            for (int e = tid; e < BI * NEAREST_BK; e += NEAREST_THREADS) {
                const int r = e / NEAREST_BK, kk = e % NEAREST_BK;
                const int gc = c0 + r, gk = k0 + kk;
                Cs[kk][r] = (gc < n && gk < d) ? catalog[(u64)gc * d + gk] : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < NEAREST_BK; ++kk) {
                const float qa = Qs[kk][tq], qb = Qs[kk][tq + 16];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float c = Cs[kk][ti + 16 * j];
                    acc[0][j] = fmaf(qa, c, acc[0][j]);
                    acc[1][j] = fmaf(qb, c, acc[1][j]);
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int ql = tq + 16 * i, gq = q0 + ql;
            const float qn = gq < b ? qnorm[gq] : 0.f;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int cl = ti + 16 * j, gc = c0 + cl;
                float dist = POS_INF;
                if (gc < n) dist = fmaxf(qn + cnorm[gc] - 2.f * acc[i][j], 0.f);
                if (!(dist < POS_INF)) dist = POS_INF;  // excluded (inf norm) or NaN
                D[ql][cl] = dist;
            }
        }
        __syncthreads();
        // Top-k phase: warp w owns queries w*QPW .. w*QPW+QPW-1 of the block.
#pragma unroll
        for (int w = 0; w < QPW; ++w) {
            const int ql = warp * QPW + w;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int cl = half * 32 + lane;
                const float cd = D[ql][cl];
                const u32 ci = (u32)(c0 + cl);
                float td; u32 tix;
                topk_last(L0d[w], L0i[w], L1d[w], L1i[w], k, td, tix);
                u32 want = __ballot_sync(0xffffffffu, cd < POS_INF && before(cd, ci, td, tix));
                while (want) {
                    const int src = __ffs(want) - 1;
                    want &= want - 1;
                    const float sd = __shfl_sync(0xffffffffu, cd, src);
                    const u32 si = __shfl_sync(0xffffffffu, ci, src);
                    topk_insert(L0d[w], L0i[w], L1d[w], L1i[w], sd, si, k, lane);
                }
            }
        }
        __syncthreads();  // D is rewritten by the next tile
    }

#pragma unroll
    for (int w = 0; w < QPW; ++w) {
        const int gq = q0 + warp * QPW + w;
        if (gq < b) {
            const u64 base = ((u64)slice * b + gq) * k;
            if (lane < k) { out_d[base + lane] = L0d[w]; out_i[base + lane] = L0i[w]; }
            if (32 + lane < k) { out_d[base + 32 + lane] = L1d[w]; out_i[base + 32 + lane] = L1i[w]; }
        }
    }
}

extern "C" __global__ void row_sq_norms(const float *__restrict__ x, int rows, int d,
                                        float *__restrict__ out) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float *r = x + (u64)row * d;
    float s = 0.f;
    for (int c = lane; c < d; c += 32) s = fmaf(r[c], r[c], s);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) out[row] = s;
}

extern "C" __global__ void mark_excluded(float *__restrict__ norms, const u32 *__restrict__ rows,
                                         int count, int n) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < count && rows[j] < (u32)n) norms[rows[j]] = POS_INF;
}
