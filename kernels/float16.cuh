// 16-bit floats as raw bits, for the kernels NVRTC compiles without headers: compiled in front
// of kernels/attention_softmax.cu and kernels/decoder_ops.cu (crates/kernels/src/sources.rs,
// `with_float16`).

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float ld_bf16(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ u16 st_bf16(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float ld_f16(u16 x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
}
__device__ __forceinline__ u16 st_f16(float x) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
