// The plumbing of a TIES pass on the GPU, shared by the row kernel (ties.cu) and the factored
// one (factored.cu): finishing a position (the merged value, or 0 and a place in the list of
// zero-sum positions), the pass's totals, the host loop that reruns a pass whose list
// overflowed, and the sorted copy of the list for the caller; a warp's append to a device list
// and the CUB radix sort that ties.cu's read-once path also uses.
#pragma once
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include <vector>

#include "cuda_utils.cuh"

namespace kx::cuda {

// Totals a TIES pass leaves on the device.
struct TiesCounters {
  unsigned long long zero_count;  // positions needing the majority sign (may exceed the list)
  unsigned long long sign_sum;    // sum of elected signs, two's complement
  uint32_t nonfinite;
  uint32_t unused;
};

// Where a pass lists its zero-sum positions: slots past `capacity` are counted, not stored.
struct ZeroList {
  int64_t* positions;
  unsigned long long capacity;
  TiesCounters* counters;
};

__device__ __forceinline__ int64_t warp_sum(int64_t x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(kFullWarp, x, offset);
  return x;
}

// Appends `value` from the lanes with `listed` to a list of `capacity` slots whose length is
// *count, one atomic per warp; values past the capacity are counted, not stored. Every lane of
// the warp calls it together.
template <class V>
__device__ __forceinline__ void warp_append(bool listed, V value, V* slots, unsigned long long capacity,
                                            unsigned long long* count) {
  const int lane = int(threadIdx.x & 31);
  const unsigned listed_lanes = __ballot_sync(kFullWarp, listed);
  if (listed_lanes == 0) return;  // warp-uniform
  const int leader = __ffs(listed_lanes) - 1;
  unsigned long long base = 0;
  if (lane == leader) base = atomicAdd(count, static_cast<unsigned long long>(__popc(listed_lanes)));
  base = __shfl_sync(kFullWarp, base, leader);
  const unsigned long long slot = base + unsigned(__popc(listed_lanes & ((1u << lane) - 1u)));
  if (listed && slot < capacity) slots[slot] = value;
}

// Position j's end of the pass, from its accumulators: positions whose trimmed sum is exactly 0
// are written 0 and listed (one atomic per warp: degenerate inputs list nearly every position),
// the others get their disjoint mean and add their sign to sign_sum. Every lane of the warp
// calls it together; lanes without a position pass inside = false.
template <class T>
__device__ __forceinline__ void ties_finish(const TiesAccum& a, bool inside, int64_t j, float lam, T* out,
                                            const ZeroList& list, int64_t& sign_sum) {
  const bool listed = inside && ties_needs_majority(a);
  warp_append(listed, j, list.positions, list.capacity, &list.counters->zero_count);
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

// A thread's totals at the end of the pass; every lane of the warp calls it: one atomic per warp.
__device__ __forceinline__ void ties_totals(int64_t sign_sum, uint32_t nonfinite, const ZeroList& list) {
  sign_sum = warp_sum(sign_sum);
  if ((threadIdx.x & 31) == 0 && sign_sum != 0)
    atomicAdd(&list.counters->sign_sum, static_cast<unsigned long long>(sign_sum));
  warp_flag_nonfinite(nonfinite, &list.counters->nonfinite);
}

// Room for this many listed positions at first (8 MiB); a pass that needs more runs again.
constexpr int64_t kInitialZeroCapacity = int64_t(1) << 20;

// What a TIES pass leaves: its sign sum, and its zero-sum positions in a device list, in no
// fixed order (atomics list them).
struct TiesPassResult {
  DeviceBuffer<int64_t> positions;
  int64_t count = 0;
  int64_t sign_sum = 0;
};

// Runs a TIES pass over P positions (launch(ZeroList) launches it on the call's stream) and
// waits for its totals. Throws on NaN or Inf.
template <class Launch>
TiesPassResult run_ties_pass(int64_t P, const CallContext& ctx, Launch&& launch) {
  int64_t capacity = std::min(P, kInitialZeroCapacity);
  for (;;) {
    DeviceBuffer<int64_t> zero_positions(size_t(capacity), ctx);
    DeviceBuffer<TiesCounters> counters(1, ctx);
    counters.zero();
    launch(ZeroList{zero_positions.get(), static_cast<unsigned long long>(capacity), counters.get()});
    KX_CUDA_CHECK_LAUNCH();
    const TiesCounters c = download(counters.get(), 1, ctx.stream)[0];
    if (c.nonfinite != 0) throw std::domain_error("input contains NaN or Inf");
    const int64_t count = int64_t(c.zero_count);  // <= P: each position is listed at most once
    if (count > capacity) {
      // The pass is a pure function of its inputs: rerunning it with room for every listed
      // position rewrites the same output.
      capacity = count;
      continue;
    }
    TiesPassResult result;
    result.positions = zero_positions;
    result.count = count;
    result.sign_sum = static_cast<int64_t>(c.sign_sum);
    return result;
  }
}

// Adds a pass's sign sum and its zero-sum positions, sorted on the device (CUB radix sort over
// the bits that positions below P have), to pending: the same list as the CPU's.
// Sorts `count` keys into `sorted` on the call's stream (CUB radix sort), by their bits
// [0, end_bit) only: the caller's keys have no other bits set, or (padding) all of them.
inline void radix_sort_keys(const unsigned long long* keys, unsigned long long* sorted, int64_t count, int end_bit,
                            const CallContext& ctx) {
  if (count == 0) return;
  size_t temp_bytes = 0;
  KX_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, keys, sorted, count, 0, end_bit, ctx.stream));
  DeviceBuffer<unsigned char> temp(std::max<size_t>(temp_bytes, 1), ctx);
  KX_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp.get(), temp_bytes, keys, sorted, count, 0, end_bit, ctx.stream));
}

inline void add_to_pending(const TiesPassResult& pass, int64_t P, const CallContext& ctx, TiesPending& pending) {
  pending.sign_sum += pass.sign_sum;
  if (pass.count == 0) return;
  int end_bit = 1;
  while (end_bit < 63 && (uint64_t(P - 1) >> end_bit) != 0) ++end_bit;
  // Positions are >= 0: sorted as unsigned keys.
  const auto* keys_in = reinterpret_cast<const unsigned long long*>(pass.positions.get());
  DeviceBuffer<unsigned long long> sorted(size_t(pass.count), ctx);
  radix_sort_keys(keys_in, sorted.get(), pass.count, end_bit, ctx);
  const std::vector<unsigned long long> host = download(sorted.get(), size_t(pass.count), ctx.stream);
  pending.zero_sum_positions.insert(pending.zero_sum_positions.end(), host.begin(), host.end());
}

inline DeviceBuffer<uint32_t> upload_threshold_keys(const std::vector<float>& thresholds, const CallContext& ctx) {
  std::vector<uint32_t> keys(thresholds.size());
  for (size_t r = 0; r < thresholds.size(); ++r) keys[r] = magnitude_key(thresholds[r]);
  return upload(keys, ctx);
}

// Row r's exact threshold as a TrimRange: keep iff key >= key(t), nothing undecided.
__device__ __forceinline__ TrimRange exact_range(const uint32_t* threshold_keys, int64_t r) {
  const uint32_t key = threshold_keys[r];
  return TrimRange{key, key};
}

}  // namespace kx::cuda
