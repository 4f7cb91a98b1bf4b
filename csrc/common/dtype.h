// Element types that cross the binding, and bit-exact fp16/bf16 <-> fp32 conversions
// (hand-written so host and device share one definition, with round-to-nearest-even).
#pragma once
#include <cstdint>
#include <cstring>

#include "hostdevice.h"

namespace kx {

// The kernels read fp32, fp16 and bf16 and accumulate in fp32.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

inline int dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

KX_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

KX_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Storage-only 16-bit types: arithmetic always happens in float.
struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

KX_HD float to_float(float x) { return x; }
KX_HD float to_float(bf16_t x) { return bits_float(uint32_t(x.bits) << 16); }
KX_HD float to_float(half_t x) {
  uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t expo = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (expo == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (expo == 0) {
    // zero or subnormal: value = mant * 2^-24, exact in float
    float v = float(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_float(sign | ((expo + 112u) << 23) | (mant << 13));
}

KX_HD bf16_t float_to_bf16(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
KX_HD half_t float_to_half(float x) {
  uint32_t u = float_bits(x);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return half_t{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {
    // result is subnormal (or zero): round a * 2^24 to an integer, ties to even
    float scaled = bits_float(a) * 16777216.0f;  // exact: power-of-two scale
    uint32_t q = uint32_t(scaled);
    float rem = scaled - float(q);
    if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
    return half_t{uint16_t(sign | q)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round mantissa to 10 bits, ties to even
  return half_t{uint16_t(sign | ((r - (112u << 23)) >> 13))};
}
KX_HD void store(float* p, float v) { *p = v; }
KX_HD void store(half_t* p, float v) { *p = float_to_half(v); }
KX_HD void store(bf16_t* p, float v) { *p = float_to_bf16(v); }

}  // namespace kx
