// Fused per-block INT8 quantization of Q and K for the CPU INT8 forward (AttnInt8Params with
// q8 == nullptr): the same math as quant.quantize_qk, bit for bit, on the row kernels of the
// selected ISA (Kernels::absmax / Kernels::quantize). Baseline-ISA code only.
#pragma once
#include <cstdint>

#include "common/attn_params.h"
#include "cpu/int8_kernels.h"

namespace hk {
namespace cpu {
namespace int8 {

// K of (b, kv head hk) -> k8 (Nk, D) int8 and k_scale (ceil(Nk / k_block)): smoothed by mean
// (D floats, nullptr: none); padded keys (f.key_padding) become zero rows and are left out of the
// block absmax.
void quantize_k_head(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                     const float* mean, int64_t k_block, int8_t* k8, float* k_scale);

// Q rows [i0, i1) of (b, head h) as one block -> q8 rows (D each, contiguous) and *q_scale.
// With mean (D floats of the kv head's K mean), lse_shift[i - i0] = scale * q_i . mean.
void quantize_q_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h, int64_t i0,
                      int64_t i1, const float* mean, int8_t* q8, float* q_scale,
                      float* lse_shift);

}  // namespace int8
}  // namespace cpu
}  // namespace hk
