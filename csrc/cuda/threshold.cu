// Magnitude histograms for the radix-select threshold on the GPU (see
// common/magnitude_select.h); same contract as cpu::magnitude_histogram. Also the build's
// CUDA availability queries.
#include <limits>

#include "cuda_utils.cuh"

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

// One row to histogram: its index, its task's slot among the chunk's histograms, and (round 1)
// the top bits its keys must have to count.
struct HistogramItem {
  int64_t row;
  uint32_t slot;
  uint32_t prefix;
};

// A chunk's device histograms are bounded: at most this many tasks (16 MiB in round 0) and
// at most grid.y rows; each slot counts fewer than 2^32 entries so uint32 bins cannot wrap.
constexpr size_t kMaxSlots = 64;
constexpr size_t kMaxItems = 65535;

// blockIdx.y picks the row; blocks along x stride over its P elements. Round 0 counts
// key >> kRound0Shift and ORs the low bits; round 1 counts the low bits of the keys whose top
// bits are the task's prefix. Bins are global atomics (in round 1 only the keys of one round-0
// bin reach them), except bin 0: it holds every zero (DARE's dropped entries, untrained
// modules), so it is counted per thread and added once per warp instead of serialising the
// whole grid on one address.
template <class T>
__global__ void __launch_bounds__(kThreads)
    magnitude_histogram_kernel(RowsView v, const HistogramItem* items, int64_t P, int round, uint32_t* hist,
                               uint32_t* low_or, uint32_t* nonfinite_flag) {
  const HistogramItem item = items[blockIdx.y];
  const int64_t bins = round == 0 ? kRound0Bins : kRound1Bins;
  uint32_t* h = hist + int64_t(item.slot) * bins;
  uint32_t low_bits = 0, nonfinite = 0, bin0 = 0;
  for (int64_t j = global_thread(); j < P; j += grid_threads()) {
    const uint32_t key = magnitude_key(load_row_value<T>(v, item.row, j, nonfinite));
    uint32_t bin;
    if (round == 0) {
      bin = key >> kRound0Shift;
      low_bits |= key & kLowMask;
    } else if ((key >> kRound0Shift) == item.prefix) {
      bin = key & kLowMask;
    } else {
      continue;
    }
    if (bin == 0) ++bin0;
    else atomicAdd(h + bin, 1u);
  }
  // Every lane gets here (no early exit above): warp-wide reductions, one atomic per warp.
  // (bin0 sums stay below P < 2^32.)
  low_bits = __reduce_or_sync(kFullWarp, low_bits);
  bin0 = __reduce_add_sync(kFullWarp, bin0);
  if ((threadIdx.x & 31) == 0) {
    if (low_bits != 0) atomicOr(low_or + item.slot, low_bits);
    if (bin0 != 0) atomicAdd(h, bin0);
  }
  warp_flag_nonfinite(nonfinite, nonfinite_flag);
}

// Histograms one chunk of rows on the device and adds the counts into sel.
void histogram_chunk(const TaskRows& x, const DeviceRows& rows, const std::vector<HistogramItem>& items,
                     const std::vector<int64_t>& slot_task, MagnitudeSelect& sel, cudaStream_t stream) {
  const int round = sel.round();
  const size_t bins = size_t(sel.bins());
  const size_t slots = slot_task.size();
  // Layout: slots x bins counts, then one low-bits word per slot, then the non-finite flag.
  const size_t low_at = slots * bins, flag_at = low_at + slots;
  DeviceBuffer<uint32_t> counts(flag_at + 1, stream);
  counts.zero();
  DeviceBuffer<HistogramItem> device_items = upload(items, stream);
  const dim3 grid(grid_blocks(x.P, int64_t(items.size())), unsigned(items.size()));
  dispatch_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    magnitude_histogram_kernel<T><<<grid, kThreads, 0, stream>>>(rows.view, device_items.get(), x.P, round,
                                                                 counts.get(), counts.get() + low_at,
                                                                 counts.get() + flag_at);
  });
  KX_CUDA_CHECK_LAUNCH();
  const std::vector<uint32_t> host = download(counts.get(), counts.size(), stream);
  for (size_t s = 0; s < slots; ++s) {
    const int64_t task = slot_task[s];
    uint64_t* h = sel.hist(task);
    const uint32_t* c = host.data() + s * bins;
    for (size_t b = 0; b < bins; ++b) h[b] += c[b];
    if (round == 0) sel.add_low_bits(task, host[low_at + s]);
  }
  if (host[flag_at] != 0) sel.flag_nonfinite();
}

}  // namespace

void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel) {
  check_rows(x, d);
  if (x.P >= (int64_t(1) << 32)) throw std::invalid_argument("arrays over 2^32 elements are not supported");
  if (task_of_row.size() != x.rows.size()) throw std::invalid_argument("one task index per row is needed");
  for (int64_t t : task_of_row)
    if (t < 0 || t >= sel.n_tasks()) throw std::invalid_argument("task index out of range");
  if (sel.done() || x.P == 0 || x.rows.empty()) return;

  const int round = sel.round();
  DeviceGuard guard(x.device);
  const cudaStream_t stream = stream_of(x);
  const DeviceRows rows = upload_rows(x, d, stream);

  // Rows are grouped into chunks of at most kMaxSlots distinct tasks and kMaxItems rows, and
  // a chunk closes before any task's entry count would reach 2^32 (its uint32 bins' limit).
  std::vector<HistogramItem> items;
  std::vector<int64_t> slot_task;      // chunk slot -> task
  std::vector<uint64_t> slot_entries;  // entries counted into each slot so far
  std::vector<int64_t> task_slot(size_t(sel.n_tasks()), -1);
  auto flush = [&] {
    if (items.empty()) return;
    histogram_chunk(x, rows, items, slot_task, sel, stream);
    for (int64_t t : slot_task) task_slot[size_t(t)] = -1;
    items.clear();
    slot_task.clear();
    slot_entries.clear();
  };
  constexpr uint64_t kSlotLimit = std::numeric_limits<uint32_t>::max();
  for (size_t r = 0; r < x.rows.size(); ++r) {
    const int64_t task = task_of_row[r];
    const uint32_t prefix = sel.prefix(task);
    if (round == 1 && prefix == MagnitudeSelect::kNoPrefix) continue;  // task already settled
    int64_t slot = task_slot[size_t(task)];
    if (items.size() == kMaxItems || (slot < 0 && slot_task.size() == kMaxSlots) ||
        (slot >= 0 && slot_entries[size_t(slot)] + uint64_t(x.P) > kSlotLimit)) {
      flush();
      slot = -1;
    }
    if (slot < 0) {
      slot = int64_t(slot_task.size());
      task_slot[size_t(task)] = slot;
      slot_task.push_back(task);
      slot_entries.push_back(0);
    }
    slot_entries[size_t(slot)] += uint64_t(x.P);
    items.push_back(HistogramItem{int64_t(r), uint32_t(slot), prefix});
  }
  flush();
}

}  // namespace kx::cuda
