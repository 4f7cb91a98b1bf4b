// Exact per-task magnitude threshold over entries that arrive in many arrays, by radix
// select on the bits of |x| (no sort, memory independent of the number of entries).
// Round 0 histograms the top 16 bits of the 31-bit magnitude key; round 1 histograms the low
// 15 bits of the entries inside the bin that holds the wanted rank. Round 1 is skipped when
// every key's low bits are zero (bf16 data) or top_k >= 1.
// TIES keeps the entries with |x| >= t, where t is the k-th smallest |x| (1-based) and
// k = N - floor(N * top_k); top_k >= 1 keeps everything (t = 0).
//
// Sampled mode (the CPU factored kernels only: entries recomputed from factors cost nothing to
// revisit in part): pass 0 histograms a fixed 1/16 lattice of each task's entries (top 16
// bits) and counts all of them. Pass 1 counts every entry below a bracket that the sample's
// order statistics place around the threshold, and keeps those inside it; if the threshold's
// rank lies inside, its key is exact after that one full pass. A task whose bracket missed
// falls back to rounds 0 and 1. Thresholds are the same bits in every mode.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ties_math.h"

namespace kx {

constexpr int kRound0Shift = 15;
constexpr uint32_t kLowMask = (1u << kRound0Shift) - 1;
constexpr int64_t kRound0Bins = int64_t(1) << 16;
constexpr int64_t kRound1Bins = int64_t(1) << kRound0Shift;
constexpr int64_t kWindowBins = int64_t(1) << 16;  // two round-0 bins, key by key
static_assert(kWindowBins <= kRound0Bins, "the window's counts live in a task's histogram");
// A bracket's list of keys holds at most this many (expected: a few thousand; the bound is
// half a task's histogram in memory).
constexpr uint64_t kMaxBracketKeys = uint64_t(1) << 16;
constexpr double kBracketSigmas = 4.5;
constexpr int kSampleRowBlock = 4;    // the sample lattice: blocks of 4 rows x 16 columns, ...
constexpr int kSampleColBlock = 16;
constexpr int kSampleEvery = 16;      // ... one block in 16 along each row of blocks

// Which block columns of row block ib the sample takes: jb = first + k * kSampleEvery. The
// offset moves with ib (5 is odd: every residue in turn), so each column is sampled too.
KX_HD int64_t sample_first_block(int64_t ib) { return (5 * ib) % kSampleEvery; }

// What a task's entries are counted for in the current pass.
enum class Count : uint8_t {
  kNone,    // settled: not counted
  kSample,  // sampled mode, pass 0: the sample lattice's keys by their top 16 bits
  kWindow,  // every key: below `key` counted, [key, key + kWindowBins) key by key
  kList,    // every key: below `key` counted, [key, key + span) kept as a list
  kTop,     // round 0: every key by its top 16 bits
  kLow,     // round 1: keys whose top 16 bits are `key`, by their low 15 bits
};
struct TaskPass {
  Count what;
  uint32_t key;
  uint32_t span = 0;  // kWindow, kList: the bracket is [key, key + span)
};

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

  MagnitudeSelect(int64_t n_tasks, double top_k, bool sampled = false)
      : n_(n_tasks), top_k_(top_k), sampled_(sampled), hist_(size_t(n_tasks) * kRound0Bins, 0),
        total_(n_tasks, 0), low_or_(n_tasks, 0), prefix_(n_tasks, kNoPrefix),
        rank_(n_tasks, 0), key_(n_tasks, 0), exact_(n_tasks, false),
        phase_(n_tasks, sampled ? Count::kSample : Count::kTop), below_(n_tasks, 0), window_(n_tasks, 0),
        span_(n_tasks, 0), keys_(sampled ? n_tasks : 0), overflow_(n_tasks, false) {
    if (n_tasks < 1) throw std::invalid_argument("magnitude threshold needs at least one task");
    check_top_k(top_k);
  }

  int64_t n_tasks() const { return n_; }
  bool sampled() const { return sampled_; }
  // The passes finished so far; without sampling, 0 or 1 while open and 2 once done.
  int round() const { return round_; }
  bool done() const { return sampled_ ? done_ : round_ == 2; }
  // Tasks whose sampled window missed the threshold (they took rounds 0 and 1 instead).
  int64_t missed() const { return missed_; }
  // The round-0 / round-1 protocol of the row kernels and the CUDA kernels (not sampled).
  int64_t bins() const {
    classic_only();
    return round_ == 0 ? kRound0Bins : kRound1Bins;
  }
  // Round 1 counts only keys whose top bits equal prefix(task); kNoPrefix: task is settled.
  uint32_t prefix(int64_t task) const {
    classic_only();
    return prefix_[task];
  }
  // What task's entries are counted for in this pass (any mode); counts go to hist(task).
  TaskPass pass_of(int64_t task) const {
    if (!sampled_) {
      if (round_ == 0) return TaskPass{Count::kTop, 0};
      return prefix_[task] == kNoPrefix ? TaskPass{Count::kNone, 0} : TaskPass{Count::kLow, prefix_[task]};
    }
    switch (phase_[task]) {
      case Count::kWindow:
      case Count::kList: return TaskPass{phase_[task], window_[task], span_[task]};
      case Count::kLow: return TaskPass{Count::kLow, prefix_[task]};
      default: return TaskPass{phase_[task], 0};
    }
  }
  // Sampled mode: entries a pass-0 call saw in all (sampled or not), and a window pass's
  // entries below the window.
  void add_total(int64_t task, uint64_t n) { total_[task] += n; }
  void add_below(int64_t task, uint64_t n) { below_[task] += n; }
  // kList: keys inside the bracket (a list that would outgrow kMaxBracketKeys is dropped: a miss).
  void add_keys(int64_t task, const uint32_t* keys, size_t count) {
    std::vector<uint32_t>& list = keys_[task];
    if (overflow_[task]) return;
    if (list.size() + count > kMaxBracketKeys) {
      overflow_[task] = true;
      std::vector<uint32_t>().swap(list);
      return;
    }
    list.insert(list.end(), keys, keys + count);
  }
  uint64_t* hist(int64_t task) { return hist_.data() + size_t(task) * kRound0Bins; }
  void add_low_bits(int64_t task, uint32_t bits) { low_or_[task] |= bits; }
  void flag_nonfinite() { nonfinite_ = true; }
  bool nonfinite() const { return nonfinite_; }

  // Ends the current round: picks each task's bin and clears the histograms for the next.
  void finish_round() {
    if (nonfinite_) throw std::domain_error("input contains NaN or Inf");
    if (sampled_) {
      finish_sampled_pass();
      return;
    }
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
  void mark_done() {
    round_ = 2;
    done_ = true;
  }
  float threshold(int64_t task) const { return bits_float(key_[task]); }

  // Counting a pass in other processes (knots_ext.distributed): counting_copy() is this
  // selection's plan for the open pass with nothing counted; add_counts() adds such a copy's
  // counts to this one. Counts are integer sums (and ORs, and key lists that are selected
  // from, not read in order), so any split of the entries gives the same thresholds.
  MagnitudeSelect counting_copy() const {
    MagnitudeSelect c(n_, top_k_, sampled_);
    c.round_ = round_;
    c.done_ = done_;
    c.prefix_ = prefix_;
    c.phase_ = phase_;
    c.window_ = window_;
    c.span_ = span_;
    return c;
  }
  void add_counts(const MagnitudeSelect& o) {
    if (o.n_ != n_ || o.sampled_ != sampled_ || o.round_ != round_ || o.top_k_ != top_k_)
      throw std::invalid_argument("counts of another selection or another pass");
    for (size_t i = 0; i < hist_.size(); ++i) hist_[i] += o.hist_[i];
    for (int64_t t = 0; t < n_; ++t) {
      total_[t] += o.total_[t];
      below_[t] += o.below_[t];
      low_or_[t] |= o.low_or_[t];
      if (o.overflow_[t]) {
        overflow_[t] = true;
        std::vector<uint32_t>().swap(keys_[t]);
      } else if (sampled_) {
        add_keys(t, o.keys_[t].data(), o.keys_[t].size());
      }
    }
    nonfinite_ = nonfinite_ || o.nonfinite_;
  }

  // The whole state as bytes and back (to cross processes; the histograms' nonzero bins only).
  std::string serialize() const {
    std::string out;
    const auto pod = [&](auto v) { out.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
    const auto vec = [&](const auto& v) {
      pod(uint64_t(v.size()));
      for (size_t i = 0; i < v.size(); ++i) pod(typename std::decay_t<decltype(v)>::value_type(v[i]));  // (vector<bool>)
    };
    pod(n_), pod(top_k_), pod(sampled_), pod(round_), pod(done_), pod(nonfinite_), pod(missed_);
    uint64_t nonzero = 0;
    for (uint64_t h : hist_) nonzero += h != 0;
    pod(nonzero);
    for (size_t i = 0; i < hist_.size(); ++i)
      if (hist_[i] != 0) pod(uint64_t(i)), pod(hist_[i]);
    vec(total_), vec(low_or_), vec(prefix_), vec(rank_), vec(key_), vec(exact_), vec(phase_), vec(below_);
    vec(window_), vec(span_), vec(overflow_);
    pod(uint64_t(keys_.size()));
    for (const auto& list : keys_) vec(list);
    return out;
  }
  static MagnitudeSelect deserialize(const std::string& bytes) {
    size_t at = 0;
    const auto read = [&](auto& v) {
      if (bytes.size() - at < sizeof(v)) throw std::invalid_argument("truncated magnitude selection state");
      std::memcpy(&v, bytes.data() + at, sizeof(v));
      at += sizeof(v);
    };
    const auto count = [&](size_t item) {
      uint64_t size = 0;
      read(size);
      if (size > (bytes.size() - at) / item) throw std::invalid_argument("truncated magnitude selection state");
      return size;
    };
    const auto vec = [&](auto& v) {
      v.resize(count(sizeof(typename std::decay_t<decltype(v)>::value_type)));
      for (size_t i = 0; i < v.size(); ++i) {
        typename std::decay_t<decltype(v)>::value_type x{};
        read(x);
        v[i] = x;
      }
    };
    int64_t n = 0;
    double top_k = 0;
    bool sampled = false;
    read(n), read(top_k), read(sampled);
    MagnitudeSelect s(n, top_k, sampled);
    read(s.round_), read(s.done_), read(s.nonfinite_), read(s.missed_);
    for (uint64_t e = count(2 * sizeof(uint64_t)); e > 0; --e) {
      uint64_t i = 0, h = 0;
      read(i), read(h);
      if (i >= s.hist_.size()) throw std::invalid_argument("corrupt magnitude selection state");
      s.hist_[i] = h;
    }
    vec(s.total_), vec(s.low_or_), vec(s.prefix_), vec(s.rank_), vec(s.key_), vec(s.exact_), vec(s.phase_);
    vec(s.below_), vec(s.window_), vec(s.span_), vec(s.overflow_);
    s.keys_.resize(count(sizeof(uint64_t)));
    for (auto& list : s.keys_) vec(list);
    const size_t tasks = size_t(n);
    for (size_t size : {s.total_.size(), s.low_or_.size(), s.prefix_.size(), s.rank_.size(), s.key_.size(),
                        s.exact_.size(), s.phase_.size(), s.below_.size(), s.window_.size(), s.span_.size(),
                        s.overflow_.size()})
      if (size != tasks) throw std::invalid_argument("corrupt magnitude selection state");
    if (s.keys_.size() != (sampled ? tasks : 0) || at != bytes.size())
      throw std::invalid_argument("corrupt magnitude selection state");
    return s;
  }

 private:
  void classic_only() const {
    if (sampled_) throw std::logic_error("a sampled magnitude selection takes only the CPU factored kernels");
  }

  void finish_sampled_pass() {
    for (int64_t t = 0; t < n_; ++t) {
      switch (phase_[t]) {
        case Count::kSample: place_window(t); break;
        case Count::kWindow:
        case Count::kList: finish_bracket(t); break;
        case Count::kTop:
          finish_round0(t);
          if (!exact_[t]) phase_[t] = Count::kLow;
          break;
        case Count::kLow:
          settle(t, (prefix_[t] << kRound0Shift) | uint32_t(pick_bin(hist(t), kRound1Bins, rank_[t])));
          break;
        case Count::kNone: break;
      }
      if (exact_[t]) phase_[t] = Count::kNone;
    }
    std::fill(hist_.begin(), hist_.end(), 0);
    ++round_;
    done_ = std::all_of(exact_.begin(), exact_.end(), [](bool e) { return e; });
  }

  // After the sample pass: the bracket of the threshold's key from the sample's order
  // statistics at the rank +- kBracketSigmas binomial standard deviations (plus slack), at the
  // granularity of round-0 bins: counted key by key if it spans two bins at most (large inputs,
  // whose sample is large), else listed if few entries are expected inside (small inputs), else
  // the two bins nearest the estimate (a bet; a miss costs rounds 0 and 1).
  void place_window(int64_t t) {
    const uint64_t k = threshold_rank(total_[t], top_k_);
    if (k == 0) {
      settle(t, 0);
      return;
    }
    const uint64_t* h = hist(t);
    uint64_t m = 0;
    for (int64_t b = 0; b < kRound0Bins; ++b) m += h[b];
    below_[t] = 0;
    if (m == 0) {  // nothing sampled: the exact rounds
      phase_[t] = Count::kTop;
      return;
    }
    const double q = (double(k) - 0.5) / double(total_[t]);
    const double est = q * double(m), margin = kBracketSigmas * std::sqrt(double(m) * q * (1.0 - q)) + 8.0;
    // (the bin of the sample key ranked `rank` (1-based, clamped to [1, m]), sample keys below that bin)
    auto bin_of = [&](double rank) {
      const uint64_t wanted = uint64_t(std::min(double(m), std::max(1.0, std::ceil(rank))));
      uint64_t in_bin = wanted;
      const int64_t bin = int64_t(pick_bin(h, kRound0Bins, in_bin));
      return std::pair<int64_t, uint64_t>(bin, wanted - in_bin);
    };
    const auto [lo_bin, below_lo] = bin_of(est - margin);
    const auto [hi_bin, below_hi] = bin_of(est + margin);
    const double expected = double(below_hi + h[hi_bin] - below_lo) * double(total_[t]) / double(m);
    if (hi_bin - lo_bin < 2) {
      window_[t] = uint32_t(std::min<int64_t>(lo_bin, kRound0Bins - 2)) << kRound0Shift;
      span_[t] = uint32_t(kWindowBins);
      phase_[t] = Count::kWindow;
    } else if (expected <= 0.5 * double(kMaxBracketKeys)) {
      window_[t] = uint32_t(lo_bin) << kRound0Shift;
      span_[t] = uint32_t(hi_bin + 1 - lo_bin) << kRound0Shift;
      phase_[t] = Count::kList;
    } else {
      const auto [bin, below_bin] = bin_of(est);
      const bool lower = 2 * (std::max(est, 1.0) - double(below_bin)) <= double(h[bin]);  // in its lower half
      window_[t] = uint32_t(std::min<int64_t>(std::max<int64_t>(lower ? bin - 1 : bin, 0), kRound0Bins - 2))
                   << kRound0Shift;
      span_[t] = uint32_t(kWindowBins);
      phase_[t] = Count::kWindow;
    }
  }

  void finish_bracket(int64_t t) {
    const uint64_t k = threshold_rank(total_[t], top_k_);
    const bool listed = phase_[t] == Count::kList;
    std::vector<uint32_t>& list = keys_[t];
    uint64_t inside = 0;
    if (listed) {
      inside = list.size();
    } else {
      for (int64_t b = 0; b < kWindowBins; ++b) inside += hist(t)[b];
    }
    if (!overflow_[t] && below_[t] < k && k <= below_[t] + inside) {
      uint64_t rank = k - below_[t];
      if (listed) {
        const auto nth = list.begin() + int64_t(rank - 1);
        std::nth_element(list.begin(), nth, list.end());
        settle(t, *nth);
      } else {
        settle(t, window_[t] + uint32_t(pick_bin(hist(t), kWindowBins, rank)));
      }
    } else {
      ++missed_;  // round 0 counts the entries (and the total) again
      phase_[t] = Count::kTop;
    }
    std::vector<uint32_t>().swap(list);
  }

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
  bool sampled_;
  int round_ = 0;
  bool done_ = false;
  bool nonfinite_ = false;
  int64_t missed_ = 0;
  std::vector<uint64_t> hist_;
  std::vector<uint64_t> total_;
  std::vector<uint32_t> low_or_;
  std::vector<uint32_t> prefix_;
  std::vector<uint64_t> rank_;
  std::vector<uint32_t> key_;
  std::vector<bool> exact_;
  std::vector<Count> phase_;    // sampled mode: what each task is counted for next
  std::vector<uint64_t> below_;
  std::vector<uint32_t> window_;  // sampled mode: each task's bracket [window_, window_ + span_)
  std::vector<uint32_t> span_;
  std::vector<std::vector<uint32_t>> keys_;  // kList: the keys inside the bracket
  std::vector<bool> overflow_;
};

}  // namespace kx
