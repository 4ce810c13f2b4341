// Host emulation of the CUDA built-ins that kernels/*.cu use, so that g++ compiles them as
// plain C++ (see tests/emulation.py). A launch runs every thread of every block in turn on
// one host thread; this is exact for kernels without __shared__ memory, __syncthreads() or
// warp intrinsics, which the kernels do not use: those are left undefined here on purpose,
// so that a kernel that starts to need them fails to compile in the tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

// One emulated launch at a time per process (the tests launch from one thread).
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

template <class T>
static inline T __ldg(const T* p) { return *p; }

static inline int __float_as_int(float v) { int b; std::memcpy(&b, &v, sizeof b); return b; }
static inline float __int_as_float(int b) { float v; std::memcpy(&v, &b, sizeof v); return v; }

// Compiled with -ffp-contract=off, so these are the single roundings they stand for.
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }

// The device's approximate log2 (relative error about 2^-22) is emulated by the exact one;
// the tests' tolerances for kernels that use it allow for the difference.
// (glibc declares a __log2f of its own, hence the macro.)
static inline float emulated_log2f(float x) { return std::log2(x); }
#define __log2f emulated_log2f

using std::fmaf;
using std::fmaxf;
using std::fminf;

// Runs a kernel over a whole grid, block after block, thread after thread.
template <class Kernel>
static void emulate_launch(dim3 grid, dim3 block, Kernel&& body) {
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx)
                for (unsigned tz = 0; tz < block.z; ++tz)
                    for (unsigned ty = 0; ty < block.y; ++ty)
                        for (unsigned tx = 0; tx < block.x; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            body();
                        }
}
