// DARE's per-element math (drop with probability p, rescale the kept by 1/(1-p)).
// Mask contract (DESIGN.md): Philox4x32-10 with key = seed XOR stream(task, module),
// counter = (element / 4 as 64 bits, 0, 0), word = element % 4, keep iff word >= floor(p * 2^32).
#pragma once
#include <cmath>
#include <cstdint>

#include "philox.h"
#include "rounding.h"

namespace kx {

struct DareSpec {
  bool enabled = false;
  uint32_t drop_below = 0;  // floor(p * 2^32): words below it are dropped
  float scale = 1.0f;       // 1 / (1 - p)
  int64_t elem_offset = 0;  // index of this array's element 0 within its module
};

inline DareSpec make_dare_spec(double p, int64_t elem_offset) {
  DareSpec d;
  d.enabled = p > 0.0;
  d.drop_below = uint32_t(std::floor(p * 4294967296.0));
  d.scale = float(1.0 / (1.0 - p));
  d.elem_offset = elem_offset;
  return d;
}

KX_HD PhiloxKey dare_key(uint64_t seed, uint64_t task, uint64_t module_id) {
  uint64_t stream = splitmix64(module_id ^ splitmix64(task));
  uint64_t k = seed ^ stream;
  return PhiloxKey{uint32_t(k), uint32_t(k >> 32)};
}

// The four mask words for elements 4*group .. 4*group+3.
KX_HD Philox4 dare_words(PhiloxKey key, uint64_t group) {
  Philox4 ctr = {{uint32_t(group), uint32_t(group >> 32), 0u, 0u}};
  return philox4x32_10(ctr, key);
}

KX_HD float dare_apply(float v, uint32_t word, const DareSpec& d) {
  return word >= d.drop_below ? mul_rn(v, d.scale) : 0.0f;
}

// Word `index` (0 .. 7) of two consecutive Philox blocks, by selects: a dynamic index (or a
// reference to either block) would put the words in GPU local memory.
KX_HD uint32_t pick_word(const Philox4& lo, const Philox4& hi, int index) {
  return index == 0 ? lo.w[0] : index == 1 ? lo.w[1] : index == 2 ? lo.w[2] : index == 3 ? lo.w[3]
       : index == 4 ? hi.w[0] : index == 5 ? hi.w[1] : index == 6 ? hi.w[2] : hi.w[3];
}

// The mask words of the 4 consecutive elements first .. first+3: one Philox block when first
// is a multiple of 4, else the two blocks they straddle.
KX_HD void dare_words4(PhiloxKey key, uint64_t first, uint32_t (&words)[4]) {
  const Philox4 lo = dare_words(key, first >> 2);
  const int lead = int(first & 3u);
  const Philox4 hi = lead != 0 ? dare_words(key, (first >> 2) + 1) : lo;
  words[0] = pick_word(lo, hi, lead);
  words[1] = pick_word(lo, hi, lead + 1);
  words[2] = pick_word(lo, hi, lead + 2);
  words[3] = pick_word(lo, hi, lead + 3);
}

// One element, computing its own Philox block (scattered positions; runs of elements share
// blocks: dare_words4, the CPU's dare_run).
KX_HD float dare_element(float v, PhiloxKey key, int64_t index, const DareSpec& d) {
  Philox4 w = dare_words(key, uint64_t(index) >> 2);
  const int lane = int(index & 3);  // selects, not w.w[lane]: a dynamic index puts w in GPU local memory
  const uint32_t word = lane == 0 ? w.w[0] : lane == 1 ? w.w[1] : lane == 2 ? w.w[2] : w.w[3];
  return dare_apply(v, word, d);
}

}  // namespace kx
