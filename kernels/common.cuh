// Shared helpers of the nsg-gpu kernels (included by every kernels/*.cu).
//
// The kernels compile three ways: by NVRTC through CuPy's RawModule (the GPU path), by
// `nvcc -ptx` or NVRTC in the compile check, and by g++ as plain C++ in the host emulation
// of tests/ (tests/cuda_host.h supplies the CUDA built-ins there). So they use only what that
// emulation provides: grid-stride loops over 64-bit indices, no __shared__ memory, no
// __syncthreads(), no warp intrinsics, no atomics. Roundings that the NumPy twins fix
// (float32 products, double sums in SciPy's order) are spelled with the explicit
// round-to-nearest intrinsics so that nvcc cannot contract them into FMAs.
#pragma once

typedef long long index_t;

// First item of this thread and the stride of a 1-D grid-stride loop.
__device__ __forceinline__ index_t grid_start() {
    return (index_t)blockIdx.x * (index_t)blockDim.x + (index_t)threadIdx.x;
}

__device__ __forceinline__ index_t grid_stride() {
    return (index_t)gridDim.x * (index_t)blockDim.x;
}

// SciPy's "reflect" boundary (d c b a | a b c d | d c b a) for an index into n items.
__device__ __forceinline__ index_t reflect_index(index_t i, index_t n) {
    if (n == 1) return 0;
    const index_t period = 2 * n;
    i %= period;
    if (i < 0) i += period;
    return i < n ? i : period - 1 - i;
}

// The bits of a non-negative float, ordered like the floats themselves.
__device__ __forceinline__ unsigned int float_bits(float v) { return (unsigned int)__float_as_int(v); }

__device__ __forceinline__ float bits_float(int b) { return __int_as_float(b); }

// log2 on the special-function unit. Arguments are normal floats (callers keep them away from
// 0), so the flush-to-zero form is exact enough and saves the subnormal fix-up of __log2f.
__device__ __forceinline__ float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return __log2f(x);
#endif
}
