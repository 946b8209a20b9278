// Small SIMD vector traits shared by the CPU kernels: VecScalar (portable), VecAvx2 (AVX2+FMA+F16C,
// only when compiled with -mavx2), VecAvx512 (only with -mavx512f). Each trait wraps one register
// type R of W fp32 lanes.
//
// Everything lives in an anonymous namespace on purpose: this header is compiled with different ISA
// flags in different translation units, and internal linkage keeps the linker from merging an
// AVX-512 copy of an inline function into the portable path.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/simd/exp2.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace hk {
namespace cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;


// tanh(x) on |x| <= 0.625: x + x^3 P(x^2) (Cephes tanhf); above, (1 - e) / (1 + e) with
// e = exp(-2|x|). ~2 ulp in fp32.
constexpr float kTanhSmall = 0.625f;
constexpr float kTanhC4 = -5.70498872745e-3f;
constexpr float kTanhC3 = 2.06390887954e-2f;
constexpr float kTanhC2 = -5.37397155531e-2f;
constexpr float kTanhC1 = 1.33314422036e-1f;
constexpr float kTanhC0 = -3.33332819422e-1f;

// ---------------------------------------------------------------- portable scalar conversions
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN stays NaN (quieted). Branch-free, so loops over it vectorize.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: renormalize
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400u) == 0);
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even, overflow -> inf
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to 0
    uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) - 1
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a - 0x38000000u;  // rebias 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// ---------------------------------------------------------------- portable "vector" of 1 lane
struct VecScalar {
  using R = float;
  static constexpr int W = 1;
  static R zero() { return 0.f; }
  static R set1(float x) { return x; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R x) { *p = x; }
  static R bcast(const float* p) { return *p; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R mul(R a, R b) { return a * b; }
  static R max(R a, R b) { return a > b ? a : b; }
  // Exact product, one (double) rounding of the sum: as accurate as a hardware FMA, and cheap.
  static R fma(R a, R b, R c) { return float(double(a) * double(b) + double(c)); }
  // 2^x for x <= 0; exactly 0 for x = -inf.
  static R exp2(R x) { return std::exp2(x); }
  static R tanh(R x) { return std::tanh(x); }
  static R neg_inf_to_zero(R m) { return m == kNegInf ? 0.f : m; }
  // s where lo <= pos <= hi, else -inf.
  static R mask_range(R s, R pos, R lo, R hi) { return (pos >= lo && pos <= hi) ? s : kNegInf; }
  static void f16_to_f32_row(float* dst, const uint16_t* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
  }
  static void f32_to_f16_row(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
  }
  static void f32_to_bf16_row(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
  // dst[i * ds + k] = src[k * ss + i] for a W x W block (bit-exact: usable on any 32-bit data).
  static void transpose(const float* src, int64_t, float* dst, int64_t) { *dst = *src; }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct VecAvx2 {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static R bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R exp2(R x) { return cpu::exp2<Exp2::kFull>(x); }
  static R tanh(R x) {  // see kTanhSmall; NaN stays NaN
    const R sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
    const R ax = _mm256_andnot_ps(sign, x);
    const R e = exp2(_mm256_mul_ps(ax, _mm256_set1_ps(-2.f * kLog2e)));
    const R big = _mm256_or_ps(_mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e)),
                               _mm256_and_ps(sign, x));
    const R z = _mm256_mul_ps(x, x);
    R y = _mm256_set1_ps(kTanhC4);
    y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(kTanhC3));
    y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(kTanhC2));
    y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(kTanhC1));
    y = _mm256_fmadd_ps(y, z, _mm256_set1_ps(kTanhC0));
    const R small = _mm256_fmadd_ps(_mm256_mul_ps(y, z), x, x);
    return _mm256_blendv_ps(small, big, _mm256_cmp_ps(ax, _mm256_set1_ps(kTanhSmall), _CMP_GT_OQ));
  }
  static R neg_inf_to_zero(R m) {
    R is_inf = _mm256_cmp_ps(m, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ);
    return _mm256_andnot_ps(is_inf, m);
  }
  static R mask_range(R s, R pos, R lo, R hi) {
    R ok = _mm256_and_ps(_mm256_cmp_ps(pos, lo, _CMP_GE_OQ), _mm256_cmp_ps(pos, hi, _CMP_LE_OQ));
    return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), s, ok);
  }
  static void f16_to_f32_row(float* dst, const uint16_t* src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
  }
  static void f32_to_f16_row(uint16_t* dst, const float* src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
  }
  static void f32_to_bf16_row(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
  static void transpose(const float* src, int64_t ss, float* dst, int64_t ds) {
    __m256 r[8], t[8];
    for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * ss);
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 2; ++k) {
      r[4 * k + 0] = _mm256_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0x44);
      r[4 * k + 1] = _mm256_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0xee);
      r[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
      r[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xee);
    }
    for (int k = 0; k < 4; ++k) {
      _mm256_storeu_ps(dst + k * ds, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
      _mm256_storeu_ps(dst + (k + 4) * ds, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
    }
  }
};
#endif

#if defined(__AVX512F__)
struct VecAvx512 {
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static R bcast(const float* p) { return _mm512_set1_ps(*p); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R exp2(R x) { return cpu::exp2<Exp2::kFull>(x); }
  static R tanh(R x) {  // see kTanhSmall; NaN stays NaN
    const R one = _mm512_set1_ps(1.f);
    const R ax = _mm512_abs_ps(x);
    const R e = exp2(_mm512_mul_ps(ax, _mm512_set1_ps(-2.f * kLog2e)));
    R big = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    big = _mm512_mask_sub_ps(big, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                             _mm512_setzero_ps(), big);
    const R z = _mm512_mul_ps(x, x);
    R y = _mm512_set1_ps(kTanhC4);
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(kTanhC3));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(kTanhC2));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(kTanhC1));
    y = _mm512_fmadd_ps(y, z, _mm512_set1_ps(kTanhC0));
    const R small = _mm512_fmadd_ps(_mm512_mul_ps(y, z), x, x);
    return _mm512_mask_mov_ps(small, _mm512_cmp_ps_mask(ax, _mm512_set1_ps(kTanhSmall), _CMP_GT_OQ), big);
  }
  // log2(x) within 4 ulp: x = 2^k m with m in [0.75, 1.5) (vgetmantps; k from vgetexpps of x and
  // of m), log2(m) = 2 / ln 2 * atanh(t), t = (m - 1) / (m + 1) in [-1/7, 1/5], by its odd series
  // to t^9. 0 gives -inf, inf gives inf, NaN and negative x NaN, as std::log2.
  static R log2(R x) {
    const R m = _mm512_getmant_ps(x, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);
    const R k = _mm512_sub_ps(_mm512_getexp_ps(x), _mm512_getexp_ps(m));
    const R t = _mm512_div_ps(_mm512_sub_ps(m, _mm512_set1_ps(1.f)), _mm512_add_ps(m, _mm512_set1_ps(1.f)));
    const R t2 = _mm512_mul_ps(t, t);
    R y = _mm512_set1_ps(1.f / 9.f);
    y = _mm512_fmadd_ps(y, t2, _mm512_set1_ps(1.f / 7.f));
    y = _mm512_fmadd_ps(y, t2, _mm512_set1_ps(1.f / 5.f));
    y = _mm512_fmadd_ps(y, t2, _mm512_set1_ps(1.f / 3.f));
    y = _mm512_fmadd_ps(y, t2, _mm512_set1_ps(1.f));
    const R r = _mm512_fmadd_ps(_mm512_mul_ps(y, t), _mm512_set1_ps(2.8853900817779268f), k);  // 2 / ln 2
    const __mmask16 zero = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ);
    const __mmask16 inf = _mm512_cmp_ps_mask(x, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(_mm512_mask_mov_ps(r, zero, _mm512_set1_ps(-INFINITY)), inf, _mm512_set1_ps(INFINITY));
  }
  static R neg_inf_to_zero(R m) {
    __mmask16 k = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ);
    return _mm512_mask_mov_ps(m, k, _mm512_setzero_ps());
  }
  static R mask_range(R s, R pos, R lo, R hi) {
    __mmask16 k = _mm512_cmp_ps_mask(pos, lo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(pos, hi, _CMP_LE_OQ);
    return _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), k, s);
  }
  static void f16_to_f32_row(float* dst, const uint16_t* src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
  }
  static void f32_to_f16_row(uint16_t* dst, const float* src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
  }
  static void f32_to_bf16_row(uint16_t* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
  static void transpose(const float* src, int64_t ss, float* dst, int64_t ds) {
    __m512 r[16];
    for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + k * ss);
    transpose_regs(r, dst, ds);
  }
  // dst[i * ds + k] = r[k][i] (16 vectors of 16 32-bit values; r is clobbered). kStream:
  // non-temporal stores (dst rows 64-byte aligned; the caller fences).
  template <bool kStream = false>
  static void transpose_regs(__m512* r, float* dst, int64_t ds) {
    __m512 t[16];
    for (int k = 0; k < 8; ++k) {
      t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {
      r[4 * k + 0] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0x44);
      r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k + 0], t[4 * k + 2], 0xee);
      r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
      r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xee);
    }
    // r[4k + m], 128-bit lane L: rows 4k..4k+3 of column 4L + m.
    for (int m = 0; m < 4; ++m) {
      t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);       // lanes: (r0 L0, r0 L2, r4 L0, r4 L2)
      t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);   // (r0 L1, r0 L3, r4 L1, r4 L3)
      t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
      t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
    }
    for (int m = 0; m < 8; ++m) {
      const __m512 a = _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88), b = _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd);
      if constexpr (kStream) {
        _mm512_stream_ps(dst + m * ds, a);
        _mm512_stream_ps(dst + (m + 8) * ds, b);
      } else {
        _mm512_storeu_ps(dst + m * ds, a);
        _mm512_storeu_ps(dst + (m + 8) * ds, b);
      }
    }
  }
};
#endif

#if defined(__AVX512BF16__)
// dst[i] = bf16(src[i]) for i below n rounded down to 32, with non-temporal stores (dst 64-byte
// aligned; the caller fences); returns how many were written. vcvtne2ps2bf16 gives
// f32_to_bf16's bits except that denormal inputs become 0 (callers run with flush-to-zero).
inline int64_t stream_bf16_row(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i),
                        (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i)));
  return i;
}

// 16 words (bf16(lo[i]), bf16(hi[i])), round to nearest even: a row of key pairs, the operand
// layout of vdpbf16ps and of AMX B tiles.
inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  // cvtne2ps_pbh(hi, lo) holds lo in 16-bit lanes 0-15 and hi in 16-31; the permute interleaves.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25,
                                              9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                              17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
#endif

// The softcap score modifier in place on n contiguous scores: S = cap * tanh(S / cap), cap > 0
// (in the caller's units). V's lanes, then the scalar tail.
template <class V>
inline void softcap_inplace(float* S, int64_t n, float cap) {
  const typename V::R c = V::set1(cap), ic = V::set1(1.f / cap);
  int64_t t = 0;
  for (; t + V::W <= n; t += V::W) V::store(S + t, V::mul(c, V::tanh(V::mul(V::load(S + t), ic))));
  for (; t < n; ++t) S[t] = cap * VecScalar::tanh(S[t] * (1.f / cap));
}

}  // namespace
}  // namespace cpu
}  // namespace hk
