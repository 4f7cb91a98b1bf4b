// Host entry points of the merge kernels. Arrays arrive as plain views (pointers, length,
// stride, dtype): no Python and no libtorch here. cpu:: runs on host memory with OpenMP;
// cuda:: on device memory, on the caller's stream.
#pragma once
#include <cstdint>
#include <vector>

#include "common/dare_math.h"
#include "common/magnitude_select.h"

namespace kx {

// n tasks' versions of one array of P elements: row r starts at rows[r], its elements are
// `stride` elements apart. dare_keys[r] is row r's Philox key (used when DARE is on).
struct TaskRows {
  std::vector<const void*> rows;
  std::vector<PhiloxKey> dare_keys;
  int64_t P = 0;
  int64_t stride = 1;
  DType dtype = DType::f32;
  int device = -1;       // CUDA device ordinal of the rows (cuda:: only)
  uintptr_t stream = 0;  // CUDA stream handle (cuda:: only); 0 is the default stream
  int64_t n() const { return int64_t(rows.size()); }
};

// What a TIES pass leaves for the caller: the sum of elected signs (for the majority sign)
// and the positions whose trimmed sum was exactly 0 (written as 0, to be fixed once the
// majority sign is known — possibly after other arrays of the same tasks).
struct TiesPending {
  int64_t sign_sum = 0;
  std::vector<int64_t> zero_sum_positions;
};

namespace cpu {
int num_threads();
void set_num_threads(int n);
// Adds row r's magnitudes to task task_of_row[r]'s histogram of sel's current round.
void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel);
// TIES with exact thresholds (one per row): writes out (P elements, x's dtype).
void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending);
// Rewrites the listed positions with the elected sign `majority` (+1, -1 or 0).
void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds,
                       float lam, int majority, const std::vector<int64_t>& positions, void* out);
// The whole in-memory TIES merge of one array, thresholds per row; returns them.
std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out);
// out = sum_r weights[r] * dare(row r). Returns false if the input had NaN or Inf.
bool weighted_sum(const TaskRows& x, const DareSpec& d, const std::vector<float>& weights, void* out);
}  // namespace cpu

namespace cuda {
bool compiled();
int device_count();  // 0 when not compiled or no driver/device
void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel);
void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending);
void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds,
                       float lam, int majority, const std::vector<int64_t>& positions, void* out);
std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out);
bool weighted_sum(const TaskRows& x, const DareSpec& d, const std::vector<float>& weights, void* out);
}  // namespace cuda

}  // namespace kx
