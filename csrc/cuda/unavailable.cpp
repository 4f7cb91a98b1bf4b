// Built instead of the .cu files when CUDA is not compiled: every CUDA entry point says so.
#include <stdexcept>

#include "../kernels.h"

namespace kx::cuda {
namespace {
[[noreturn]] void unavailable() {
  throw std::runtime_error("knots_ext was built without CUDA (set KNOTS_EXT_CUDA=1 and reinstall with nvcc on PATH)");
}
}  // namespace

bool compiled() { return false; }
int device_count() { return 0; }
void magnitude_histogram(const TaskRows&, const DareSpec&, const std::vector<int64_t>&, MagnitudeSelect&) { unavailable(); }
void ties_apply(const TaskRows&, const DareSpec&, const std::vector<float>&, float, void*, TiesPending&) { unavailable(); }
void ties_fix_majority(const TaskRows&, const DareSpec&, const std::vector<float>&, float, int,
                       const std::vector<int64_t>&, void*) { unavailable(); }
std::vector<float> ties_merge(const TaskRows&, const DareSpec&, double, float, void*) { unavailable(); }
bool weighted_sum(const TaskRows&, const DareSpec&, const std::vector<float>&, void*) { unavailable(); }
void factored_histogram(const TaskFactors&, const DareSpec&, const std::vector<int64_t>&, MagnitudeSelect&) {
  unavailable();
}
void factored_ties_apply(const TaskFactors&, const DareSpec&, const std::vector<float>&, float, float*, TiesPending&) {
  unavailable();
}
void factored_ties_fix_majority(const TaskFactors&, const DareSpec&, const std::vector<float>&, float, int,
                                const std::vector<int64_t>&, float*) { unavailable(); }
bool factored_weighted_sum(const TaskFactors&, const DareSpec&, const std::vector<float>&, float*) { unavailable(); }
}  // namespace kx::cuda
