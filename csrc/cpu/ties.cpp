// Fused TIES on the CPU: trim, elect and disjoint mean in one pass over the n rows, tile by
// tile, with no n x P temporary.
//
// ties_merge needs each row's exact threshold before it can trim. Rather than one or two
// histogram passes first, it brackets each threshold from a 1/32 sample, runs the merge pass
// with the bracket as the undecided range (entries above it are kept, below it dropped, and
// positions with an entry inside it set aside with their values), then selects the exact
// threshold among the set-aside entries and finishes those positions: one read of the input. If a bracket
// missed (rare: only for data whose sample misrepresents it), it falls back to the exact
// radix select (MagnitudeSelect) and a second merge pass.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "tile.h"
#include "path.h"  // last (but for the path's own helpers)
#include "dare_run.h"

namespace kx::cpu::KX_CPU_PATH {
namespace {

std::vector<TrimRange> exact_ranges(const std::vector<float>& thresholds) {
  std::vector<TrimRange> ranges;
  for (float t : thresholds) ranges.push_back(exact_trim(t));
  return ranges;
}

TiesAccum accumulate_position(const TaskRows& x, const DareSpec& d, const std::vector<TrimRange>& ranges,
                              int64_t j) {
  TiesAccum a;
  for (int64_t r = 0; r < x.n(); ++r) ties_add(a, load_element(x, r, d, j), ranges[r]);
  return a;
}

// Output of one decided position; positions that need the majority sign are written 0 and listed.
inline float finish_position(const TiesAccum& a, float lam, int64_t j, int64_t& sign_sum,
                             std::vector<int64_t>& zero_sum) {
  if (ties_needs_majority(a)) {
    zero_sum.push_back(j);
    return 0.0f;
  }
  int sign = ties_sign(a);
  sign_sum += sign;
  return ties_mean(a, sign, lam);
}

void append(std::vector<int64_t>& to, const std::vector<int64_t>& from) {
  to.insert(to.end(), from.begin(), from.end());
}

void store_one(void* out, DType dtype, int64_t j, float v) { store_tile(&v, 1, dtype, out, j); }

// Positions set aside by a pass, with every row's (DARE'd) value there, row-minor:
// values[q * n + r] is row r at positions[q]. Decided later without touching the input again.
struct SetAside {
  std::vector<int64_t> positions;
  std::vector<float> values;
};

// One pass over all positions. Positions where some row's entry is undecided are set aside
// (with their values) and left unwritten; below[r] counts row r's keys under its undecided range.
void ties_pass(const TaskRows& x, const DareSpec& d, const std::vector<TrimRange>& ranges, float lam,
               void* out, TiesPending& pending, SetAside& aside, std::vector<int64_t>& below) {
  const int64_t n = x.n(), tiles = (x.P + kTile - 1) / kTile;
  bool finite = true;
  int64_t sign_sum = 0;
  below.assign(size_t(n), 0);
#pragma omp parallel if (x.P > 4 * kTile) reduction(+ : sign_sum) reduction(&& : finite)
  {
    std::vector<int64_t> my_zero, my_below(size_t(n), 0), in_tile(kTile);
    SetAside mine;
    std::vector<TileAccum> storage(1);
    TileAccum& acc = storage[0];
    std::vector<float> tile_rows(size_t(n) * kTile);  // every row's tile, for setting positions aside
    float buf[kTile];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t j0 = tile * kTile, len = std::min(kTile, x.P - j0);
      acc.clear(len);
      for (int64_t r = 0; r < n; ++r) {
        float* row = tile_rows.data() + r * kTile;
        finite = load_tile(x, r, d, j0, len, row) && finite;
        const TrimRange range = ranges[r];
        int64_t under = 0;
        for (int64_t t = 0; t < len; ++t) {
          ties_add(acc.sum[t], acc.pos_sum[t], acc.neg_sum[t], acc.pos_count[t], acc.neg_count[t],
                   acc.undecided[t], row[t], range);
          under += magnitude_key(row[t]) < range.undecided_from;
        }
        my_below[r] += under;
      }
      // Every position as if decided, vectorised (undecided ones are not counted in the sign
      // sum: they are counted once decided); then the rare undecided or zero-sum ones.
      int32_t any_undecided = 0, any_zero_sum = 0;
      for (int64_t t = 0; t < len; ++t) {
        const TiesAccum a = acc.at(t);
        const int sign = ties_sign(a);
        buf[t] = ties_mean(a, sign, lam);
        sign_sum += a.undecided ? 0 : sign;
        any_undecided |= a.undecided;
        any_zero_sum |= int32_t(ties_needs_majority(a)) & (a.undecided ^ 1);
      }
      store_tile(buf, len, x.dtype, out, j0);
      if (any_zero_sum) {
        for (int64_t t = 0; t < len; ++t)  // written 0 (sign 0) for now
          if (!acc.undecided[t] && ties_needs_majority(acc.at(t))) my_zero.push_back(j0 + t);
      }
      if (any_undecided) {
        // Branch-free compaction of the undecided positions, then their values from the tile.
        int64_t count = 0;
        for (int64_t t = 0; t < len; ++t) {
          in_tile[count] = t;
          count += acc.undecided[t] != 0;
        }
        const size_t base = mine.values.size();
        mine.values.resize(base + size_t(count) * size_t(n));
        float* dst = mine.values.data() + base;
        for (int64_t q = 0; q < count; ++q) {
          mine.positions.push_back(j0 + in_tile[q]);
          for (int64_t r = 0; r < n; ++r) dst[q * n + r] = tile_rows[size_t(r) * kTile + size_t(in_tile[q])];
        }
      }
    }
#pragma omp critical
    {
      append(pending.zero_sum_positions, my_zero);
      append(aside.positions, mine.positions);
      aside.values.insert(aside.values.end(), mine.values.begin(), mine.values.end());
      for (int64_t r = 0; r < n; ++r) below[r] += my_below[r];
    }
  }
  if (!finite) throw std::domain_error("input contains NaN or Inf");
  pending.sign_sum += sign_sum;
}

constexpr int64_t kSampleBlock = 64;      // the sample: 64 elements ...
constexpr int64_t kSampleStride = 1024;   // ... in every 1024 (1/16 of the row)
constexpr int64_t kSampleAll = 32768;     // rows this short are histogrammed whole

// Per row, a key range that holds the threshold with high probability: the sample's order
// statistics at its expected rank +- 4.5 binomial standard deviations (plus slack; a miss
// costs the exact fallback). A histogram of the sample finds their bins, a selection among
// the sample keys in those bins the exact keys. Rows histogrammed whole get the exact key.
std::vector<TrimRange> sample_brackets(const TaskRows& x, const DareSpec& d, double top_k) {
  const int64_t n = x.n();
  const bool whole = x.P <= kSampleAll;
  const int64_t block = whole ? kTile : kSampleBlock, stride = whole ? kTile : kSampleStride;
  const uint64_t k = threshold_rank(uint64_t(x.P), top_k);
  std::vector<TrimRange> ranges(static_cast<size_t>(n));
#pragma omp parallel
  {
    std::vector<uint32_t> hist(static_cast<size_t>(kRound0Bins)), keys, near;
    float buf[kTile];
#pragma omp for schedule(dynamic)
    for (int64_t r = 0; r < n; ++r) {
      std::fill(hist.begin(), hist.end(), 0);
      keys.clear();
      for (int64_t start = 0, i = 0; start < x.P; start += stride, ++i) {
        // A different offset in each stride, so the sample does not alias with row lengths.
        const int64_t j0 = whole ? start : start + (i * 5 * kSampleBlock) % kSampleStride;
        const int64_t len = std::max<int64_t>(0, std::min(block, x.P - j0));
        load_tile(x, r, d, j0, len, buf);  // non-finite values are reported by the full pass
        for (int64_t t = 0; t < len; ++t) {
          const uint32_t key = std::min(magnitude_key(buf[t]), kNonFiniteKey);
          ++hist[key >> kRound0Shift];
          keys.push_back(key);
        }
      }
      const double m = double(keys.size()), q = (double(k) - 0.5) / double(x.P);
      const double margin = whole ? 0.0 : 4.5 * std::sqrt(m * q * (1.0 - q)) + 8.0;
      // 1-based ranks in the sample; outside [1, m] the bracket is open on that side.
      const double lo_rank = whole ? double(k) : std::ceil(q * m - margin);
      const double hi_rank = whole ? double(k) : std::ceil(q * m + margin);
      // The bins of both ranks, and the rank of the first sample key in the lower one.
      int64_t lo_bin = -1, hi_bin = kRound0Bins - 1;
      uint64_t seen = 0, before_lo = 0;
      for (int64_t b = 0; b < kRound0Bins; ++b) {
        if (lo_bin < 0 && double(seen + hist[b]) >= lo_rank) {
          lo_bin = b;
          before_lo = seen;
        }
        seen += hist[b];
        if (double(seen) >= hi_rank) {
          hi_bin = b;
          break;
        }
      }
      near.clear();  // the sample keys in bins lo_bin .. hi_bin, where both order statistics lie
      const uint32_t near_lo = uint32_t(std::max<int64_t>(lo_bin, 0)) << kRound0Shift;
      const uint32_t near_hi = uint32_t(hi_bin + 1) << kRound0Shift;
      for (uint32_t key : keys)
        if (key >= near_lo && key < near_hi) near.push_back(key);
      auto key_at = [&](double rank) {  // the rank-th smallest sample key (1-based)
        auto it = near.begin() + (int64_t(rank) - 1 - int64_t(before_lo));
        std::nth_element(near.begin(), it, near.end());
        return *it;
      };
      const uint32_t lo = lo_rank < 1.0 ? 0u : key_at(lo_rank);
      const uint32_t hi = hi_rank > m ? kNonFiniteKey : std::min(key_at(hi_rank) + 1u, kNonFiniteKey);
      ranges[r] = whole ? TrimRange{lo, lo} : TrimRange{lo, hi};
    }
  }
  return ranges;
}

// The exact thresholds by radix select over the whole input (MagnitudeSelect's rounds).
std::vector<float> exact_thresholds(const TaskRows& x, const DareSpec& d, double top_k) {
  MagnitudeSelect sel(x.n(), top_k);
  std::vector<int64_t> task_of_row(size_t(x.n()));
  for (int64_t r = 0; r < x.n(); ++r) task_of_row[r] = r;
  while (!sel.done()) {
    magnitude_histogram(x, d, task_of_row, sel);
    sel.finish_round();
  }
  std::vector<float> thresholds(size_t(x.n()));
  for (int64_t r = 0; r < x.n(); ++r) thresholds[r] = sel.threshold(r);
  return thresholds;
}

void resolve_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                      const TiesPending& pending, void* out) {
  const int majority = (pending.sign_sum > 0) - (pending.sign_sum < 0);
  ties_fix_majority(x, d, thresholds, lam, majority, pending.zero_sum_positions, out);
}

}  // namespace

void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending) {
  SetAside aside;  // stays empty: exact thresholds decide every entry
  std::vector<int64_t> below;
  const size_t listed_before = pending.zero_sum_positions.size();
  ties_pass(x, d, exact_ranges(thresholds), lam, out, pending, aside, below);
  // Threads list their positions in no fixed order: sorted, the list is the same for any
  // thread count (and the same as on the GPU).
  std::sort(pending.zero_sum_positions.begin() + int64_t(listed_before), pending.zero_sum_positions.end());
}

void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds,
                       float lam, int majority, const std::vector<int64_t>& positions, void* out) {
  const std::vector<TrimRange> ranges = exact_ranges(thresholds);
  const int64_t count = int64_t(positions.size());
#pragma omp parallel for if (count > 4096)
  for (int64_t q = 0; q < count; ++q) {
    const int64_t j = positions[q];
    store_one(out, x.dtype, j, ties_mean(accumulate_position(x, d, ranges, j), majority, lam));
  }
}

std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out) {
  const int64_t n = x.n();
  const uint64_t k = threshold_rank(uint64_t(x.P), top_k);
  std::vector<float> thresholds(size_t(n), 0.0f);
  TiesPending pending;
  if (k == 0) {  // keep everything
    ties_apply(x, d, thresholds, lam, out, pending);
    resolve_majority(x, d, thresholds, lam, pending, out);
    return thresholds;
  }

  std::vector<TrimRange> ranges = sample_brackets(x, d, top_k);
  SetAside aside;
  std::vector<int64_t> below;
  ties_pass(x, d, ranges, lam, out, pending, aside, below);
  const size_t count = aside.positions.size(), nn = size_t(n);

  // A row's entries inside its bracket all lie at set-aside positions: its threshold is the
  // (k - below)-th smallest of them, if the bracket holds rank k at all. One sweep over the
  // set-aside values sorts the in-bracket keys by row.
  std::vector<std::vector<uint32_t>> keys(nn);
#pragma omp parallel
  {
    std::vector<std::vector<uint32_t>> mine(nn);
#pragma omp for schedule(static)
    for (int64_t q = 0; q < int64_t(count); ++q) {
      const float* v = aside.values.data() + size_t(q) * nn;
      for (size_t r = 0; r < nn; ++r) {
        const uint32_t key = magnitude_key(v[r]);
        if (key >= ranges[r].undecided_from && key < ranges[r].keep_from) mine[r].push_back(key);
      }
    }
#pragma omp critical
    for (size_t r = 0; r < nn; ++r) keys[r].insert(keys[r].end(), mine[r].begin(), mine[r].end());
  }
  bool all_found = true;
#pragma omp parallel for schedule(dynamic) reduction(&& : all_found)
  for (int64_t r = 0; r < n; ++r) {
    const uint64_t under = uint64_t(below[r]);
    std::vector<uint32_t>& row_keys = keys[size_t(r)];
    if (ranges[r].undecided_from == ranges[r].keep_from) {  // histogrammed whole: exact already
      thresholds[r] = bits_float(ranges[r].keep_from);
    } else if (under < k && k <= under + row_keys.size()) {
      const auto nth = row_keys.begin() + int64_t(k - under - 1);
      std::nth_element(row_keys.begin(), nth, row_keys.end());
      thresholds[r] = bits_float(*nth);
    } else {
      all_found = false;
    }
  }

  if (!all_found) {  // a bracket missed: exact select, then merge again from scratch
    thresholds = exact_thresholds(x, d, top_k);
    pending = TiesPending();
    ties_apply(x, d, thresholds, lam, out, pending);
    resolve_majority(x, d, thresholds, lam, pending, out);
    return thresholds;
  }

  const std::vector<TrimRange> exact = exact_ranges(thresholds);
  int64_t sign_sum = 0;
#pragma omp parallel if (count > 4096) reduction(+ : sign_sum)
  {
    std::vector<int64_t> my_zero;
#pragma omp for
    for (int64_t q = 0; q < int64_t(count); ++q) {
      TiesAccum a;
      for (size_t r = 0; r < nn; ++r) ties_add(a, aside.values[size_t(q) * nn + r], exact[r]);
      const int64_t j = aside.positions[q];
      store_one(out, x.dtype, j, finish_position(a, lam, j, sign_sum, my_zero));
    }
#pragma omp critical
    append(pending.zero_sum_positions, my_zero);
  }
  pending.sign_sum += sign_sum;
  resolve_majority(x, d, thresholds, lam, pending, out);
  return thresholds;
}

}  // namespace kx::cpu::KX_CPU_PATH
