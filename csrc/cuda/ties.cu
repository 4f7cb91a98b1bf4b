// Fused TIES on the GPU: trim, elect and disjoint mean in one pass over the n rows, one
// thread per position, with no n x P temporary. Same results as csrc/cpu/ties.cpp (the rows
// are added in the same order with the same shared math).
#include <algorithm>

#include "cuda_utils.cuh"

namespace kx::cuda {
namespace {

// Totals a TIES pass leaves on the device.
struct TiesCounters {
  unsigned long long zero_count;  // positions needing the majority sign (may exceed the list)
  unsigned long long sign_sum;    // sum of elected signs, two's complement
  uint32_t nonfinite;
  uint32_t unused;
};

// Row r's exact threshold as a TrimRange: keep iff key >= key(t), nothing undecided.
__device__ __forceinline__ TrimRange exact_range(const uint32_t* threshold_keys, int64_t r) {
  const uint32_t key = threshold_keys[r];
  return TrimRange{key, key};
}

template <class T>
__device__ __forceinline__ TiesAccum accumulate_position(const RowsView& v, const uint32_t* threshold_keys,
                                                         int64_t n, int64_t j, uint32_t& nonfinite) {
  TiesAccum a;
  for (int64_t r = 0; r < n; ++r) ties_add(a, load_row_value<T>(v, r, j, nonfinite), exact_range(threshold_keys, r));
  return a;
}

__device__ __forceinline__ int64_t warp_sum(int64_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(kFullWarp, x, offset);
  return x;
}

// Writes every position; those whose trimmed sum is exactly 0 are written 0 and listed
// (list slots past `capacity` are counted but not stored: the host reruns with room).
// The loop condition is the warp's first position, so whole warps iterate together and the
// list append can be one atomic per warp (degenerate inputs list nearly every position).
template <class T>
__global__ void __launch_bounds__(kThreads)
    ties_apply_kernel(RowsView v, const uint32_t* threshold_keys, int64_t n, int64_t P, float lam, T* out,
                      int64_t* zero_positions, unsigned long long capacity, TiesCounters* counters) {
  const int lane = int(threadIdx.x & 31);
  int64_t sign_sum = 0;
  uint32_t nonfinite = 0;
  for (int64_t j = global_thread(); j - lane < P; j += grid_threads()) {
    const bool inside = j < P;
    TiesAccum a;  // empty (nothing listed, sign 0) for lanes past the end
    if (inside) a = accumulate_position<T>(v, threshold_keys, n, j, nonfinite);
    const bool listed = inside && ties_needs_majority(a);
    const unsigned listed_lanes = __ballot_sync(kFullWarp, listed);
    if (listed_lanes != 0) {  // warp-uniform
      const int leader = __ffs(listed_lanes) - 1;
      unsigned long long base = 0;
      if (lane == leader) base = atomicAdd(&counters->zero_count, static_cast<unsigned long long>(__popc(listed_lanes)));
      base = __shfl_sync(kFullWarp, base, leader);
      const unsigned long long slot = base + unsigned(__popc(listed_lanes & ((1u << lane) - 1u)));
      if (listed && slot < capacity) zero_positions[slot] = j;
    }
    if (inside) {
      float merged = 0.0f;  // listed positions: fixed once the majority sign is known
      if (!listed) {
        const int sign = ties_sign(a);
        sign_sum += sign;
        merged = ties_mean(a, sign, lam);
      }
      store(out + j, merged);
    }
  }
  // Every lane gets here (whole warps leave the loop together): one atomic per warp.
  sign_sum = warp_sum(sign_sum);
  if (lane == 0 && sign_sum != 0) atomicAdd(&counters->sign_sum, static_cast<unsigned long long>(sign_sum));
  warp_flag_nonfinite(nonfinite, &counters->nonfinite);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    ties_fix_majority_kernel(RowsView v, const uint32_t* threshold_keys, int64_t n, const int64_t* positions,
                             int64_t count, int majority, float lam, T* out) {
  uint32_t nonfinite = 0;  // checked by ties_apply already
  for (int64_t q = global_thread(); q < count; q += grid_threads()) {
    const int64_t j = positions[q];
    store(out + j, ties_mean(accumulate_position<T>(v, threshold_keys, n, j, nonfinite), majority, lam));
  }
}

DeviceBuffer<uint32_t> upload_threshold_keys(const std::vector<float>& thresholds, cudaStream_t stream) {
  std::vector<uint32_t> keys(thresholds.size());
  for (size_t r = 0; r < thresholds.size(); ++r) keys[r] = magnitude_key(thresholds[r]);
  return upload(keys, stream);
}

// Room for this many listed positions at first (8 MiB); a pass that needs more runs again.
constexpr int64_t kInitialZeroCapacity = int64_t(1) << 20;

}  // namespace

void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending) {
  check_rows(x, d);
  if (thresholds.size() != x.rows.size()) throw std::invalid_argument("one threshold per row is needed");
  if (x.P == 0) return;
  DeviceGuard guard(x.device);
  const cudaStream_t stream = stream_of(x);
  const DeviceRows rows = upload_rows(x, d, stream);
  const DeviceBuffer<uint32_t> keys = upload_threshold_keys(thresholds, stream);
  const unsigned blocks = grid_blocks(x.P);

  int64_t capacity = std::min(x.P, kInitialZeroCapacity);
  for (;;) {
    DeviceBuffer<int64_t> zero_positions(size_t(capacity), stream);
    DeviceBuffer<TiesCounters> counters(1, stream);
    counters.zero();
    dispatch_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      ties_apply_kernel<T><<<blocks, kThreads, 0, stream>>>(rows.view, keys.get(), x.n(), x.P, lam,
                                                            static_cast<T*>(out), zero_positions.get(),
                                                            static_cast<unsigned long long>(capacity),
                                                            counters.get());
    });
    KX_CUDA_CHECK_LAUNCH();
    const TiesCounters c = download(counters.get(), 1, stream)[0];
    if (c.nonfinite != 0) throw std::domain_error("input contains NaN or Inf");
    const int64_t count = int64_t(c.zero_count);  // <= P: each position is listed at most once
    if (count > capacity) {
      // The pass is a pure function of its inputs: rerunning it with room for every listed
      // position rewrites the same output.
      capacity = count;
      continue;
    }
    std::vector<int64_t> positions = download(zero_positions.get(), size_t(count), stream);
    std::sort(positions.begin(), positions.end());  // atomics list them in no fixed order
    pending.zero_sum_positions.insert(pending.zero_sum_positions.end(), positions.begin(), positions.end());
    pending.sign_sum += static_cast<int64_t>(c.sign_sum);
    return;
  }
}

void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                       int majority, const std::vector<int64_t>& positions, void* out) {
  check_rows(x, d);
  if (thresholds.size() != x.rows.size()) throw std::invalid_argument("one threshold per row is needed");
  for (int64_t j : positions)
    if (j < 0 || j >= x.P) throw std::invalid_argument("position out of range");
  if (positions.empty()) return;
  DeviceGuard guard(x.device);
  const cudaStream_t stream = stream_of(x);
  const DeviceRows rows = upload_rows(x, d, stream);
  const DeviceBuffer<uint32_t> keys = upload_threshold_keys(thresholds, stream);
  const DeviceBuffer<int64_t> device_positions = upload(positions, stream);
  const int64_t count = int64_t(positions.size());
  const unsigned blocks = grid_blocks(count);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    ties_fix_majority_kernel<T><<<blocks, kThreads, 0, stream>>>(rows.view, keys.get(), x.n(),
                                                                 device_positions.get(), count, majority, lam,
                                                                 static_cast<T*>(out));
  });
  KX_CUDA_CHECK_LAUNCH();
  // No synchronisation: the buffers are freed in stream order, after the kernel.
}

std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out) {
  const int64_t n = x.n();
  MagnitudeSelect sel(n, top_k);
  std::vector<int64_t> task_of_row(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) task_of_row[size_t(r)] = r;
  // Round 0, then round 1 only for the tasks whose low bits are still open.
  while (!sel.done()) {
    magnitude_histogram(x, d, task_of_row, sel);
    sel.finish_round();  // throws on NaN / Inf
  }
  std::vector<float> thresholds(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) thresholds[size_t(r)] = sel.threshold(r);

  TiesPending pending;
  ties_apply(x, d, thresholds, lam, out, pending);
  const int majority = (pending.sign_sum > 0) - (pending.sign_sum < 0);
  ties_fix_majority(x, d, thresholds, lam, majority, pending.zero_sum_positions, out);
  return thresholds;
}

}  // namespace kx::cuda
