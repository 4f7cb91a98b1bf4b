// Exact per-task magnitude threshold over entries that arrive in many arrays, by radix
// select on the bits of |x| (no sort, memory independent of the number of entries).
// Round 0 histograms the top 16 bits of the 31-bit magnitude key; round 1 histograms the low
// 15 bits of the entries inside the bin that holds the wanted rank. Round 1 is skipped when
// every key's low bits are zero (bf16 data) or top_k >= 1.
// TIES keeps the entries with |x| >= t, where t is the k-th smallest |x| (1-based) and
// k = N - floor(N * top_k); top_k >= 1 keeps everything (t = 0).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "ties_math.h"

namespace kx {

constexpr int kRound0Shift = 15;
constexpr uint32_t kLowMask = (1u << kRound0Shift) - 1;
constexpr int64_t kRound0Bins = int64_t(1) << 16;
constexpr int64_t kRound1Bins = int64_t(1) << kRound0Shift;

// The 1-based rank k of the threshold among N magnitudes (k = N - floor(N * top_k)); 0 means
// keep everything (top_k >= 1 or no entries).
inline uint64_t threshold_rank(uint64_t n, double top_k) {
  if (n == 0 || top_k >= 1.0) return 0;
  return n - uint64_t(std::floor(double(n) * top_k));
}

inline void check_top_k(double top_k) {
  if (!(top_k > 0.0 && top_k <= 1.0))  // NaN too
    throw std::invalid_argument("top_k must be in (0, 1] (top_k is a fraction: 20% is 0.2)");
}

class MagnitudeSelect {
 public:
  static constexpr uint32_t kNoPrefix = 0xffffffffu;

  MagnitudeSelect(int64_t n_tasks, double top_k)
      : n_(n_tasks), top_k_(top_k), hist_(size_t(n_tasks) * kRound0Bins, 0),
        total_(n_tasks, 0), low_or_(n_tasks, 0), prefix_(n_tasks, kNoPrefix),
        rank_(n_tasks, 0), key_(n_tasks, 0), exact_(n_tasks, false) {
    if (n_tasks < 1) throw std::invalid_argument("magnitude threshold needs at least one task");
    check_top_k(top_k);
  }

  int64_t n_tasks() const { return n_; }
  int round() const { return round_; }
  bool done() const { return round_ == 2; }
  int64_t bins() const { return round_ == 0 ? kRound0Bins : kRound1Bins; }
  // Round 1 counts only keys whose top bits equal prefix(task); kNoPrefix: task is settled.
  uint32_t prefix(int64_t task) const { return prefix_[task]; }
  uint64_t* hist(int64_t task) { return hist_.data() + size_t(task) * kRound0Bins; }
  void add_low_bits(int64_t task, uint32_t bits) { low_or_[task] |= bits; }
  void flag_nonfinite() { nonfinite_ = true; }
  bool nonfinite() const { return nonfinite_; }

  // Ends the current round: picks each task's bin and clears the histograms for the next.
  void finish_round() {
    if (nonfinite_) throw std::domain_error("input contains NaN or Inf");
    if (round_ == 0) {
      for (int64_t t = 0; t < n_; ++t) finish_round0(t);
    } else if (round_ == 1) {
      for (int64_t t = 0; t < n_; ++t) {
        if (exact_[t]) continue;
        uint64_t low = pick_bin(hist(t), kRound1Bins, rank_[t]);
        settle(t, (prefix_[t] << kRound0Shift) | uint32_t(low));
      }
    }
    std::fill(hist_.begin(), hist_.end(), 0);
    round_ = std::all_of(exact_.begin(), exact_.end(), [](bool e) { return e; }) ? 2 : 1;
  }

  // After round 0: the key range still undecided for a task, with its rank inside it.
  TrimRange range(int64_t task) const {
    if (exact_[task]) return TrimRange{key_[task], key_[task]};
    uint32_t lo = prefix_[task] << kRound0Shift;
    return TrimRange{lo, lo + kLowMask + 1};
  }
  uint64_t rank_in_bin(int64_t task) const { return rank_[task]; }
  bool exact(int64_t task) const { return exact_[task]; }
  uint64_t total(int64_t task) const { return total_[task]; }
  // The caller found the exact key itself (by selecting among the undecided entries).
  void settle(int64_t task, uint32_t key) {
    key_[task] = key;
    exact_[task] = true;
    prefix_[task] = kNoPrefix;
  }
  void mark_done() { round_ = 2; }
  float threshold(int64_t task) const { return bits_float(key_[task]); }

 private:
  // The bin holding rank `rank` (1-based); leaves in `rank` the rank inside that bin.
  static uint64_t pick_bin(const uint64_t* h, int64_t bins, uint64_t& rank) {
    uint64_t below = 0;
    for (int64_t b = 0; b < bins; ++b) {
      if (below + h[b] >= rank) {
        rank -= below;
        return uint64_t(b);
      }
      below += h[b];
    }
    throw std::logic_error("magnitude histogram lost entries");
  }

  void finish_round0(int64_t t) {
    const uint64_t* h = hist(t);
    uint64_t n = 0;
    for (int64_t b = 0; b < kRound0Bins; ++b) n += h[b];
    total_[t] = n;
    const uint64_t k = threshold_rank(n, top_k_);
    if (k == 0) {
      settle(t, 0);
      return;
    }
    rank_[t] = k;
    uint32_t bin = uint32_t(pick_bin(h, kRound0Bins, rank_[t]));
    prefix_[t] = bin;
    if (low_or_[t] == 0) settle(t, bin << kRound0Shift);  // one value per bin: exact already
  }

  int64_t n_;
  double top_k_;
  int round_ = 0;
  bool nonfinite_ = false;
  std::vector<uint64_t> hist_;
  std::vector<uint64_t> total_;
  std::vector<uint32_t> low_or_;
  std::vector<uint32_t> prefix_;
  std::vector<uint64_t> rank_;
  std::vector<uint32_t> key_;
  std::vector<bool> exact_;
};

}  // namespace kx
