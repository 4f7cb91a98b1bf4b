// The threshold pass's bracket test on a run of entries, for the CPU path being compiled: how
// many keys lie below the bracket [key0, key0 + span), and the offsets (key - key0) of those
// inside it. The bracket is narrow (~0.4% of the keys), so on the avx2 path a vector of 8 keys
// is tested at once and only one holding a key inside is compacted, lane by lane; GCC's own
// vectorisation of the plain loop reduced its counts every 32 entries and compacted whole rows.
// Include after path.h (it names the path's namespace and turns AVX2 on).
#pragma once

#if defined(KX_CPU_AVX2)
#include <immintrin.h>
#endif

#include <cstdint>

#include "tile.h"

namespace kx::cpu::KX_CPU_PATH::bracket_path {

#if defined(KX_CPU_AVX512)
// The bracket test of 16 values x (keys: their bits without the sign, 31-bit, so signed order):
// the below-count is a masked add into below's lanes, the offsets inside are compacted in a
// register and stored whole (a compressing store to memory is microcoded on these cores), so
// bin_of needs room for 15 more.
struct Bracket16 {
  __m512i low, last, below = _mm512_setzero_si512();
  Bracket16(uint32_t key0, uint32_t span) : low(_mm512_set1_epi32(int(key0))), last(_mm512_set1_epi32(int(span - 1))) {}
  void test(__m512 x, uint32_t* bin_of, int64_t& count) {
    const __m512i key = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
    below = _mm512_mask_add_epi32(below, _mm512_cmplt_epi32_mask(key, low), below, _mm512_set1_epi32(1));
    const __m512i offset = _mm512_sub_epi32(key, low);
    const __mmask16 inside = _mm512_cmple_epu32_mask(offset, last);
    if (inside) {
      _mm512_storeu_si512(bin_of + count, _mm512_maskz_compress_epi32(inside, offset));
      count += __builtin_popcount(uint32_t(inside));
    }
  }
  uint64_t below_count() const {
    alignas(64) uint32_t counts[16];  // (GCC's _mm512_reduce_add_epi32 warns of an undefined vector)
    _mm512_store_si512(counts, below);
    uint64_t total = 0;
    for (int i = 0; i < 16; ++i) total += counts[i];
    return total;
  }
};
#endif

// Keys of v[0 .. len): returns how many are below key0; appends key - key0 of those inside the
// bracket to bin_of[count ..] and advances count. On the avx512 path bin_of must have room for 15
// more (Bracket16).
inline uint64_t scan(const float* v, int64_t len, uint32_t key0, uint32_t span, uint32_t* bin_of, int64_t& count) {
  uint64_t under = 0;
  int64_t j = 0;
#if defined(KX_CPU_AVX512)
  Bracket16 bracket(key0, span);
  for (; j + 16 <= len; j += 16) bracket.test(_mm512_loadu_ps(v + j), bin_of, count);
  under += bracket.below_count();
#elif defined(KX_CPU_AVX2)
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff), low = _mm256_set1_epi32(int(key0));
  const __m256i last = _mm256_set1_epi32(int(span - 1));  // span >= 1
  __m256i below = _mm256_setzero_si256();
  for (; j + 8 <= len; j += 8) {
    const __m256i key = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)), magnitude);
    below = _mm256_sub_epi32(below, _mm256_cmpgt_epi32(low, key));  // keys are 31-bit: signed order
    const __m256i offset = _mm256_sub_epi32(key, low);
    const __m256i inside = _mm256_cmpeq_epi32(_mm256_min_epu32(offset, last), offset);
    uint32_t lanes = uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(inside)));
    if (lanes) {
      alignas(32) uint32_t offsets[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(offsets), offset);
      for (; lanes; lanes &= lanes - 1) bin_of[count++] = offsets[__builtin_ctz(lanes)];
    }
  }
  alignas(32) uint32_t counts[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(counts), below);
  for (int i = 0; i < 8; ++i) under += counts[i];
#endif
  for (; j < len; ++j) {
    const uint32_t key = magnitude_key(v[j]);
    under += key < key0;
    bin_of[count] = key - key0;
    count += uint32_t(key - key0) < span;
  }
  return under;
}

}  // namespace kx::cpu::KX_CPU_PATH::bracket_path
