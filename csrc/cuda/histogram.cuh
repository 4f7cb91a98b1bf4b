// The plumbing of the magnitude histograms on the GPU (common/magnitude_select.h), shared by
// the row kernel (threshold.cu) and the factored one (factored.cu): a thread's counting of keys
// into a chunk's device histograms, and the host loop that cuts the rows into chunks whose
// device histograms are bounded, then adds their counts into the MagnitudeSelect.
#pragma once
#include <limits>
#include <vector>

#include "cuda_utils.cuh"

namespace kx::cuda {

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

// Where a chunk's kernel counts: slots x bins counts, one low-bits word per slot, the
// non-finite flag.
struct HistogramOut {
  uint32_t* hist;
  uint32_t* low_or;
  uint32_t* nonfinite;
};

// One thread's counting of one item's keys. Round 0 counts key >> kRound0Shift and ORs the low
// bits; round 1 counts the low bits of the keys whose top bits are the task's prefix. Bin 0 holds
// every zero (DARE's dropped entries, untrained modules): it is counted per thread and added once
// per warp. The other bins are counted either in global memory (`shared` null: one atomic per
// key), or, so that repeated magnitudes (bf16, quantised data) do not all queue on one global
// address, in the block's shared memory: two 16-bit counts per 32-bit word (65536 bins in
// 128 KiB), moved to the global bins by drain(), one atomic per nonzero bin, before any count
// can reach 2^16.
struct KeyCounter {
  uint32_t* h;
  int round;
  uint32_t prefix;
  uint32_t* shared;
  uint32_t low_bits = 0, bin0 = 0;

  __device__ KeyCounter(const HistogramOut& out, const HistogramItem& item, int round_, uint32_t* shared_ = nullptr)
      : h(out.hist + int64_t(item.slot) * (round_ == 0 ? kRound0Bins : kRound1Bins)), round(round_),
        prefix(item.prefix), shared(shared_) {}

  __device__ __forceinline__ void add(uint32_t key) {
    uint32_t bin;
    if (round == 0) {
      bin = key >> kRound0Shift;
      low_bits |= key & kLowMask;
    } else if ((key >> kRound0Shift) == prefix) {
      bin = key & kLowMask;
    } else {
      return;
    }
    if (bin == 0) ++bin0;
    else if (shared != nullptr) atomicAdd(shared + (bin >> 1), 1u << ((bin & 1u) * 16u));
    else atomicAdd(h + bin, 1u);
  }

  // Block-wide (every thread of the block calls them, at the same point): zero the shared words,
  // and move their counts to the global bins, leaving them zero.
  __device__ void clear_shared(int words) {
    for (int w = int(threadIdx.x); w < words; w += int(blockDim.x)) shared[w] = 0u;
    __syncthreads();
  }
  __device__ void drain(int words) {
    __syncthreads();  // every add of the period is done
    for (int w = int(threadIdx.x); w < words; w += int(blockDim.x)) {
      const uint32_t c = shared[w];
      if (c == 0u) continue;
      shared[w] = 0u;
      if ((c & 0xffffu) != 0u) atomicAdd(h + 2 * w, c & 0xffffu);
      if ((c >> 16) != 0u) atomicAdd(h + 2 * w + 1, c >> 16);
    }
    __syncthreads();  // cleared before the next adds
  }

  // Warp-wide reductions, one atomic per warp; every lane of the warp calls it. (bin0 sums stay
  // below P < 2^32.)
  __device__ __forceinline__ void flush(const HistogramOut& out, const HistogramItem& item, uint32_t nonfinite) {
    low_bits = __reduce_or_sync(kFullWarp, low_bits);
    bin0 = __reduce_add_sync(kFullWarp, bin0);
    if ((threadIdx.x & 31) == 0) {
      if (low_bits != 0) atomicOr(out.low_or + item.slot, low_bits);
      if (bin0 != 0) atomicAdd(h, bin0);
    }
    warp_flag_nonfinite(nonfinite, out.nonfinite);
  }
};

// Dynamic shared memory for a block's bins in KeyCounter's 16-bit layout, with the kernel allowed
// to use it; 0 where the device cannot give that much beside the kernel's static shared memory
// (the kernel then counts in global memory).
template <class Kernel>
size_t shared_bins_bytes(Kernel kernel, int64_t bins) {
  int device = 0, optin = 0;
  KX_CUDA_CHECK(cudaGetDevice(&device));
  KX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  KX_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t bytes = size_t(bins / 2) * sizeof(uint32_t);
  if (attr.sharedSizeBytes + bytes > size_t(optin)) return 0;
  KX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  return bytes;
}

// The arguments of a histogram call, checked before anything is uploaded.
inline void check_histogram(size_t n_rows, int64_t P, const std::vector<int64_t>& task_of_row,
                            const MagnitudeSelect& sel) {
  if (P >= (int64_t(1) << 32)) throw std::invalid_argument("arrays over 2^32 elements are not supported");
  if (task_of_row.size() != n_rows) throw std::invalid_argument("one task index per row is needed");
  for (int64_t t : task_of_row)
    if (t < 0 || t >= sel.n_tasks()) throw std::invalid_argument("task index out of range");
}

// Histograms n_rows rows of P entries each into sel's current round, row r into task
// task_of_row[r]'s histogram: launch(items, item_count, round, HistogramOut) launches a kernel
// on the call's stream that counts each item's row into its slot. Rows are grouped into chunks of at
// most kMaxSlots distinct tasks and kMaxItems rows, and a chunk closes before any task's entry
// count would reach 2^32 (its uint32 bins' limit).
template <class Launch>
void histogram_rows(size_t n_rows, int64_t P, const std::vector<int64_t>& task_of_row, MagnitudeSelect& sel,
                    const CallContext& ctx, Launch&& launch) {
  check_histogram(n_rows, P, task_of_row, sel);
  if (sel.done() || P == 0 || n_rows == 0) return;
  const int round = sel.round();

  std::vector<HistogramItem> items;
  std::vector<int64_t> slot_task;      // chunk slot -> task
  std::vector<uint64_t> slot_entries;  // entries counted into each slot so far
  std::vector<int64_t> task_slot(size_t(sel.n_tasks()), -1);
  auto flush = [&] {
    if (items.empty()) return;
    const size_t bins = size_t(sel.bins()), slots = slot_task.size();
    const size_t low_at = slots * bins, flag_at = low_at + slots;
    DeviceBuffer<uint32_t> counts(flag_at + 1, ctx);
    counts.zero();
    DeviceBuffer<HistogramItem> device_items = upload(items, ctx);
    launch(device_items.get(), items.size(), round,
           HistogramOut{counts.get(), counts.get() + low_at, counts.get() + flag_at});
    KX_CUDA_CHECK_LAUNCH();
    const std::vector<uint32_t> host = download(counts.get(), counts.size(), ctx.stream);
    for (size_t s = 0; s < slots; ++s) {
      const int64_t task = slot_task[s];
      uint64_t* h = sel.hist(task);
      const uint32_t* c = host.data() + s * bins;
      for (size_t b = 0; b < bins; ++b) h[b] += c[b];
      if (round == 0) sel.add_low_bits(task, host[low_at + s]);
    }
    if (host[flag_at] != 0) sel.flag_nonfinite();
    for (int64_t t : slot_task) task_slot[size_t(t)] = -1;
    items.clear();
    slot_task.clear();
    slot_entries.clear();
  };
  constexpr uint64_t kSlotLimit = std::numeric_limits<uint32_t>::max();
  for (size_t r = 0; r < n_rows; ++r) {
    const int64_t task = task_of_row[r];
    const uint32_t prefix = sel.prefix(task);
    if (round == 1 && prefix == MagnitudeSelect::kNoPrefix) continue;  // task already settled
    int64_t slot = task_slot[size_t(task)];
    if (items.size() == kMaxItems || (slot < 0 && slot_task.size() == kMaxSlots) ||
        (slot >= 0 && slot_entries[size_t(slot)] + uint64_t(P) > kSlotLimit)) {
      flush();
      slot = -1;
    }
    if (slot < 0) {
      slot = int64_t(slot_task.size());
      task_slot[size_t(task)] = slot;
      slot_task.push_back(task);
      slot_entries.push_back(0);
    }
    slot_entries[size_t(slot)] += uint64_t(P);
    items.push_back(HistogramItem{int64_t(r), uint32_t(slot), prefix});
  }
  flush();
}

}  // namespace kx::cuda
