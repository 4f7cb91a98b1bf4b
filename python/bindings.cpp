// pybind11 layer: turns the views that knots_ext/_arrays.py extracts (pointers, length,
// stride, dtype code, device, stream) into kernel calls. No libtorch: one build serves any
// torch version, numpy and CuPy.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels.h"

namespace py = pybind11;
using namespace kx;

namespace {

// The CUDA kernels' scratch memory (kernels.h Scratch) from a Python callable: alloc(nbytes)
// returns the address of device memory that the Python side keeps alive until the kernel call
// returns and frees in the order of the call's stream (knots_ext/_arrays.py KernelStream).
class PyScratch final : public Scratch {
 public:
  // Made and destroyed with the GIL held (Input objects are owned by Python).
  explicit PyScratch(py::object alloc) : alloc_(std::move(alloc)) {}
  void* allocate(size_t bytes) override {
    std::string error;
    {
      py::gil_scoped_acquire gil;  // the kernels run with the GIL released
      try {
        return reinterpret_cast<void*>(alloc_(bytes).cast<uintptr_t>());
      } catch (py::error_already_set& e) {
        error = e.what();  // formatted with the GIL held; a C++ error carries it out
      }
    }
    throw std::runtime_error("device scratch allocation of " + std::to_string(bytes) + " bytes failed: " + error);
  }

 private:
  py::object alloc_;
};

std::shared_ptr<PyScratch> make_scratch(const py::object& alloc, int device) {
  if (alloc.is_none()) {
    if (device >= 0) throw std::invalid_argument("CUDA inputs need a scratch allocator");
    return nullptr;
  }
  return std::make_shared<PyScratch>(alloc);
}

// The rows of one kernel call plus DARE's settings for them.
struct Input {
  TaskRows rows;
  DareSpec dare;
  std::shared_ptr<PyScratch> scratch;  // CUDA only: rows.scratch points to it
  bool on_cuda() const { return rows.device >= 0; }
};

Input make_input(const std::vector<uintptr_t>& ptrs, int64_t P, int64_t stride, int dtype, int device,
                 uintptr_t stream, double dare_p, uint64_t seed, const std::vector<int64_t>& tasks,
                 uint64_t module_id, int64_t elem_offset, const py::object& scratch) {
  if (ptrs.empty()) throw std::invalid_argument("no input rows");
  if (tasks.size() != ptrs.size()) throw std::invalid_argument("one task index per row is needed");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("unsupported dtype code");
  if (!(dare_p >= 0.0 && dare_p < 1.0)) throw std::invalid_argument("dare_p must be in [0, 1)");
  Input in;
  for (size_t r = 0; r < ptrs.size(); ++r) {
    in.rows.rows.push_back(reinterpret_cast<const void*>(ptrs[r]));
    in.rows.dare_keys.push_back(dare_key(seed, uint64_t(tasks[r]), module_id));
  }
  in.rows.P = P;
  in.rows.stride = stride;
  in.rows.dtype = DType(dtype);
  in.rows.device = device;
  in.rows.stream = stream;
  in.scratch = make_scratch(scratch, device);
  in.rows.scratch = in.scratch.get();
  in.dare = make_dare_spec(dare_p, elem_offset);
  return in;
}

void* out_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }
float* out_f32(uintptr_t p) { return reinterpret_cast<float*>(p); }

// Task rows given as factors (kernels.h TaskFactors) plus DARE's settings for them.
struct FactorInput {
  TaskFactors f;
  DareSpec dare;
  std::shared_ptr<PyScratch> scratch;  // CUDA only: f.scratch points to it
  bool on_cuda() const { return f.device >= 0; }
};

FactorInput make_factor_input(const std::vector<uintptr_t>& P, const std::vector<uintptr_t>& Q,
                              const std::vector<int64_t>& ranks, const std::vector<float>& scales, int64_t m,
                              int64_t c, int device, uintptr_t stream, double dare_p, uint64_t seed,
                              const std::vector<int64_t>& tasks, uint64_t module_id, int64_t elem_offset,
                              const py::object& scratch) {
  const size_t n = P.size();
  if (n == 0) throw std::invalid_argument("no task factors");
  if (Q.size() != n || ranks.size() != n || scales.size() != n || tasks.size() != n)
    throw std::invalid_argument("one P, Q, rank, scale and task index per task is needed");
  if (m < 0 || c < 0) throw std::invalid_argument("negative row shape");
  if (!(dare_p >= 0.0 && dare_p < 1.0)) throw std::invalid_argument("dare_p must be in [0, 1)");
  FactorInput in;
  for (size_t i = 0; i < n; ++i) {
    if (ranks[i] < 0) throw std::invalid_argument("factor ranks must be >= 0");
    if (!std::isfinite(scales[i])) throw std::invalid_argument("factor scales must be finite float32 numbers");
    FactorTask t;
    t.P = reinterpret_cast<const float*>(P[i]);
    t.Q = reinterpret_cast<const float*>(Q[i]);
    if (ranks[i] > 0 && ((m > 0 && t.P == nullptr) || (c > 0 && t.Q == nullptr)))
      throw std::invalid_argument("null factor pointer");
    t.rank = ranks[i];
    t.scale = scales[i];
    t.dare_key = dare_key(seed, uint64_t(tasks[i]), module_id);
    in.f.tasks.push_back(t);
  }
  in.f.m = m;
  in.f.c = c;
  in.f.device = device;
  in.f.stream = stream;
  in.scratch = make_scratch(scratch, device);
  in.f.scratch = in.scratch.get();
  in.dare = make_dare_spec(dare_p, elem_offset);
  return in;
}

void check_per_task(size_t given, const FactorInput& in, const char* what) {
  if (given != in.f.tasks.size())
    throw std::invalid_argument(std::string("one ") + what + " per task is needed (" + std::to_string(given) +
                                " for " + std::to_string(in.f.tasks.size()) + " tasks)");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "knots_ext kernels (CPU/OpenMP and CUDA) over plain array views";

  py::class_<Input>(m, "Input")
      .def(py::init(&make_input), py::arg("ptrs"), py::arg("P"), py::arg("stride"), py::arg("dtype"),
           py::arg("device"), py::arg("stream"), py::arg("dare_p"), py::arg("seed"), py::arg("tasks"),
           py::arg("module_id"), py::arg("elem_offset"), py::arg("scratch") = py::none());

  cpu::path();  // reads KNOTS_EXT_CPU_PATH now: a bad value fails the import, not a later call

  m.def("build_info", [] {
    py::dict d;
    d["cpu"] = true;
    d["cpu_arch"] = cpu::arch();
    d["cpu_path"] = cpu::path();
    d["cpu_paths"] = cpu::paths();
    d["openmp_threads"] = cpu::num_threads();
    d["cuda_compiled"] = cuda::compiled();
    d["cuda_devices"] = cuda::device_count();
    return d;
  });
  m.def("set_num_threads", &cpu::set_num_threads);
  m.def("set_cpu_path", &cpu::set_path, py::arg("name"),
        "Runs the CPU kernels on this path (one of build_info()['cpu_paths']); results do not change");
  m.def("num_threads", &cpu::num_threads);
  m.def(
      "widen_f32",
      [](uintptr_t src, int64_t n, int dtype, uintptr_t dst) {
        if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0, 1 or 2");
        py::gil_scoped_release release;
        return cpu::widen_f32(reinterpret_cast<const void*>(src), n, DType(dtype), reinterpret_cast<float*>(dst));
      },
      py::arg("src"), py::arg("n"), py::arg("dtype"), py::arg("dst") = 0,
      "Host arrays: n contiguous elements (dtype code) at src into float32 at dst (0: not written); "
      "returns bit 1 if one was NaN or Inf, bit 2 if one was zero");
  m.def("release_kept_floats", &cpu::release_kept_floats,
        "Frees the calling thread's buffer that the CPU kernels keep from call to call (kernels.h kept_floats)");
  m.def("release_free_heap", &cpu::release_free_heap,
        "Returns the C heap's free memory to the system (malloc_trim on glibc); whether any was returned");
  m.attr("SAW_NONFINITE") = cpu::kSawNonFinite;
  m.attr("SAW_ZERO") = cpu::kSawZero;
  m.def("module_id", [](const std::string& name) { return fnv1a64(name.data(), name.size()); },
        "64-bit FNV-1a of a module name: the module part of DARE's stream");
  m.def("dare_key", [](uint64_t seed, uint64_t task, uint64_t module_id) {
    PhiloxKey k = dare_key(seed, task, module_id);
    return py::make_tuple(k.k0, k.k1);
  });
  m.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
    Philox4 out = philox4x32_10(Philox4{{ctr[0], ctr[1], ctr[2], ctr[3]}}, PhiloxKey{key[0], key[1]});
    return std::array<uint32_t, 4>{out.w[0], out.w[1], out.w[2], out.w[3]};
  });

  m.def("ties_merge", [](const Input& in, double top_k, float lam, uintptr_t out) {
    check_top_k(top_k);
    py::gil_scoped_release nogil;
    return in.on_cuda() ? cuda::ties_merge(in.rows, in.dare, top_k, lam, out_ptr(out))
                        : cpu::ties_merge(in.rows, in.dare, top_k, lam, out_ptr(out));
  });
  m.def("ties_apply", [](const Input& in, const std::vector<float>& thresholds, float lam, uintptr_t out) {
    if (thresholds.size() != in.rows.rows.size()) throw std::invalid_argument("one threshold per row is needed");
    TiesPending pending;
    {
      py::gil_scoped_release nogil;
      if (in.on_cuda()) cuda::ties_apply(in.rows, in.dare, thresholds, lam, out_ptr(out), pending);
      else cpu::ties_apply(in.rows, in.dare, thresholds, lam, out_ptr(out), pending);
    }
    return py::make_tuple(pending.sign_sum, pending.zero_sum_positions);
  });
  m.def("ties_fix_majority", [](const Input& in, const std::vector<float>& thresholds, float lam, int majority,
                                const std::vector<int64_t>& positions, uintptr_t out) {
    py::gil_scoped_release nogil;
    if (in.on_cuda()) cuda::ties_fix_majority(in.rows, in.dare, thresholds, lam, majority, positions, out_ptr(out));
    else cpu::ties_fix_majority(in.rows, in.dare, thresholds, lam, majority, positions, out_ptr(out));
  });
  m.def("weighted_sum", [](const Input& in, const std::vector<float>& weights, uintptr_t out) {
    if (weights.size() != in.rows.rows.size()) throw std::invalid_argument("one weight per row is needed");
    py::gil_scoped_release nogil;
    return in.on_cuda() ? cuda::weighted_sum(in.rows, in.dare, weights, out_ptr(out))
                        : cpu::weighted_sum(in.rows, in.dare, weights, out_ptr(out));
  });

  py::class_<FactorInput>(m, "FactorInput")
      .def(py::init(&make_factor_input), py::arg("P"), py::arg("Q"), py::arg("ranks"), py::arg("scales"),
           py::arg("m"), py::arg("c"), py::arg("device"), py::arg("stream"), py::arg("dare_p"), py::arg("seed"),
           py::arg("tasks"), py::arg("module_id"), py::arg("elem_offset"), py::arg("scratch") = py::none());

  m.def("factored_ties_apply", [](const FactorInput& in, const std::vector<float>& thresholds, float lam,
                                  uintptr_t out) {
    check_per_task(thresholds.size(), in, "threshold");
    TiesPending pending;
    {
      py::gil_scoped_release nogil;
      if (in.on_cuda()) cuda::factored_ties_apply(in.f, in.dare, thresholds, lam, out_f32(out), pending);
      else cpu::factored_ties_apply(in.f, in.dare, thresholds, lam, out_f32(out), pending);
    }
    return py::make_tuple(pending.sign_sum, pending.zero_sum_positions);
  });
  m.def("factored_ties_fix_majority", [](const FactorInput& in, const std::vector<float>& thresholds, float lam,
                                         int majority, const std::vector<int64_t>& positions, uintptr_t out) {
    check_per_task(thresholds.size(), in, "threshold");
    for (int64_t j : positions)
      if (j < 0 || j >= in.f.numel()) throw std::invalid_argument("position out of range");
    py::gil_scoped_release nogil;
    if (in.on_cuda()) cuda::factored_ties_fix_majority(in.f, in.dare, thresholds, lam, majority, positions, out_f32(out));
    else cpu::factored_ties_fix_majority(in.f, in.dare, thresholds, lam, majority, positions, out_f32(out));
  });
  m.def("factored_weighted_sum", [](const FactorInput& in, const std::vector<float>& weights, uintptr_t out) {
    check_per_task(weights.size(), in, "weight");
    py::gil_scoped_release nogil;
    return in.on_cuda() ? cuda::factored_weighted_sum(in.f, in.dare, weights, out_f32(out))
                        : cpu::factored_weighted_sum(in.f, in.dare, weights, out_f32(out));
  });

  py::class_<MagnitudeSelect>(m, "MagnitudeSelect")
      .def(py::init<int64_t, double, bool>(), py::arg("n_tasks"), py::arg("top_k"), py::arg("sampled") = false)
      .def_property_readonly("round", &MagnitudeSelect::round)
      .def_property_readonly("sampled", &MagnitudeSelect::sampled)
      .def_property_readonly("missed", &MagnitudeSelect::missed,
                             "Tasks whose sampled window missed the threshold (they took two more passes)")
      .def_property_readonly("done", &MagnitudeSelect::done)
      .def(
          "counted",
          [](const MagnitudeSelect& sel) {
            std::vector<int64_t> tasks;
            if (!sel.done())
              for (int64_t t = 0; t < sel.n_tasks(); ++t)
                if (sel.pass_of(t).what != Count::kNone) tasks.push_back(t);
            return tasks;
          },
          "The tasks whose entries the open round counts (the others' thresholds are settled)")
      .def("histogram", [](MagnitudeSelect& sel, const Input& in, const std::vector<int64_t>& task_of_row) {
        for (int64_t t : task_of_row)
          if (t < 0 || t >= sel.n_tasks()) throw std::invalid_argument("task index out of range");
        if (sel.done()) throw std::logic_error("the thresholds are final: no round is open");
        py::gil_scoped_release nogil;
        if (in.on_cuda()) cuda::magnitude_histogram(in.rows, in.dare, task_of_row, sel);
        else cpu::magnitude_histogram(in.rows, in.dare, task_of_row, sel);
      })
      .def("factored_histogram", [](MagnitudeSelect& sel, const FactorInput& in, const std::vector<int64_t>& task_of_row) {
        check_per_task(task_of_row.size(), in, "threshold slot");
        for (int64_t t : task_of_row)
          if (t < 0 || t >= sel.n_tasks()) throw std::invalid_argument("task index out of range");
        if (sel.done()) throw std::logic_error("the thresholds are final: no round is open");
        py::gil_scoped_release nogil;
        if (in.on_cuda()) cuda::factored_histogram(in.f, in.dare, task_of_row, sel);
        else cpu::factored_histogram(in.f, in.dare, task_of_row, sel);
      })
      .def_property_readonly("nonfinite", &MagnitudeSelect::nonfinite,
                             "Whether a value sent in this round was NaN or Inf (finish_round then raises)")
      .def("finish_round", &MagnitudeSelect::finish_round)
      .def("counting_copy", &MagnitudeSelect::counting_copy,
           "This selection's open pass with nothing counted yet (to count part of the entries elsewhere)")
      .def("add_counts", &MagnitudeSelect::add_counts, "Adds a counting copy's counts of the same pass")
      .def(py::pickle([](const MagnitudeSelect& sel) { return py::bytes(sel.serialize()); },
                      [](const py::bytes& state) { return MagnitudeSelect::deserialize(std::string(state)); }))
      .def("total", &MagnitudeSelect::total)
      .def("thresholds", [](const MagnitudeSelect& sel) {
        if (!sel.done()) throw std::logic_error("thresholds are not final yet: finish every round first");
        std::vector<float> t;
        for (int64_t i = 0; i < sel.n_tasks(); ++i) t.push_back(sel.threshold(i));
        return t;
      });
}
