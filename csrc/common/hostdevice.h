// Marks functions compiled for both the CPU build and nvcc, so the CPU tests run
// the exact per-element math the GPU runs.
#pragma once

#if defined(__CUDACC__)
#define KX_HD __host__ __device__ __forceinline__
#else
#define KX_HD inline
#endif
