// TIES per-position math (DESIGN.md §1): trim by magnitude threshold, elect the sign of the
// sum of trimmed values, disjoint mean over the entries that agree with it.
#pragma once
#include <cstdint>

#include "dtype.h"
#include "rounding.h"

namespace kx {

// |x| as an order-preserving uint32 (the float's bits without the sign). Non-finite
// magnitudes have keys >= kNonFiniteKey.
KX_HD uint32_t magnitude_key(float v) { return float_bits(v) & 0x7fffffffu; }
constexpr uint32_t kNonFiniteKey = 0x7f800000u;

// How one task's entries are trimmed: keys >= keep_from are kept; keys in
// [undecided_from, keep_from) are not known yet (the CPU path defers them until the exact
// threshold is known); the rest are dropped. An exact threshold t has both equal to key(t).
struct TrimRange {
  uint32_t undecided_from;
  uint32_t keep_from;
};

// An exact threshold t: keep iff |x| >= t, nothing undecided.
KX_HD TrimRange exact_trim(float threshold) {
  const uint32_t key = magnitude_key(threshold);
  return TrimRange{key, key};
}

struct TiesAccum {
  float sum = 0.0f;      // of all trimmed values: its sign is the elected sign
  float pos_sum = 0.0f;  // of the kept positive values
  float neg_sum = 0.0f;
  int32_t pos_count = 0;
  int32_t neg_count = 0;
  int32_t undecided = 0;  // 1 if some entry fell in its row's undecided range
};

// One entry into a position's accumulators where the row's threshold is exact: kept iff its
// key >= keep_from. Separate scalars so the CPU can keep them in vectorisable arrays (one per
// field) and the GPU in registers.
KX_HD void ties_add_kept(float& sum, float& pos_sum, float& neg_sum, int32_t& pos_count, int32_t& neg_count,
                         float v, uint32_t keep_from) {
  // Keys are 31-bit: compared as int32, the same order, one vector compare on the CPU. The
  // dropped entries become +0 by a bit mask (not a select, which GCC turns into two sums).
  const uint32_t keep = 0u - uint32_t(int32_t(magnitude_key(v)) >= int32_t(keep_from));
  const float t = bits_float(float_bits(v) & keep);
  sum = add_rn(sum, t);
  pos_sum = add_rn(pos_sum, t > 0.0f ? t : 0.0f);
  neg_sum = add_rn(neg_sum, t < 0.0f ? t : 0.0f);
  pos_count += t > 0.0f;
  neg_count += t < 0.0f;
}

// The same with a TrimRange that may leave entries undecided (flagged in `undecided`).
KX_HD void ties_add(float& sum, float& pos_sum, float& neg_sum, int32_t& pos_count, int32_t& neg_count,
                    int32_t& undecided, float v, TrimRange r) {
  const uint32_t key = magnitude_key(v);
  undecided |= int32_t(key >= r.undecided_from) & int32_t(key < r.keep_from);
  ties_add_kept(sum, pos_sum, neg_sum, pos_count, neg_count, v, r.keep_from);
}

KX_HD void ties_add(TiesAccum& a, float v, TrimRange r) {
  ties_add(a.sum, a.pos_sum, a.neg_sum, a.pos_count, a.neg_count, a.undecided, v, r);
}

// The elected sign before the majority rule: +1, -1, or 0 where the trimmed sum is exactly 0.
KX_HD int ties_sign(const TiesAccum& a) { return (a.sum > 0.0f) - (a.sum < 0.0f); }

// A position whose elected sign must come from the majority sign (sum exactly 0 but
// something survived the trim).
KX_HD bool ties_needs_majority(const TiesAccum& a) {
  return (a.sum == 0.0f) & ((a.pos_count + a.neg_count) > 0);  // & not &&: no branch
}

// Disjoint mean for a given elected sign (0 gives 0: no entry has sign 0 and is nonzero).
// The sum and count are selected first, then divided once (denominator >= 1), so the CPU loop
// over a tile has no branch.
KX_HD float ties_mean(const TiesAccum& a, int sign, float lam) {
  const float sum = sign > 0 ? a.pos_sum : (sign < 0 ? a.neg_sum : 0.0f);
  const int32_t count = sign > 0 ? a.pos_count : (sign < 0 ? a.neg_count : 1);
  return mul_rn(lam, div_rn(sum, float(count > 0 ? count : 1)));
}

}  // namespace kx
