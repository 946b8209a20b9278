// Fused INT8 quantization of Q and K (see int8_quantize.h). Matches quant.quantize_qk exactly:
// scale = absmax / 127 (1 for an all-zero block), inv = 1 / scale, x8 = round_half_even((x -
// mean) * inv); max |fl(x - mean)| equals quantize_qk's max(max x - mean, mean - min x) because
// fl(x - mean) is monotone in x.
#include "cpu/int8/int8_quantize.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace hk {
namespace cpu {
namespace int8 {
namespace {

// Row j of a (B, H, N, D) input with element strides st, as fp32 (converted into buf unless F32).
const float* row_f32(const Kernels& kern, const AttnParams& f, const void* base,
                     const int64_t* st, int64_t b, int64_t h, int64_t j, float* buf) {
  const int64_t off = b * st[0] + h * st[1] + j * st[2];
  if (f.dtype == DType::F32) return static_cast<const float*>(base) + off;
  kern.widen(static_cast<const uint16_t*>(base) + off, f.dtype == DType::BF16, f.D, buf);
  return buf;
}

// x . y with 8 independent partial sums (a single fp32 chain would serialize on add latency).
float dot8(const float* x, const float* y, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int t = 0; t < 8; ++t) acc[t] += x[d + t] * y[d + t];
  for (; d < n; ++d) acc[0] += x[d] * y[d];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float block_scale(float absmax) {
  const float s = absmax / 127.f;
  return s > 0.f ? s : 1.f;
}

// The scale of Q block `blk` of (b, h): its absmax is taken over the whole block.
float q_block_scale(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h, int64_t blk,
                    int64_t q_block, float* buf) {
  const int64_t i1 = std::min((blk + 1) * q_block, f.Nq);
  float amax = 0.f;
  for (int64_t i = blk * q_block; i < i1; ++i)
    amax = std::max(amax, kern.absmax(row_f32(kern, f, f.q, f.q_stride, b, h, i, buf), nullptr, f.D));
  return block_scale(amax);
}

// Q row i of (b, h) -> D int8 at dst with 1 / scale = inv; returns scale * q . mean (0 without
// mean).
float quantize_q_row(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h, int64_t i,
                     float inv, const float* mean, int8_t* dst, float* buf) {
  const float* x = row_f32(kern, f, f.q, f.q_stride, b, h, i, buf);
  kern.quantize(x, nullptr, inv, f.D, dst);
  return mean ? dot8(x, mean, f.D) * f.scale : 0.f;
}

}  // namespace

float quantize_k_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                       const float* mean, int64_t j0, int64_t j1, int8_t* out, int64_t ld,
                       float* buf) {
  const uint8_t* pad = f.key_padding ? f.key_padding + b * f.Nk : nullptr;
  float amax = 0.f;
  for (int64_t j = j0; j < j1; ++j) {
    if (pad && !pad[j]) continue;
    const float* x = row_f32(kern, f, f.k, f.k_stride, b, hk, j, buf);
    amax = std::max(amax, kern.absmax(x, mean, f.D));
  }
  const float scale = block_scale(amax);
  const float inv = 1.f / scale;
  for (int64_t j = j0; j < j1; ++j) {
    int8_t* row = out + (j - j0) * ld;
    if (pad && !pad[j])
      std::memset(row, 0, size_t(f.D));
    else
      kern.quantize(row_f32(kern, f, f.k, f.k_stride, b, hk, j, buf), mean, inv, f.D, row);
  }
  return scale;
}

float quantize_q_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h,
                       int64_t blk, int64_t q_block, const float* mean, int8_t* out, int64_t ld,
                       float* lse_shift, float* buf) {
  const float scale = q_block_scale(kern, f, b, h, blk, q_block, buf);
  const float inv = 1.f / scale;
  const int64_t i0 = blk * q_block, i1 = std::min(i0 + q_block, f.Nq);
  for (int64_t i = i0; i < i1; ++i)
    lse_shift[i - i0] = quantize_q_row(kern, f, b, h, i, inv, mean, out + (i - i0) * ld, buf);
  return scale;
}

}  // namespace int8
}  // namespace cpu
}  // namespace hk
