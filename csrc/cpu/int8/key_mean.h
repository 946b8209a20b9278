// The K smoothing mean of the INT8 definition on the CPU (hybrid_kernels.quant.smoothing_mean):
// per (b, h) the fp32 sum of the real keys' rows, in 256-key chunks added in key order, over the
// number of real keys (N without a mask; with one, the real keys, at least 1). One thread sums a
// (b, h), so any thread count gives the same bits. A bf16 K (1, 8, 16384, 64) takes ~1 ms on one
// core where torch's mean over dim 2 took 22 ms.
#pragma once
#include <cstdint>

#include "common/attn_params.h"

namespace hk {
namespace cpu {

// k: (B, H, N, D) of `dtype`, element strides stride[0..2] (the last dim contiguous); real:
// (B, N) bytes (nonzero = real key) or nullptr; out: (B, H, D) fp32.
void key_mean(const void* k, DType dtype, int64_t B, int64_t H, int64_t N, int64_t D,
              const int64_t* stride, const uint8_t* real, float* out, int num_threads);

}  // namespace cpu
}  // namespace hk
