// Fused TIES on the GPU: trim, elect and disjoint mean in one pass over the n rows, one
// thread per group of 4 positions, with no n x P temporary. Same results as csrc/cpu/ties.cpp (the rows
// are added in the same order with the same shared math).
#include <algorithm>

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
      for (int64_t r = 0; r < n; ++r) {
        float x[4];
        load_group<T>(v, r, g, k, x, nonfinite);
        const TrimRange range = exact_range(threshold_keys, r);
#pragma unroll
        for (int i = 0; i < 4; ++i) ties_add(a[i], x[i], range);  // 0 outside [0, P): adds nothing
      }
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

}  // namespace

void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending) {
  check_rows(x, d);
  if (thresholds.size() != x.rows.size()) throw std::invalid_argument("one threshold per row is needed");
  if (x.P == 0) return;
  DeviceGuard guard(x.device);
  const CallContext ctx = context_of(x);
  const cudaStream_t stream = ctx.stream;
  const DeviceRows rows = upload_rows(x, d, ctx);
  const DeviceBuffer<uint32_t> keys = upload_threshold_keys(thresholds, ctx);
  const Groups g = groups_of(x.P, d);
  run_ties_pass(x.P, ctx, pending, [&](const ZeroList& list) {
    dispatch_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      const unsigned blocks = grid_blocks(ties_apply_kernel<T>, blocks_for(g.count));
      ties_apply_kernel<T><<<blocks, kThreads, 0, stream>>>(rows.view, keys.get(), x.n(), g, lam,
                                                            static_cast<T*>(out), list);
    });
  });
}

void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                       int majority, const std::vector<int64_t>& positions, void* out) {
  check_rows(x, d);
  if (thresholds.size() != x.rows.size()) throw std::invalid_argument("one threshold per row is needed");
  for (int64_t j : positions)
    if (j < 0 || j >= x.P) throw std::invalid_argument("position out of range");
  if (positions.empty()) return;
  DeviceGuard guard(x.device);
  const CallContext ctx = context_of(x);
  const cudaStream_t stream = ctx.stream;
  const DeviceRows rows = upload_rows(x, d, ctx);
  const DeviceBuffer<uint32_t> keys = upload_threshold_keys(thresholds, ctx);
  const DeviceBuffer<int64_t> device_positions = upload(positions, ctx);
  const int64_t count = int64_t(positions.size());
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = grid_blocks(ties_fix_majority_kernel<T>, blocks_for(count));
    ties_fix_majority_kernel<T><<<blocks, kThreads, 0, stream>>>(rows.view, keys.get(), x.n(),
                                                                 device_positions.get(), count, majority, lam,
                                                                 static_cast<T*>(out));
  });
  KX_CUDA_CHECK_LAUNCH();
  // No synchronisation: the caller frees the scratch in stream order, after the kernel.
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
