// One rounding rule for every kernel, on the CPU (every instruction-set path) and on the GPU:
// each product and each sum is rounded to float on its own, never fused into an FMA, so all
// of them give bit-identical results. The build enforces it too (-ffp-contract=off for C++,
// -fmad=false for nvcc); on the GPU the intrinsics also make it explicit here. (An explicit
// fmaf would be the other choice, but it is a slow libm call on CPUs without FMA.)
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

// Task Arithmetic's step: acc + w * v, the product rounded first.
KX_HD float weighted_add(float acc, float w, float v) { return add_rn(acc, mul_rn(w, v)); }

}  // namespace kx
