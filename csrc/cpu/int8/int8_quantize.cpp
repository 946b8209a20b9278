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

// Rows [j0, j1) of a (B, H, N, D) input with element strides st as fp32, row j at
// result + (j - j0) * *ld: read in place (F32) or widened once into buf ((j1 - j0) * D floats), so
// the absmax pass and the quantize pass do not convert a 16-bit row twice.
const float* rows_f32(const Kernels& kern, const AttnParams& f, const void* base, const int64_t* st,
                      int64_t b, int64_t h, int64_t j0, int64_t j1, float* buf, int64_t* ld) {
  const int64_t off = b * st[0] + h * st[1] + j0 * st[2];
  if (f.dtype == DType::F32) {
    *ld = st[2];
    return static_cast<const float*>(base) + off;
  }
  for (int64_t j = j0; j < j1; ++j)
    kern.widen(static_cast<const uint16_t*>(base) + off + (j - j0) * st[2], f.dtype == DType::BF16, f.D,
               buf + (j - j0) * f.D);
  *ld = f.D;
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

}  // namespace

float quantize_k_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                       const float* mean, int64_t j0, int64_t j1, int8_t* out, int64_t ld,
                       float* buf) {
  const uint8_t* pad = f.key_padding ? f.key_padding + b * f.Nk : nullptr;
  int64_t lx;
  const float* x = rows_f32(kern, f, f.k, f.k_stride, b, hk, j0, j1, buf, &lx);
  float amax = 0.f;
  for (int64_t j = j0; j < j1; ++j)
    if (!pad || pad[j]) amax = std::max(amax, kern.absmax(x + (j - j0) * lx, mean, f.D));
  const float scale = block_scale(amax);
  const float inv = 1.f / scale;
  for (int64_t j = j0; j < j1; ++j) {
    int8_t* row = out + (j - j0) * ld;
    if (pad && !pad[j])
      std::memset(row, 0, size_t(f.D));
    else
      kern.quantize(x + (j - j0) * lx, mean, inv, f.D, row);
  }
  return scale;
}

float quantize_q_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h,
                       int64_t blk, int64_t q_block, const float* mean, int8_t* out, int64_t ld,
                       float* lse_shift, float* buf) {
  const int64_t i0 = blk * q_block, i1 = std::min(i0 + q_block, f.Nq);
  int64_t lx;
  const float* x = rows_f32(kern, f, f.q, f.q_stride, b, h, i0, i1, buf, &lx);
  float amax = 0.f;  // over the whole block
  for (int64_t i = i0; i < i1; ++i) amax = std::max(amax, kern.absmax(x + (i - i0) * lx, nullptr, f.D));
  const float scale = block_scale(amax);
  const float inv = 1.f / scale;
  for (int64_t i = i0; i < i1; ++i) {
    const float* xi = x + (i - i0) * lx;
    kern.quantize(xi, nullptr, inv, f.D, out + (i - i0) * ld);
    lse_shift[i - i0] = mean ? dot8(xi, mean, f.D) * f.scale : 0.f;
  }
  return scale;
}

}  // namespace int8
}  // namespace cpu
}  // namespace hk
