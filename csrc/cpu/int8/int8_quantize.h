// Fused per-block INT8 quantization of Q and K for the CPU INT8 forward (AttnInt8Params with
// q8 == nullptr): the same math as quant.quantize_qk, bit for bit, on the row kernels of the
// selected ISA (Kernels::absmax / Kernels::quantize). Baseline-ISA code only.
#pragma once
#include <cstdint>

#include "common/attn_params.h"
#include "cpu/int8/int8_kernels.h"

namespace hk {
namespace cpu {
namespace int8 {

// K of (b, kv head hk), quantized per block of k_block keys after smoothing by mean (D floats,
// nullptr: none; padded keys become zero rows, left out of the block absmax), written straight
// into the packed K layout of int8_kernels.h (Dp = D rounded up to 4; round_up(Nk, kChunk) keys,
// the tail zero): colcorr[j] = -128 * sum_d k8[j][d],
// key_scale[j] = the scale of key j's block (0 past Nk).
void quantize_k_head_packed(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                            const float* mean, int64_t k_block, int64_t Dp, int8_t* packed,
                            int32_t* colcorr, float* key_scale);

// Keys [j0, j1) of (b, kv head hk), one block of k_block keys, smoothed by mean (nullptr: none):
// key j's D int8 at out + (j - j0) * ld (a padded key: zeros, left out of the block absmax).
// Returns the block scale. buf: D floats of scratch.
float quantize_k_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                       const float* mean, int64_t j0, int64_t j1, int8_t* out, int64_t ld,
                       float* buf);

// Q rows rows_i[0..rows) of (b, head h) -> qu8 rows (q8 + 128, row stride Dp, padded dims 128,
// the operand layout of Kernels::qk); q_scale[r] = the scale of row r's block of q_block rows
// (its absmax taken over the whole block). With mean (D floats of the kv head's K mean),
// lse_shift[r] = scale * q_r . mean. buf: D floats of scratch.
void quantize_q_rows(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h,
                     const int64_t* rows_i, int rows, int64_t q_block, const float* mean,
                     int64_t Dp, uint8_t* qu8, float* q_scale, float* lse_shift, float* buf);

// Q block blk (rows i0 = blk * q_block up to min(i0 + q_block, Nq)) of (b, head h): row i's D
// int8 at out + (i - i0) * ld, lse_shift[i - i0] = scale * q_i . mean (0 without mean), as
// quantize_q_rows. Returns the block scale. buf: D floats of scratch.
float quantize_q_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h,
                       int64_t blk, int64_t q_block, const float* mean, int8_t* out, int64_t ld,
                       float* lse_shift, float* buf);

}  // namespace int8
}  // namespace cpu
}  // namespace hk
