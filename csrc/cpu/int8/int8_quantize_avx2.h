// AVX2 row kernels of the fused INT8 quantization (Kernels::absmax / Kernels::quantize), included
// by the avx2, avx512 and amx int8 sets (fwd_int8_*.cpp): internal linkage, one copy per TU.
// Bit-exact with quant.quantize_qk: y = (x - shift) * inv rounded half to even by vcvtps2dq (MXCSR
// default rounding); (x - s) * inv has no a * b + c shape, so no FMA contraction can change it.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace hk {
namespace cpu {
namespace int8 {
namespace {

float absmax_avx2(const float* x, const float* shift, int64_t n) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // Four independent max chains (max is exact, so the order does not matter).
  __m256 m4[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int u = 0; u < 4; ++u) {
      __m256 d = _mm256_loadu_ps(x + i + 8 * u);
      if (shift) d = _mm256_sub_ps(d, _mm256_loadu_ps(shift + i + 8 * u));
      m4[u] = _mm256_max_ps(m4[u], _mm256_and_ps(d, abs_mask));
    }
  }
  __m256 m = _mm256_max_ps(_mm256_max_ps(m4[0], m4[1]), _mm256_max_ps(m4[2], m4[3]));
  for (; i + 8 <= n; i += 8) {
    __m256 d = _mm256_loadu_ps(x + i);
    if (shift) d = _mm256_sub_ps(d, _mm256_loadu_ps(shift + i));
    m = _mm256_max_ps(m, _mm256_and_ps(d, abs_mask));
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; i < n; ++i) {
    const float a = std::fabs(shift ? x[i] - shift[i] : x[i]);
    r = a > r ? a : r;
  }
  return r;
}

void quantize_avx2(const float* x, const float* shift, float inv, int64_t n, int8_t* out) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i r[4];
    for (int u = 0; u < 4; ++u) {
      __m256 d = _mm256_loadu_ps(x + i + 8 * u);
      if (shift) d = _mm256_sub_ps(d, _mm256_loadu_ps(shift + i + 8 * u));
      r[u] = _mm256_cvtps_epi32(_mm256_mul_ps(d, vinv));
    }
    // packs work per 128-bit lane: the dword permute afterwards restores the order.
    const __m256i w01 = _mm256_packs_epi32(r[0], r[1]), w23 = _mm256_packs_epi32(r[2], r[3]);
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), b);
  }
  for (; i < n; ++i) {
    const float y = (shift ? x[i] - shift[i] : x[i]) * inv;
    const float c = std::fmin(std::fmax(std::nearbyint(y), -128.f), 127.f);
    out[i] = int8_t(c);
  }
}

void widen_avx2(const uint16_t* src, bool bf16, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256 f = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                          : _mm256_cvtph_ps(h);
    _mm256_storeu_ps(dst + i, f);
  }
  for (; i < n; ++i) {
    if (bf16) {
      const uint32_t bits = uint32_t(src[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    } else {
      dst[i] = _cvtsh_ss(src[i]);
    }
  }
}

}  // namespace
}  // namespace int8
}  // namespace cpu
}  // namespace hk
