// pybind11 bindings of the torch-free CPU kernels. Pointers cross the boundary as integers
// (tensor.data_ptr()); the Python side (hybrid_kernels/backends/cpu.py) owns validation and the
// lifetime of every buffer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "bindings/params_bindings.h"
#include "cpu/attention_cpu.h"
#include "cpu/int8/key_mean.h"
#include "cpu/scratch_cache.h"

namespace py = pybind11;

namespace {

// Memory from the scratch cache behind a Python buffer (torch.frombuffer views it as an output
// tensor); it goes back to the cache when the last view of it dies, so the next call's output
// lands on pages that are already mapped instead of fresh ones the OS must fault in and zero.
struct CachedBuffer {
  void* p;
  size_t bytes;
  explicit CachedBuffer(size_t n) : p(hk::cpu::scratch_alloc(n)), bytes(n) {}
  ~CachedBuffer() { hk::cpu::scratch_free(p, bytes); }
  CachedBuffer(const CachedBuffer&) = delete;
  CachedBuffer& operator=(const CachedBuffer&) = delete;
};

// The per-call entries of the plan replays (fast_path.py, Int8KVCache) as METH_FASTCALL functions:
// pybind11 matched their 4 / 14 arguments in ~0.35 us more, of a ~7 us one-token call.
// Positional arguments only.

// args[i] as an integer (a pointer or a stride); false with a Python error set.
bool int_arg(PyObject* const* args, int i, int64_t* out) {
  const long long x = PyLong_AsLongLong(args[i]);
  if (x == -1 && PyErr_Occurred()) return false;
  *out = x;
  return true;
}

// args = (params, N integers: pointers and strides), params of type P (params_bindings.h): false
// with a Python error set when they are not.
template <class P, int N>
bool parse_args(PyObject* const* args, Py_ssize_t nargs, const char* fn, const char* usage,
                const P** params, int64_t (&ints)[N]) {
  if (nargs != N + 1) {
    PyErr_Format(PyExc_TypeError, "%s takes %d positional arguments (%s), got %zd", fn, N + 1, usage, nargs);
    return false;
  }
  try {
    *params = py::cast<const P*>(py::handle(args[0]));
  } catch (const py::cast_error&) {
    PyErr_Format(PyExc_TypeError, "%s: params must be a %s, got %s", fn, py::type_id<P>().c_str(),
                 Py_TYPE(args[0])->tp_name);
    return false;
  }
  for (int i = 0; i < N; ++i)
    if (!int_arg(args, i + 1, &ints[i])) return false;
  return true;
}

// Runs kernel(p) without the GIL; a std::invalid_argument (the kernels' validation) becomes a
// ValueError, any other exception a RuntimeError, as pybind11 would map them.
template <class F>
PyObject* run_released(F&& kernel) {
  std::string error;
  bool invalid = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    kernel();
  } catch (const std::invalid_argument& e) {
    invalid = true;
    error = e.what();
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  Py_END_ALLOW_THREADS
  if (invalid || !error.empty()) {
    PyErr_SetString(invalid ? PyExc_ValueError : PyExc_RuntimeError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// The lse row a call writes: the caller's (lse != 0), else a per-thread scratch row (B, Hq, Nq)
// for a caller that does not want it.
float* lse_or_scratch(int64_t lse, const hk::AttnParams& p) {
  if (lse) return reinterpret_cast<float*>(lse);
  static thread_local std::vector<float> scratch;
  const size_t n = size_t(p.B * p.Hq * p.Nq);
  if (scratch.size() < n) scratch.resize(n);
  return scratch.data();
}

// attention_forward_ptrs_kv(params, q, k, v, o, lse, key_padding, nk, ks0, ks1, ks2, vs0, vs1,
// vs2): a params object prefilled once per plan, with only the data pointers, K/V's length and
// their strides (elements, dims 0-2) given per call (a plan serves a KV cache growing between
// calls). lse == 0: the caller does not want the lse; it goes to a per-thread scratch row instead.
// key_padding: the call's (B, Nk) mask as bytes (a contiguous bool tensor), 0: none.
PyObject* forward_ptrs_kv(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const hk::AttnParams* params;
  int64_t a[13];
  if (!parse_args(args, nargs, "attention_forward_ptrs_kv",
                  "params, q, k, v, o, lse, key_padding, nk, ks0, ks1, ks2, vs0, vs1, vs2", &params, a))
    return nullptr;
  hk::AttnParams p = *params;
  p.q = reinterpret_cast<const void*>(a[0]);
  p.k = reinterpret_cast<const void*>(a[1]);
  p.v = reinterpret_cast<const void*>(a[2]);
  p.o = reinterpret_cast<void*>(a[3]);
  if (a[5]) p.key_padding = reinterpret_cast<const uint8_t*>(a[5]);
  p.Nk = a[6];
  for (int d = 0; d < 3; ++d) {
    p.k_stride[d] = a[7 + d];
    p.v_stride[d] = a[10 + d];
  }
  const int64_t lse = a[4];
  return run_released([&] {
    p.lse = lse_or_scratch(lse, p);
    hk::cpu::attention_forward(p);
  });
}

// attention_forward_int8_ptrs(params, q, o, lse): Int8KVCache's per-call entry, params prefilled
// once per plan (the cache's k8, scales, mean and V included); only q, out and lse change
// (lse == 0: not wanted, as in attention_forward_ptrs_kv).
PyObject* forward_int8_ptrs(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const hk::AttnInt8Params* params;
  int64_t a[3];
  if (!parse_args(args, nargs, "attention_forward_int8_ptrs", "params, q, o, lse", &params, a)) return nullptr;
  hk::AttnInt8Params p = *params;
  p.fwd.q = reinterpret_cast<const void*>(a[0]);
  p.fwd.o = reinterpret_cast<void*>(a[1]);
  return run_released([&] {
    p.fwd.lse = lse_or_scratch(a[2], p.fwd);
    hk::cpu::attention_forward_int8(p);
  });
}

PyMethodDef kFastcallDefs[] = {
    {"attention_forward_ptrs_kv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_ptrs_kv)),
     METH_FASTCALL, "One forward call from a prefilled AttnParams (fast_path.py's plan replay)"},
    {"attention_forward_int8_ptrs", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_int8_ptrs)),
     METH_FASTCALL, "One int8 forward call from a prefilled AttnInt8Params (Int8KVCache's plan replay)"},
};

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "hybrid_kernels CPU attention kernels (torch-free)";
  hk::bind_params(m);

  m.def("cpu_features", []() {
    auto f = hk::cpu::detect_cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512bf16"] = f.avx512bf16;
    d["avx512vnni"] = f.avx512vnni;
    d["amx_tile"] = f.amx_tile;
    d["amx_bf16"] = f.amx_bf16;
    d["amx_int8"] = f.amx_int8;
    return d;
  });
  m.def("selected_isa", &hk::cpu::selected_isa);
  m.def("scratch_cache_bytes", &hk::cpu::scratch_cache_bytes,
        "Bytes of packed-K/V scratch kept for reuse (HYBRID_KERNELS_CPU_CACHE_MB caps it)");
  m.def("scratch_cache_clear", &hk::cpu::scratch_cache_clear, "Frees the kept scratch buffers");
  m.def("scratch_cache_limit", &hk::cpu::scratch_cache_limit,
        "The cap on kept scratch bytes (HYBRID_KERNELS_CPU_CACHE_MB, default 1024 MiB)");
  m.attr("SCRATCH_MIN_CACHED_BYTES") = py::int_(hk::cpu::kMinCachedBytes);
  // attention_forward_int8 takes q8 == 0 with k8 given (quantizes q itself, bit for bit as
  // quant.quantize_qk, and adds scale * q . k_mean to the lse): Int8KVCache's decode step.
  m.attr("INT8_QUANTIZES_Q") = py::bool_(true);
  py::class_<CachedBuffer>(m, "CachedBuffer", py::buffer_protocol(),
                           "Writable bytes from the scratch cache, returned to it on release")
      .def(py::init<size_t>(), py::arg("nbytes"))
      .def("__len__", [](const CachedBuffer& b) { return b.bytes; })
      .def_buffer([](CachedBuffer& b) {
        return py::buffer_info(b.p, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(b.bytes)}, {py::ssize_t(1)});
      });
  // The kernels never touch Python objects: release the GIL while they run.
  m.def("attention_forward", &hk::cpu::attention_forward, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
  for (PyMethodDef& def : kFastcallDefs) {
    PyObject* fn = PyCFunction_NewEx(&def, nullptr, m.attr("__name__").ptr());
    if (!fn) throw py::error_already_set();
    m.add_object(def.ml_name, py::reinterpret_steal<py::object>(fn));
  }
  m.def("attention_backward", &hk::cpu::attention_backward, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_forward_int8", &hk::cpu::attention_forward_int8, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
  // quant.smoothing_mean on CPU tensors (see cpu/int8/key_mean.h).
  m.def(
      "key_mean",
      [](std::uintptr_t k, hk::DType dtype, int64_t B, int64_t H, int64_t N, int64_t D, int64_t s0,
         int64_t s1, int64_t s2, std::uintptr_t real, std::uintptr_t out, int num_threads) {
        const int64_t stride[3] = {s0, s1, s2};
        hk::cpu::key_mean(reinterpret_cast<const void*>(k), dtype, B, H, N, D, stride,
                          reinterpret_cast<const uint8_t*>(real), reinterpret_cast<float*>(out),
                          num_threads);
      },
      py::arg("k"), py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("N"), py::arg("D"),
      py::arg("s0"), py::arg("s1"), py::arg("s2"), py::arg("real"), py::arg("out"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
}
