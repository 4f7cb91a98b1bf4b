// Magnitude histograms for the radix-select threshold (see common/magnitude_select.h).
#include <stdexcept>
#include <vector>

#include "tile.h"
#include "path.h"  // last (but for the path's own helpers)
#include "dare_run.h"

namespace kx::cpu::KX_CPU_PATH {

void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel) {
  if (x.P >= (int64_t(1) << 32)) throw std::invalid_argument("arrays over 2^32 elements are not supported");
  const int round = sel.round();
  const int64_t bins = sel.bins();
  const int64_t tiles = (x.P + kTile - 1) / kTile;
  for (int64_t r = 0; r < x.n(); ++r) {
    const int64_t task = task_of_row[r];
    const uint32_t prefix = sel.prefix(task);
    if (round == 1 && prefix == MagnitudeSelect::kNoPrefix) continue;
    uint64_t* hist = sel.hist(task);
    uint32_t low_bits = 0;
    bool finite = true;
#pragma omp parallel if (x.P > 4 * kTile) reduction(| : low_bits) reduction(&& : finite)
    {
      // Per-thread counts, added once at the end: no atomics in the hot loop.
      std::vector<uint32_t> local(size_t(bins), 0);
      float buf[kTile];
#pragma omp for schedule(static)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t j0 = tile * kTile, len = std::min(kTile, x.P - j0);
        finite = load_tile(x, r, d, j0, len, buf) && finite;
        if (round == 0) {
          for (int64_t t = 0; t < len; ++t) {
            uint32_t key = magnitude_key(buf[t]);
            ++local[key >> kRound0Shift];
            low_bits |= key & kLowMask;
          }
        } else {
          for (int64_t t = 0; t < len; ++t) {
            uint32_t key = magnitude_key(buf[t]);
            if ((key >> kRound0Shift) == prefix) ++local[key & kLowMask];
          }
        }
      }
#pragma omp critical
      for (int64_t b = 0; b < bins; ++b) hist[b] += local[b];
    }
    if (!finite) sel.flag_nonfinite();
    sel.add_low_bits(task, low_bits);
  }
}

}  // namespace kx::cpu::KX_CPU_PATH
