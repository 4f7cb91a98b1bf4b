// Fused TIES on the GPU: trim, elect and disjoint mean in one pass over the n rows, one thread
// per group of 4 positions, with no n x P temporary. Same results as csrc/cpu/ties.cpp (the
// rows are added in the same order with the same shared math).
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

}  // namespace kx::cuda
