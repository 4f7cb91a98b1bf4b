// DARE on a run of consecutive elements of one row, for the CPU path being compiled: the same
// masks as dare_run (tile.h: Philox4x32-10 of DESIGN.md §1, one block per 4 elements), with the
// Philox blocks computed 8 at a time in AVX2 registers on the avx2 path. GCC does not vectorise
// the scalar loop (the 32 x 32 -> 64-bit products), and Philox was most of DARE's cost there.
// Include after path.h (it names the path's namespace and turns AVX2 on).
#pragma once

#if defined(KX_CPU_AVX2)
#include <immintrin.h>
#endif

#include "tile.h"

namespace kx::cpu::KX_CPU_PATH::dare_path {

#if defined(KX_CPU_AVX2)
// (hi, lo) of the 32 x 32-bit products a * m, 8 lanes: even lanes multiplied in place, odd lanes
// shifted down first; the halves blended back into lane order.
inline void mul_hi_lo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Philox blocks g0 .. g0+7 under key: words[4 i + w] = word w of block g0 + i.
inline void philox8(PhiloxKey key, uint64_t g0, uint32_t* words) {
  alignas(32) uint32_t low[8], high[8];
  for (int i = 0; i < 8; ++i) {
    low[i] = uint32_t(g0 + uint64_t(i));
    high[i] = uint32_t((g0 + uint64_t(i)) >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(low));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(high));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  const __m256i m0 = _mm256_set1_epi32(int(0xD2511F53u)), m1 = _mm256_set1_epi32(int(0xCD9E8D57u));
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mul_hi_lo8(c0, m0, hi0, lo0);
    mul_hi_lo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(int(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(int(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Interleave the four word vectors: (c0 c1 c2 c3) per block, blocks in order.
  // (unpacks work within each 128-bit half: lanes 0-3 and 4-7)
  const __m256i a = _mm256_unpacklo_epi32(c0, c1), b = _mm256_unpackhi_epi32(c0, c1);  // w0 w1 pairs
  const __m256i c = _mm256_unpacklo_epi32(c2, c3), d = _mm256_unpackhi_epi32(c2, c3);  // w2 w3 pairs
  const __m256i b0 = _mm256_unpacklo_epi64(a, c), b1 = _mm256_unpackhi_epi64(a, c);    // blocks 0|4, 1|5
  const __m256i b2 = _mm256_unpacklo_epi64(b, d), b3 = _mm256_unpackhi_epi64(b, d);    // blocks 2|6, 3|7
  __m256i* out = reinterpret_cast<__m256i*>(words);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(b0, b1, 0x20));  // blocks 0, 1
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(b2, b3, 0x20));  // blocks 2, 3
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(b0, b1, 0x31));  // blocks 4, 5
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(b2, b3, 0x31));  // blocks 6, 7
}
#endif

// dare_run (tile.h) with the blocks from philox8 where the path has it.
inline void run(PhiloxKey key, const DareSpec& d, uint64_t first, int64_t len, float* buf) {
  const uint64_t g0 = first >> 2;
  const int64_t lead = int64_t(first & 3), groups = (lead + len + 3) / 4;
  alignas(32) uint32_t words[kTile + 40];
  int64_t i = 0;
#if defined(KX_CPU_AVX2)
  for (; i + 8 <= groups; i += 8) philox8(key, g0 + uint64_t(i), words + 4 * i);
#endif
  dare_fill(key, g0, i, groups, words);
  dare_masked(words, lead, d, len, buf);
}

}  // namespace kx::cpu::KX_CPU_PATH::dare_path
