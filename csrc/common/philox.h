// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind DARE's masks:
// every random word is a pure function of (key, counter), so masks do not depend on
// thread count, chunking or launch configuration.
#pragma once
#include <cstdint>

#include "hostdevice.h"

namespace kx {

struct PhiloxKey { uint32_t k0, k1; };
struct Philox4 { uint32_t w[4]; };

KX_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

KX_HD Philox4 philox4x32_10(Philox4 ctr, PhiloxKey key) {
  const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;  // round multipliers
  const uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(M0, ctr.w[0], hi0, lo0);
    mul_hi_lo(M1, ctr.w[2], hi1, lo1);
    Philox4 next = {{hi1 ^ ctr.w[1] ^ key.k0, lo1, hi0 ^ ctr.w[3] ^ key.k1, lo0}};
    ctr = next;
    key.k0 += W0;
    key.k1 += W1;
  }
  return ctr;
}

KX_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// 64-bit FNV-1a of a module name: the module's identity in DARE's stream.
inline uint64_t fnv1a64(const char* s, uint64_t len) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint64_t i = 0; i < len; ++i) {
    h ^= uint8_t(s[i]);
    h *= 0x100000001b3ull;
  }
  return h;
}

}  // namespace kx
