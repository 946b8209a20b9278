// quant="int8" on the forward driver without intrinsics (one-lane "vectors"); see
// fwd_core_int8.h.
#include <cmath>

#include "cpu/forward/fwd_core_f32.h"
#include "cpu/int8/fwd_core_int8.h"
#include "cpu/int8/int8_support.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

struct OpsScalar {
  using I = int32_t;
  static constexpr bool kVPairs = false;
  static I load(const uint32_t* p) { return int32_t(*p); }
  static I set1(int32_t x) { return x; }
  static I dot(I acc, I q, I k) {
    for (int b = 0; b < 4; ++b) acc += int32_t(uint8_t(uint32_t(q) >> (8 * b))) * int32_t(int8_t(uint32_t(k) >> (8 * b)));
    return acc;
  }
  static float to_float(I x) { return float(x); }
  static float exp2(float x) { return std::exp2(x); }
  static float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
};

float absmax_scalar(const float* x, const float* shift, int64_t n) {
  float r = 0.f;
  for (int64_t i = 0; i < n; ++i) r = std::fmax(r, std::fabs(shift ? x[i] - shift[i] : x[i]));
  return r;
}

// std::nearbyint rounds half to even in the default rounding mode, like torch.round.
void quantize_scalar(const float* x, const float* shift, float inv, int64_t n, int8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = (shift ? x[i] - shift[i] : x[i]) * inv;
    out[i] = int8_t(std::fmin(std::fmax(std::nearbyint(y), -128.f), 127.f));
  }
}

void widen_scalar(const uint16_t* src, bool bf16, int64_t n, float* dst) {
  to_float(src, bf16 ? DType::BF16 : DType::F16, n, dst);
}

template <int DC, int DVC>
using CoreScalarInt8 = CoreInt8<VecScalar, OpsScalar, CoreF32<VecScalar, 8, 2, 2, 0, DVC>, 2, DC>;

void forward_scalar(const AttnInt8Params& p, const Kernels& kern) {
  run_int8_with_head_dims<CoreScalarInt8>(p, kern);
}

const Kernels kScalar = {"scalar", absmax_scalar, quantize_scalar, widen_scalar, forward_scalar};

}  // namespace

const Kernels* kernels_scalar() { return &kScalar; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
