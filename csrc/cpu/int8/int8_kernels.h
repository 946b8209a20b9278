// The CPU INT8 forward's kernel sets, one per instruction set (quant="int8").
//
// Contract (every set; SageAttention's): Q and K quantized per block (hybrid_kernels/quant.py, bit
// for bit), INT8 QK^T with int32 accumulation, S = float(acc) * k_scale * q_scale * scale, fp32
// online softmax, PV with P and V rounded to bf16 (nearest even) and fp32 accumulation; the softmax
// sum l uses the unrounded fp32 P.
//
// A set holds the row kernels of the fused quantization (int8_quantize.h; bit-exact on every set)
// and its forward: the forward driver (fwd_driver.h) with an int8 core (fwd_core_int8.h, or
// fwd_core_int8_amx.h on AMX tiles). attention_forward_int8 (attention_int8.cpp, baseline flags)
// validates, routes decode calls, and calls the selected set's forward, so no ISA-specific code is
// reached without a cpuid check.
#pragma once
#include <cstdint>

#include "common/attn_params.h"

namespace hk {
namespace cpu {
namespace int8 {

struct Kernels {
  const char* name;
  // Fused quantization (bit-exact with quant.quantize_qk): max_i |x[i] - shift[i]|, and
  // out[i] = round_half_even((x[i] - shift[i]) * inv) saturated to int8; shift nullptr: 0.
  float (*absmax)(const float* x, const float* shift, int64_t n);
  void (*quantize)(const float* x, const float* shift, float inv, int64_t n, int8_t* out);
  // n bf16 (bf16 true) or fp16 values -> fp32 (exact).
  void (*widen)(const uint16_t* src, bool bf16, int64_t n, float* dst);
  // The forward of validated params with B, Nq > 0 (kern: this set).
  void (*forward)(const AttnInt8Params& p, const Kernels& kern);
};

const Kernels* kernels_scalar();
const Kernels* kernels_avx2();    // AVX2 + FMA + F16C
const Kernels* kernels_avx512();  // AVX-512 F/BW/VL + VNNI + BF16
const Kernels* kernels_amx();     // avx512 plus AMX tiles (int8 QK, bf16 PV)

}  // namespace int8
}  // namespace cpu
}  // namespace hk
