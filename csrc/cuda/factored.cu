// The merge kernels on task rows given as factors (TaskFactors, common/factor_math.h) on the GPU:
// a block per output tile of kTileRows x kTileCols entries (grid-stride over tiles); for each task
// in turn the block stages the tile's rows of P and columns of Q in shared memory, kChunk ranks
// at a time, and each thread computes its kPerThread entries (4 consecutive columns of one row,
// so that DARE needs at most two Philox blocks for them, one when aligned) as the same fma chain
// as the CPU (k order from 0), then the per-element DARE / TIES / TA math shared with the CPU. No task's row is ever stored. Same bits as csrc/cpu/factored.cpp.
#include "histogram.cuh"
#include "ties_pass.cuh"

namespace kx::cuda {
namespace {

constexpr int kTileRows = 16;
constexpr int kTileCols = 64;
constexpr int kPerThread = 4;                          // consecutive columns of one row
constexpr int kThreadsPerRow = kTileCols / kPerThread;  // 16
constexpr int kChunk = 32;                             // ranks staged at a time
static_assert(kThreadsPerRow * kTileRows == kThreads, "a thread per 4 columns of a tile row");

// 16-byte aligned: threads read q 4 columns at a time (float4).
struct alignas(16) Staged {
  float p[kTileRows][kChunk + 1];  // +1: no bank conflicts when loading
  float q[kChunk][kTileCols];
};

// The tiling of the m x c output (tiles run down a column strip first, as on the CPU).
struct TileGrid {
  int64_t m, c, row_tiles, tiles;
  explicit TileGrid(const TaskFactors& f) : m(f.m), c(f.c) {
    row_tiles = (m + kTileRows - 1) / kTileRows;
    tiles = row_tiles * ((c + kTileCols - 1) / kTileCols);
  }
};

// This thread's place in a tile: row a, columns b0 + i (i < kPerThread).
struct Place {
  int64_t a, b0;
  __device__ Place(const TileGrid& g, int64_t tile)
      : a((tile % g.row_tiles) * kTileRows + threadIdx.x / kThreadsPerRow),
        b0((tile / g.row_tiles) * kTileCols + (threadIdx.x % kThreadsPerRow) * kPerThread) {}
  __device__ bool inside(const TileGrid& g, int i) const { return a < g.m && b0 + i < g.c; }
  __device__ int64_t index(const TileGrid& g, int i) const { return a * g.c + b0 + i; }
};

// v[i] = task t's entry at this thread's place (0 outside the row). Every thread of the block
// calls it together (it synchronises the block).
__device__ __forceinline__ void tile_entries(const FactorTask& t, const TileGrid& g, int64_t tile, Staged& s,
                                             float (&v)[kPerThread]) {
  const int64_t a_first = (tile % g.row_tiles) * kTileRows, b_first = (tile / g.row_tiles) * kTileCols;
  const int row = int(threadIdx.x / kThreadsPerRow), col = int(threadIdx.x % kThreadsPerRow) * kPerThread;
  float acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0.0f;
  for (int64_t k0 = 0; k0 < t.rank; k0 += kChunk) {
    const int kc = int(t.rank - k0 < kChunk ? t.rank - k0 : kChunk);
    __syncthreads();  // the previous chunk (or task, or tile) is read by every thread
    for (int e = int(threadIdx.x); e < kTileRows * kChunk; e += kThreads) {
      const int i = e / kChunk, k = e % kChunk;
      const int64_t a = a_first + i;
      s.p[i][k] = a < g.m && k < kc ? t.P[a * t.rank + k0 + k] : 0.0f;
    }
    for (int e = int(threadIdx.x); e < kChunk * kTileCols; e += kThreads) {
      const int k = e / kTileCols, j = e % kTileCols;
      const int64_t b = b_first + j;
      s.q[k][j] = b < g.c && k < kc ? t.Q[(k0 + k) * g.c + b] : 0.0f;
    }
    __syncthreads();
    for (int k = 0; k < kc; ++k) {
      const float p = s.p[row][k];
      const float4 q = *reinterpret_cast<const float4*>(&s.q[k][col]);  // 16-byte aligned: col % 4 == 0
      acc[0] = fma_rn(p, q.x, acc[0]);
      acc[1] = fma_rn(p, q.y, acc[1]);
      acc[2] = fma_rn(p, q.z, acc[2]);
      acc[3] = fma_rn(p, q.w, acc[3]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) v[i] = factor_scale(t.scale, acc[i]);
}

// This thread's entries after DARE (their consecutive indices share Philox blocks), 0 outside
// the row; `nonfinite` collects NaN / Inf (before DARE, as the row kernels check the stored
// rows) at places inside the row.
__device__ __forceinline__ void dare_entries(float (&v)[kPerThread], const FactorTask& t, const DareSpec& d,
                                             const TileGrid& g, const Place& at, uint32_t& nonfinite) {
  uint32_t words[kPerThread] = {0u, 0u, 0u, 0u};
  if (d.enabled) dare_words4(t.dare_key, uint64_t(d.elem_offset + at.index(g, 0)), words);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    if (!at.inside(g, i)) {
      v[i] = 0.0f;
      continue;
    }
    nonfinite |= uint32_t(magnitude_key(v[i]) >= kNonFiniteKey);
    if (d.enabled) v[i] = dare_apply(v[i], words[i], d);
  }
}

// blockIdx.y picks the item (task); blocks along x stride over the tiles.
__global__ void __launch_bounds__(kThreads)
    factored_histogram_kernel(const FactorTask* tasks, TileGrid g, DareSpec d, const HistogramItem* items, int round,
                              HistogramOut out) {
  __shared__ Staged s;
  const HistogramItem item = items[blockIdx.y];
  const FactorTask t = tasks[item.row];
  KeyCounter counter(out, item, round);
  uint32_t nonfinite = 0;
  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    float v[kPerThread];
    tile_entries(t, g, tile, s, v);
    const Place at(g, tile);
    dare_entries(v, t, d, g, at, nonfinite);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (at.inside(g, i)) counter.add(magnitude_key(v[i]));
  }
  counter.flush(out, item, nonfinite);  // every lane gets here
}

__global__ void __launch_bounds__(kThreads)
    factored_ties_apply_kernel(const FactorTask* tasks, int64_t n, TileGrid g, DareSpec d,
                               const uint32_t* threshold_keys, float lam, float* out, ZeroList list) {
  __shared__ Staged s;
  int64_t sign_sum = 0;
  uint32_t nonfinite = 0;
  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const Place at(g, tile);
    TiesAccum acc[kPerThread];
    for (int64_t r = 0; r < n; ++r) {
      const FactorTask t = tasks[r];
      float v[kPerThread];
      tile_entries(t, g, tile, s, v);
      dare_entries(v, t, d, g, at, nonfinite);
      const TrimRange range = exact_range(threshold_keys, r);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) ties_add(acc[i], v[i], range);  // 0 outside the row: adds nothing
    }
    // Whole warps get here together (every thread runs every tile of its block).
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) ties_finish(acc[i], at.inside(g, i), at.index(g, i), lam, out, list, sign_sum);
  }
  ties_totals(sign_sum, nonfinite, list);
}

__global__ void __launch_bounds__(kThreads)
    factored_ties_fix_majority_kernel(const FactorTask* tasks, int64_t n, int64_t c, DareSpec d,
                                      const uint32_t* threshold_keys, const int64_t* positions, int64_t count,
                                      int majority, float lam, float* out) {
  for (int64_t q = global_thread(); q < count; q += grid_threads()) {
    const int64_t j = positions[q], a = j / c, b = j % c;
    TiesAccum acc;
    for (int64_t r = 0; r < n; ++r) {
      const FactorTask t = tasks[r];
      const float v = factor_entry(t, c, a, b);
      ties_add(acc, d.enabled ? dare_element(v, t.dare_key, d.elem_offset + j, d) : v, exact_range(threshold_keys, r));
    }
    out[j] = ties_mean(acc, majority, lam);
  }
}

__global__ void __launch_bounds__(kThreads)
    factored_weighted_sum_kernel(const FactorTask* tasks, int64_t n, TileGrid g, DareSpec d, const float* weights,
                                 float* out, uint32_t* nonfinite_flag) {
  __shared__ Staged s;
  uint32_t nonfinite = 0;
  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const Place at(g, tile);
    float acc[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) acc[i] = 0.0f;
    for (int64_t r = 0; r < n; ++r) {
      const FactorTask t = tasks[r];
      float v[kPerThread];
      tile_entries(t, g, tile, s, v);
      dare_entries(v, t, d, g, at, nonfinite);
      const float w = weights[r];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) acc[i] = weighted_add(acc[i], w, v[i]);
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (at.inside(g, i)) out[at.index(g, i)] = acc[i];
  }
  warp_flag_nonfinite(nonfinite, nonfinite_flag);  // every lane gets here
}

void check_factors(const TaskFactors& f) {
  if (f.m < 0 || f.c < 0) throw std::invalid_argument("negative row shape");
  for (const FactorTask& t : f.tasks) {
    if (t.rank < 0) throw std::invalid_argument("negative factor rank");
    if (t.rank > 0 && ((f.m > 0 && t.P == nullptr) || (f.c > 0 && t.Q == nullptr)))
      throw std::invalid_argument("null factor pointer");
  }
}

}  // namespace

void factored_histogram(const TaskFactors& f, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                        MagnitudeSelect& sel) {
  check_factors(f);
  check_histogram(f.tasks.size(), f.numel(), task_of_row, sel);
  if (sel.done() || f.numel() == 0 || f.tasks.empty()) return;
  DeviceGuard guard(f.device);
  const CallContext ctx = context_of(f);
  const cudaStream_t stream = ctx.stream;
  const DeviceBuffer<FactorTask> tasks = upload(f.tasks, ctx);
  const TileGrid g(f);
  histogram_rows(f.tasks.size(), f.numel(), task_of_row, sel, ctx,
                 [&](const HistogramItem* items, size_t count, int round, const HistogramOut& out) {
                   const dim3 grid(grid_blocks(factored_histogram_kernel, g.tiles, int64_t(count)), unsigned(count));
                   factored_histogram_kernel<<<grid, kThreads, 0, stream>>>(tasks.get(), g, d, items, round, out);
                 });
}

void factored_ties_apply(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                         float* out, TiesPending& pending) {
  check_factors(f);
  if (thresholds.size() != f.tasks.size()) throw std::invalid_argument("one threshold per task is needed");
  if (f.numel() == 0) return;
  DeviceGuard guard(f.device);
  const CallContext ctx = context_of(f);
  const cudaStream_t stream = ctx.stream;
  const DeviceBuffer<FactorTask> tasks = upload(f.tasks, ctx);
  const DeviceBuffer<uint32_t> keys = upload_threshold_keys(thresholds, ctx);
  const TileGrid g(f);
  const unsigned blocks = grid_blocks(factored_ties_apply_kernel, g.tiles);
  const TiesPassResult pass = run_ties_pass(f.numel(), ctx, [&](const ZeroList& list) {
    factored_ties_apply_kernel<<<blocks, kThreads, 0, stream>>>(tasks.get(), f.n(), g, d, keys.get(), lam, out, list);
  });
  add_to_pending(pass, f.numel(), ctx, pending);
}

void factored_ties_fix_majority(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds,
                                float lam, int majority, const std::vector<int64_t>& positions, float* out) {
  check_factors(f);
  if (thresholds.size() != f.tasks.size()) throw std::invalid_argument("one threshold per task is needed");
  for (int64_t j : positions)
    if (j < 0 || j >= f.numel()) throw std::invalid_argument("position out of range");
  if (positions.empty()) return;
  DeviceGuard guard(f.device);
  const CallContext ctx = context_of(f);
  const cudaStream_t stream = ctx.stream;
  const DeviceBuffer<FactorTask> tasks = upload(f.tasks, ctx);
  const DeviceBuffer<uint32_t> keys = upload_threshold_keys(thresholds, ctx);
  const DeviceBuffer<int64_t> device_positions = upload(positions, ctx);
  const int64_t count = int64_t(positions.size());
  factored_ties_fix_majority_kernel<<<grid_blocks(factored_ties_fix_majority_kernel, blocks_for(count)), kThreads, 0,
                                      stream>>>(
      tasks.get(), f.n(), f.c, d, keys.get(), device_positions.get(), count, majority, lam, out);
  KX_CUDA_CHECK_LAUNCH();
  // No synchronisation: the caller frees the scratch in stream order, after the kernel.
}

bool factored_weighted_sum(const TaskFactors& f, const DareSpec& d, const std::vector<float>& weights, float* out) {
  check_factors(f);
  if (weights.size() != f.tasks.size()) throw std::invalid_argument("one weight per task is needed");
  if (f.numel() == 0) return true;
  DeviceGuard guard(f.device);
  const CallContext ctx = context_of(f);
  const cudaStream_t stream = ctx.stream;
  const DeviceBuffer<FactorTask> tasks = upload(f.tasks, ctx);
  const DeviceBuffer<float> device_weights = upload(weights, ctx);
  DeviceBuffer<uint32_t> nonfinite(1, ctx);
  nonfinite.zero();
  const TileGrid g(f);
  factored_weighted_sum_kernel<<<grid_blocks(factored_weighted_sum_kernel, g.tiles), kThreads, 0, stream>>>(tasks.get(), f.n(), g, d,
                                                                       device_weights.get(), out, nonfinite.get());
  KX_CUDA_CHECK_LAUNCH();
  return download(nonfinite.get(), 1, stream)[0] == 0;
}

}  // namespace kx::cuda
