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

// Threads per block of the row histogram: its blocks hold up to 128 KiB of shared bins, so few
// fit on an SM; large blocks keep enough loads in flight.
constexpr int kHistogramThreads = 1024;
// Keys a thread adds per step (one group); a block drains its 16-bit shared counts (KeyCounter)
// every kStepsPerDrain steps, before a count can reach 2^16 (15 * 4096 = 61440 keys).
constexpr int kKeysPerStep = 4;
constexpr int kStepsPerDrain = 65535 / (kKeysPerStep * kHistogramThreads);
static_assert(kStepsPerDrain >= 1, "a block's step must not overflow a 16-bit count");

// blockIdx.y picks the item (row); blocks along x stride over its groups of 4 elements.
// shared_words > 0: the bins are counted in dynamic shared memory (KeyCounter), else globally.
template <class T>
__global__ void __launch_bounds__(kHistogramThreads)
    magnitude_histogram_kernel(RowsView v, const HistogramItem* items, Groups g, int round, HistogramOut out,
                               int shared_words) {
  extern __shared__ uint32_t shared_bins[];
  const HistogramItem item = items[blockIdx.y];
  KeyCounter counter(out, item, round, shared_words > 0 ? shared_bins : nullptr);
  if (shared_words > 0) counter.clear_shared(shared_words);
  uint32_t nonfinite = 0;
  int steps = 0;
  // base is the block's first group: every thread of the block runs every step (drain syncs).
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < g.count; base += grid_threads()) {
    const int64_t k = base + threadIdx.x;
    if (k < g.count) {
      float x[4];
      load_group<T>(v, item.row, g, k, x, nonfinite);
      const int64_t j0 = g.first(k);
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (g.inside(j0 + i)) counter.add(magnitude_key(x[i]));
    }
    if (shared_words > 0 && ++steps == kStepsPerDrain) {
      counter.drain(shared_words);
      steps = 0;
    }
  }
  if (shared_words > 0) counter.drain(shared_words);
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
                     const auto kernel = magnitude_histogram_kernel<T>;
                     const int64_t wanted = blocks_for(g.count, kHistogramThreads), bins = sel.bins();
                     size_t smem = shared_bins_bytes(kernel, bins);
                     unsigned blocks = grid_blocks(kernel, wanted, int64_t(count), smem, kHistogramThreads);
                     // Shared bins pay off when a block counts at least as many keys as it has bins
                     // (clearing and draining them costs about one shared access per bin).
                     if (smem > 0 && x.P / int64_t(blocks) < bins) {
                       smem = 0;
                       blocks = grid_blocks(kernel, wanted, int64_t(count), 0, kHistogramThreads);
                     }
                     const dim3 grid(blocks, unsigned(count));
                     magnitude_histogram_kernel<T><<<grid, kHistogramThreads, smem, stream>>>(
                         rows.view, items, g, round, out, int(smem / sizeof(uint32_t)));
                   });
                 });
}

}  // namespace kx::cuda
