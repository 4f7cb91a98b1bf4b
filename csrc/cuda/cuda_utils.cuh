// Host and device plumbing shared by the CUDA kernels: error checks, the device guard,
// views of the caller's scratch memory, the upload of a TaskRows' row table, dtype dispatch, and
// the device-side row loader. The per-element math itself lives in csrc/common.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels.h"

namespace kx::cuda {

constexpr int kThreads = 256;             // threads per block of every kernel here
constexpr unsigned kFullWarp = 0xffffffffu;

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " (" + what + " at " + file +
                           ":" + std::to_string(line) + ")");
}

#define KX_CUDA_CHECK(expr)                                                                 \
  do {                                                                                      \
    const cudaError_t kx_err_ = (expr);                                                     \
    if (kx_err_ != cudaSuccess) ::kx::cuda::throw_cuda_error(kx_err_, #expr, __FILE__, __LINE__); \
  } while (0)

// After a <<<>>> launch: reports a bad configuration (the kernel's own faults surface at the
// next synchronising call).
#define KX_CUDA_CHECK_LAUNCH() KX_CUDA_CHECK(cudaGetLastError())

// Where a call's device work goes: the caller's stream and the caller's scratch memory
// (kernels.h Scratch: the kernels never allocate device memory themselves).
struct CallContext {
  cudaStream_t stream;
  Scratch* scratch;
};

inline CallContext context_of(uintptr_t stream, Scratch* scratch) {
  if (scratch == nullptr) throw std::invalid_argument("the CUDA kernels need device scratch memory from the caller");
  return CallContext{reinterpret_cast<cudaStream_t>(stream), scratch};
}
inline CallContext context_of(const TaskRows& x) { return context_of(x.stream, x.scratch); }
inline CallContext context_of(const TaskFactors& f) { return context_of(f.stream, f.scratch); }

// Makes `device` current for the scope and restores the caller's device on exit, so a call
// never leaves the thread on another device. device < 0 keeps the current one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (device < 0) return;
    int current = 0;
    KX_CUDA_CHECK(cudaGetDevice(&current));
    if (current != device) {
      KX_CUDA_CHECK(cudaSetDevice(device));
      previous_ = current;
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);  // no throwing from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// `count` elements of T in the caller's scratch memory: valid until the call returns, and for
// every kernel the call queues on its stream (the caller frees scratch in that stream's order).
// Contents are uninitialised. A view: nothing is freed here.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t count, const CallContext& ctx) : count_(count), stream_(ctx.stream) {
    if (count > 0) ptr_ = static_cast<T*>(ctx.scratch->allocate(count * sizeof(T)));
  }
  T* get() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  void zero() {
    if (count_ > 0) KX_CUDA_CHECK(cudaMemsetAsync(ptr_, 0, bytes(), stream_));
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Copies a host vector to new scratch on the call's stream. A pageable source is staged by the
// driver before cudaMemcpyAsync returns, so `host` may be freed right after.
template <class T>
DeviceBuffer<T> upload(const std::vector<T>& host, const CallContext& ctx) {
  DeviceBuffer<T> buf(host.size(), ctx);
  if (!host.empty())
    KX_CUDA_CHECK(cudaMemcpyAsync(buf.get(), host.data(), buf.bytes(), cudaMemcpyHostToDevice, ctx.stream));
  return buf;
}

// Copies a device buffer's first `count` elements back and waits for the stream (the results
// of every kernel launched before on it are then final).
template <class T>
std::vector<T> download(const T* device_ptr, size_t count, cudaStream_t stream) {
  std::vector<T> host(count);
  if (count > 0)
    KX_CUDA_CHECK(cudaMemcpyAsync(host.data(), device_ptr, count * sizeof(T), cudaMemcpyDeviceToHost, stream));
  KX_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host;
}

// What a kernel needs to read the task rows: passed by value as a kernel argument.
struct RowsView {
  const void* const* rows;  // device array of n row pointers
  const PhiloxKey* keys;    // device array of n DARE keys
  int64_t stride;
  DareSpec dare;
};

// The row table of a TaskRows on the device: pointers then keys, in one scratch buffer.
struct DeviceRows {
  DeviceBuffer<unsigned char> storage;
  RowsView view{};
};

// Checks the parts of a TaskRows that every kernel relies on.
inline void check_rows(const TaskRows& x, const DareSpec& d) {
  if (x.P < 0) throw std::invalid_argument("negative array length");
  if (x.stride < 1) throw std::invalid_argument("element stride must be >= 1");
  if (d.enabled && x.dare_keys.size() != x.rows.size())
    throw std::invalid_argument("DARE needs one Philox key per row");
  for (const void* p : x.rows)
    if (p == nullptr && x.P > 0) throw std::invalid_argument("null row pointer");
}

inline DeviceRows upload_rows(const TaskRows& x, const DareSpec& d, const CallContext& ctx) {
  const size_t n = x.rows.size();
  static_assert(sizeof(PhiloxKey) == 8 && alignof(PhiloxKey) <= alignof(void*), "row table layout");
  const size_t ptr_bytes = n * sizeof(void*);
  std::vector<unsigned char> host(ptr_bytes + n * sizeof(PhiloxKey), 0);
  if (n > 0) std::memcpy(host.data(), x.rows.data(), ptr_bytes);
  if (d.enabled && n > 0) std::memcpy(host.data() + ptr_bytes, x.dare_keys.data(), n * sizeof(PhiloxKey));
  DeviceRows out;
  out.storage = upload(host, ctx);
  unsigned char* base = out.storage.get();
  out.view.rows = reinterpret_cast<const void* const*>(base);
  out.view.keys = reinterpret_cast<const PhiloxKey*>(base == nullptr ? nullptr : base + ptr_bytes);
  out.view.stride = x.stride;
  out.view.dare = d;
  return out;
}

// Blocks of `threads` threads that `items` work items need, one item per thread.
inline int64_t blocks_for(int64_t items, int threads = kThreads) { return (items + threads - 1) / threads; }

// Blocks for a grid-stride loop that could use `wanted` blocks: at most as many as the device
// keeps resident at once for this kernel (the occupancy API: its registers and shared memory
// decide the blocks per SM), shared among `share` launches side by side (grid.y); at least 1.
template <class Kernel>
unsigned grid_blocks(Kernel kernel, int64_t wanted, int64_t share = 1, size_t dynamic_smem = 0,
                     int threads = kThreads) {
  int device = 0, sms = 0, per_sm = 0;
  KX_CUDA_CHECK(cudaGetDevice(&device));
  KX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  KX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, dynamic_smem));
  // per_sm == 0: the kernel cannot run with these resources; the launch reports it.
  const int64_t fill = std::max<int64_t>(1, int64_t(std::max(per_sm, 1)) * sms / std::max<int64_t>(share, 1));
  return unsigned(std::max<int64_t>(1, std::min(wanted, fill)));
}

// Calls f(T{}) with T the storage type of `dtype` (float, half_t or bf16_t).
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(float{}); return;
    case DType::f16: f(half_t{}); return;
    case DType::bf16: f(bf16_t{}); return;
  }
  throw std::invalid_argument("unsupported dtype");
}

// Grid-stride loop bounds, in 64 bits (P may exceed 2^31).
__device__ __forceinline__ int64_t global_thread() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_threads() { return int64_t(gridDim.x) * blockDim.x; }

// The row kernels' unit of work: a group of 4 consecutive positions sharing one Philox block
// (DESIGN.md §1: counter = module element / 4, word = module element % 4), so DARE costs one
// Philox call per 4 elements. Group k covers positions first(k) .. first(k) + 3, clipped to
// [0, P): with DARE on, group 0 starts `lead` = elem_offset % 4 positions before the array, so
// that every group is one Philox block.
struct Groups {
  int64_t P;
  int64_t lead;       // 0 .. 3
  uint64_t counter0;  // group 0's Philox counter
  int64_t count;
  __device__ __forceinline__ int64_t first(int64_t k) const { return 4 * k - lead; }
  __device__ __forceinline__ bool inside(int64_t j) const { return j >= 0 && j < P; }
};

inline Groups groups_of(int64_t P, const DareSpec& d) {
  // Unsigned like dare_element (elem_offset + j as uint64): the same counter for any offset.
  const uint64_t offset = uint64_t(d.elem_offset);
  Groups g;
  g.P = P;
  g.lead = d.enabled ? int64_t(offset & 3u) : 0;
  g.counter0 = offset >> 2;
  g.count = P > 0 ? (g.lead + P + 3) / 4 : 0;
  return g;
}

// Four consecutive stored values from a pointer aligned to their size, in one vector load
// (16 bytes of float32, 8 bytes of float16 / bfloat16), as float.
__device__ __forceinline__ void load4_as_float(const float* p, float (&raw)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  raw[0] = q.x;
  raw[1] = q.y;
  raw[2] = q.z;
  raw[3] = q.w;
}
template <class T>  // half_t or bf16_t: 16-bit storage, little-endian halves of two words
__device__ __forceinline__ void load4_as_float(const T* p, float (&raw)[4]) {
  static_assert(sizeof(T) == 2, "16-bit storage");
  const uint2 q = *reinterpret_cast<const uint2*>(p);
  raw[0] = to_float(T{uint16_t(q.x & 0xffffu)});
  raw[1] = to_float(T{uint16_t(q.x >> 16)});
  raw[2] = to_float(T{uint16_t(q.y & 0xffffu)});
  raw[3] = to_float(T{uint16_t(q.y >> 16)});
}

// Row r's values at group k's positions as float, DARE applied (one Philox block); 0 outside
// [0, P). `nonfinite` collects whether a stored value (before DARE, as on the CPU) was NaN or Inf.
// A whole group of a contiguous row is one vector load where it is aligned (for a given row,
// every group is or none is, but the first and last, which may be cut).
template <class T>
__device__ __forceinline__ void load_group(const RowsView& v, int64_t r, const Groups& g, int64_t k, float (&x)[4],
                                           uint32_t& nonfinite) {
  const T* row = static_cast<const T*>(v.rows[r]);
  const int64_t j0 = g.first(k);
  float raw[4];
  if (v.stride == 1 && j0 >= 0 && j0 + 4 <= g.P && reinterpret_cast<uintptr_t>(row + j0) % (4 * sizeof(T)) == 0) {
    load4_as_float(row + j0, raw);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) raw[i] = g.inside(j0 + i) ? to_float(row[(j0 + i) * v.stride]) : 0.0f;
  }
  Philox4 w{};
  if (v.dare.enabled) w = dare_words(v.keys[r], g.counter0 + uint64_t(k));
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // i is a constant after unrolling: raw and w stay in registers
    float value = raw[i];  // +0 outside [0, P): finite, and +0 after DARE too
    nonfinite |= uint32_t(magnitude_key(value) >= kNonFiniteKey);
    if (v.dare.enabled) value = dare_apply(value, w.w[i], v.dare);
    x[i] = value;
  }
}

// The row kernels read kRowBatch rows' groups before adding them, so that many loads are in
// flight per thread.
constexpr int kRowBatch = 8;

// Calls add(r, x) for the rows r = 0 .. n-1 in order, x being row r's values at group k
// (load_group), the loads of kRowBatch rows issued before their adds.
template <class T, class Add>
__device__ __forceinline__ void for_each_row_group(const RowsView& v, int64_t n, const Groups& g, int64_t k,
                                                   uint32_t& nonfinite, Add&& add) {
  for (int64_t r0 = 0; r0 < n; r0 += kRowBatch) {
    float x[kRowBatch][4];
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b)
      if (r0 + b < n) load_group<T>(v, r0 + b, g, k, x[b], nonfinite);
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b)
      if (r0 + b < n) add(r0 + b, x[b]);
  }
}

// Element j of row r as float, DARE applied, on its own (scattered positions).
template <class T>
__device__ __forceinline__ float load_row_value(const RowsView& v, int64_t r, int64_t j) {
  const T* row = static_cast<const T*>(v.rows[r]);
  const float x = to_float(row[j * v.stride]);
  return v.dare.enabled ? dare_element(x, v.keys[r], v.dare.elem_offset + j, v.dare) : x;
}

// Sets *flag when any lane of the warp saw a non-finite value; every lane must call it.
__device__ __forceinline__ void warp_flag_nonfinite(uint32_t nonfinite, uint32_t* flag) {
  if (__any_sync(kFullWarp, nonfinite != 0) && (threadIdx.x & 31) == 0) atomicOr(flag, 1u);
}

}  // namespace kx::cuda
