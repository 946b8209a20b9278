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

// Q rows rows_i[0..rows) of (b, head h) -> qu8 rows (q8 + 128, row stride Dp, padded dims 128,
// the operand layout of Kernels::qk); q_scale[r] = the scale of row r's block of q_block rows
// (its absmax taken over the whole block). With mean (D floats of the kv head's K mean),
// lse_shift[r] = scale * q_r . mean. buf: D floats of scratch.
void quantize_q_rows(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h,
                     const int64_t* rows_i, int rows, int64_t q_block, const float* mean,
                     int64_t Dp, uint8_t* qu8, float* q_scale, float* lse_shift, float* buf);

}  // namespace int8
}  // namespace cpu
}  // namespace hk
