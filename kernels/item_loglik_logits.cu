// Item log-likelihood from precomputed logits: the stepping-stone kernel.
//
// item_loglik_logits: one block per row of the [n, v] f32 logits. Each thread walks the row
// with a stride of blockDim.x keeping an online (max, sum-exp) pair, the block merges the
// pairs, and thread 0 writes logits[row, target] - logsumexp(row). One read of the logits,
// nothing else stored: the row's bytes are the whole cost (memory-bound, n * v * 4 bytes).
//
// item_segment_sum: per-item sum of the per-token values (one thread per item, f64 sum,
// deterministic order; items are a few tokens long).
//
// Compiled at run time by NVRTC (no headers: nothing from the CUDA toolkit is needed).

typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef LOGITS_THREADS
#define LOGITS_THREADS 256
#endif

#define NEG_INF __int_as_float(0xff800000)

// Merge (m, s) with (om, os): both are (max, sum of exp(x - max)) over disjoint sets.
__device__ __forceinline__ void lse_merge(float &m, float &s, float om, float os) {
    float M = fmaxf(m, om);
    if (M == NEG_INF) { m = M; s = 0.f; return; }
    s = s * __expf(m - M) + os * __expf(om - M);
    m = M;
}

extern "C" __global__ void __launch_bounds__(LOGITS_THREADS)
item_loglik_logits(const float *__restrict__ logits, const u32 *__restrict__ targets,
                   int n, int v, float *__restrict__ per_token) {
    __shared__ float red_m[LOGITS_THREADS / 32];
    __shared__ float red_s[LOGITS_THREADS / 32];
    const int row = blockIdx.x;
    if (row >= n) return;
    const float *x = logits + (u64)row * (u64)v;
    float m = NEG_INF, s = 0.f;
    for (int c = threadIdx.x; c < v; c += LOGITS_THREADS) {
        float xv = x[c];
        if (xv > m) { s = s * __expf(m - xv) + 1.f; m = xv; }
        else if (xv != NEG_INF) { s += __expf(xv - m); }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float om = __shfl_xor_sync(0xffffffffu, m, off);
        float os = __shfl_xor_sync(0xffffffffu, s, off);
        lse_merge(m, s, om, os);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { red_m[warp] = m; red_s[warp] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = red_m[0], S = red_s[0];
        for (int w = 1; w < LOGITS_THREADS / 32; ++w) lse_merge(M, S, red_m[w], red_s[w]);
        per_token[row] = x[targets[row]] - (M + logf(S));
    }
}

extern "C" __global__ void item_segment_sum(const float *__restrict__ per_token,
                                            const u32 *__restrict__ offsets, int items,
                                            float *__restrict__ per_item) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= items) return;
    double acc = 0.0;
    for (u32 i = offsets[j]; i < offsets[j + 1]; ++i) acc += (double)per_token[i];
    per_item[j] = (float)acc;
}
