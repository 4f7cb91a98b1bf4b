// Task rows given as factors (DESIGN.md §2, factor-fused kernels): task i's row is the m x c
// matrix s_i * P_i @ Q_i, flattened row-major (element a * c + b), P_i (m x r_i) and Q_i
// (r_i x c) float32, row-major and contiguous. The kernels recompute each entry from the factors
// instead of reading a stored row; every kernel, CPU (any path, vectorised or not) or GPU,
// computes an entry as below, so they all give the same bits.
#pragma once
#include <cstdint>

#include "philox.h"
#include "rounding.h"

namespace kx {

// One task's factors, as the kernels read them (host or device pointers).
struct FactorTask {
  const float* P = nullptr;  // m x rank, row-major
  const float* Q = nullptr;  // rank x c, row-major
  int64_t rank = 0;
  float scale = 1.0f;
  PhiloxKey dare_key{0u, 0u};  // used when DARE is on
};

// The dot product of an entry: sum_k p[k] * q[k * q_stride] as a chain of fused multiply-adds
// in k order 0 .. rank-1, from +0 (common/rounding.h). A vectorised kernel may compute many
// entries at once but must keep, per entry, exactly this chain.
KX_HD float factor_dot(const float* p, const float* q, int64_t rank, int64_t q_stride) {
  float acc = 0.0f;
  for (int64_t k = 0; k < rank; ++k) acc = fma_rn(p[k], q[k * q_stride], acc);
  return acc;
}

// The entry from its dot product: s * dot, one rounding.
KX_HD float factor_scale(float scale, float dot) { return mul_rn(scale, dot); }

// Entry (a, b) of task t's row (c columns), computed on its own.
KX_HD float factor_entry(const FactorTask& t, int64_t c, int64_t a, int64_t b) {
  return factor_scale(t.scale, factor_dot(t.P + a * t.rank, t.Q + b, t.rank, c));
}

}  // namespace kx
