// pybind11 bindings of the torch-free CPU kernels. Pointers cross the boundary as integers
// (tensor.data_ptr()); the Python side (hybrid_kernels/backends/cpu.py) owns validation and the
// lifetime of every buffer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "cpu/attention_cpu.h"

namespace py = pybind11;
using hk::AttnBwdParams;
using hk::AttnInt8Params;
using hk::AttnParams;

#define HK_PTR_PROP(cls, field, type)                                                   \
  def_property(                                                                         \
      #field, [](const cls& s) { return reinterpret_cast<std::uintptr_t>(s.field); },   \
      [](cls& s, std::uintptr_t v) { s.field = reinterpret_cast<type>(v); })

#define HK_STRIDE_PROP(cls, field)                                                      \
  def_property(                                                                         \
      #field,                                                                           \
      [](const cls& s) { return std::array<int64_t, 3>{s.field[0], s.field[1], s.field[2]}; }, \
      [](cls& s, std::array<int64_t, 3> v) { for (int i = 0; i < 3; ++i) s.field[i] = v[i]; })

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "hybrid_kernels CPU attention kernels (torch-free)";

  py::enum_<hk::DType>(m, "DType")
      .value("F32", hk::DType::F32)
      .value("BF16", hk::DType::BF16)
      .value("F16", hk::DType::F16);

  py::class_<AttnParams>(m, "AttnParams")
      .def(py::init<>())
      .def_readwrite("B", &AttnParams::B)
      .def_readwrite("Hq", &AttnParams::Hq)
      .def_readwrite("Hk", &AttnParams::Hk)
      .def_readwrite("Nq", &AttnParams::Nq)
      .def_readwrite("Nk", &AttnParams::Nk)
      .def_readwrite("D", &AttnParams::D)
      .def_readwrite("Dv", &AttnParams::Dv)
      .HK_STRIDE_PROP(AttnParams, q_stride)
      .HK_STRIDE_PROP(AttnParams, k_stride)
      .HK_STRIDE_PROP(AttnParams, v_stride)
      .HK_STRIDE_PROP(AttnParams, o_stride)
      .HK_PTR_PROP(AttnParams, q, const void*)
      .HK_PTR_PROP(AttnParams, k, const void*)
      .HK_PTR_PROP(AttnParams, v, const void*)
      .HK_PTR_PROP(AttnParams, o, void*)
      .HK_PTR_PROP(AttnParams, lse, float*)
      .def_readwrite("dtype", &AttnParams::dtype)
      .def_readwrite("scale", &AttnParams::scale)
      .def_readwrite("window_left", &AttnParams::window_left)
      .def_readwrite("window_right", &AttnParams::window_right)
      .def_readwrite("causal", &AttnParams::causal)
      .HK_PTR_PROP(AttnParams, landmarks, const int32_t*)
      .def_readwrite("num_landmarks", &AttnParams::num_landmarks)
      .def_readwrite("landmarks_batch_stride", &AttnParams::landmarks_batch_stride)
      .HK_PTR_PROP(AttnParams, landmark_flags, const uint8_t*)
      .def_readwrite("landmark_flags_batch_stride", &AttnParams::landmark_flags_batch_stride)
      .HK_PTR_PROP(AttnParams, key_padding, const uint8_t*)
      .def_readwrite("num_threads", &AttnParams::num_threads);

  py::class_<AttnBwdParams>(m, "AttnBwdParams")
      .def(py::init<>())
      .def_readwrite("fwd", &AttnBwdParams::fwd)
      .HK_PTR_PROP(AttnBwdParams, dout, const void*)
      .HK_STRIDE_PROP(AttnBwdParams, dout_stride)
      .HK_PTR_PROP(AttnBwdParams, dq, float*)
      .HK_PTR_PROP(AttnBwdParams, dk, float*)
      .HK_PTR_PROP(AttnBwdParams, dv, float*);

  py::class_<AttnInt8Params>(m, "AttnInt8Params")
      .def(py::init<>())
      .def_readwrite("fwd", &AttnInt8Params::fwd)
      .HK_PTR_PROP(AttnInt8Params, q8, const int8_t*)
      .HK_PTR_PROP(AttnInt8Params, k8, const int8_t*)
      .HK_PTR_PROP(AttnInt8Params, q_scale, const float*)
      .HK_PTR_PROP(AttnInt8Params, k_scale, const float*)
      .def_readwrite("q_block", &AttnInt8Params::q_block)
      .def_readwrite("k_block", &AttnInt8Params::k_block);

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
    return d;
  });
  m.def("selected_isa", &hk::cpu::selected_isa);
  // The kernels never touch Python objects: release the GIL while they run.
  m.def("attention_forward", &hk::cpu::attention_forward, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_backward", &hk::cpu::attention_backward, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_forward_int8", &hk::cpu::attention_forward_int8, py::arg("params"),
        py::call_guard<py::gil_scoped_release>());
}
