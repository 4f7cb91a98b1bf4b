// DARE on a run of consecutive elements of one row, for the CPU path being compiled (Philox4x32-10
// of DESIGN.md §1, one block per 4 elements: tile.h's dare_fill and dare_masked), with the
// Philox blocks computed 4, 8 or 16 at a time in AVX2 registers on the avx2 path. GCC does not vectorise
// the scalar loop (the 32 x 32 -> 64-bit products), and Philox was most of DARE's cost there.
// Also load_tile, the row kernels' load of a run with DARE, so that they share this path's DARE.
// Include after path.h (it names the path's namespace and turns AVX2 on).
#pragma once

#if defined(KX_CPU_AVX2)
#include <immintrin.h>
#endif

#include "tile.h"

namespace kx::cpu::KX_CPU_PATH::dare_path {

#if defined(KX_CPU_AVX2)
// Philox4x32-10's rounds (common/philox.h) in 64-bit lanes, one block a lane, each word in the low
// half of its lane (see philox_sets), for the vector ops of Lanes: mul (the 64-bit products of
// the lanes' low halves), hi (each lane's high half into its low half; what it leaves in the
// high half does not matter: only low halves are read), xor3 and set1.
template <class Lanes, int kSets>
inline void philox_rounds(PhiloxKey key, typename Lanes::V (&c0)[kSets], typename Lanes::V (&c1)[kSets],
                          typename Lanes::V (&c2)[kSets], typename Lanes::V (&c3)[kSets]) {
  using V = typename Lanes::V;
  const V m0 = Lanes::set1(0xD2511F53), m1 = Lanes::set1(0xCD9E8D57);
  uint32_t k0 = key.k0, k1 = key.k1;
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
    const V key0 = Lanes::set1(k0), key1 = Lanes::set1(k1);
    for (int h = 0; h < kSets; ++h) {
      const V p0 = Lanes::mul(c0[h], m0), p1 = Lanes::mul(c2[h], m1);
      c0[h] = Lanes::xor3(Lanes::hi(p1), c1[h], key0);
      c2[h] = Lanes::xor3(Lanes::hi(p0), c3[h], key1);
      c1[h] = p1;
      c3[h] = p0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

struct Lanes256 {
  using V = __m256i;
  static V set1(uint64_t x) { return _mm256_set1_epi64x(int64_t(x)); }
  static V mul(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V hi(V a) { return _mm256_srli_epi64(a, 32); }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
};

#if defined(KX_CPU_AVX512)
// (xor3: one ternary-logic instruction, 0x96 = a ^ b ^ c; hi: a dword shuffle that swaps the
// halves, on the shuffle port, where a 512-bit shift would share port 0 with the products)
struct Lanes512 {
  using V = __m512i;
  static V set1(uint64_t x) { return _mm512_set1_epi64(int64_t(x)); }
  static V mul(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V swap(V a) { return _mm512_shuffle_epi32(a, _MM_PERM_CDAB); }  // each lane's two halves
  static V hi(V a) { return swap(a); }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }
};
#endif

// Philox blocks under key in kSets sets of 4 consecutive blocks, set h being blocks g0[h] ..
// g0[h] + 3, in element order: words[2h] holds the set's blocks 0 and 1, words[2h + 1] blocks 2
// and 3 (words 0-3 of each). The rounds run in 64-bit lanes, lane j of set h being block
// g0[h] + j with each word in the low half of its lane: _mm256_mul_epu32 then yields the whole
// 64-bit product and reads only low halves, so the high halves may hold anything, and a round is
// 2 products, 2 shifts and 4 XORs a set (the 32-bit layout also needed shifts and blends to split
// odd lanes: 1.0 -> 0.72 ns a word on one core). kSets = 4 keeps 16 blocks in flight, enough to
// hide the products' latency (0.80 -> 0.64 ns a word on one core against kSets = 2), with the
// rounds unrolled (else GCC kept the round-to-round register moves and spilled).
template <int kSets>
inline void philox_sets(PhiloxKey key, const uint64_t (&g0)[kSets], __m256i (&words)[2 * kSets]) {
  __m256i c0[kSets], c1[kSets], c2[kSets], c3[kSets];
  for (int h = 0; h < kSets; ++h) {
    const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
    c0[h] = _mm256_add_epi64(_mm256_set1_epi64x(int64_t(g0[h])), lane);
    c1[h] = _mm256_srli_epi64(c0[h], 32);
    c2[h] = c3[h] = _mm256_setzero_si256();
  }
  philox_rounds<Lanes256, kSets>(key, c0, c1, c2, c3);
  for (int h = 0; h < kSets; ++h) {
    // words 0 and 1 of a block into one 64-bit lane, 2 and 3 into another; then the lanes in
    // block order (unpacks work within 128-bit halves: blocks 0 | 2 and 1 | 3 of the set)
    const __m256i w01 = _mm256_blend_epi32(c0[h], _mm256_slli_epi64(c1[h], 32), 0xAA);
    const __m256i w23 = _mm256_blend_epi32(c2[h], _mm256_slli_epi64(c3[h], 32), 0xAA);
    const __m256i even = _mm256_unpacklo_epi64(w01, w23), odd = _mm256_unpackhi_epi64(w01, w23);
    words[2 * h] = _mm256_permute2x128_si256(even, odd, 0x20);
    words[2 * h + 1] = _mm256_permute2x128_si256(even, odd, 0x31);
  }
}

#if defined(KX_CPU_AVX512)
// philox_sets in 512-bit registers, 4 consecutive blocks a half: words[q] holds blocks g0[q] ..
// g0[q] + 3 in element order (16 words). Twice the products an instruction, and the round's two
// XORs one instruction.
template <int kSets>
inline void philox_sets512(PhiloxKey key, const uint64_t (&g0)[2 * kSets], __m512i (&words)[2 * kSets]) {
  __m512i c0[kSets], c1[kSets], c2[kSets], c3[kSets];
  for (int h = 0; h < kSets; ++h) {
    const int64_t lo = int64_t(g0[2 * h]), hi = int64_t(g0[2 * h + 1]);
    c0[h] = _mm512_add_epi64(_mm512_setr_epi64(lo, lo, lo, lo, hi, hi, hi, hi), _mm512_setr_epi64(0, 1, 2, 3, 0, 1, 2, 3));
    c1[h] = _mm512_srli_epi64(c0[h], 32);
    c2[h] = c3[h] = _mm512_setzero_si512();
  }
  philox_rounds<Lanes512, kSets>(key, c0, c1, c2, c3);
  const __m512i first4 = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), last4 = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int h = 0; h < kSets; ++h) {
    // lane j: words 0 and 1 of block j in w01, 2 and 3 in w23; then the lanes interleaved
    const __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, c0[h], Lanes512::swap(c1[h]));
    const __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, c2[h], Lanes512::swap(c3[h]));
    words[2 * h] = _mm512_permutex2var_epi64(w01, first4, w23);
    words[2 * h + 1] = _mm512_permutex2var_epi64(w01, last4, w23);
  }
}

// mask8 for the 16 elements at v.
inline void mask16(__m512i w, __m512i drop_below, __m512 scale, float* v) {
  const __mmask16 keep = _mm512_cmpge_epu32_mask(w, drop_below);
  _mm512_storeu_ps(v, _mm512_maskz_mul_ps(keep, _mm512_loadu_ps(v), scale));
}
#endif

// Blocks g0 .. g0 + 4 kSets - 1: words[q] holds blocks g0 + 2q and g0 + 2q + 1.
template <int kSets>
inline void philox_blocks(PhiloxKey key, uint64_t g0, __m256i (&words)[2 * kSets]) {
  uint64_t starts[kSets];
  for (int h = 0; h < kSets; ++h) starts[h] = g0 + uint64_t(4 * h);
  philox_sets<kSets>(key, starts, words);
}

// DARE on the 8 elements at v whose mask words are w: keep iff word >= drop_below (unsigned:
// max(word, drop_below) == word), kept ones times scale.
inline void mask8(__m256i w, __m256i drop_below, __m256 scale, float* v) {
  const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(w, drop_below), w);
  _mm256_storeu_ps(v, _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_mul_ps(_mm256_loadu_ps(v), scale)));
}
#endif

#if defined(KX_CPU_AVX512)
// DARE on runs of 16 kHalves elements starting on block boundaries (run i: elements first + i *
// stride .., at buf + i * ldv), 4 at a time: 16 or 32 Philox blocks in flight; returns the runs done.
template <int kHalves>
inline int64_t rows512(PhiloxKey key, const DareSpec& d, uint64_t first, int64_t stride, int64_t rows, float* buf,
                       int64_t ldv) {
  constexpr int kSets = 2 * kHalves;  // 4 runs of kHalves halves
  const __m512i drop_below = _mm512_set1_epi32(int(d.drop_below));
  const __m512 scale = _mm512_set1_ps(d.scale);
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    uint64_t g0[2 * kSets];
    for (int q = 0; q < 2 * kSets; ++q)
      g0[q] = ((first + uint64_t((i + q / kHalves) * stride)) >> 2) + uint64_t(4 * (q % kHalves));
    __m512i w[2 * kSets];
    philox_sets512<kSets>(key, g0, w);
    for (int q = 0; q < 2 * kSets; ++q) mask16(w[q], drop_below, scale, buf + (i + q / kHalves) * ldv + 16 * (q % kHalves));
  }
  return i;
}
#endif

// DARE on buf[0..len), elements first .. first+len-1 of their module (len <= kTile): with the
// blocks from philox_blocks where the path has it, a run that starts on a block masked in
// registers, 32 or 16 elements at a time; the rest through the words array.
inline void run(PhiloxKey key, const DareSpec& d, uint64_t first, int64_t len, float* buf) {
  const uint64_t g0 = first >> 2;
  const int64_t lead = int64_t(first & 3), groups = (lead + len + 3) / 4;
  alignas(32) uint32_t words[kTile + 40];
  int64_t i = 0, done = 0;  // blocks computed, elements masked
#if defined(KX_CPU_AVX2)
  if (lead == 0) {
    const __m256i drop_below = _mm256_set1_epi32(int(d.drop_below));
    const __m256 scale = _mm256_set1_ps(d.scale);
#if defined(KX_CPU_AVX512)
    i = 4 * rows512<1>(key, d, first, 16, len / 16, buf, 16);  // (the run as rows of 16, 64 elements at a time)
#endif
    for (; 4 * (i + 16) <= len; i += 16) {
      __m256i w[8];
      philox_blocks<4>(key, g0 + uint64_t(i), w);
      for (int q = 0; q < 8; ++q) mask8(w[q], drop_below, scale, buf + 4 * i + 8 * q);
    }
    if (4 * (i + 8) <= len) {
      __m256i w[4];
      philox_blocks<2>(key, g0 + uint64_t(i), w);
      for (int q = 0; q < 4; ++q) mask8(w[q], drop_below, scale, buf + 4 * i + 8 * q);
      i += 8;
    }
    if (4 * (i + 4) <= len) {  // 16 more (the sample lattice's blocks are 16 wide)
      __m256i w[2];
      philox_blocks<1>(key, g0 + uint64_t(i), w);
      for (int q = 0; q < 2; ++q) mask8(w[q], drop_below, scale, buf + 4 * i + 8 * q);
      i += 4;
    }
    done = 4 * i;
  }
  for (; i + 8 <= groups; i += 8) {
    __m256i w[4];
    philox_blocks<2>(key, g0 + uint64_t(i), w);
    for (int q = 0; q < 4; ++q) _mm256_store_si256(reinterpret_cast<__m256i*>(words + 4 * i) + q, w[q]);
  }
#endif
  dare_fill(key, g0, i, groups, words);
  dare_masked(words + done, lead, d, len - done, buf + done);
}

// DARE on `rows` runs of len elements: run i is elements first + i * stride .. of its module, in
// buf + i * ldv (a tile's rows, a sample block's). Runs of 32 or 16 elements on block boundaries
// (the factored kernels' tiles and sample blocks) go 2 or 4 at a time on the avx2 path: 16
// Philox blocks in flight instead of 8 or 4.
inline void run_rows(PhiloxKey key, const DareSpec& d, uint64_t first, int64_t stride, int64_t rows, int64_t len,
                     float* buf, int64_t ldv) {
  int64_t i = 0;
#if defined(KX_CPU_AVX512)
  if (first % 4 == 0 && stride % 4 == 0) {
    if (len == 32) i = rows512<2>(key, d, first, stride, rows, buf, ldv);
    if (len == 16) i = rows512<1>(key, d, first, stride, rows, buf, ldv);
  }
#endif
#if defined(KX_CPU_AVX2)
  if ((len == 16 || len == 32) && first % 4 == 0 && stride % 4 == 0) {
    const __m256i drop_below = _mm256_set1_epi32(int(d.drop_below));
    const __m256 scale = _mm256_set1_ps(d.scale);
    const int sets = int(len / 16), step = 4 / sets;  // sets of 4 blocks (16 elements) a run; runs a step
    for (; i + step <= rows; i += step) {
      uint64_t g0[4];
      for (int h = 0; h < 4; ++h) g0[h] = ((first + uint64_t((i + h / sets) * stride)) >> 2) + uint64_t(4 * (h % sets));
      __m256i w[8];
      philox_sets<4>(key, g0, w);
      for (int h = 0; h < 4; ++h) {
        float* v = buf + (i + h / sets) * ldv + 16 * (h % sets);
        mask8(w[2 * h], drop_below, scale, v);
        mask8(w[2 * h + 1], drop_below, scale, v + 8);
      }
    }
  }
#endif
  for (; i < rows; ++i) run(key, d, first + uint64_t(i * stride), len, buf + i * ldv);
}

}  // namespace kx::cpu::KX_CPU_PATH::dare_path

namespace kx::cpu::KX_CPU_PATH {

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
  if (d.enabled) dare_path::run(x.dare_keys[r], d, uint64_t(d.elem_offset + j0), len, buf);
  return nonfinite == 0;
}

}  // namespace kx::cpu::KX_CPU_PATH
