// Masked, scaled softmax of attention scores: the decoder's attention on candle's CUDA backend
// (crates/kernels/src/attention.rs, used by crates/llm/src/decoder.rs).
//
// attn_softmax_{f32,bf16,f16}: for every row r of the scores `att` ([rows, s], the model's
// dtype; rows = batch x heads x n queries),
//     out[r, :] = softmax(scale * att[r, :] + mask[mrow(r), :])
// with the f32 additive mask ([mask_batches x n, s], 0 or -inf: causal, prefix and padding)
// shared by every head of a batch entry: mrow(r) = (mask_batches == 1 ? 0 : r / rows_per_batch)
// * n + r % n. One pass instead of candle's three (scale, a 5-d broadcast add of the mask,
// softmax): the broadcast add alone took half of a SmolLM2 forward's GPU time on an H200
// (docs/llm.md). One warp per row: an online (max, sum-exp) pass, then the write pass (the
// second read of the row hits L2). A fully masked row (never made by the decoder) gives zeros.
//
// Compiled at run time by NVRTC (no headers) after kernels/float16.cuh (u16/u32/u64, the
// 16-bit float conversions).

#ifndef ATTN_ROWS_PER_BLOCK
#define ATTN_ROWS_PER_BLOCK 8
#endif

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ld(float x) { return x; }
__device__ __forceinline__ float st_f32(float x) { return x; }


#define ATTN_SOFTMAX(NAME, T, LOAD, STORE)                                                      \
    extern "C" __global__ void __launch_bounds__(ATTN_ROWS_PER_BLOCK * 32)                     \
    NAME(const T *__restrict__ att, const float *__restrict__ mask, T *__restrict__ out,        \
         u64 rows, int s, int n, u64 rows_per_batch, int mask_batches, float scale) {          \
        const u64 row = (u64)blockIdx.x * ATTN_ROWS_PER_BLOCK + (threadIdx.x >> 5);            \
        const int lane = threadIdx.x & 31;                                                     \
        if (row >= rows) return;                                                               \
        const T *x = att + row * (u64)s;                                                       \
        const u64 b = mask_batches == 1 ? 0 : row / rows_per_batch;                            \
        const float *mk = mask + (b * (u64)n + row % (u64)n) * (u64)s;                        \
        float m = NEG_INF, sum = 0.f;                                                          \
        for (int c = lane; c < s; c += 32) {                                                   \
            float v = LOAD(x[c]) * scale + mk[c];                                              \
            if (v > m) {                                                                       \
                sum = sum * __expf(m - v) + 1.f;                                               \
                m = v;                                                                         \
            } else if (v != NEG_INF) {                                                         \
                sum += __expf(v - m);                                                          \
            }                                                                                  \
        }                                                                                      \
        for (int off = 16; off > 0; off >>= 1) {                                               \
            float om = __shfl_xor_sync(0xffffffffu, m, off);                                   \
            float os = __shfl_xor_sync(0xffffffffu, sum, off);                                 \
            float M = fmaxf(m, om);                                                            \
            if (M == NEG_INF) {                                                                \
                sum = 0.f;                                                                     \
            } else {                                                                           \
                sum = (m == NEG_INF ? 0.f : sum * __expf(m - M)) +                             \
                      (om == NEG_INF ? 0.f : os * __expf(om - M));                             \
            }                                                                                  \
            m = M;                                                                             \
        }                                                                                      \
        const float inv = (m == NEG_INF || sum <= 0.f) ? 0.f : 1.f / sum;                      \
        T *y = out + row * (u64)s;                                                             \
        for (int c = lane; c < s; c += 32) {                                                   \
            float v = LOAD(x[c]) * scale + mk[c];                                              \
            y[c] = STORE(v == NEG_INF ? 0.f : __expf(v - m) * inv);                            \
        }                                                                                      \
    }

ATTN_SOFTMAX(attn_softmax_f32, float, ld, st_f32)
ATTN_SOFTMAX(attn_softmax_bf16, u16, ld_bf16, st_bf16)
ATTN_SOFTMAX(attn_softmax_f16, u16, ld_f16, st_f16)
