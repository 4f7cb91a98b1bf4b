// Host entry points of the merge kernels. Arrays arrive as plain views (pointers, length,
// stride, dtype): no Python and no libtorch here. cpu:: runs on host memory with OpenMP;
// cuda:: on device memory, on the caller's stream.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/dare_math.h"
#include "common/factor_math.h"
#include "common/magnitude_select.h"

namespace kx {

// Device scratch memory for the CUDA kernels, given by the caller: the Python side allocates it
// with the input's library (torch's caching allocator, CuPy's pool) in the order of the call's
// stream, so it is reused only by work queued after the call's kernels (cuda:: never allocates
// device memory itself). allocate() returns memory on the call's device, valid until the call
// returns; it may throw (out of memory). cpu:: never uses it.
class Scratch {
 public:
  virtual ~Scratch() = default;
  virtual void* allocate(size_t bytes) = 0;
};

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
  Scratch* scratch = nullptr;  // device scratch (cuda:: only)
  int64_t n() const { return int64_t(rows.size()); }
};

// n tasks' rows of one array given as factors (common/factor_math.h): task i's row is the
// m x c matrix tasks[i].scale * tasks[i].P @ tasks[i].Q, element a * c + b; its DARE index is
// d.elem_offset + a * c + b. The factors are float32, row-major and contiguous, on the host
// (cpu::) or on `device` (cuda::). Outputs of the factored kernels are float32 m x c, row-major.
struct TaskFactors {
  std::vector<FactorTask> tasks;
  int64_t m = 0;
  int64_t c = 0;
  int device = -1;       // CUDA device ordinal of the factors (cuda:: only)
  uintptr_t stream = 0;  // CUDA stream handle (cuda:: only); 0 is the default stream
  Scratch* scratch = nullptr;  // device scratch (cuda:: only)
  int64_t n() const { return int64_t(tasks.size()); }
  int64_t numel() const { return m * c; }
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
// The kernels below run on the selected instruction-set path (cpu/dispatch.cpp): "baseline"
// (the build's -march) or "avx2" (AVX2, chosen at run time where the CPU has it).
std::vector<std::string> paths();  // the paths this build has and this CPU can run
std::string path();                // the one that runs
void set_path(const std::string& name);
std::string arch();                // the -march the baseline path was built for
// What widen_f32 saw, as bits.
constexpr int kSawNonFinite = 1, kSawZero = 2;
// Host arrays only: n contiguous elements of dtype at src, widened into dst as float32 (dst
// nullptr: only looked at). Returns kSawNonFinite | kSawZero for the values seen: one pass where
// torch takes three calls (convert, check finite, check for zeros), each waking its threads
// (LoRA factors are small: the wake-ups cost more than the work).
int widen_f32(const void* src, int64_t n, DType dtype, float* dst);
// A growable float buffer: reserve(count) gives at least `count` floats, 64-byte aligned,
// uninitialised, reusing the memory of an earlier reserve where it is large enough.
class FloatBuffer {
 public:
  float* reserve(size_t count) {
    constexpr size_t kAlign = 64 / sizeof(float);
    if (count + kAlign > capacity_) {
      data_.reset();  // (before the new one: both at once would be twice the memory)
      data_.reset(new float[count + kAlign]);
      capacity_ = count + kAlign;
    }
    const size_t misalign = reinterpret_cast<uintptr_t>(data_.get()) % 64 / sizeof(float);
    return data_.get() + (kAlign - misalign) % kAlign;
  }
  void release() {
    data_.reset();
    capacity_ = 0;
  }

 private:
  std::unique_ptr<float[]> data_;
  size_t capacity_ = 0;
};
// At least `count` floats, 64-byte aligned, uninitialised, kept by the calling thread from one
// call to the next (its contents not): the factored kernels' per-call copy of every task's Q,
// 262 MB for a 4096-wide module at n = 1000, was fresh pages every module (their faults a
// quarter of a ties merge's). release_kept_floats() frees the calling thread's (the merge
// driver does, when a merge ends).
float* kept_floats(size_t count);
void release_kept_floats();
// Returns the C heap's free memory to the system (glibc's malloc_trim; false elsewhere, or when
// nothing was returned): what the heap keeps free after a module's medium-sized arrays would
// otherwise sit under the next module's largest allocation.
bool release_free_heap();
#include "kernel_api.h"
}  // namespace cpu

namespace cuda {
bool compiled();
int device_count();  // 0 when not compiled or no driver/device
#include "kernel_api.h"
}  // namespace cuda

}  // namespace kx
