// Portable tile kernels of the INT8 forward (the reference the SIMD sets are tested against).
#include <cmath>
#include <limits>

#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_support.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

void qk_scalar(const uint8_t* qu8, int64_t Dp, int rows, const int8_t* k, int nchunks,
               const int32_t* colcorr, const float* key_scale, const float* row_scale,
               float* S) {
  const int64_t groups = Dp / 4;
  for (int r = 0; r < rows; ++r) {
    const uint8_t* q = qu8 + r * Dp;
    for (int c = 0; c < nchunks * kChunk; ++c) {
      const int8_t* kc = k + (c / kChunk) * kChunk * Dp + (c % kChunk) * 4;
      int32_t acc = colcorr[c];
      for (int64_t g = 0; g < groups; ++g)
        for (int t = 0; t < 4; ++t)
          acc += int32_t(q[g * 4 + t]) * int32_t(kc[g * kChunk * 4 + t]);
      S[r * kTile + c] = float(acc) * key_scale[c] * row_scale[r];
    }
  }
}

void mask_scalar(float* S, int rows, int cols, const int32_t* kidx, const uint8_t* kflags,
                 const int64_t* wlo, const int64_t* whi, const int64_t* clim, int32_t* first,
                 int32_t* last) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    int32_t f = cols, l = -1;
    for (int c = 0; c < cols; ++c) {
      const int64_t j = kidx[c];
      const bool real = kflags[c] & 1, lm = kflags[c] & 2;
      const bool vis = real && ((j >= wlo[r] && j <= whi[r]) || (lm && j <= clim[r]));
      if (vis) {
        if (f == cols) f = c;
        l = c;
      } else {
        S[r * kTile + c] = ninf;
      }
    }
    first[r] = f;
    last[r] = l;
  }
}

void softmax_scalar(float* S, int rows, int cols, float* m, float* l, float* alpha) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    float* s = S + r * kTile;
    float mx = m[r];
    for (int c = 0; c < cols; ++c) mx = std::fmax(mx, s[c]);
    if (mx == ninf) {
      for (int c = 0; c < cols; ++c) s[c] = 0.f;
      alpha[r] = 1.f;
      continue;
    }
    float sum = 0.f;
    for (int c = 0; c < cols; ++c) {
      s[c] = std::exp2(s[c] - mx);
      sum += s[c];
    }
    const float a = mx == m[r] ? 1.f : std::exp2(m[r] - mx);
    alpha[r] = a;
    l[r] = l[r] * a + sum;
    m[r] = mx;
  }
}

// p rounded to the nearest bf16 value (ties to even; NaN stays NaN).
float bf16_round(float p) {
  float r = p;
  round_to_bf16(&r, 1);
  return r;
}

void pv_scalar(float* O, int64_t ldo, const float* P, int rows, int cols, const int32_t* first,
               const int32_t* last, const float* alpha, const float* V, int64_t ldv,
               int64_t Dv) {
  for (int r = 0; r < rows; ++r) {
    float* o = O + r * ldo;
    if (alpha[r] != 1.f)
      for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha[r];
    const int c0 = first ? first[r] : 0, c1 = last ? last[r] + 1 : cols;
    for (int c = c0; c < c1; ++c) {
      const float p = bf16_round(P[r * kTile + c]);
      const float* v = V + c * ldv;
      for (int64_t d = 0; d < Dv; ++d) o[d] += p * v[d];
    }
  }
}

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

const Kernels kScalar = {"scalar", qk_scalar, mask_scalar, softmax_scalar, pv_scalar, nullptr,
                         absmax_scalar, quantize_scalar, widen_scalar};

}  // namespace

const Kernels* kernels_scalar() { return &kScalar; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
