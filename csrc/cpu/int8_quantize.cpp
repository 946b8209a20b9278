// Fused INT8 quantization of Q and K (see int8_quantize.h). Matches quant.quantize_qk exactly:
// scale = absmax / 127 (1 for an all-zero block), inv = 1 / scale, x8 = round_half_even((x -
// mean) * inv); max |fl(x - mean)| equals quantize_qk's max(max x - mean, mean - min x) because
// fl(x - mean) is monotone in x.
#include "cpu/int8_quantize.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/int8_support.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

// Row j of a (B, H, N, D) input with element strides st, as fp32 (converted into buf unless F32).
const float* row_f32(const AttnParams& f, const void* base, const int64_t* st, int64_t b,
                     int64_t h, int64_t j, float* buf) {
  const int64_t off = b * st[0] + h * st[1] + j * st[2];
  if (f.dtype == DType::F32) return static_cast<const float*>(base) + off;
  to_float(static_cast<const char*>(base) + off * 2, f.dtype, f.D, buf);
  return buf;
}

float block_scale(float absmax) {
  const float s = absmax / 127.f;
  return s > 0.f ? s : 1.f;
}

}  // namespace

void quantize_k_head(const Kernels& kern, const AttnParams& f, int64_t b, int64_t hk,
                     const float* mean, int64_t k_block, int8_t* k8, float* k_scale) {
  std::vector<float> buf(size_t(f.dtype == DType::F32 ? 0 : f.D));
  const uint8_t* pad = f.key_padding ? f.key_padding + b * f.Nk : nullptr;
  for (int64_t j0 = 0, kb = 0; j0 < f.Nk; j0 += k_block, ++kb) {
    const int64_t j1 = std::min(j0 + k_block, f.Nk);
    float amax = 0.f;
    for (int64_t j = j0; j < j1; ++j) {
      if (pad && !pad[j]) continue;
      const float* x = row_f32(f, f.k, f.k_stride, b, hk, j, buf.data());
      amax = std::max(amax, kern.absmax(x, mean, f.D));
    }
    const float scale = block_scale(amax);
    const float inv = 1.f / scale;
    for (int64_t j = j0; j < j1; ++j) {
      int8_t* out = k8 + j * f.D;
      if (pad && !pad[j]) {
        std::memset(out, 0, size_t(f.D));
        continue;
      }
      kern.quantize(row_f32(f, f.k, f.k_stride, b, hk, j, buf.data()), mean, inv, f.D, out);
    }
    k_scale[kb] = scale;
  }
}

void quantize_q_block(const Kernels& kern, const AttnParams& f, int64_t b, int64_t h, int64_t i0,
                      int64_t i1, const float* mean, int8_t* q8, float* q_scale,
                      float* lse_shift) {
  std::vector<float> buf(size_t(f.dtype == DType::F32 ? 0 : f.D));
  float amax = 0.f;
  for (int64_t i = i0; i < i1; ++i)
    amax = std::max(amax, kern.absmax(row_f32(f, f.q, f.q_stride, b, h, i, buf.data()), nullptr,
                                      f.D));
  const float scale = block_scale(amax);
  const float inv = 1.f / scale;
  for (int64_t i = i0; i < i1; ++i) {
    const float* x = row_f32(f, f.q, f.q_stride, b, h, i, buf.data());
    kern.quantize(x, nullptr, inv, f.D, q8 + (i - i0) * f.D);
    if (mean) {
      float dot = 0.f;
      for (int64_t d = 0; d < f.D; ++d) dot += x[d] * mean[d];
      lse_shift[i - i0] = dot * f.scale;
    }
  }
  *q_scale = scale;
}

}  // namespace int8
}  // namespace cpu
}  // namespace hk
