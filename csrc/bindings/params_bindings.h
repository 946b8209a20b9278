// pybind11 bindings of the parameter structs (csrc/common/attn_params.h), shared by the CPU and
// CUDA modules. Classes are module_local so both modules can be imported side by side.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "common/attn_params.h"

namespace hk {
namespace py = pybind11;

#define HK_PTR_PROP(cls, field, type)                                                   \
  def_property(                                                                         \
      #field, [](const cls& s) { return reinterpret_cast<std::uintptr_t>(s.field); },   \
      [](cls& s, std::uintptr_t v) { s.field = reinterpret_cast<type>(v); })

#define HK_STRIDE_PROP(cls, field)                                                      \
  def_property(                                                                         \
      #field,                                                                           \
      [](const cls& s) { return std::array<int64_t, 3>{s.field[0], s.field[1], s.field[2]}; }, \
      [](cls& s, std::array<int64_t, 3> v) { for (int i = 0; i < 3; ++i) s.field[i] = v[i]; })

inline void bind_params(py::module_& m) {
  py::enum_<DType>(m, "DType", py::module_local())
      .value("F32", DType::F32)
      .value("BF16", DType::BF16)
      .value("F16", DType::F16);

  py::class_<AttnParams>(m, "AttnParams", py::module_local())
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
      .def_readwrite("num_threads", &AttnParams::num_threads)
      .def_readwrite("softcap", &AttnParams::softcap)
      .HK_PTR_PROP(AttnParams, bias, const float*);

  py::class_<AttnBwdParams>(m, "AttnBwdParams", py::module_local())
      .def(py::init<>())
      .def_readwrite("fwd", &AttnBwdParams::fwd)
      .HK_PTR_PROP(AttnBwdParams, dout, const void*)
      .HK_STRIDE_PROP(AttnBwdParams, dout_stride)
      .HK_PTR_PROP(AttnBwdParams, dq, float*)
      .HK_PTR_PROP(AttnBwdParams, dk, float*)
      .HK_PTR_PROP(AttnBwdParams, dv, float*)
      .def_readwrite("grad_dtype", &AttnBwdParams::grad_dtype)
      .HK_PTR_PROP(AttnBwdParams, dq_lp, uint16_t*)
      .HK_PTR_PROP(AttnBwdParams, dk_lp, uint16_t*)
      .HK_PTR_PROP(AttnBwdParams, dv_lp, uint16_t*)
      .HK_PTR_PROP(AttnBwdParams, dbias, float*);

  py::class_<AttnInt8Params>(m, "AttnInt8Params", py::module_local())
      .def(py::init<>())
      .def_readwrite("fwd", &AttnInt8Params::fwd)
      .HK_PTR_PROP(AttnInt8Params, q8, const int8_t*)
      .HK_PTR_PROP(AttnInt8Params, k8, const int8_t*)
      .HK_PTR_PROP(AttnInt8Params, q_scale, const float*)
      .HK_PTR_PROP(AttnInt8Params, k_scale, const float*)
      .def_readwrite("q_block", &AttnInt8Params::q_block)
      .def_readwrite("k_block", &AttnInt8Params::k_block)
      .HK_PTR_PROP(AttnInt8Params, k_mean, const float*);
}

}  // namespace hk
