// pybind11 bindings of the torch-free CUDA kernels. Streams and pointers cross as integers
// (torch.cuda.current_stream().cuda_stream, tensor.data_ptr()); hybrid_kernels/backends/cuda.py
// owns validation, workspace allocation and buffer lifetimes. Imported lazily: a CPU-only
// install never loads this module.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings/params_bindings.h"
#include "cuda/attention_cuda.h"

namespace py = pybind11;

namespace {
cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "hybrid_kernels CUDA attention kernels (torch-free)";
  hk::bind_params(m);

  py::class_<hk::cuda::Int8SplitParams>(m, "Int8SplitParams", py::module_local())
      .def(py::init<>())
      .def_readwrite("attn", &hk::cuda::Int8SplitParams::attn)
      .def_readwrite("num_splits", &hk::cuda::Int8SplitParams::num_splits)
      .HK_PTR_PROP(hk::cuda::Int8SplitParams, partial_o, float*)
      .HK_PTR_PROP(hk::cuda::Int8SplitParams, partial_ml, float*);

  m.def("device_count", []() {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
  });
  m.def("int8_rows_per_cta", &hk::cuda::int8_rows_per_cta, py::arg("nq"));
  m.def(
      "attention_forward",
      [](const hk::AttnParams& p, std::uintptr_t stream) { hk::cuda::attention_forward(p, as_stream(stream)); },
      py::arg("params"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "attention_forward_int8",
      [](const hk::cuda::Int8SplitParams& p, std::uintptr_t stream) {
        hk::cuda::attention_forward_int8(p, as_stream(stream));
      },
      py::arg("params"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
