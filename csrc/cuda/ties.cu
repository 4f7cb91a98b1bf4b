// Fused TIES on the GPU: trim, elect and disjoint mean in one pass over the n rows, one thread
// per group of 4 positions, with no n x P temporary. Same results as csrc/cpu/ties.cpp (the
// rows are added in the same order with the same shared math).
//
// ties_merge reads the input once where it can, as the CPU does: a 1/16 sample brackets each
// row's threshold, the pass runs with the bracket as the undecided range (above it kept, below
// it dropped; positions with an entry inside it set aside, unwritten, out of the sign sum, and
// each row's entries below its bracket counted), the in-bracket keys at the set-aside positions
// give the exact thresholds (rank k - below among them), and a finish kernel merges the
// set-aside positions with them. A decided position adds the same values in the same order as
// with the exact threshold (its entries are above or below the bracket, which holds the
// threshold), so every output bit is the exact path's. Where a bracket missed, or a list
// outgrew its room, the exact path (rounds of histograms, then the pass) runs instead.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "ties_pass.cuh"

namespace kx::cuda {
namespace {

template <class T>
__device__ __forceinline__ TiesAccum accumulate_position(const RowsView& v, const uint32_t* threshold_keys,
                                                         int64_t n, int64_t j) {
  TiesAccum a;
  for (int64_t r = 0; r < n; ++r) ties_add(a, load_row_value<T>(v, r, j), exact_range(threshold_keys, r));
  return a;
}

// Writes every position, a group of 4 per thread (cuda_utils.cuh Groups); those whose trimmed
// sum is exactly 0 are written 0 and listed (ties_pass.cuh). The loop condition is the warp's
// first group, so whole warps iterate together (ties_finish's list append is warp-wide).
template <class T>
__global__ void __launch_bounds__(kThreads)
    ties_apply_kernel(RowsView v, const uint32_t* threshold_keys, int64_t n, Groups g, float lam, T* out,
                      ZeroList list) {
  const int lane = int(threadIdx.x & 31);
  int64_t sign_sum = 0;
  uint32_t nonfinite = 0;
  for (int64_t k = global_thread(); k - lane < g.count; k += grid_threads()) {
    TiesAccum a[4];  // empty (nothing listed, sign 0) for groups past the end
    if (k < g.count) {
      for_each_row_group<T>(v, n, g, k, nonfinite, [&](int64_t r, const float (&x)[4]) {
        const TrimRange range = exact_range(threshold_keys, r);
#pragma unroll
        for (int i = 0; i < 4; ++i) ties_add(a[i], x[i], range);  // 0 outside [0, P): adds nothing
      });
    }
    const int64_t j0 = g.first(k);
#pragma unroll
    for (int i = 0; i < 4; ++i) ties_finish(a[i], k < g.count && g.inside(j0 + i), j0 + i, lam, out, list, sign_sum);
  }
  // Every lane gets here (whole warps leave the loop together).
  ties_totals(sign_sum, nonfinite, list);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    ties_fix_majority_kernel(RowsView v, const uint32_t* threshold_keys, int64_t n, const int64_t* positions,
                             int64_t count, int majority, float lam, T* out) {
  for (int64_t q = global_thread(); q < count; q += grid_threads()) {
    const int64_t j = positions[q];
    store(out + j, ties_mean(accumulate_position<T>(v, threshold_keys, n, j), majority, lam));
  }
}

// The device side of one call: the row table and the thresholds' keys, uploaded once.
struct TiesCall {
  const TaskRows& x;
  CallContext ctx;
  DeviceRows rows;
  DeviceBuffer<uint32_t> keys;
  Groups groups;

  TiesCall(const TaskRows& x_, const DareSpec& d, const std::vector<float>& thresholds)
      : x(x_), ctx(context_of(x_)), rows(upload_rows(x_, d, ctx)), keys(upload_threshold_keys(thresholds, ctx)),
        groups(groups_of(x_.P, d)) {}

  TiesPassResult apply(float lam, void* out) const {
    return run_ties_pass(x.P, ctx, [&](const ZeroList& list) {
      dispatch_dtype(x.dtype, [&](auto tag) {
        using T = decltype(tag);
        const unsigned blocks = grid_blocks(ties_apply_kernel<T>, blocks_for(groups.count));
        ties_apply_kernel<T><<<blocks, kThreads, 0, ctx.stream>>>(rows.view, keys.get(), x.n(), groups, lam,
                                                                  static_cast<T*>(out), list);
      });
    });
  }

  // Rewrites the `count` positions of the device list with the elected sign `majority`. No
  // synchronisation: the caller frees the scratch in stream order, after the kernel.
  void fix_majority(const int64_t* positions, int64_t count, int majority, float lam, void* out) const {
    if (count == 0) return;
    dispatch_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      const unsigned blocks = grid_blocks(ties_fix_majority_kernel<T>, blocks_for(count));
      ties_fix_majority_kernel<T><<<blocks, kThreads, 0, ctx.stream>>>(rows.view, keys.get(), x.n(), positions,
                                                                       count, majority, lam, static_cast<T*>(out));
    });
    KX_CUDA_CHECK_LAUNCH();
  }
};

void check_thresholds(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds) {
  check_rows(x, d);
  if (thresholds.size() != x.rows.size()) throw std::invalid_argument("one threshold per row is needed");
}

// Today's exact path: rounds of magnitude histograms (round 1 only for the rows whose low bits
// are still open), then the pass with the exact thresholds.
std::vector<float> ties_merge_exact(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out) {
  const int64_t n = x.n();
  MagnitudeSelect sel(n, top_k);
  std::vector<int64_t> task_of_row(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) task_of_row[size_t(r)] = r;
  while (!sel.done()) {
    magnitude_histogram(x, d, task_of_row, sel);
    sel.finish_round();  // throws on NaN / Inf
  }
  std::vector<float> thresholds(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) thresholds[size_t(r)] = sel.threshold(r);
  check_thresholds(x, d, thresholds);
  if (x.P == 0) return thresholds;

  // The zero-sum positions stay on the device: the fix reads the pass's list where it is
  // (each position is rewritten on its own, so their order does not matter).
  DeviceGuard guard(x.device);
  const TiesCall call(x, d, thresholds);
  const TiesPassResult pass = call.apply(lam, out);
  const int majority = (pass.sign_sum > 0) - (pass.sign_sum < 0);
  call.fix_majority(pass.positions.get(), pass.count, majority, lam, out);
  return thresholds;
}

// ---- The read-once path of ties_merge ----

constexpr int64_t kSampleRun = 64;        // the sample: runs of 64 consecutive elements, ...
constexpr int64_t kSampleSpacing = 1024;  // ... one run per 1024 elements at most (1/16 of a row)
constexpr int64_t kMaxSampleKeys = int64_t(1) << 24;  // all rows' sample keys (2 x 128 MiB of scratch)
constexpr int64_t kMinReadOnceP = 32768;  // shorter rows: the exact rounds (each is a short pass)
constexpr int64_t kMaxReadOnceRows = 2048;  // a block counts each row's entries below its bracket in shared memory
// Room for set-aside positions: 1/16 of P (8 bytes each: 1/2 byte per position).
constexpr int64_t kAsideShare = 16;
// The set-aside positions are read twice more, scattered: n values each, a 32-byte sector per
// value. The path is tried where that is expected to cost half a pass at most: a share of
// positions up to element_size / 128 (1/32 of P for float32, 1/64 for 16-bit types).
constexpr int kSectorBytes = 32;
// In-bracket keys and sample keys are sorted as (row << 31) | key (keys have 31 bits).
constexpr int kKeyBits = 31;
constexpr uint32_t kKeyMask = (1u << kKeyBits) - 1u;

// The sample layout and the ranks (1-based, in a row's sorted sample) of the bracket's ends;
// lo_rank < 1: open below (key 0), hi_rank > per_row: open above (kNonFiniteKey).
struct ReadOncePlan {
  int64_t runs;     // sample runs per row: run b starts in [b * spacing, (b + 1) * spacing)
  int64_t spacing;  // >= kSampleSpacing
  int64_t per_row;  // sample keys per row: runs * kSampleRun
  int64_t lo_rank;
  int64_t hi_rank;
  uint64_t k;       // the threshold's rank among a row's P keys (threshold_rank)
};

// Whether the read-once path is worth trying: long rows, a threshold to select (top_k < 1), few
// enough rows, brackets expected narrow enough, and rows the exact path can fall back to.
bool plan_read_once(int64_t n, int64_t P, DType dtype, double top_k, ReadOncePlan& plan) {
  const uint64_t k = threshold_rank(uint64_t(std::max<int64_t>(P, 0)), top_k);
  if (k == 0 || n < 1 || n > kMaxReadOnceRows || P < kMinReadOnceP || P >= (int64_t(1) << 32)) return false;
  plan.k = k;
  plan.runs = std::min(P / kSampleSpacing, std::max<int64_t>(1, kMaxSampleKeys / (kSampleRun * n)));
  plan.spacing = P / plan.runs;
  plan.per_row = plan.runs * kSampleRun;
  // The CPU's bracket: the threshold's expected rank in the sample +- kBracketSigmas binomial
  // standard deviations, plus slack.
  const double m = double(plan.per_row), q = (double(k) - 0.5) / double(P);
  const double margin = kBracketSigmas * std::sqrt(m * q * (1.0 - q)) + 8.0;
  plan.lo_rank = int64_t(std::ceil(q * m - margin));
  plan.hi_rank = int64_t(std::ceil(q * m + margin));
  // A row's bracket holds about 2 * margin / m of its entries (more where many entries share a
  // key); a position is set aside if any row's entry there is in its bracket.
  const double sectors_per_value = double(kSectorBytes) / double(dtype_size(dtype));
  return double(n) * 2.0 * margin / m <= 0.5 / (2.0 * sectors_per_value);
}

// The smallest number of bits b >= 1 with n < 2^b: rows 0 .. n-1 in the bits above a key, and
// an all-ones padding key sorts after every real one.
int row_bits(int64_t n) {
  int bits = 1;
  while ((uint64_t(n) >> bits) != 0) ++bits;
  return bits;
}

__device__ __forceinline__ unsigned long long row_key(int64_t r, uint32_t key) {
  return (static_cast<unsigned long long>(r) << kKeyBits) | key;
}

// Row r's sample: per_row keys (non-finite ones capped: the pass reports them) as row_key.
// Run b starts at b * spacing plus an offset that moves with b (by 5 runs per step), so that the
// sample does not alias with a period of the data.
template <class T>
__global__ void __launch_bounds__(kThreads)
    sample_keys_kernel(RowsView v, int64_t n, ReadOncePlan plan, unsigned long long* keys) {
  const int64_t total = n * plan.per_row, slots = plan.spacing / kSampleRun;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t r = i / plan.per_row, s = i % plan.per_row, b = s / kSampleRun;
    const int64_t j = b * plan.spacing + ((5 * b) % slots) * kSampleRun + s % kSampleRun;  // < runs * spacing <= P
    keys[i] = row_key(r, min(magnitude_key(load_row_value<T>(v, r, j)), kNonFiniteKey));
  }
}

// Each row's bracket from its sorted sample (sorted row by row: row r's keys are
// sorted[r * per_row ..]).
__global__ void __launch_bounds__(kThreads)
    bracket_kernel(const unsigned long long* sorted, int64_t n, ReadOncePlan plan, TrimRange* brackets) {
  for (int64_t r = global_thread(); r < n; r += grid_threads()) {
    const unsigned long long* row = sorted + r * plan.per_row;
    const uint32_t lo = plan.lo_rank < 1 ? 0u : uint32_t(row[plan.lo_rank - 1] & kKeyMask);
    const uint32_t hi =
        plan.hi_rank > plan.per_row ? kNonFiniteKey : min(uint32_t(row[plan.hi_rank - 1] & kKeyMask) + 1u, kNonFiniteKey);
    brackets[r] = TrimRange{lo, hi};
  }
}

// The set-aside positions of the bracketed pass.
struct AsideList {
  int64_t* positions;
  unsigned long long capacity;
  unsigned long long* count;  // may exceed the capacity: then the path is abandoned
};

// The pass with each row's bracket as its undecided range: decided positions are written (or
// listed as zero-sum) as by ties_apply_kernel, positions with an undecided entry are set aside
// (not written, no sign), and below[r] counts row r's entries under its bracket (a block's
// counts in shared memory, n of them, added to below[] at the end). Every lane runs every
// iteration of its warp, past the end too (loads there give 0 at no position), so the warp can
// sum its counts.
template <class T>
__global__ void __launch_bounds__(kThreads)
    ties_bracket_kernel(RowsView v, const TrimRange* brackets, int64_t n, Groups g, float lam, T* out, ZeroList list,
                        AsideList aside, unsigned long long* below) {
  extern __shared__ unsigned long long block_below[];
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) block_below[r] = 0;
  __syncthreads();
  const int lane = int(threadIdx.x & 31);
  int64_t sign_sum = 0;
  uint32_t nonfinite = 0;
  for (int64_t k = global_thread(); k - lane < g.count; k += grid_threads()) {
    const int64_t j0 = g.first(k);
    const bool live = k < g.count;
    TiesAccum a[4];
    for_each_row_group<T>(v, n, g, k, nonfinite, [&](int64_t r, const float (&x)[4]) {
      const TrimRange range = brackets[r];
      uint32_t under = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        ties_add(a[i], x[i], range);
        under += uint32_t(live && g.inside(j0 + i) && magnitude_key(x[i]) < range.undecided_from);
      }
      under = __reduce_add_sync(kFullWarp, under);
      if (lane == 0 && under != 0) atomicAdd(&block_below[r], static_cast<unsigned long long>(under));
    });
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t j = j0 + i;
      const bool inside = live && g.inside(j);
      ties_finish(a[i], inside && a[i].undecided == 0, j, lam, out, list, sign_sum);
      warp_append(inside && a[i].undecided != 0, j, aside.positions, aside.capacity, aside.count);
    }
  }
  // Every lane gets here (whole warps leave the loop together).
  ties_totals(sign_sum, nonfinite, list);
  __syncthreads();
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x)
    if (block_below[r] != 0) atomicAdd(below + r, block_below[r]);
}

// The keys inside each row's bracket at the set-aside positions (every in-bracket entry lies at
// one), as row_key, appended to `keys` (*kept counts them, beyond the capacity too).
template <class T>
__global__ void __launch_bounds__(kThreads)
    gather_bracket_keys_kernel(RowsView v, const TrimRange* brackets, int64_t n, const int64_t* positions,
                               int64_t count, unsigned long long* keys, unsigned long long capacity,
                               unsigned long long* kept) {
  const int lane = int(threadIdx.x & 31);
  for (int64_t q = global_thread(); q - lane < count; q += grid_threads()) {  // whole warps: warp_append
    const bool live = q < count;
    const int64_t j = live ? positions[q] : 0;
    for (int64_t r = 0; r < n; ++r) {
      uint32_t key = 0;
      bool in_bracket = false;
      if (live) {
        key = magnitude_key(load_row_value<T>(v, r, j));
        const TrimRange b = brackets[r];
        in_bracket = key >= b.undecided_from && key < b.keep_from;
      }
      warp_append(in_bracket, row_key(r, key), keys, capacity, kept);
    }
  }
}

__device__ __forceinline__ int64_t lower_bound(const unsigned long long* sorted, int64_t count,
                                               unsigned long long value) {
  int64_t lo = 0, hi = count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Row r's exact threshold key: the (k - below[r])-th smallest of its in-bracket keys (sorted,
// row by row, padding last), if its bracket holds rank k; else *missed is set. A list that
// outgrew its capacity misses for every row (keys were lost).
__global__ void __launch_bounds__(kThreads)
    select_in_bracket_kernel(const unsigned long long* sorted, int64_t count, const unsigned long long* kept,
                             unsigned long long capacity, const unsigned long long* below, int64_t n, uint64_t k,
                             uint32_t* threshold_keys, uint32_t* missed) {
  for (int64_t r = global_thread(); r < n; r += grid_threads()) {
    const int64_t begin = lower_bound(sorted, count, row_key(r, 0));
    const uint64_t inside = uint64_t(lower_bound(sorted, count, row_key(r + 1, 0)) - begin);
    const uint64_t under = below[r];
    if (*kept <= capacity && under < k && k <= under + inside) {
      threshold_keys[r] = uint32_t(sorted[begin + int64_t(k - under - 1)] & kKeyMask);
    } else {
      threshold_keys[r] = 0;
      atomicOr(missed, 1u);
    }
  }
}

// The set-aside positions with the exact thresholds, as ties_fix_majority_kernel computes a
// position (rows in order): written, or written 0 and listed as zero-sum.
template <class T>
__global__ void __launch_bounds__(kThreads)
    ties_finish_aside_kernel(RowsView v, const uint32_t* threshold_keys, int64_t n, const int64_t* positions,
                             int64_t count, float lam, T* out, ZeroList list) {
  const int lane = int(threadIdx.x & 31);
  int64_t sign_sum = 0;
  for (int64_t q = global_thread(); q - lane < count; q += grid_threads()) {  // whole warps: ties_finish
    const bool live = q < count;
    const int64_t j = live ? positions[q] : 0;
    TiesAccum a;
    if (live) a = accumulate_position<T>(v, threshold_keys, n, j);
    ties_finish(a, live, j, lam, out, list, sign_sum);
  }
  ties_totals(sign_sum, 0u, list);
}

// Which path ties_merge takes: by default the read-once path where it applies and hits, else the
// exact one. The environment variable KNOTS_EXT_CUDA_TIES_PATH (for tests and diagnosis) forces
// one: "exact", or "read-once" (an error where it does not apply or missed, instead of the
// exact path).
enum class TiesPath { kAuto, kExact, kReadOnce };

TiesPath chosen_ties_path() {
  const char* value = std::getenv("KNOTS_EXT_CUDA_TIES_PATH");
  if (value == nullptr || *value == '\0') return TiesPath::kAuto;
  const std::string name(value);
  if (name == "exact") return TiesPath::kExact;
  if (name == "read-once") return TiesPath::kReadOnce;
  throw std::invalid_argument("KNOTS_EXT_CUDA_TIES_PATH must be 'exact' or 'read-once', not '" + name + "'");
}

// The read-once path; false (out partly written) where a bracket missed or a list outgrew its
// room: the caller runs the exact path, which writes every position.
bool ties_merge_read_once(const TaskRows& x, const DareSpec& d, const ReadOncePlan& plan, float lam, void* out,
                          std::vector<float>& thresholds) {
  const int64_t n = x.n();
  const CallContext ctx = context_of(x);
  const DeviceRows rows = upload_rows(x, d, ctx);
  const Groups groups = groups_of(x.P, d);
  const int end_bit = kKeyBits + row_bits(n);

  // 1. Each row's bracket from its sorted sample.
  DeviceBuffer<TrimRange> brackets(size_t(n), ctx);
  {
    const int64_t items = n * plan.per_row;
    DeviceBuffer<unsigned long long> sample(size_t(items), ctx), sorted(size_t(items), ctx);
    dispatch_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      const unsigned blocks = grid_blocks(sample_keys_kernel<T>, blocks_for(items));
      sample_keys_kernel<T><<<blocks, kThreads, 0, ctx.stream>>>(rows.view, n, plan, sample.get());
    });
    KX_CUDA_CHECK_LAUNCH();
    radix_sort_keys(sample.get(), sorted.get(), items, end_bit, ctx);
    bracket_kernel<<<unsigned(blocks_for(n)), kThreads, 0, ctx.stream>>>(sorted.get(), n, plan, brackets.get());
    KX_CUDA_CHECK_LAUNCH();
  }

  // 2. The bracketed pass (rerun by run_ties_pass if its zero-sum list overflowed: counts zeroed again).
  const int64_t aside_capacity = std::max<int64_t>(1, x.P / kAsideShare);
  DeviceBuffer<int64_t> aside(size_t(aside_capacity), ctx);
  DeviceBuffer<unsigned long long> counts(size_t(n) + 1, ctx);  // below[0 .. n), then the aside count
  unsigned long long* below = counts.get();
  const AsideList aside_list{aside.get(), static_cast<unsigned long long>(aside_capacity), counts.get() + n};
  const TiesPassResult pass = run_ties_pass(x.P, ctx, [&](const ZeroList& list) {
    counts.zero();
    dispatch_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      const auto kernel = ties_bracket_kernel<T>;
      const size_t smem = size_t(n) * sizeof(unsigned long long);  // <= 16 KiB (kMaxReadOnceRows)
      const unsigned blocks = grid_blocks(kernel, blocks_for(groups.count), 1, smem);
      kernel<<<blocks, kThreads, smem, ctx.stream>>>(rows.view, brackets.get(), n, groups, lam, static_cast<T*>(out),
                                                     list, aside_list, below);
    });
  });
  const int64_t count = int64_t(download(aside_list.count, 1, ctx.stream)[0]);
  // No position set aside: no row's bracket holds an entry, so none holds rank k.
  if (count == 0 || count > aside_capacity) return false;

  // 3. The exact thresholds from the in-bracket keys, sorted row by row (room for all of them
  // where each set-aside position has at most two; unused slots are all-ones padding, sorted last).
  const int64_t key_capacity = std::min(count * n, 2 * count + 1024);
  DeviceBuffer<unsigned long long> keys(size_t(key_capacity), ctx), sorted_keys(size_t(key_capacity), ctx),
      kept(1, ctx);
  KX_CUDA_CHECK(cudaMemsetAsync(keys.get(), 0xff, keys.bytes(), ctx.stream));
  kept.zero();
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = grid_blocks(gather_bracket_keys_kernel<T>, blocks_for(count));
    gather_bracket_keys_kernel<T><<<blocks, kThreads, 0, ctx.stream>>>(
        rows.view, brackets.get(), n, aside.get(), count, keys.get(), static_cast<unsigned long long>(key_capacity),
        kept.get());
  });
  KX_CUDA_CHECK_LAUNCH();
  radix_sort_keys(keys.get(), sorted_keys.get(), key_capacity, end_bit, ctx);
  DeviceBuffer<uint32_t> selected(size_t(n) + 1, ctx);  // n threshold keys, then the miss flag
  selected.zero();
  select_in_bracket_kernel<<<unsigned(blocks_for(n)), kThreads, 0, ctx.stream>>>(
      sorted_keys.get(), key_capacity, kept.get(), static_cast<unsigned long long>(key_capacity), below, n, plan.k,
      selected.get(), selected.get() + n);
  KX_CUDA_CHECK_LAUNCH();
  const std::vector<uint32_t> host = download(selected.get(), size_t(n) + 1, ctx.stream);
  if (host[size_t(n)] != 0) return false;
  thresholds.resize(size_t(n));
  for (int64_t r = 0; r < n; ++r) thresholds[size_t(r)] = bits_float(host[size_t(r)]);

  // 4. The set-aside positions, then the majority sign over both lists of zero-sum positions.
  const TiesCall call(x, d, thresholds);
  const TiesPassResult finish = run_ties_pass(count, ctx, [&](const ZeroList& list) {
    dispatch_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      const unsigned blocks = grid_blocks(ties_finish_aside_kernel<T>, blocks_for(count));
      ties_finish_aside_kernel<T><<<blocks, kThreads, 0, ctx.stream>>>(call.rows.view, call.keys.get(), n, aside.get(),
                                                                       count, lam, static_cast<T*>(out), list);
    });
  });
  const int64_t sign_sum = pass.sign_sum + finish.sign_sum;
  const int majority = (sign_sum > 0) - (sign_sum < 0);
  call.fix_majority(pass.positions.get(), pass.count, majority, lam, out);
  call.fix_majority(finish.positions.get(), finish.count, majority, lam, out);
  return true;
}


}  // namespace

void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending) {
  check_thresholds(x, d, thresholds);
  if (x.P == 0) return;
  DeviceGuard guard(x.device);
  const TiesCall call(x, d, thresholds);
  add_to_pending(call.apply(lam, out), x.P, call.ctx, pending);
}

void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                       int majority, const std::vector<int64_t>& positions, void* out) {
  check_thresholds(x, d, thresholds);
  for (int64_t j : positions)
    if (j < 0 || j >= x.P) throw std::invalid_argument("position out of range");
  if (positions.empty()) return;
  DeviceGuard guard(x.device);
  const TiesCall call(x, d, thresholds);
  const DeviceBuffer<int64_t> device_positions = upload(positions, call.ctx);
  call.fix_majority(device_positions.get(), int64_t(positions.size()), majority, lam, out);
}

std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out) {
  check_top_k(top_k);
  const TiesPath path = chosen_ties_path();
  ReadOncePlan plan;
  const bool planned = path != TiesPath::kExact && plan_read_once(x.n(), x.P, x.dtype, top_k, plan);
  if (planned) {
    check_rows(x, d);
    DeviceGuard guard(x.device);
    std::vector<float> thresholds;
    if (ties_merge_read_once(x, d, plan, lam, out, thresholds)) return thresholds;
  }
  if (path == TiesPath::kReadOnce)
    throw std::runtime_error(planned ? "ties_merge: the read-once path missed (KNOTS_EXT_CUDA_TIES_PATH=read-once)"
                                     : "ties_merge: the read-once path does not apply to these rows "
                                       "(KNOTS_EXT_CUDA_TIES_PATH=read-once)");
  return ties_merge_exact(x, d, top_k, lam, out);
}

}  // namespace kx::cuda
