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

// Keys of v[0 .. len): returns how many are below key0; appends key - key0 of those inside the
// bracket to bin_of[count ..] and advances count. On the avx512 path bin_of must have room for 15
// more (a vector of 16 offsets is stored whole, the ones inside first).
inline uint64_t scan(const float* v, int64_t len, uint32_t key0, uint32_t span, uint32_t* bin_of, int64_t& count) {
  uint64_t under = 0;
  int64_t j = 0;
#if defined(KX_CPU_AVX512)
  // The tests give masks: the below-count is a masked add, the offsets inside are compacted in a
  // register (a compressing store to memory is microcoded on these cores).
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), low = _mm512_set1_epi32(int(key0));
  const __m512i last = _mm512_set1_epi32(int(span - 1)), one = _mm512_set1_epi32(1);
  __m512i below = _mm512_setzero_si512();
  for (; j + 16 <= len; j += 16) {
    const __m512i key = _mm512_and_si512(_mm512_loadu_si512(v + j), magnitude);
    below = _mm512_mask_add_epi32(below, _mm512_cmplt_epi32_mask(key, low), below, one);  // 31-bit keys
    const __m512i offset = _mm512_sub_epi32(key, low);
    const __mmask16 inside = _mm512_cmple_epu32_mask(offset, last);
    if (inside) {
      _mm512_storeu_si512(bin_of + count, _mm512_maskz_compress_epi32(inside, offset));
      count += __builtin_popcount(uint32_t(inside));
    }
  }
  alignas(64) uint32_t counts[16];  // (GCC's _mm512_reduce_add_epi32 warns of an undefined vector)
  _mm512_store_si512(counts, below);
  for (int i = 0; i < 16; ++i) under += counts[i];
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
