// Fused item log-likelihood: hidden [n, d] x LM head [v, d]^T with an online log-sum-exp over
// the vocabulary, so the [n, v] logits are never stored (unless a caller asks for them, to
// time the materialising path with the same GEMM).
//
// Work split (see crates/kernels/src/launch.rs, which owns the launch shape):
//   grid = (vocabulary slices, row blocks); a block takes BM rows and sweeps its slice of the
//   vocabulary in BN-wide tiles. Per tile it computes the BM x BN logits in registers, folds
//   them into each row's running (max, sum-exp), and, when a row's target id falls in the
//   tile, writes that logit. At the end each block writes one (max, sum-exp) partial per row;
//   item_loglik_combine merges the slices: per_token = target_logit - logsumexp.
//
// Variants:
//   item_loglik_fused_bf16 / _f16: 16-bit inputs, tensor cores (mma.sync m16n8k16, f32
//     accumulate). 4 warps as 2 x 2, each warp 32 rows x 32 columns = 2 x 4 mma tiles.
//     Tiles go global -> shared with 16-byte loads (d % 8 == 0), padded rows (no bank
//     conflicts on fragment loads).
//   item_loglik_fused_f32: f32 inputs on CUDA cores (16 x 16 threads, 4 x 4 outputs each);
//     the accurate path (f32 tolerance) and the fallback for d % 8 != 0.
//
// No headers: bf16/f16 travel as 16-bit integers and mma is inline PTX, so NVRTC needs
// nothing from a CUDA toolkit. Needs sm_80+ for the bf16 mma (Hopper: sm_90).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef FUSED_BM
#define FUSED_BM 64
#endif
#ifndef FUSED_BN
#define FUSED_BN 64
#endif
#ifndef FUSED_TC_BK
#define FUSED_TC_BK 32
#endif
#ifndef FUSED_TC_THREADS
#define FUSED_TC_THREADS 128
#endif
#ifndef FUSED_F32_BK
#define FUSED_F32_BK 16
#endif
#ifndef FUSED_F32_THREADS
#define FUSED_F32_THREADS 256
#endif

#define BM FUSED_BM
#define BN FUSED_BN
#define NEG_INF __int_as_float(0xff800000)
#define NO_TARGET 0xffffffffu

// Padded shared-memory row of the tensor-core tiles, in 16-bit elements: 40 halves = 80 bytes
// (a multiple of 16 for the vector stores; 20 words apart, so the 8 rows x 4 columns of a
// fragment load hit 32 distinct banks).
#define TC_LDS (FUSED_TC_BK + 8)

__device__ __forceinline__ void lse_merge(float &m, float &s, float om, float os) {
    float M = fmaxf(m, om);
    if (M == NEG_INF) { m = M; s = 0.f; return; }
    s = s * __expf(m - M) + os * __expf(om - M);
    m = M;
}

// Fold a thread's values of one row within one tile into the row's running (max, sum-exp).
template <int CNT>
__device__ __forceinline__ void lse_fold(float &m, float &s, const float (&x)[CNT],
                                         const bool (&ok)[CNT]) {
    float lmax = NEG_INF;
#pragma unroll
    for (int e = 0; e < CNT; ++e) if (ok[e]) lmax = fmaxf(lmax, x[e]);
    float M = fmaxf(m, lmax);
    if (M == NEG_INF) return;
    float acc = s * __expf(m - M);
#pragma unroll
    for (int e = 0; e < CNT; ++e) if (ok[e]) acc += __expf(x[e] - M);
    s = acc;
    m = M;
}

template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// Copy a [BM or BN rows, BK] tile of a row-major [rows, d] 16-bit matrix into shared memory;
// rows past `rows` read as zero. 16-byte chunks: d % 8 == 0, so a chunk is all in or all out.
__device__ __forceinline__ void load_tile16(u16 *__restrict__ dst, const u16 *__restrict__ src,
                                            int row0, int rows, int k0, int d, int tid) {
    const int chunks_per_row = FUSED_TC_BK / 8;
#pragma unroll
    for (int c = tid; c < 64 * chunks_per_row; c += FUSED_TC_THREADS) {
        const int r = c / chunks_per_row, kc = (c % chunks_per_row) * 8;
        const int gr = row0 + r, gk = k0 + kc;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (gr < rows && gk < d)
            val = *reinterpret_cast<const uint4 *>(src + (u64)gr * (u64)d + gk);
        *reinterpret_cast<uint4 *>(dst + r * TC_LDS + kc) = val;
    }
}

template <bool BF16>
__device__ __forceinline__ void fused_tc(const u16 *__restrict__ hidden,
                                         const u16 *__restrict__ head,
                                         const u32 *__restrict__ targets, int n, int v, int d,
                                         int tiles_per_slice, float *__restrict__ part_m,
                                         float *__restrict__ part_s,
                                         float *__restrict__ tgt_logit,
                                         float *__restrict__ logits_out) {
    __shared__ __align__(16) u16 sa[BM * TC_LDS];
    __shared__ __align__(16) u16 sb[BN * TC_LDS];
    __shared__ float red_m[2][BM];
    __shared__ float red_s[2][BM];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;  // warp's 32-row band, 32-column band
    const int g = lane >> 2, t = lane & 3;    // mma group id, thread in group
    const int slice = blockIdx.x, row0 = blockIdx.y * BM;
    const int vtiles = (v + BN - 1) / BN;
    const int vt_begin = slice * tiles_per_slice;
    const int vt_end = min(vt_begin + tiles_per_slice, vtiles);

    // Rows this thread owns in the epilogue: ri = mi * 2 + h -> wm*32 + mi*16 + h*8 + g.
    float run_m[4], run_s[4];
    u32 tgt[4];
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
        const int row = row0 + wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g;
        run_m[ri] = NEG_INF;
        run_s[ri] = 0.f;
        tgt[ri] = row < n ? targets[row] : NO_TARGET;
    }

    for (int vt = vt_begin; vt < vt_end; ++vt) {
        const int col0 = vt * BN;
        float acc[2][4][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

        for (int k0 = 0; k0 < d; k0 += FUSED_TC_BK) {
            load_tile16(sa, hidden, row0, n, k0, d, tid);
            load_tile16(sb, head, col0, v, k0, d, tid);
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < FUSED_TC_BK; kk += 16) {
                u32 a[2][4], b[4][2];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    const u16 *p = sa + (wm * 32 + mi * 16 + g) * TC_LDS + kk + 2 * t;
                    a[mi][0] = *reinterpret_cast<const u32 *>(p);
                    a[mi][1] = *reinterpret_cast<const u32 *>(p + 8 * TC_LDS);
                    a[mi][2] = *reinterpret_cast<const u32 *>(p + 8);
                    a[mi][3] = *reinterpret_cast<const u32 *>(p + 8 * TC_LDS + 8);
                }
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const u16 *p = sb + (wn * 32 + ni * 8 + g) * TC_LDS + kk + 2 * t;
                    b[ni][0] = *reinterpret_cast<const u32 *>(p);
                    b[ni][1] = *reinterpret_cast<const u32 *>(p + 8);
                }
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) mma_16816<BF16>(acc[mi][ni], a[mi], b[ni]);
            }
            __syncthreads();
        }

        // Epilogue of this tile: acc[mi][ni][h*2+e] is row wm*32+mi*16+h*8+g,
        // column col0 + wn*32 + ni*8 + 2t + e.
#pragma unroll
        for (int ri = 0; ri < 4; ++ri) {
            const int mi = ri >> 1, h = ri & 1;
            const int row = row0 + wm * 32 + mi * 16 + h * 8 + g;
            float x[8];
            bool ok[8];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = col0 + wn * 32 + ni * 8 + 2 * t + e;
                    const float val = acc[mi][ni][h * 2 + e];
                    x[ni * 2 + e] = val;
                    ok[ni * 2 + e] = col < v;
                    if (row < n && col < v) {
                        if ((u32)col == tgt[ri]) tgt_logit[row] = val;
                        if (logits_out) logits_out[(u64)row * (u64)v + col] = val;
                    }
                }
            lse_fold<8>(run_m[ri], run_s[ri], x, ok);
        }
    }

    // Merge the 4 threads of a group (same rows, different columns), then the 2 column warps.
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, run_m[ri], off);
            const float os = __shfl_xor_sync(0xffffffffu, run_s[ri], off);
            lse_merge(run_m[ri], run_s[ri], om, os);
        }
        if (t == 0) {
            const int r = wm * 32 + (ri >> 1) * 16 + (ri & 1) * 8 + g;
            red_m[wn][r] = run_m[ri];
            red_s[wn][r] = run_s[ri];
        }
    }
    __syncthreads();
    for (int r = tid; r < BM; r += FUSED_TC_THREADS) {
        const int row = row0 + r;
        if (row < n) {
            float m = red_m[0][r], s = red_s[0][r];
            lse_merge(m, s, red_m[1][r], red_s[1][r]);
            part_m[(u64)slice * n + row] = m;
            part_s[(u64)slice * n + row] = s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(FUSED_TC_THREADS)
item_loglik_fused_bf16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                       const u32 *__restrict__ targets, int n, int v, int d, int tiles_per_slice,
                       float *__restrict__ part_m, float *__restrict__ part_s,
                       float *__restrict__ tgt_logit, float *__restrict__ logits_out) {
    fused_tc<true>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s, tgt_logit,
                   logits_out);
}

extern "C" __global__ void __launch_bounds__(FUSED_TC_THREADS)
item_loglik_fused_f16(const u16 *__restrict__ hidden, const u16 *__restrict__ head,
                      const u32 *__restrict__ targets, int n, int v, int d, int tiles_per_slice,
                      float *__restrict__ part_m, float *__restrict__ part_s,
                      float *__restrict__ tgt_logit, float *__restrict__ logits_out) {
    fused_tc<false>(hidden, head, targets, n, v, d, tiles_per_slice, part_m, part_s, tgt_logit,
                    logits_out);
}

// f32 inputs on CUDA cores. Thread (ty, tx) of 16 x 16 owns rows ty + 16 i and columns
// tx + 16 j (i, j < 4) of the 64 x 64 tile; tiles are stored k-major in shared memory so the
// inner loop reads consecutive words across a half-warp.
extern "C" __global__ void __launch_bounds__(FUSED_F32_THREADS)
item_loglik_fused_f32(const float *__restrict__ hidden, const float *__restrict__ head,
                      const u32 *__restrict__ targets, int n, int v, int d, int tiles_per_slice,
                      float *__restrict__ part_m, float *__restrict__ part_s,
                      float *__restrict__ tgt_logit, float *__restrict__ logits_out) {
    __shared__ float As[FUSED_F32_BK][BM + 4];
    __shared__ float Bs[FUSED_F32_BK][BN + 4];
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int slice = blockIdx.x, row0 = blockIdx.y * BM;
    const int vtiles = (v + BN - 1) / BN;
    const int vt_begin = slice * tiles_per_slice;
    const int vt_end = min(vt_begin + tiles_per_slice, vtiles);

    float run_m[4], run_s[4];
    u32 tgt[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + ty + 16 * i;
        run_m[i] = NEG_INF;
        run_s[i] = 0.f;
        tgt[i] = row < n ? targets[row] : NO_TARGET;
    }

    for (int vt = vt_begin; vt < vt_end; ++vt) {
        const int col0 = vt * BN;
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
        for (int k0 = 0; k0 < d; k0 += FUSED_F32_BK) {
#pragma unroll
            for (int e = tid; e < BM * FUSED_F32_BK; e += FUSED_F32_THREADS) {
                const int r = e / FUSED_F32_BK, k = e % FUSED_F32_BK;
                const int gr = row0 + r, gc = col0 + r, gk = k0 + k;
                As[k][r] = (gr < n && gk < d) ? hidden[(u64)gr * d + gk] : 0.f;
                Bs[k][r] = (gc < v && gk < d) ? head[(u64)gc * d + gk] : 0.f;
            }
            __syncthreads();
#pragma unroll
            for (int k = 0; k < FUSED_F32_BK; ++k) {
                float a[4], b[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + ty + 16 * i;
            bool ok[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = col0 + tx + 16 * j;
                ok[j] = col < v;
                if (row < n && col < v) {
                    if ((u32)col == tgt[i]) tgt_logit[row] = acc[i][j];
                    if (logits_out) logits_out[(u64)row * (u64)v + col] = acc[i][j];
                }
            }
            lse_fold<4>(run_m[i], run_s[i], acc[i], ok);
        }
    }
    // The 16 threads sharing ty are 16 consecutive lanes of one warp: merge with xor 1..8.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int off = 1; off <= 8; off <<= 1) {
            const float om = __shfl_xor_sync(0xffffffffu, run_m[i], off);
            const float os = __shfl_xor_sync(0xffffffffu, run_s[i], off);
            lse_merge(run_m[i], run_s[i], om, os);
        }
        const int row = row0 + ty + 16 * i;
        if (tx == 0 && row < n) {
            part_m[(u64)slice * n + row] = run_m[i];
            part_s[(u64)slice * n + row] = run_s[i];
        }
    }
}

// Merge the slices' partials: per_token[row] = target_logit - (M + log sum_j s_j e^(m_j - M)).
// A row whose target logit was never written stays NaN (the wrapper poisons it first).
extern "C" __global__ void item_loglik_combine(const float *__restrict__ part_m,
                                               const float *__restrict__ part_s,
                                               const float *__restrict__ tgt_logit, int n,
                                               int slices, float *__restrict__ per_token) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    float M = NEG_INF;
    for (int j = 0; j < slices; ++j) M = fmaxf(M, part_m[(u64)j * n + row]);
    float S = 0.f;
    for (int j = 0; j < slices; ++j) {
        const float m = part_m[(u64)j * n + row];
        if (m != NEG_INF) S += part_s[(u64)j * n + row] * expf(m - M);
    }
    per_token[row] = tgt_logit[row] - (M + logf(S));
}
