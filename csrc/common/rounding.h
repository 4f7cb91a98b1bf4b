// One rounding rule for every kernel, on the CPU (every instruction-set path) and on the GPU:
// each product and each sum is rounded to float on its own, never fused into an FMA, so all
// of them give bit-identical results. The build enforces it too (-ffp-contract=off for C++,
// -fmad=false for nvcc); on the GPU the intrinsics also make it explicit here. (An explicit
// fmaf would be the other choice, but it is a slow libm call on CPUs without FMA.)
//
// One exception, explicit and equally portable: the dot product of the factor-fused kernels
// (common/factor_math.h) is a chain of fused multiply-adds, fma_rn below. A fused multiply-add
// is rounded once, correctly, by definition (IEEE 754 fusedMultiplyAdd), so it too gives the
// same bits everywhere: __fmaf_rn on the GPU; __builtin_fmaf on the CPU, which is one vfmadd
// instruction on the AVX2+FMA path (and vectorises) and a call to the C library's fmaf on the
// x86-64-v2 baseline path (correctly rounded in software, or the FMA instruction where glibc
// finds one at run time): slower there, never different. It halves the dot product's
// instructions and rounds once per term instead of twice. -ffp-contract=off and -fmad=false
// stay on: they forbid only the compiler's own contractions, never this explicit call.
#pragma once

#include "hostdevice.h"

namespace kx {

KX_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KX_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Correctly rounded on the GPU whatever -prec-div says.
KX_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// a * b + c rounded once (see above): the factor dot product's step.
KX_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// Task Arithmetic's step: acc + w * v, the product rounded first.
KX_HD float weighted_add(float acc, float w, float v) { return add_rn(acc, mul_rn(w, v)); }

}  // namespace kx
