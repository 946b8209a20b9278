// pybind11 bindings of the torch-free CPU kernels. Pointers cross the boundary as integers
// (tensor.data_ptr()); the Python side (hybrid_kernels/backends/cpu.py) owns validation and the
// lifetime of every buffer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
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
  // The per-call fast path of hybrid_kernels.api: a params object prefilled once per plan, with
  // only the data pointers, K/V's length and their strides (elements, dims 0-2) given per call
  // (one crossing instead of one per field; a plan serves a KV cache growing between calls).
  // lse == 0: the caller does not want the lse; it goes to a per-thread scratch row instead.
  // key_padding: the call's (B, Nk) mask as bytes (a contiguous bool tensor), 0: none.
  m.def(
      "attention_forward_ptrs_kv",
      [](const hk::AttnParams& params, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
         std::uintptr_t o, std::uintptr_t lse, std::uintptr_t key_padding, int64_t nk, int64_t ks0,
         int64_t ks1, int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2) {
        hk::AttnParams p = params;
        p.q = reinterpret_cast<const void*>(q);
        p.k = reinterpret_cast<const void*>(k);
        p.v = reinterpret_cast<const void*>(v);
        p.o = reinterpret_cast<void*>(o);
        p.Nk = nk;
        p.k_stride[0] = ks0;
        p.k_stride[1] = ks1;
        p.k_stride[2] = ks2;
        p.v_stride[0] = vs0;
        p.v_stride[1] = vs1;
        p.v_stride[2] = vs2;
        if (key_padding) p.key_padding = reinterpret_cast<const uint8_t*>(key_padding);
        if (lse) {
          p.lse = reinterpret_cast<float*>(lse);
        } else {
          static thread_local std::vector<float> scratch;
          const size_t n = size_t(p.B * p.Hq * p.Nq);
          if (scratch.size() < n) scratch.resize(n);
          p.lse = scratch.data();
        }
        hk::cpu::attention_forward(p);
      },
      py::arg("params"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("lse"),
      py::arg("key_padding"), py::arg("nk"), py::arg("ks0"), py::arg("ks1"), py::arg("ks2"),
      py::arg("vs0"), py::arg("vs1"), py::arg("vs2"), py::call_guard<py::gil_scoped_release>());
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
  // Int8KVCache's per-call fast path: params prefilled once per plan (the cache's k8, scales,
  // mean and V included); only q, out and lse change per call.
  m.def(
      "attention_forward_int8_ptrs",
      [](const hk::AttnInt8Params& params, std::uintptr_t q, std::uintptr_t o, std::uintptr_t lse) {
        hk::AttnInt8Params p = params;
        p.fwd.q = reinterpret_cast<const void*>(q);
        p.fwd.o = reinterpret_cast<void*>(o);
        p.fwd.lse = reinterpret_cast<float*>(lse);
        hk::cpu::attention_forward_int8(p);
      },
      py::arg("params"), py::arg("q"), py::arg("o"), py::arg("lse"),
      py::call_guard<py::gil_scoped_release>());
}
