// The merge kernels on task rows given as factors (TaskFactors, common/factor_math.h): each
// tile of the m x c output is recomputed for one task at a time from that task's factors into a
// small per-thread buffer (r FMAs per entry, register-blocked so that GCC vectorises them; with
// intrinsics on the avx512 path), then goes through the same per-element DARE / TIES / TA math as
// the row kernels. No task's row is ever stored: per thread, a few tasks' tiles of kFactoredTile
// entries and the tile's accumulators (20-80 KB, in L1 or L2), whatever the number of tasks and
// the module's size; per call, a copy of the Q factors cut into panels (QPanels, in memory the
// calling thread keeps from call to call).
//
// Results do not depend on the thread count: every position's math is its own, histograms are
// integer counts, the sign sum is an integer and the zero-sum positions are sorted.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "tile.h"
#include "path.h"  // last (but for the path's own helpers)
#include "dare_run.h"
#include "bracket_scan.h"

namespace kx::cpu::KX_CPU_PATH {
namespace {

// A register block: 3 rows x 32 columns (four AVX2 vectors), 12 accumulators, enough chains
// to hide the FMA latency with both FMA pipes busy (4 x 16 blocks, 8 chains, ran at ~55% of the
// FMA peak in a micro-benchmark; 3 x 32 at ~80%). With AVX-512 a row of 32 is two vectors: 8
// rows, 16 accumulators (zmm_block; GCC's own vectorisation stopped at 4 rows).
#if defined(KX_CPU_AVX512)
constexpr int kBlockRows = 8;
#else
constexpr int kBlockRows = 3;
#endif
constexpr int kBlockCols = 32;
// A tile is one block wide and kFactoredTile / kBlockCols rows (rounded down to whole blocks) high:
// per task, the P rows and Q panel it reads (3-6 KB) are about the fewest for its entries.
constexpr int64_t kTileCols = kBlockCols;
// Entries a tile. kTile (accumulators in L1) where tuned on a 32 KB L1 / 512 KB L2 CPU; on the
// avx512 path 2048 (64 rows): its cores' 2 MB L2 holds the accumulators (48 KB), and a task's
// factors under a tile, read from the last-level cache when there are many tasks, serve 4x the
// entries (n = 256, 1024 x 4096: TIES apply and window pass 8-15% faster; n = 8 unchanged).
#if defined(KX_CPU_AVX512)
constexpr int64_t kFactoredTile = 2048;
#else
constexpr int64_t kFactoredTile = kTile;
#endif
using FactoredAccum = TileAccumOf<kFactoredTile>;

#if defined(KX_CPU_AVX512)
// R rows x 16 V columns of entries in registers (v[i][h]: row i, columns 16h ..), written with
// intrinsics: per entry the fma chain from +0 in k order, then times the scale (factor_dot,
// factor_scale). Row i's P entries (rank floats) at p_row(i); Q's columns at q, its rows
// q_stride apart. The rows share each Q vector: R V independent chains hide the FMA latency.
template <int R, int V, class RowOfP>
inline void zmm_entries(RowOfP p_row, int64_t rank, const float* q, int64_t q_stride, float scale, __m512 (&v)[R][V]) {
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < V; ++h) v[i][h] = _mm512_setzero_ps();
  for (int64_t k = 0; k < rank; ++k) {
    __m512 qk[V];
    for (int h = 0; h < V; ++h) qk[h] = _mm512_loadu_ps(q + k * q_stride + 16 * h);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 pk = _mm512_set1_ps(p_row(i)[k]);  // (an FMA's broadcast operand)
      for (int h = 0; h < V; ++h) v[i][h] = _mm512_fmadd_ps(pk, qk[h], v[i][h]);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < R; ++i)
    for (int h = 0; h < V; ++h) v[i][h] = _mm512_mul_ps(s, v[i][h]);
}

// block_entries' R x 32 entries in registers: rows of P rank floats apart from p.
template <int R>
inline void zmm_block(const float* p, int64_t rank, const float* q, int64_t q_stride, float scale,
                      __m512 (&v)[R][2]) {
  zmm_entries<R, 2>([=](int i) { return p + i * rank; }, rank, q, q_stride, scale, v);
}
#endif

// v[i * ldv + j] (i < R, j < kBlockCols) = entries (i, j) of the block: p points at the block's
// first row of P (rank entries a row), q at its first column of Q's row 0 (q_stride apart). Per
// entry the chain of factor_dot (fma in k order from +0), then factor_scale: the same bits as
// factor_entry, however GCC vectorises the loops. (Keep this loop nest simple: anything more in
// it, e.g. a finiteness check of the results, and GCC stops vectorising it.) Out of line: inlined
// into the TIES apply, GCC spilled one of the two Q vectors to the stack for lack of registers
// (n = 8 apply ~10% slower), and into the sample it left the loops scalar.
template <int R, int C = kBlockCols>
[[gnu::noinline]] void block_entries(const float* p, int64_t rank, const float* q, int64_t q_stride, float scale, float* v,
                          int64_t ldv) {
#if defined(KX_CPU_AVX512)
  if constexpr (C == kBlockCols) {
    __m512 block[R][2];
    zmm_block<R>(p, rank, q, q_stride, scale, block);
    for (int i = 0; i < R; ++i) {
      _mm512_storeu_ps(v + i * ldv, block[i][0]);
      _mm512_storeu_ps(v + i * ldv + 16, block[i][1]);
    }
    return;
  }
#endif
  float acc[R * C];
#pragma GCC unroll 128
  for (int t = 0; t < R * C; ++t) acc[t] = 0.0f;
  for (int64_t k = 0; k < rank; ++k) {
    const float* qk = q + k * q_stride;
    float pk[R];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) pk[i] = p[i * rank + k];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 32
      for (int j = 0; j < C; ++j) acc[i * C + j] = fma_rn(pk[i], qk[j], acc[i * C + j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 32
    for (int j = 0; j < C; ++j) v[i * ldv + j] = factor_scale(scale, acc[i * C + j]);
}

// block(R, i) over `rows` rows in register blocks: R = kBlockRows rows from i = 0, then one
// block of the rows left (R < kBlockRows). R comes as a std::integral_constant.
template <int R, class Block>
inline void last_block(int64_t left, int64_t i, Block& block) {
  if constexpr (R > 0) {
    if (left == R) block(std::integral_constant<int, R>{}, i);
    else last_block<R - 1>(left, i, block);
  }
}

template <class Block>
inline void row_blocks(int64_t rows, Block&& block) {
  int64_t i = 0;
  for (; i + kBlockRows <= rows; i += kBlockRows) block(std::integral_constant<int, kBlockRows>{}, i);
  last_block<kBlockRows - 1>(rows - i, i, block);
}

inline int64_t whole_blocks(int64_t cols) { return (cols + kBlockCols - 1) / kBlockCols * kBlockCols; }

// How the m x c output is cut into tiles of `rows` x `cols` entries, the last ones smaller. A
// tile's entries are laid out rows x ldv (ldv: its columns rounded up to whole register
// blocks), at most kFactoredTile of them. Tiles run across a band of kBandStrips column strips, then
// down: a thread's consecutive tiles share every task's P rows (read from memory once a band
// instead of once a strip: with 1000 tasks a 4096-wide module's P is 256 MB, read 128 times
// at one strip a band), while the band's Q panels (kBandStrips x 2 KB x rank/16 a task) stay
// in the last-level cache from one row of tiles to the next.
struct Tile {
  int64_t a0, ta, b0, tb, ldv;
  int64_t len() const { return ta * ldv; }
};
// The tile loops hand out a row of a band's tiles at a time (dynamic: the two vCPUs of a shared
// machine do not run at one speed, and a static half each left one waiting ~8% of the time).
// 16 strips: the apply gathers every task's P rows once a row of a band (TileRowsOfP), and at 4
// that copy was ~9% of the apply's time at n = 300 (the band's Q panels, 32 MB at n = 1000, still
// stay in the last-level cache).
constexpr int64_t kBandStrips = 16;
struct Tiling {
  int64_t m, c, rows, cols, row_tiles, col_tiles;

  explicit Tiling(const TaskFactors& f) : m(f.m), c(f.c) {
    cols = std::max<int64_t>(1, std::min(c, kTileCols));
    rows = std::max<int64_t>(1, std::min(m, kFactoredTile / whole_blocks(cols) / kBlockRows * kBlockRows));
    row_tiles = (m + rows - 1) / rows;
    col_tiles = (c + cols - 1) / cols;
  }
  int64_t count() const { return m == 0 || c == 0 ? 0 : row_tiles * col_tiles; }
  Tile at(int64_t t) const {
    const int64_t band = t / (kBandStrips * row_tiles), in_band = t % (kBandStrips * row_tiles);
    const int64_t strips = std::min(kBandStrips, col_tiles - band * kBandStrips);  // the last band may be narrower
    Tile tile;
    tile.a0 = (in_band / strips) * rows;
    tile.b0 = (band * kBandStrips + in_band % strips) * cols;
    tile.ta = std::min(rows, m - tile.a0);
    tile.tb = std::min(cols, c - tile.b0);
    tile.ldv = whole_blocks(tile.tb);
    return tile;
  }
};

// One task's Q as the kernels read it: at(b) is column b of Q's row 0 (b a multiple of
// kSampleColBlock), the next rows row_stride floats apart. Cut into panels (QPanels::of): rank
// x kBlockCols floats a column block, contiguous; in place (in_place): Q itself.
struct TaskQ {
  const float* base;
  int64_t block_stride, row_stride;  // (block_stride: floats from one column block to the next)
  const float* at(int64_t b) const { return base + b / kBlockCols * block_stride + b % kBlockCols; }
};

inline TaskQ in_place(const FactorTask& t, int64_t c) { return TaskQ{t.Q, kBlockCols, c}; }

// Every task's Q, copied once per call into panels of kBlockCols columns, the panels of one
// column block for all tasks side by side (zero columns past c): a tile reads each task's
// panel as one contiguous run, and all tasks' panels under a tile as one stream. Read in place,
// a task's panel would be `rank` pieces a Q row apart (16 KB for c = 4096): 16 pages a task
// per tile, more than the TLB holds once there are a few hundred tasks. Its size is that of the
// Q factors (the factors are small), not of a row. fill(f, rows) copies some tasks' only. The
// memory is the calling thread's kept_floats (Kept: valid until that thread's next QPanels of
// that kind) or the panels' own (Own: the buffer of an earlier fill where it is large enough).
struct QPanels {
  enum Memory { Kept, Own };
  int64_t block_stride = 0;  // floats from one column block's panels to the next's
  float* data = nullptr;     // 64-byte aligned; not zeroed first (all written)
  std::vector<int64_t> offset;  // task r's panel within a block (-1: not copied)

  explicit QPanels(Memory memory) : memory_(memory) {}
  QPanels(const TaskFactors& f, Memory memory) : memory_(memory) {
    std::vector<int64_t> all(size_t(f.n()));
    std::iota(all.begin(), all.end(), int64_t(0));
    fill(f, all);
  }
  void fill(const TaskFactors& f, const std::vector<int64_t>& rows) {
    offset.assign(size_t(f.n()), -1);
    block_stride = 0;
    for (int64_t r : rows) {
      offset[size_t(r)] = block_stride;
      block_stride += f.tasks[r].rank * kBlockCols;
    }
    const int64_t blocks = (f.c + kBlockCols - 1) / kBlockCols;
    data = reserve(size_t(blocks * block_stride));
    const int64_t count = int64_t(rows.size()), c = f.c;
#pragma omp parallel for schedule(static) if (blocks * block_stride > (int64_t(1) << 18))
    for (int64_t jb = 0; jb < blocks; ++jb) {
      const int64_t b0 = jb * kBlockCols, tb = std::min<int64_t>(kBlockCols, c - b0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t r = rows[size_t(i)];
        const FactorTask& t = f.tasks[r];
        float* panel = data + jb * block_stride + offset[r];
        for (int64_t k = 0; k < t.rank; ++k) {
          std::copy(t.Q + k * c + b0, t.Q + k * c + b0 + tb, panel + k * kBlockCols);
          std::fill(panel + k * kBlockCols + tb, panel + (k + 1) * kBlockCols, 0.0f);
        }
      }
    }
  }
  TaskQ of(int64_t r) const { return TaskQ{data + offset[r], block_stride, kBlockCols}; }

 private:
  float* reserve(size_t count) { return memory_ == Kept ? kept_floats(count) : own_.reserve(count); }
  Memory memory_;
  FloatBuffer own_;
};

// Per thread, for the tile-major kernels (TIES apply, TA): every task's P rows under the current
// row of tiles, gathered side by side when the thread's tiles move to another row of tiles
// (tiles run across a band of kBandStrips column strips before going down), so that the strips
// after the first read them as one stream. Read in place, each tile reads a piece of ~1 KB from
// each task's own P; with many tasks those neither stay in cache nor stream (ties n = 1000: the
// apply ran at 65 GFLOP/s, 84 with one P shared by every task). Only when the pieces exceed
// kGatheredPBytes: fewer stay in cache from tile to tile, where the copy would be all cost.
constexpr int64_t kGatheredPBytes = 256 << 10;
class TileRowsOfP {
 public:
  TileRowsOfP(const TaskFactors& f, int64_t rows) : f_(f) {
    for (const FactorTask& t : f.tasks) {
      offset_.push_back(stride_);
      stride_ += rows * t.rank;
    }
    if (stride_ * int64_t(sizeof(float)) > kGatheredPBytes) data_.resize(size_t(stride_));
  }
  // Before the tasks of a tile: gathers the rows of its row of tiles if they are not the last ones.
  void enter(const Tile& tile) {
    if (data_.empty() || tile.a0 == a0_) return;
    a0_ = tile.a0;
    for (size_t r = 0; r < f_.tasks.size(); ++r) {
      const FactorTask& t = f_.tasks[r];
      std::copy(t.P + tile.a0 * t.rank, t.P + (tile.a0 + tile.ta) * t.rank, data_.data() + offset_[r]);
    }
  }
  // Task r's P rows of the tile entered last (rank floats a row, contiguous).
  const float* of(int64_t r, const Tile& tile) const {
    return data_.empty() ? f_.tasks[r].P + tile.a0 * f_.tasks[r].rank : data_.data() + offset_[r];
  }

 private:
  const TaskFactors& f_;
  std::vector<int64_t> offset_;  // task r's rows in data_
  int64_t stride_ = 0;
  std::vector<float> data_;  // empty: read in place
  int64_t a0_ = -1;
};

// Per thread: one task's tile of entries.
struct Scratch {
  alignas(64) float v[kFactoredTile];
};

// Per thread: the tiles of a group of kGroup tasks, added to the TIES accumulators in one sweep.
constexpr int kGroup = 4;
struct GroupScratch {
  alignas(64) float v[kGroup][kFactoredTile];
};

#if defined(KX_CPU_AVX512)
// FactoredAccum::add_exact with the tests in mask registers, which the adds take as write masks:
// 9 instructions a task and 16 positions, where GCC's vectorisation of ties_add_kept made 16 (a
// zeroed copy of each kept value, all-ones vectors for the counts), as many as the entries' FMAs.
// The same bits: a dropped entry added +0 to the sums, which leaves each as it was (none is ever
// -0: they start at +0, and only x + y with x = y = -0 gives -0). len: a multiple of 16.
template <int G, bool kFirst>
void add_exact_zmm(FactoredAccum& acc, const float* const* v, int64_t len, const float* thresholds) {
  __m512i keep_from[G];
  for (int g = 0; g < G; ++g) keep_from[g] = _mm512_set1_epi32(int(magnitude_key(thresholds[g])));
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t += 16) {
    __m512 sum = kFirst ? zero : _mm512_loadu_ps(acc.sum + t);
    __m512 pos_sum = kFirst ? zero : _mm512_loadu_ps(acc.pos_sum + t);
    __m512 neg_sum = kFirst ? zero : _mm512_loadu_ps(acc.neg_sum + t);
    __m512i pos_count = kFirst ? _mm512_setzero_si512() : _mm512_loadu_si512(acc.pos_count + t);
    __m512i neg_count = kFirst ? _mm512_setzero_si512() : _mm512_loadu_si512(acc.neg_count + t);
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const __m512 x = _mm512_loadu_ps(v[g] + t);
      // keys are 31-bit: signed order (ties_add_kept)
      const __mmask16 keep = _mm512_cmpge_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), magnitude), keep_from[g]);
      const __mmask16 pos = _mm512_mask_cmp_ps_mask(keep, x, zero, _CMP_GT_OQ);
      const __mmask16 neg = _mm512_mask_cmp_ps_mask(keep, x, zero, _CMP_LT_OQ);
      sum = _mm512_mask_add_ps(sum, keep, sum, x);
      pos_sum = _mm512_mask_add_ps(pos_sum, pos, pos_sum, x);
      neg_sum = _mm512_mask_add_ps(neg_sum, neg, neg_sum, x);
      pos_count = _mm512_mask_add_epi32(pos_count, pos, pos_count, one);
      neg_count = _mm512_mask_add_epi32(neg_count, neg, neg_count, one);
    }
    _mm512_storeu_ps(acc.sum + t, sum);
    _mm512_storeu_ps(acc.pos_sum + t, pos_sum);
    _mm512_storeu_ps(acc.neg_sum + t, neg_sum);
    _mm512_storeu_si512(acc.pos_count + t, pos_count);
    _mm512_storeu_si512(acc.neg_count + t, neg_count);
    if (kFirst) _mm512_storeu_si512(acc.undecided + t, _mm512_setzero_si512());
  }
}
#endif

template <int G, bool kFirst>
void add_exact(FactoredAccum& acc, const float* const* v, int64_t len, const float* thresholds) {
#if defined(KX_CPU_AVX512)
  if (len % 16 == 0) return add_exact_zmm<G, kFirst>(acc, v, len, thresholds);
#endif
  acc.add_exact<G, kFirst>(v, len, thresholds);
}

template <bool kFirst>
void add_group(FactoredAccum& acc, const GroupScratch& s, int g, int64_t len, const float* thresholds) {
  const float* v[kGroup] = {s.v[0], s.v[1], s.v[2], s.v[3]};
  switch (g) {
    case 4: add_exact<4, kFirst>(acc, v, len, thresholds); break;
    case 3: add_exact<3, kFirst>(acc, v, len, thresholds); break;
    case 2: add_exact<2, kFirst>(acc, v, len, thresholds); break;
    default: add_exact<1, kFirst>(acc, v, len, thresholds); break;
  }
}

// The largest magnitude_key of x[0 .. len): NaN's above Inf's above every finite value's.
uint32_t max_key(const float* x, int64_t len) {
  uint32_t top = 0;
  for (int64_t e = 0; e < len; ++e) top = std::max(top, magnitude_key(x[e]));
  return top;
}

// Whether task t's entries (m x c) need looking at for NaN or Inf: not when its factors are
// finite and both the partial sums of an entry's fma chain, <= rank max|P| max|Q|, and the
// entry, <= |s| times that, are far below float32's range, as LoRA factors' always are. The
// per-entry check, one more sweep of each tile, cost ~10% of the window pass and ~8% of the TIES
// apply; this reads each factor once.
bool entries_need_check(const FactorTask& t, int64_t m, int64_t c) {
  const uint32_t p = max_key(t.P, m * t.rank), q = max_key(t.Q, t.rank * c);
  if (p >= kNonFiniteKey || q >= kNonFiniteKey) return true;
  constexpr double kFar = 0x1p100;  // float32's largest is ~2^128
  const double dot_max = double(t.rank) * double(bits_float(p)) * double(bits_float(q));
  return !(dot_max < kFar && std::fabs(double(t.scale)) * dot_max < kFar);
}

// entries_need_check of the tasks at `rows`, side by side; 1 at the others.
std::vector<char> tasks_to_check(const TaskFactors& f, const std::vector<int64_t>& rows) {
  std::vector<char> check(size_t(f.n()), 1);
  const int64_t count = int64_t(rows.size());
#pragma omp parallel for schedule(dynamic) if (count > 1)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = rows[size_t(i)];
    check[size_t(r)] = entries_need_check(f.tasks[r], f.m, f.c);
  }
  return check;
}

// entries_need_check of every task.
std::vector<char> tasks_to_check(const TaskFactors& f) {
  std::vector<int64_t> all(size_t(f.n()));
  std::iota(all.begin(), all.end(), int64_t(0));
  return tasks_to_check(f, all);
}

// v[i * ldv + j] = task t's entry (a0 + i, b0 + j) for i < ta, j < tb (columns tb .. ldv-1 of
// v hold padding: entries of Q's zero columns); then, with DARE, each row's run of tb entries
// is masked. p is t's P rows a0 .. a0+ta-1 (rank floats each, contiguous), q its Q panels.
// Returns false if an entry (before DARE, as the row kernels check the stored rows) is NaN or Inf;
// looked at only when `check` (entries_need_check), else true.
bool task_tile(const FactorTask& t, const float* p, const TaskQ& q, const DareSpec& d, int64_t c, const Tile& tile,
               bool check, float* out) {
  const int64_t rank = t.rank, a0 = tile.a0, ta = tile.ta, b0 = tile.b0, tb = tile.tb, ldv = tile.ldv;
  for (int64_t jb = 0; jb < tb; jb += kBlockCols) {
    const float* qb = q.at(b0 + jb);
    float* v = out + jb;
    row_blocks(ta, [&](auto rows, int64_t i) {
      block_entries<rows()>(p + i * rank, rank, qb, q.row_stride, t.scale, v + i * ldv, ldv);
    });
  }
  // Padding entries come from Q's zero columns: one is NaN or Inf only if a P entry of its row
  // is, and then so are all of the row's entries. So one flat loop over the tile, padding
  // included, flags exactly the tiles with a non-finite entry.
  uint32_t nonfinite = 0;
  if (check)
    for (int64_t e = 0; e < tile.len(); ++e) nonfinite |= magnitude_key(out[e]) >= kNonFiniteKey;
  if (d.enabled) dare_path::run_rows(t.dare_key, d, uint64_t(d.elem_offset + a0 * c + b0), c, ta, tb, out, ldv);
  return nonfinite == 0;
}

// Asks for the tile's output lines before the tile is computed (n tasks' worth of work), so its
// stores at the end find them in cache instead of stalling on each line's read-for-ownership.
inline void prefetch_output(float* out, int64_t c, const Tile& tile) {
  for (int64_t i = 0; i < tile.ta; ++i) {
    const char* row = reinterpret_cast<const char*>(out + (tile.a0 + i) * c + tile.b0);
    for (int64_t byte = 0; byte < tile.tb * int64_t(sizeof(float)); byte += 64) __builtin_prefetch(row + byte, 1);
  }
}

// The tile's outputs from its accumulators (ties_sign, ties_mean; positions that need the
// majority sign written 0), added to sign_sum; returns whether some position needs it. On the
// avx512 path a row of a whole register block is done 16 positions at a time, with one division
// (GCC's vectorisation of ties_mean divided twice, pos and neg: the divider is slow, ~10% of the
// apply at n = 8), and stored past the cache where its lines are aligned: the output is written
// once and read long after, so fetching its lines first (read for ownership) was only a wait.
inline bool finish_tile(const FactoredAccum& acc, const Tile& tl, float lam, float* out, int64_t c, int64_t& sign_sum) {
  int32_t any_zero_sum = 0, tile_signs = 0;
  for (int64_t i = 0; i < tl.ta; ++i) {
    float* row = out + (tl.a0 + i) * c + tl.b0;
    int64_t j = 0;
#if defined(KX_CPU_AVX512)
    if (tl.tb == kBlockCols && reinterpret_cast<uintptr_t>(row) % 64 == 0) {
      const __m512 zero = _mm512_setzero_ps(), scale = _mm512_set1_ps(lam);
      const __m512i one = _mm512_set1_epi32(1);
      for (; j < kBlockCols; j += 16) {
        const int64_t e = i * tl.ldv + j;
        const __m512 sum = _mm512_loadu_ps(acc.sum + e);
        const __m512i pos_count = _mm512_loadu_si512(acc.pos_count + e), neg_count = _mm512_loadu_si512(acc.neg_count + e);
        const __mmask16 pos = _mm512_cmp_ps_mask(sum, zero, _CMP_GT_OQ), neg = _mm512_cmp_ps_mask(sum, zero, _CMP_LT_OQ);
        const __m512 kept = _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(neg, acc.neg_sum + e), pos, acc.pos_sum + e);
        __m512i count = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(one, neg, neg_count), pos, pos_count);
        count = _mm512_max_epi32(count, one);  // (count > 0 ? count : 1)
        _mm512_stream_ps(row + j, _mm512_mul_ps(scale, _mm512_div_ps(kept, _mm512_cvtepi32_ps(count))));
        tile_signs += __builtin_popcount(uint32_t(pos)) - __builtin_popcount(uint32_t(neg));
        const __mmask16 survived = _mm512_cmpgt_epi32_mask(_mm512_add_epi32(pos_count, neg_count), _mm512_setzero_si512());
        any_zero_sum |= int32_t(_mm512_mask_cmp_ps_mask(survived, sum, zero, _CMP_EQ_OQ) != 0);
      }
    }
#endif
    for (; j < tl.tb; ++j) {  // positions needing the majority sign get sign 0: 0
      const TiesAccum a = acc.at(i * tl.ldv + j);
      const int sign = ties_sign(a);
      row[j] = ties_mean(a, sign, lam);
      tile_signs += sign;
      any_zero_sum |= int32_t(ties_needs_majority(a));
    }
  }
  sign_sum += tile_signs;
  return any_zero_sum != 0;
}

// Whether finish_tile streams the output past the cache (so need not prefetch it).
inline bool output_streamed(const float* out, int64_t c) {
#if defined(KX_CPU_AVX512)
  return reinterpret_cast<uintptr_t>(out) % 64 == 0 && c % 16 == 0;
#else
  (void)out, (void)c;
  return false;
#endif
}

// Asks for task t's factors under a tile (its P rows and its Q panels) while the task
// before it is computed: with many tasks they no longer stay in cache from one tile to the next.
inline void prefetch_factors(const FactorTask& t, const float* rows, const TaskQ& q, const Tile& tile) {
  const char* p = reinterpret_cast<const char*>(rows);
  for (int64_t byte = 0; byte < tile.ta * t.rank * int64_t(sizeof(float)); byte += 64) __builtin_prefetch(p + byte);
  for (int64_t jb = 0; jb < tile.ldv; jb += kBlockCols) {
    const char* panel = reinterpret_cast<const char*>(q.at(tile.b0 + jb));
    for (int64_t byte = 0; byte < t.rank * kBlockCols * int64_t(sizeof(float)); byte += 64) __builtin_prefetch(panel + byte);
  }
}

void check(const TaskFactors& f) {
  if (f.m < 0 || f.c < 0) throw std::invalid_argument("negative row shape");
  for (const FactorTask& t : f.tasks) {
    if (t.rank < 0) throw std::invalid_argument("negative factor rank");
    if (t.rank > 0 && f.m > 0 && t.P == nullptr) throw std::invalid_argument("null factor pointer");
    if (t.rank > 0 && f.c > 0 && t.Q == nullptr) throw std::invalid_argument("null factor pointer");
  }
}

}  // namespace

namespace {

// The sample lattice (MagnitudeSelect, sampled mode) column block by column block: block jb of
// kSampleColBlock columns is sampled in the row blocks ib with sample_first_block(ib) ==
// jb mod kSampleEvery, i.e. every kSampleEvery-th row block from first_sampled_row_block(jb).
// In this order a block's Q panel (16 lines) stays in L1 while the P rows under it stream by;
// row by row, each sampled block had read its panel from the last-level cache (3-5x the time of
// an entry of the full pass for 1/16 of the entries).
inline int64_t first_sampled_row_block(int64_t jb) {
  static const std::vector<int64_t> first = [] {
    std::vector<int64_t> f(kSampleEvery, -1);
    for (int64_t ib = 0; ib < kSampleEvery; ++ib) f[size_t(sample_first_block(ib))] = ib;
    return f;
  }();
  return first[size_t(jb % kSampleEvery)];
}

// The top-16-bit keys of a sample block's R x kSampleColBlock entries v (tb columns of them:
// padding left out) into hist.
template <int R>
inline void count_sample(const float* v, int64_t tb, uint64_t* hist) {
  constexpr int C = kSampleColBlock;
  if (tb == C) {  // (a whole block: no bound to test per entry)
    for (int e = 0; e < R * C; ++e) ++hist[magnitude_key(v[e]) >> kRound0Shift];
    return;
  }
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < tb; ++j) ++hist[magnitude_key(v[i * C + j]) >> kRound0Shift];
}

// Task t's keys at the sample block of R rows from a0 and the columns from b0 into hist by their
// top 16 bits, with DARE, padding left out. Non-finite values are flagged by the full pass that
// follows.
template <int R>
inline void sample_block(const FactorTask& t, const TaskQ& q, const DareSpec& d, int64_t c, int64_t a0,
                         int64_t b0, uint64_t* hist) {
  constexpr int C = kSampleColBlock;
  alignas(64) float v[R * C];
  const int64_t tb = std::min<int64_t>(C, c - b0);
  block_entries<R, C>(t.P + a0 * t.rank, t.rank, q.at(b0), q.row_stride, t.scale, v, C);
  if (d.enabled) dare_path::run_rows(t.dare_key, d, uint64_t(d.elem_offset + a0 * c + b0), c, R, tb, v, C);
  count_sample<R>(v, tb, hist);
}

#if defined(KX_CPU_AVX512)
// Two sample blocks of the same columns (kSampleRowBlock rows from a0, as many from a1) at once:
// their 8 rows share each Q vector, 8 FMA chains where one block's 4 waited on the FMA latency
// (the sample ran at a quarter of the full pass's speed an entry).
[[gnu::noinline]] void sample_pair(const FactorTask& t, const TaskQ& q, const DareSpec& d, int64_t c, int64_t a0,
                                  int64_t a1, int64_t b0, uint64_t* hist) {
  constexpr int R = kSampleRowBlock, C = kSampleColBlock;
  static_assert(C == 16, "a sample block's row is one AVX-512 vector");
  const int64_t rank = t.rank;
  const float *p0 = t.P + a0 * rank, *p1 = t.P + a1 * rank;
  __m512 entries[2 * R][1];
  zmm_entries<2 * R, 1>([=](int i) { return i < R ? p0 + i * rank : p1 + (i - R) * rank; }, rank, q.at(b0),
                        q.row_stride, t.scale, entries);
  alignas(64) float v[2][R * C];
  for (int i = 0; i < 2 * R; ++i) _mm512_store_ps(v[i / R] + i % R * C, entries[i][0]);
  const int64_t tb = std::min<int64_t>(C, c - b0), first[2] = {a0, a1};
  for (int h = 0; h < 2; ++h) {
    if (d.enabled) dare_path::run_rows(t.dare_key, d, uint64_t(d.elem_offset + first[h] * c + b0), c, R, tb, v[h], C);
    count_sample<R>(v[h], tb, hist);
  }
}
#endif

// Task t's sample blocks in column blocks jb0 .. jb1-1.
void sample_columns(const FactorTask& t, const TaskQ& q, const DareSpec& d, int64_t m, int64_t c, int64_t jb0,
                    int64_t jb1, uint64_t* hist) {
  static_assert(kBlockCols % kSampleColBlock == 0, "a sample block lies in one Q panel");
  static_assert(kSampleRowBlock == 4, "sample_block takes blocks of up to 4 rows");
  constexpr int64_t kStep = kSampleEvery * kSampleRowBlock;  // rows from one sampled block to the next
  for (int64_t jb = jb0; jb < jb1; ++jb) {
    const int64_t b0 = jb * kSampleColBlock;
    int64_t a0 = first_sampled_row_block(jb) * kSampleRowBlock;
#if defined(KX_CPU_AVX512)
    for (; a0 + kStep + kSampleRowBlock <= m; a0 += 2 * kStep) sample_pair(t, q, d, c, a0, a0 + kStep, b0, hist);
#endif
    for (; a0 < m; a0 += kStep) {
      switch (std::min<int64_t>(kSampleRowBlock, m - a0)) {
        case 4: sample_block<4>(t, q, d, c, a0, b0, hist); break;
        case 3: sample_block<3>(t, q, d, c, a0, b0, hist); break;
        case 2: sample_block<2>(t, q, d, c, a0, b0, hist); break;
        default: sample_block<1>(t, q, d, c, a0, b0, hist); break;
      }
    }
  }
}

// The sample of rows `rows`, each counted into its task's histogram (task_of_row). With at
// least as many rows as threads, all of distinct tasks, each thread takes whole rows and counts
// straight into their histograms; else the threads share each row's column blocks, counting
// into their own histograms, added at the end.
void sample_rows(const TaskFactors& f, const QPanels* panels, const DareSpec& d, const std::vector<int64_t>& rows,
                 const std::vector<int64_t>& task_of_row, MagnitudeSelect& sel) {
  auto q_of = [&](int64_t r) { return panels ? panels->of(r) : in_place(f.tasks[r], f.c); };
  const int64_t col_blocks = (f.c + kSampleColBlock - 1) / kSampleColBlock, count = int64_t(rows.size());
  std::vector<int64_t> tasks;
  for (int64_t r : rows) tasks.push_back(task_of_row[r]);
  std::sort(tasks.begin(), tasks.end());
  const bool distinct = std::adjacent_find(tasks.begin(), tasks.end()) == tasks.end();
  constexpr int64_t kThreadedSample = 32 * 1024;  // sampled entries a parallel region is worth
  const int64_t per_row = f.m * f.c / kSampleEvery;  // (about)
  if (distinct && count >= omp_get_max_threads()) {
#pragma omp parallel for schedule(dynamic, 1) if (count * per_row > kThreadedSample)
    for (int64_t e = 0; e < count; ++e) {
      const int64_t r = rows[size_t(e)];
      sample_columns(f.tasks[r], q_of(r), d, f.m, f.c, 0, col_blocks, sel.hist(task_of_row[r]));
    }
    return;
  }
  for (int64_t r : rows) {
    uint64_t* hist = sel.hist(task_of_row[r]);
    if (per_row <= kThreadedSample) {  // (a small row: no threads, no histograms of their own)
      sample_columns(f.tasks[r], q_of(r), d, f.m, f.c, 0, col_blocks, hist);
      continue;
    }
#pragma omp parallel
    {
      std::vector<uint64_t> local(size_t(kRound0Bins), 0);
#pragma omp for schedule(dynamic, 4)
      for (int64_t jb = 0; jb < col_blocks; ++jb) sample_columns(f.tasks[r], q_of(r), d, f.m, f.c, jb, jb + 1, local.data());
#pragma omp critical
      for (int64_t b = 0; b < kRound0Bins; ++b) hist[b] += local[b];
    }
  }
}

#if defined(KX_CPU_AVX512)
// count_task's bracket pass over a tile one block wide (no padding), without DARE and with
// entries known finite, on the registers that computed the entries (no store, no second read):
// returns how many keys are below key0, appends the offsets inside.
int64_t bracket_tile(const FactorTask& t, const TaskQ& q, const Tile& tile, uint32_t key0, uint32_t span,
                     uint32_t* bin_of, int64_t& count) {
  bracket_path::Bracket16 bracket(key0, span);
  const float* qb = q.at(tile.b0);
  const float* p = t.P + tile.a0 * t.rank;
  row_blocks(tile.ta, [&](auto rows, int64_t i) {  // tested on the registers that computed them
    __m512 block[rows()][2];
    zmm_block<rows()>(p + i * t.rank, t.rank, qb, q.row_stride, t.scale, block);
    for (int r = 0; r < rows(); ++r) {
      bracket.test(block[r][0], bin_of, count);
      bracket.test(block[r][1], bin_of, count);
    }
  });
  return int64_t(bracket.below_count());
}
#endif

// Task `task`'s keys over the whole row (factors t, Q panels q), counted into sel as `pass`
// says (kWindow, kList, kTop or kLow); returns false if an entry is NaN or Inf.
bool count_task(const FactorTask& t, const TaskQ& q, const DareSpec& d, const TaskFactors& f,
                const Tiling& tiling, TaskPass pass, bool check, MagnitudeSelect& sel, int64_t task) {
  const int64_t tiles = tiling.count();
  const bool listed = pass.what == Count::kList, bracket = listed || pass.what == Count::kWindow;
  const int64_t bins = listed ? 0 : bracket ? kWindowBins : pass.what == Count::kTop ? kRound0Bins : kRound1Bins;
  const uint32_t key0 = pass.key, span = pass.span;
  uint64_t* hist = sel.hist(task);
  uint32_t low = 0;
  uint64_t under = 0;
  bool finite = true;
#pragma omp parallel if (tiles > 4) reduction(| : low) reduction(+ : under) reduction(&& : finite)
  {
    // Per-thread counts (or keys), added once at the end: no atomics in the hot loop.
    std::vector<uint32_t> local(size_t(bins), 0), keys;
    uint32_t bin_of[kFactoredTile + 16];  // (bracket_path::scan's room)
    Scratch s;
#pragma omp for schedule(dynamic, kBandStrips)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const Tile tl = tiling.at(tile);
      int64_t count = 0;
      bool entries_stored = true;
#if defined(KX_CPU_AVX512)
      if (bracket && !d.enabled && !check && tl.tb == kBlockCols) {  // (entries finite: entries_need_check)
        under += bracket_tile(t, q, tl, key0, span, bin_of, count);
        entries_stored = false;
      }
#endif
      if (entries_stored) finite = task_tile(t, t.P + tl.a0 * t.rank, q, d, f.c, tl, check, s.v) && finite;
      // The bins first (vectorised), then the counts: a scalar loop of increments only.
      for (int64_t i = 0; entries_stored && i < tl.ta; ++i) {
        const float* v = s.v + i * tl.ldv;
        if (pass.what == Count::kTop) {
          for (int64_t j = 0; j < tl.tb; ++j) {
            const uint32_t key = magnitude_key(v[j]);
            bin_of[count + j] = key >> kRound0Shift;
            low |= key & kLowMask;
          }
          count += tl.tb;
        } else if (bracket) {  // a tile without padding columns in one run, else row by row
          const bool whole = tl.tb == tl.ldv;
          under += bracket_path::scan(v, whole ? tl.len() : tl.tb, key0, span, bin_of, count);
          if (whole) break;
        } else {
          for (int64_t j = 0; j < tl.tb; ++j) {  // keys outside the prefix's bin are left out
            const uint32_t key = magnitude_key(v[j]);
            bin_of[count] = key & kLowMask;
            count += (key >> kRound0Shift) == key0;
          }
        }
      }
      if (listed)
        for (int64_t e = 0; e < count; ++e) keys.push_back(key0 + bin_of[e]);
      else
        for (int64_t e = 0; e < count; ++e) ++local[bin_of[e]];
    }
#pragma omp critical
    {
      for (int64_t b = 0; b < bins; ++b) hist[b] += local[b];
      if (listed) sel.add_keys(task, keys.data(), keys.size());
    }
  }
  sel.add_low_bits(task, low);
  sel.add_below(task, under);
  return finite;
}

}  // namespace

void factored_histogram(const TaskFactors& f, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                        MagnitudeSelect& sel) {
  check(f);
  if (f.numel() >= (int64_t(1) << 32)) throw std::invalid_argument("arrays over 2^32 elements are not supported");
  const Tiling tiling(f);
  std::vector<int64_t> sampled, counted;  // rows whose task this pass samples / counts in full
  for (int64_t r = 0; r < f.n(); ++r) {
    const Count what = sel.pass_of(task_of_row[r]).what;
    if (what == Count::kSample) {
      sampled.push_back(r);
      sel.add_total(task_of_row[r], uint64_t(f.numel()));
    } else if (what != Count::kNone) {
      counted.push_back(r);
    }
  }
  // A counted task's Q panels are copied just before its pass, into one buffer for all (its Q
  // and no more: 256 KB at rank 16, c = 4096, in cache while the task's tiles read it); the
  // sample reads each task's Q in place (one column block of 16, rank lines, at a time for all
  // its sampled rows), unless its blocks would run past a row's end. Panels of every task at
  // once were most of the sample's time at n = 300 and a copy of 262 MB per 4096-wide module at
  // n = 1000.
  QPanels one(QPanels::Kept);
  const std::vector<char> check = tasks_to_check(f, counted);
  for (int64_t r : counted) {
    const int64_t task = task_of_row[r];
    one.fill(f, {r});
    if (!count_task(f.tasks[r], one.of(r), d, f, tiling, sel.pass_of(task), check[size_t(r)], sel, task))
      sel.flag_nonfinite();
  }
  std::optional<QPanels> panels;
  if (!sampled.empty() && f.c % kSampleColBlock != 0) panels.emplace(f, QPanels::Own);  // (one's memory: Kept)
  sample_rows(f, panels ? &*panels : nullptr, d, sampled, task_of_row, sel);
}

void factored_ties_apply(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                         float* out, TiesPending& pending) {
  check(f);
  const int64_t n = f.n();
  const Tiling tiling(f);
  const int64_t tiles = tiling.count();
  const QPanels panels(f, QPanels::Kept);
  const std::vector<char> check = tasks_to_check(f);
  const size_t listed_before = pending.zero_sum_positions.size();
  const bool streamed = output_streamed(out, f.c);
  bool finite = true;
  int64_t sign_sum = 0;
#pragma omp parallel if (tiles > 4) reduction(+ : sign_sum) reduction(&& : finite)
  {
    std::vector<int64_t> my_zero;
    std::vector<FactoredAccum> storage(1);
    FactoredAccum& acc = storage[0];
    std::vector<GroupScratch> group_storage(1);
    GroupScratch& s = group_storage[0];
    TileRowsOfP p_rows(f, tiling.rows);
#pragma omp for schedule(dynamic, kBandStrips)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const Tile tl = tiling.at(tile);
      const int64_t a0 = tl.a0, ta = tl.ta, b0 = tl.b0, tb = tl.tb, ldv = tl.ldv;
      if (!streamed) prefetch_output(out, f.c, tl);
      p_rows.enter(tl);
      for (int64_t r0 = 0; r0 < n; r0 += kGroup) {  // padding columns are accumulated too, and never read
        const int g = int(std::min<int64_t>(kGroup, n - r0));
        for (int i = 0; i < g; ++i) {
          const int64_t r = r0 + i;
          if (r + 1 < n) prefetch_factors(f.tasks[r + 1], p_rows.of(r + 1, tl), panels.of(r + 1), tl);
          finite = task_tile(f.tasks[r], p_rows.of(r, tl), panels.of(r), d, f.c, tl, check[size_t(r)], s.v[i]) && finite;
        }
        if (r0 == 0) add_group<true>(acc, s, g, tl.len(), thresholds.data() + r0);
        else add_group<false>(acc, s, g, tl.len(), thresholds.data() + r0);
      }
      if (finish_tile(acc, tl, lam, out, f.c, sign_sum))
        for (int64_t i = 0; i < ta; ++i)
          for (int64_t j = 0; j < tb; ++j)
            if (ties_needs_majority(acc.at(i * ldv + j))) my_zero.push_back((a0 + i) * f.c + b0 + j);
    }
#if defined(KX_CPU_AVX512)
    _mm_sfence();  // (the streamed stores visible before the threads join)
#endif
#pragma omp critical
    pending.zero_sum_positions.insert(pending.zero_sum_positions.end(), my_zero.begin(), my_zero.end());
  }
  if (!finite) throw std::domain_error("input contains NaN or Inf");
  pending.sign_sum += sign_sum;
  // Threads list their positions in no fixed order: sorted, the list is the same for any
  // thread count (and the same as on the GPU).
  std::sort(pending.zero_sum_positions.begin() + int64_t(listed_before), pending.zero_sum_positions.end());
}

void factored_ties_fix_majority(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds,
                                float lam, int majority, const std::vector<int64_t>& positions, float* out) {
  check(f);
  std::vector<TrimRange> ranges;
  for (float t : thresholds) ranges.push_back(exact_trim(t));
  const int64_t count = int64_t(positions.size()), n = f.n();
#pragma omp parallel for if (count > 256)
  for (int64_t q = 0; q < count; ++q) {
    const int64_t j = positions[q], a = j / f.c, b = j % f.c;
    TiesAccum acc;
    for (int64_t r = 0; r < n; ++r) {
      const FactorTask& t = f.tasks[r];
      const float v = factor_entry(t, f.c, a, b);
      ties_add(acc, d.enabled ? dare_element(v, t.dare_key, d.elem_offset + j, d) : v, ranges[r]);
    }
    out[j] = ties_mean(acc, majority, lam);
  }
}

bool factored_weighted_sum(const TaskFactors& f, const DareSpec& d, const std::vector<float>& weights, float* out) {
  check(f);
  const Tiling tiling(f);
  const int64_t tiles = tiling.count();
  const QPanels panels(f, QPanels::Kept);
  const std::vector<char> check = tasks_to_check(f);
  const int64_t n = f.n();
  bool finite = true;
#pragma omp parallel if (tiles > 4) reduction(&& : finite)
  {
    Scratch s;
    std::vector<float> acc_storage(kFactoredTile);
    float* acc = acc_storage.data();
    TileRowsOfP p_rows(f, tiling.rows);
#pragma omp for schedule(dynamic, kBandStrips)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const Tile tl = tiling.at(tile);
      const int64_t len = tl.len();
      prefetch_output(out, f.c, tl);
      p_rows.enter(tl);
      std::fill(acc, acc + len, 0.0f);
      for (int64_t r = 0; r < n; ++r) {
        finite = task_tile(f.tasks[r], p_rows.of(r, tl), panels.of(r), d, f.c, tl, check[size_t(r)], s.v) && finite;
        const float w = weights[r];
        for (int64_t t = 0; t < len; ++t) acc[t] = weighted_add(acc[t], w, s.v[t]);
      }
      for (int64_t i = 0; i < tl.ta; ++i)
        std::copy(acc + i * tl.ldv, acc + i * tl.ldv + tl.tb, out + (tl.a0 + i) * f.c + tl.b0);
    }
  }
  return finite;
}

}  // namespace kx::cpu::KX_CPU_PATH
