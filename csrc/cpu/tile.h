// The CPU kernels work on tiles: a run of one row's elements is loaded as float, with DARE
// applied (load_tile, csrc/cpu/dare_run.h), into a small buffer, so the merge loops that follow
// are plain float loops the compiler vectorises, whatever the storage dtype and stride.
#pragma once
#include <algorithm>
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

// DARE on a run of len <= kTile consecutive elements of one row, the first being element
// `first` of its module (DESIGN.md §1: the mask depends only on the key and the index).
// The run's mask words are one Philox block per 4 elements, laid out so that element t's word
// is words[t + lead] (lead = first mod 4): blocks g0 + i for i in [from, groups) are written by
// dare_fill, the run masked by dare_masked (csrc/cpu/dare_run.h puts them together, with AVX2
// blocks on that path).
inline void dare_fill(PhiloxKey key, uint64_t g0, int64_t from, int64_t groups, uint32_t* words) {
  for (int64_t i = from; i < groups; ++i) {
    const Philox4 w = dare_words(key, g0 + uint64_t(i));
    words[4 * i] = w.w[0];
    words[4 * i + 1] = w.w[1];
    words[4 * i + 2] = w.w[2];
    words[4 * i + 3] = w.w[3];
  }
}

inline void dare_masked(const uint32_t* words, int64_t lead, const DareSpec& d, int64_t len, float* buf) {
  const DareSpec dare = d;
  for (int64_t t = 0; t < len; ++t) buf[t] = dare_apply(buf[t], words[t + lead], dare);
}

inline void store_tile(const float* buf, int64_t len, DType dtype, void* out, int64_t j0) {
  switch (dtype) {
    case DType::f32: for (int64_t t = 0; t < len; ++t) store(static_cast<float*>(out) + j0 + t, buf[t]); break;
    case DType::f16: for (int64_t t = 0; t < len; ++t) store(static_cast<half_t*>(out) + j0 + t, buf[t]); break;
    case DType::bf16: for (int64_t t = 0; t < len; ++t) store(static_cast<bf16_t*>(out) + j0 + t, buf[t]); break;
  }
}

// A TIES tile's per-position accumulators, one array per field so the loops vectorise. Each
// array is padded by 64 bytes: unpadded, sum[t] and neg_sum[t] would be 4 KB apart, and a load
// that follows a store at the same address modulo 4 KB waits for it (4K aliasing).
template <int64_t kCapacity>
struct alignas(64) TileAccumOf {
  static constexpr int64_t kLen = kCapacity + 16;
  float sum[kLen], pos_sum[kLen], neg_sum[kLen];
  int32_t pos_count[kLen], neg_count[kLen], undecided[kLen];

  void clear(int64_t len) {
    std::fill(sum, sum + len, 0.0f);
    std::fill(pos_sum, pos_sum + len, 0.0f);
    std::fill(neg_sum, neg_sum + len, 0.0f);
    std::fill(pos_count, pos_count + len, 0);
    std::fill(neg_count, neg_count + len, 0);
    std::fill(undecided, undecided + len, 0);
  }
  // Adds G tasks' values (v[g], in task order) at positions 0 .. len-1, each trimmed by its
  // exact threshold. Several tasks a sweep: the accumulators are loaded and stored once for
  // all G (their stores, 5 a position, bound the loop). kFirst: the first tasks, added to zero
  // accumulators (no clear() needed, nothing read).
  template <int G, bool kFirst>
  void add_exact(const float* const* v, int64_t len, const float* thresholds) {
    uint32_t keep_from[G];
    const float* x[G];
    for (int g = 0; g < G; ++g) {
      keep_from[g] = magnitude_key(thresholds[g]);
      x[g] = v[g];
    }
    for (int64_t t = 0; t < len; ++t) {
      float s = kFirst ? 0.0f : sum[t], ps = kFirst ? 0.0f : pos_sum[t], ns = kFirst ? 0.0f : neg_sum[t];
      int32_t pc = kFirst ? 0 : pos_count[t], nc = kFirst ? 0 : neg_count[t];
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) ties_add_kept(s, ps, ns, pc, nc, x[g][t], keep_from[g]);
      sum[t] = s;
      pos_sum[t] = ps;
      neg_sum[t] = ns;
      pos_count[t] = pc;
      neg_count[t] = nc;
      if (kFirst) undecided[t] = 0;
    }
  }
  TiesAccum at(int64_t t) const {
    TiesAccum a;
    a.sum = sum[t];
    a.pos_sum = pos_sum[t];
    a.neg_sum = neg_sum[t];
    a.pos_count = pos_count[t];
    a.neg_count = neg_count[t];
    a.undecided = undecided[t];
    return a;
  }
};
using TileAccum = TileAccumOf<kTile>;

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
