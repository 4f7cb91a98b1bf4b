// Magnitude histograms for the radix-select threshold on the GPU (see
// common/magnitude_select.h); same contract as cpu::magnitude_histogram. Also the build's
// CUDA availability queries.
#include "histogram.cuh"

namespace kx::cuda {

bool compiled() { return true; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return count;
}

namespace {

// blockIdx.y picks the item (row); blocks along x stride over its groups of 4 elements.
template <class T>
__global__ void __launch_bounds__(kThreads)
    magnitude_histogram_kernel(RowsView v, const HistogramItem* items, Groups g, int round, HistogramOut out) {
  const HistogramItem item = items[blockIdx.y];
  KeyCounter counter(out, item, round);
  uint32_t nonfinite = 0;
  for (int64_t k = global_thread(); k < g.count; k += grid_threads()) {
    float x[4];
    load_group<T>(v, item.row, g, k, x, nonfinite);
    const int64_t j0 = g.first(k);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (g.inside(j0 + i)) counter.add(magnitude_key(x[i]));
  }
  counter.flush(out, item, nonfinite);  // every lane gets here (no early exit above)
}

}  // namespace

void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel) {
  check_rows(x, d);
  check_histogram(x.rows.size(), x.P, task_of_row, sel);
  if (sel.done() || x.P == 0 || x.rows.empty()) return;
  DeviceGuard guard(x.device);
  const CallContext ctx = context_of(x);
  const cudaStream_t stream = ctx.stream;
  const DeviceRows rows = upload_rows(x, d, ctx);
  const Groups g = groups_of(x.P, d);
  histogram_rows(x.rows.size(), x.P, task_of_row, sel, ctx,
                 [&](const HistogramItem* items, size_t count, int round, const HistogramOut& out) {
                   dispatch_dtype(x.dtype, [&](auto tag) {
                     using T = decltype(tag);
                     const dim3 grid(grid_blocks(magnitude_histogram_kernel<T>, blocks_for(g.count), int64_t(count)),
                                     unsigned(count));
                     magnitude_histogram_kernel<T><<<grid, kThreads, 0, stream>>>(rows.view, items, g, round, out);
                   });
                 });
}

}  // namespace kx::cuda
