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

// Keys [j0, j1) of (b, kv head hk), one block of k_block keys, smoothed by mean (nullptr: none):
// key j's D int8 at out + (j - j0) * ld (a padded key: zeros, left out of the block absmax).
// Returns the block scale. buf: (j1 - j0) * D floats of scratch.
float quantize_k_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                       const float* mean, int64_t j0, int64_t j1, int8_t* out, int64_t ld,
                       float* buf);

// Q block blk (rows i0 = blk * q_block up to min(i0 + q_block, Nq)) of (b, head h): row i's D
// int8 at out + (i - i0) * ld, lse_shift[i - i0] = scale * q_i . mean (0 without mean). Returns
// the block scale. buf: q_block * D floats of scratch.
float quantize_q_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h,
                       int64_t blk, int64_t q_block, const float* mean, int8_t* out, int64_t ld,
                       float* lse_shift, float* buf);

}  // namespace int8
}  // namespace cpu
}  // namespace hk
