// Benchmark inputs generated on the device: filling gigabytes of random data from the host
// would cost more lease time than the kernels being timed. Counter-based hash (splitmix64 of
// seed ^ index), uniform in [-scale, scale); values never zero by construction except by
// chance. Used only by benches/kernels.rs.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

__device__ __forceinline__ float uniform_pm1(u64 seed, u64 i) {
    u64 z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

extern "C" __global__ void fill_f32(float *x, u64 len, u64 seed, float scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        x[i] = uniform_pm1(seed, i) * scale;
}

// bf16 bits by truncation of the f32 value (round-toward-zero: fine for random inputs).
extern "C" __global__ void fill_bf16(u16 *x, u64 len, u64 seed, float scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        x[i] = (u16)(__float_as_uint(uniform_pm1(seed, i) * scale) >> 16);
}

extern "C" __global__ void fill_ids(u32 *x, u64 len, u64 seed, u32 modulo) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        x[i] = (u32)((uniform_pm1(seed, i) * 0.5f + 0.5f) * (float)modulo) % modulo;
}
