// Task Arithmetic on the GPU: out = sum_r w_r * dare(row r), one thread per group of 4
// positions (cuda_utils.cuh Groups). With
// one row and weight 1 this is the plain DARE op.
#include "cuda_utils.cuh"

namespace kx::cuda {
namespace {

template <class T>
__global__ void __launch_bounds__(kThreads)
    weighted_sum_kernel(RowsView v, const float* weights, int64_t n, Groups g, T* out, uint32_t* nonfinite_flag) {
  uint32_t nonfinite = 0;
  for (int64_t k = global_thread(); k < g.count; k += grid_threads()) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // In row order, rounded as on the CPU (common/rounding.h).
    for_each_row_group<T>(v, n, g, k, nonfinite, [&](int64_t r, const float (&x)[4]) {
      const float w = weights[r];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = weighted_add(acc[i], w, x[i]);
    });
    const int64_t j0 = g.first(k);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (g.inside(j0 + i)) store(out + j0 + i, acc[i]);
  }
  warp_flag_nonfinite(nonfinite, nonfinite_flag);  // every lane gets here
}

}  // namespace

bool weighted_sum(const TaskRows& x, const DareSpec& d, const std::vector<float>& weights, void* out) {
  check_rows(x, d);
  if (weights.size() != x.rows.size()) throw std::invalid_argument("one weight per row is needed");
  if (x.P == 0) return true;
  DeviceGuard guard(x.device);
  const CallContext ctx = context_of(x);
  const cudaStream_t stream = ctx.stream;
  const DeviceRows rows = upload_rows(x, d, ctx);
  const DeviceBuffer<float> device_weights = upload(weights, ctx);
  DeviceBuffer<uint32_t> nonfinite(1, ctx);
  nonfinite.zero();
  const Groups g = groups_of(x.P, d);
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const unsigned blocks = grid_blocks(weighted_sum_kernel<T>, blocks_for(g.count));
    weighted_sum_kernel<T><<<blocks, kThreads, 0, stream>>>(rows.view, device_weights.get(), x.n(), g,
                                                            static_cast<T*>(out), nonfinite.get());
  });
  KX_CUDA_CHECK_LAUNCH();
  return download(nonfinite.get(), 1, stream)[0] == 0;
}

}  // namespace kx::cuda
