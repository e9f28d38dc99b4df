// The decoder's layout and element-wise kernels on candle's CUDA backend
// (crates/kernels/src/decoder_ops.rs, used by crates/llm/src/decoder.rs). Each replaces a chain
// of candle ops whose generic strided kernels ran at ~0.4 TB/s on an H200 (docs/llm.md):
//
// gather_heads_first_w32: dst[b, H, n, W] = src[rows[b * n + j], H, W], i.e. pick the rows of
//   a token-major [P, H, W] tensor (packed tokens, or the key pool) and lay them out heads-first
//   for the batched attention products. Replaces index_select + transpose + contiguous.
// gather_token_major_w32: dst[t, H, W] = src[b, H, n, W] at rows[t] = b * n + j, the inverse
//   direction for the attention's output (the real rows only, in packed order).
//   Both move 32-bit words (W = head_dim x element size / 4), one word per thread.
// swiglu_{f32,bf16,f16}: out = silu(gate) * up, the SwiGLU MLP's middle, in f32 arithmetic.
//   Replaces candle's silu + mul (two passes over the [T, intermediate] activations).
// add_rms_norm_{f32,bf16,f16}: the residual add and the next RMSNorm in one pass (below).
//
// Compiled at run time by NVRTC (no headers) after kernels/float16.cuh (u16/u32/u64, the
// 16-bit float conversions).

extern "C" __global__ void gather_heads_first_w32(const u32 *__restrict__ src,
                                                  const u32 *__restrict__ rows,
                                                  u32 *__restrict__ dst, u32 b, u32 heads,
                                                  u32 n, u32 words) {
    const u64 total = (u64)b * heads * n * words;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u32 w = (u32)(i % words);
        u64 rest = i / words;
        const u32 j = (u32)(rest % n);
        rest /= n;
        const u32 h = (u32)(rest % heads);
        const u32 bi = (u32)(rest / heads);
        const u64 row = rows[(u64)bi * n + j];
        dst[i] = src[(row * heads + h) * words + w];
    }
}

extern "C" __global__ void gather_token_major_w32(const u32 *__restrict__ src,
                                                  const u32 *__restrict__ rows,
                                                  u32 *__restrict__ dst, u32 t, u32 heads,
                                                  u32 n, u32 words) {
    const u64 total = (u64)t * heads * words;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (u64)gridDim.x * blockDim.x) {
        const u32 w = (u32)(i % words);
        const u64 rest = i / words;
        const u32 h = (u32)(rest % heads);
        const u32 r = rows[rest / heads];
        const u32 bi = r / n, j = r % n;
        dst[i] = src[(((u64)bi * heads + h) * n + j) * words + w];
    }
}

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.f + __expf(-g)) * u; }


extern "C" __global__ void swiglu_f32(const float *__restrict__ gate, const float *__restrict__ up,
                                      float *__restrict__ out, u64 numel) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < numel;
         i += (u64)gridDim.x * blockDim.x)
        out[i] = silu_mul(gate[i], up[i]);
}

// 16-bit types: two values per thread through 32-bit words (numel even; the wrapper checks).
#define SWIGLU_16(NAME, LD, ST)                                                                 \
    extern "C" __global__ void NAME(const u32 *__restrict__ gate, const u32 *__restrict__ up,   \
                                    u32 *__restrict__ out, u64 pairs) {                         \
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < pairs;                     \
             i += (u64)gridDim.x * blockDim.x) {                                                \
            const u32 g = gate[i], u = up[i];                                                   \
            const u16 lo = ST(silu_mul(LD((u16)(g & 0xffff)), LD((u16)(u & 0xffff))));          \
            const u16 hi = ST(silu_mul(LD((u16)(g >> 16)), LD((u16)(u >> 16))));                \
            out[i] = (u32)lo | ((u32)hi << 16);                                                 \
        }                                                                                       \
    }

SWIGLU_16(swiglu_bf16, ld_bf16, st_bf16)
SWIGLU_16(swiglu_f16, ld_f16, st_f16)

// add_rms_norm_{f32,bf16,f16}: the residual add and the next RMSNorm in one pass. Row r of
// x, delta [rows, d]: s = x + delta (rounded to the dtype, as candle's add), then
// n = s * rsqrt(mean(s^2) + eps) * w (f32 arithmetic on the rounded s, one rounding, as
// candle's rmsnorm kernel). out [2, rows, d]: s, then n. One warp per row, 8 rows a block; the
// second pass reads back the s this lane wrote. Replaces candle's add + rmsnorm (two launches,
// three passes over the rows).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void add_rms_norm_f32(const float *__restrict__ x,
                                            const float *__restrict__ delta,
                                            const float *__restrict__ w, float *__restrict__ out,
                                            u32 rows, u32 d, float eps) {
    const u32 row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps
    const u64 base = (u64)row * d;
    float *s_out = out + base, *n_out = out + (u64)rows * d + base;
    float acc = 0.f;
    for (u32 i = lane; i < d; i += 32) {
        const float s = x[base + i] + delta[base + i];
        s_out[i] = s;
        acc += s * s;
    }
    const float scale = rsqrtf(warp_sum(acc) / (float)d + eps);
    for (u32 i = lane; i < d; i += 32) n_out[i] = scale * s_out[i] * w[i];
}

// 16-bit types: two values per lane and step through 32-bit words (d even; the wrapper checks).
#define ADD_RMS_NORM_16(NAME, LD, ST)                                                           \
    extern "C" __global__ void NAME(const u32 *__restrict__ x, const u32 *__restrict__ delta,   \
                                    const u32 *__restrict__ w, u32 *__restrict__ out, u32 rows, \
                                    u32 d, float eps) {                                         \
        const u32 row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31; \
        if (row >= rows) return;                                                                \
        const u32 words = d / 2;                                                                \
        const u64 base = (u64)row * words;                                                      \
        u32 *s_out = out + base, *n_out = out + (u64)rows * words + base;                       \
        float acc = 0.f;                                                                        \
        for (u32 i = lane; i < words; i += 32) {                                                \
            const u32 a = x[base + i], b = delta[base + i];                                     \
            const u16 lo = ST(LD((u16)(a & 0xffff)) + LD((u16)(b & 0xffff)));                   \
            const u16 hi = ST(LD((u16)(a >> 16)) + LD((u16)(b >> 16)));                         \
            s_out[i] = (u32)lo | ((u32)hi << 16);                                               \
            const float fl = LD(lo), fh = LD(hi);                                               \
            acc += fl * fl + fh * fh;                                                           \
        }                                                                                       \
        const float scale = rsqrtf(warp_sum(acc) / (float)d + eps);                             \
        for (u32 i = lane; i < words; i += 32) {                                                \
            const u32 s = s_out[i], ww = w[i];                                                  \
            const u16 lo = ST(scale * LD((u16)(s & 0xffff)) * LD((u16)(ww & 0xffff)));          \
            const u16 hi = ST(scale * LD((u16)(s >> 16)) * LD((u16)(ww >> 16)));                \
            n_out[i] = (u32)lo | ((u32)hi << 16);                                               \
        }                                                                                       \
    }

ADD_RMS_NORM_16(add_rms_norm_bf16, ld_bf16, st_bf16)
ADD_RMS_NORM_16(add_rms_norm_f16, ld_f16, st_f16)
