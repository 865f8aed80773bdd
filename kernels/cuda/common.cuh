// Shared helpers for hyserve's CUDA kernels. The sources in this folder are joined in
// the order `kernels/src/cuda/source.rs` lists them and compiled once per process by
// NVRTC for the device's architecture.
//
// Conventions:
// - Activations, weights and the KV cache are bf16; accumulation is fp32.
// - `rb(x)` rounds an fp32 value to bf16 and back: the storage points of a bf16 model,
//   placed where the CPU oracle (`kernels/src/cpu`) places them.
// - Row-major matrices; a weight is `[out, in]`.

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef unsigned long long u64;

#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float rb(float x) { return __bfloat162float(__float2bfloat16(x)); }
__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ bf16 st(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Eight bf16 packed in 16 bytes, dotted with eight fp32 values.
__device__ __forceinline__ float dot8(uint4 w, const float* x) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        s = fmaf(f.x, x[2 * i], s);
        s = fmaf(f.y, x[2 * i + 1], s);
    }
    return s;
}

__device__ __forceinline__ void unpack8(uint4 v, float* out) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Streaming 16-byte load that does not pollute L1 (weights are read once per step).
__device__ __forceinline__ uint4 ld_stream(const bf16* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ float silu_rb(float g) { return rb(g / (1.f + expf(-g))); }
