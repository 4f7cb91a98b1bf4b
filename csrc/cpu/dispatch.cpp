// Chooses which CPU path runs the kernels (csrc/cpu/path.h): the best one this CPU supports,
// unless KNOTS_EXT_CPU_PATH or set_path() asks for another. All paths round identically
// (common/rounding.h), so the choice changes speed, never a result. Compiled once, for the
// baseline.
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#if defined(__GLIBC__)
#include <malloc.h>  // malloc_trim
#endif

#include "../kernels.h"

namespace kx::cpu::baseline {
#include "../kernel_api.h"
}  // namespace kx::cpu::baseline
#if defined(KX_CPU_HAS_AVX2_PATH)
namespace kx::cpu::avx2 {
#include "../kernel_api.h"
}  // namespace kx::cpu::avx2
namespace kx::cpu::avx512 {
#include "../kernel_api.h"
}  // namespace kx::cpu::avx512
#endif

namespace kx::cpu {
namespace {

struct Path {
  const char* name;
  bool (*supported)();
  decltype(&baseline::magnitude_histogram) magnitude_histogram;
  decltype(&baseline::ties_apply) ties_apply;
  decltype(&baseline::ties_fix_majority) ties_fix_majority;
  decltype(&baseline::ties_merge) ties_merge;
  decltype(&baseline::weighted_sum) weighted_sum;
  decltype(&baseline::factored_histogram) factored_histogram;
  decltype(&baseline::factored_ties_apply) factored_ties_apply;
  decltype(&baseline::factored_ties_fix_majority) factored_ties_fix_majority;
  decltype(&baseline::factored_weighted_sum) factored_weighted_sum;
};

#define KX_PATH(ns, supported)                                                                                \
  Path {                                                                                                      \
    #ns, supported, &ns::magnitude_histogram, &ns::ties_apply, &ns::ties_fix_majority, &ns::ties_merge,       \
        &ns::weighted_sum, &ns::factored_histogram, &ns::factored_ties_apply, &ns::factored_ties_fix_majority, \
        &ns::factored_weighted_sum                                                                            \
  }

bool always() { return true; }
#if defined(KX_CPU_HAS_AVX2_PATH)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
         __builtin_cpu_supports("bmi2");
}
// The subsets path.h turns on (those of every AVX-512 CPU since Skylake-SP).
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
}
#endif

// Best last.
const Path kPaths[] = {
    KX_PATH(baseline, always),
#if defined(KX_CPU_HAS_AVX2_PATH)
    KX_PATH(avx2, cpu_has_avx2),
    KX_PATH(avx512, cpu_has_avx512),
#endif
};
constexpr int kPathCount = int(sizeof(kPaths) / sizeof(kPaths[0]));

int find(const std::string& name) {
  for (int i = 0; i < kPathCount; ++i)
    if (name == kPaths[i].name && kPaths[i].supported()) return i;
  std::string known;
  for (const std::string& p : paths()) known += (known.empty() ? "" : ", ") + p;
  throw std::invalid_argument("CPU path '" + name + "' is not available here (available: " + known + ")");
}

int initial() {
  const char* env = std::getenv("KNOTS_EXT_CPU_PATH");
  if (env != nullptr && *env != '\0') return find(env);
  int best = 0;
  for (int i = 0; i < kPathCount; ++i)
    if (kPaths[i].supported()) best = i;
  return best;
}

std::atomic<int>& selected() {
  static std::atomic<int> index{initial()};
  return index;
}

const Path& active() { return kPaths[selected().load(std::memory_order_relaxed)]; }

}  // namespace

int num_threads() { return omp_get_max_threads(); }
void set_num_threads(int n) { omp_set_num_threads(n < 1 ? 1 : n); }

std::vector<std::string> paths() {
  std::vector<std::string> names;
  for (const Path& p : kPaths)
    if (p.supported()) names.push_back(p.name);
  return names;
}
std::string path() { return active().name; }
void set_path(const std::string& name) { selected().store(find(name)); }
std::string arch() { return KX_CPU_ARCH_NAME; }

namespace {
template <class T, bool kWrite>
int widen(const T* src, int64_t n, float* dst) {
  // By the magnitude key (ties_math.h): Inf or NaN from kNonFiniteKey up, 0 for +-0. Branch-free,
  // so it vectorises.
  uint32_t nonfinite = 0, zero = 0;
#pragma omp parallel for if (n >= (int64_t(1) << 22)) reduction(| : nonfinite, zero) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_float(src[i]);
    if constexpr (kWrite) dst[i] = v;
    const uint32_t mag = magnitude_key(v);
    nonfinite |= uint32_t(mag >= kNonFiniteKey);
    zero |= uint32_t(mag == 0u);
  }
  return (nonfinite ? kSawNonFinite : 0) | (zero ? kSawZero : 0);
}

template <class T>
int widen_to(const void* src, int64_t n, float* dst) {
  const T* s = static_cast<const T*>(src);
  return dst != nullptr ? widen<T, true>(s, n, dst) : widen<T, false>(s, n, nullptr);
}
}  // namespace

int widen_f32(const void* src, int64_t n, DType dtype, float* dst) {
  if (n < 0) throw std::invalid_argument("negative length");
  if (n > 0 && src == nullptr) throw std::invalid_argument("null source pointer");
  switch (dtype) {
    case DType::f32: return widen_to<float>(src, n, dst);
    case DType::f16: return widen_to<half_t>(src, n, dst);
    case DType::bf16: return widen_to<bf16_t>(src, n, dst);
  }
  throw std::invalid_argument("unknown dtype");
}

namespace {
thread_local FloatBuffer kept;
}  // namespace

float* kept_floats(size_t count) { return kept.reserve(count); }
void release_kept_floats() { kept.release(); }

bool release_free_heap() {
#if defined(__GLIBC__)
  return malloc_trim(0) != 0;
#else
  return false;
#endif
}

void magnitude_histogram(const TaskRows& x, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                         MagnitudeSelect& sel) {
  active().magnitude_histogram(x, d, task_of_row, sel);
}
void ties_apply(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                void* out, TiesPending& pending) {
  active().ties_apply(x, d, thresholds, lam, out, pending);
}
void ties_fix_majority(const TaskRows& x, const DareSpec& d, const std::vector<float>& thresholds,
                       float lam, int majority, const std::vector<int64_t>& positions, void* out) {
  active().ties_fix_majority(x, d, thresholds, lam, majority, positions, out);
}
std::vector<float> ties_merge(const TaskRows& x, const DareSpec& d, double top_k, float lam, void* out) {
  return active().ties_merge(x, d, top_k, lam, out);
}
bool weighted_sum(const TaskRows& x, const DareSpec& d, const std::vector<float>& weights, void* out) {
  return active().weighted_sum(x, d, weights, out);
}

void factored_histogram(const TaskFactors& f, const DareSpec& d, const std::vector<int64_t>& task_of_row,
                        MagnitudeSelect& sel) {
  active().factored_histogram(f, d, task_of_row, sel);
}
void factored_ties_apply(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds, float lam,
                         float* out, TiesPending& pending) {
  active().factored_ties_apply(f, d, thresholds, lam, out, pending);
}
void factored_ties_fix_majority(const TaskFactors& f, const DareSpec& d, const std::vector<float>& thresholds,
                                float lam, int majority, const std::vector<int64_t>& positions, float* out) {
  active().factored_ties_fix_majority(f, d, thresholds, lam, majority, positions, out);
}
bool factored_weighted_sum(const TaskFactors& f, const DareSpec& d, const std::vector<float>& weights, float* out) {
  return active().factored_weighted_sum(f, d, weights, out);
}

}  // namespace kx::cpu
