// The CPU kernels work on tiles: a run of one row's elements is loaded as float, with DARE
// applied, into a small buffer, so the merge loops that follow are plain float loops the
// compiler vectorises, whatever the storage dtype and stride.
#pragma once
#include <cstdint>

#include "../kernels.h"

namespace kx::cpu {

constexpr int64_t kTile = 512;  // a TIES tile's accumulators (24 bytes a position) stay in L1

template <class T>
inline void load_as_float(const T* src, int64_t stride, int64_t len, float* buf) {
  if (stride == 1) {
    for (int64_t t = 0; t < len; ++t) buf[t] = to_float(src[t]);
  } else {
    for (int64_t t = 0; t < len; ++t) buf[t] = to_float(src[t * stride]);
  }
}

// buf[0..len) = dare(row r)[j0 .. j0+len); returns false if a loaded value is NaN or Inf.
inline bool load_tile(const TaskRows& x, int64_t r, const DareSpec& d, int64_t j0, int64_t len,
                      float* buf) {
  const char* base = static_cast<const char*>(x.rows[r]) + j0 * x.stride * dtype_size(x.dtype);
  switch (x.dtype) {
    case DType::f32: load_as_float(reinterpret_cast<const float*>(base), x.stride, len, buf); break;
    case DType::f16: load_as_float(reinterpret_cast<const half_t*>(base), x.stride, len, buf); break;
    case DType::bf16: load_as_float(reinterpret_cast<const bf16_t*>(base), x.stride, len, buf); break;
  }
  uint32_t nonfinite = 0;
  for (int64_t t = 0; t < len; ++t) nonfinite |= magnitude_key(buf[t]) >= kNonFiniteKey;
  if (d.enabled) {
    // The tile's mask words, one Philox block per 4 elements, laid out so that element t's word
    // is words[t + lead]: both loops vectorise (Philox on 8 counters at a time with AVX2).
    const PhiloxKey key = x.dare_keys[r];
    const uint64_t first = uint64_t(d.elem_offset + j0), g0 = first >> 2;
    const int64_t lead = int64_t(first & 3), groups = (lead + len + 3) / 4;
    uint32_t words[kTile + 8];
    for (int64_t i = 0; i < groups; ++i) {
      const Philox4 w = dare_words(key, g0 + uint64_t(i));
      words[4 * i] = w.w[0];
      words[4 * i + 1] = w.w[1];
      words[4 * i + 2] = w.w[2];
      words[4 * i + 3] = w.w[3];
    }
    const DareSpec dare = d;
    for (int64_t t = 0; t < len; ++t) buf[t] = dare_apply(buf[t], words[t + lead], dare);
  }
  return nonfinite == 0;
}

inline void store_tile(const float* buf, int64_t len, DType dtype, void* out, int64_t j0) {
  switch (dtype) {
    case DType::f32: for (int64_t t = 0; t < len; ++t) store(static_cast<float*>(out) + j0 + t, buf[t]); break;
    case DType::f16: for (int64_t t = 0; t < len; ++t) store(static_cast<half_t*>(out) + j0 + t, buf[t]); break;
    case DType::bf16: for (int64_t t = 0; t < len; ++t) store(static_cast<bf16_t*>(out) + j0 + t, buf[t]); break;
  }
}

}  // namespace kx::cpu

namespace kx::cpu {

// One element of row r (with DARE), for the scattered positions the tile loops set aside.
inline float load_element(const TaskRows& x, int64_t r, const DareSpec& d, int64_t j) {
  const char* p = static_cast<const char*>(x.rows[r]) + j * x.stride * dtype_size(x.dtype);
  float v = x.dtype == DType::f32   ? *reinterpret_cast<const float*>(p)
            : x.dtype == DType::f16 ? to_float(*reinterpret_cast<const half_t*>(p))
                                    : to_float(*reinterpret_cast<const bf16_t*>(p));
  return d.enabled ? dare_element(v, x.dare_keys[r], d.elem_offset + j, d) : v;
}

}  // namespace kx::cpu
