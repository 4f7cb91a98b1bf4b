// Task Arithmetic on the CPU: out = sum_r w_r * dare(row r). With one row and weight 1 this
// is the plain DARE op.
#include <algorithm>
#include <vector>

#include "tile.h"
#include "path.h"  // last (but for the path's own helpers)
#include "dare_run.h"

namespace kx::cpu::KX_CPU_PATH {

bool weighted_sum(const TaskRows& x, const DareSpec& d, const std::vector<float>& weights, void* out) {
  const int64_t tiles = (x.P + kTile - 1) / kTile;
  bool finite = true;
#pragma omp parallel if (x.P > 4 * kTile) reduction(&& : finite)
  {
    float buf[kTile], acc[kTile];
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t j0 = tile * kTile, len = std::min(kTile, x.P - j0);
      std::fill(acc, acc + len, 0.0f);
      for (int64_t r = 0; r < x.n(); ++r) {
        finite = load_tile(x, r, d, j0, len, buf) && finite;
        const float w = weights[r];
        for (int64_t t = 0; t < len; ++t) acc[t] = weighted_add(acc[t], w, buf[t]);
      }
      store_tile(acc, len, x.dtype, out, j0);
    }
  }
  return finite;
}

}  // namespace kx::cpu::KX_CPU_PATH
