// Every vectorized exponential of the CPU kernels, in one place: 2^x at three accuracy levels and
// e^x for the fp32 backward, for AVX-512 (__m512) and AVX2 (__m256). The scalar paths use
// std::exp2 / std::exp.
//
//   Exp2::kFull    degree 6 (Cephes exp2f), ~1 ulp:      fp32 softmax, tanh
//   Exp2::kBf16    degree 4, rel. error ~4e-6:           avx512 bf16 forward, avx512 / avx2 int8
//                                                        cores (P is rounded to bf16, 2^-9, right
//                                                        after)
//   Exp2::kCoarse  degree 3, rel. error < 1.4e-4:        AMX int8 and AMX bf16 softmax, the bf16
//                                                        backward's P (likewise)
//
// All of them: 2^x = 2^n * poly(f), n = round(x), f = x - n in [-0.5, 0.5]; x = -inf gives exactly
// 0; x < -125 gives 0 (never a denormal: each would cost a microcode assist); NaN stays NaN.
// exp2_ftz (AVX-512, for threads with flush-to-zero) splits x at floor(x) (the same polynomials,
// shifted to [0, 1) at compile time) and drops the clamp and the x < -125 mask: values below
// 2^-126 are flushed by FTZ instead.
//
// Internal linkage on purpose (see simd_common.h): the header is compiled with different ISA flags
// in different translation units.
#pragma once
#include <array>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace hk {
namespace cpu {
namespace {

enum class Exp2 { kFull, kBf16, kCoarse };

// Polynomial coefficients of 2^f, highest degree first (the constant term 1 is implied for kFull).
template <Exp2 L>
struct Exp2Poly;
template <>
struct Exp2Poly<Exp2::kFull> {
  static constexpr int N = 7;
  static constexpr float c[N] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                 5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f,
                                 1.f};
};
template <>
struct Exp2Poly<Exp2::kBf16> {  // least-squares fit
  static constexpr int N = 5;
  static constexpr float c[N] = {9.676041930e-03f, 5.592207752e-02f, 2.402210727e-01f, 6.931210288e-01f,
                                 1.000000076e+00f};
};
template <>
struct Exp2Poly<Exp2::kCoarse> {
  static constexpr int N = 4;
  static constexpr float c[N] = {5.5470794439315796e-2f, 2.423935979604721e-1f, 6.931890845298767e-1f,
                                 9.999397993087769e-1f};
};

// The same approximations of 2^f for f in [0, 1) (exp2_ftz's split): poly01(f) = sqrt(2) *
// poly(f - 1/2), expanded at compile time (in double, rounded to float), highest degree first.
template <Exp2 L>
constexpr std::array<float, Exp2Poly<L>::N> exp2_poly01_coefficients() {
  constexpr int N = Exp2Poly<L>::N, deg = N - 1;
  double b[N] = {};  // b[k]: the coefficient of f^k of poly(f - 1/2)
  for (int i = 0; i <= deg; ++i) {
    const double a = Exp2Poly<L>::c[deg - i];  // of y^i
    double binom = 1.0;                        // C(i, k)
    for (int k = 0; k <= i; ++k) {
      double shift = 1.0;  // (-1/2)^(i - k)
      for (int e = 0; e < i - k; ++e) shift *= -0.5;
      b[k] += a * binom * shift;
      binom = binom * (i - k) / (k + 1);
    }
  }
  std::array<float, N> c{};
  for (int k = 0; k <= deg; ++k) c[deg - k] = float(1.4142135623730950488 * b[k]);
  return c;
}
template <Exp2 L>
struct Exp2Poly01 {
  static constexpr int N = Exp2Poly<L>::N;
  static constexpr std::array<float, N> c = exp2_poly01_coefficients<L>();
};

// Below this, 2^x is 0.
constexpr float kExp2Lowest = -125.f;

// e^x = 2^n e^r, n = round(x log2 e), r = x - n ln2 in two parts (Cephes expf, ~1 ulp).
constexpr float kExpLn2Hi = 0.693359375f, kExpLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                               4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

#if defined(__AVX512F__)
template <Exp2 L, class P = Exp2Poly<L>>
inline __m512 exp2_poly(__m512 f) {
  __m512 y = _mm512_set1_ps(P::c[0]);
  for (int i = 1; i < P::N; ++i) y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(P::c[i]));
  return y;
}

// f = x - round(x) (exact) and n = round(x) = x - f: one vreduceps instead of vrndscaleps and a
// subtraction (the same bits, fewer uops).
inline __m512 exp2_split(__m512 x, __m512* n) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  *n = _mm512_sub_ps(x, f);
  return f;
}

// 2^x at level L; lanes outside `lanes` are 0.
template <Exp2 L>
inline __m512 exp2(__m512 x, __mmask16 lanes = 0xffff) {
  const __m512 lo = _mm512_set1_ps(kExp2Lowest);
  const __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes, x, lo, _CMP_NLT_UQ);  // x >= lo or NaN
  x = _mm512_max_ps(lo, x);  // max returns its second operand on NaN: NaN propagates
  __m512 n;
  const __m512 f = exp2_split(x, &n);
  return _mm512_maskz_scalef_ps(keep, exp2_poly<L>(f), n);
}

// 2^x at level L for code that runs with flush-to-zero (the forward driver's and the backward's
// threads): 2^floor(x) * poly01(x - floor(x)), where vscalefps floors x itself, so the split is
// one vreduceps (rounding down); no clamp and no zero mask. x = -inf gives f = 0 and exactly 0;
// results below 2^-126 are flushed to 0 by FTZ; NaN stays NaN. Four vector ops fewer than exp2
// (the AMX softmax, the bf16 backward).
template <Exp2 L>
inline __m512 exp2_ftz(__m512 x) {
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_poly<L, Exp2Poly01<L>>(f), x);
}

// e^x for the fp32 backward; 0 below about -87.
inline __m512 exp_full(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Lo), r);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
template <Exp2 L>
inline __m256 exp2_poly(__m256 f) {
  using P = Exp2Poly<L>;
  __m256 y = _mm256_set1_ps(P::c[0]);
  for (int i = 1; i < P::N; ++i) y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(P::c[i]));
  return y;
}

// 2^n for whole n in [-127, 127] from the exponent bits; n = -127 gives the bit pattern 0: 0.
inline __m256 pow2i(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

template <Exp2 L>
inline __m256 exp2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(kExp2Lowest);
  const __m256 zero = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // x < lo (not NaN)
  x = _mm256_max_ps(lo, x);  // NaN propagates
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_andnot_ps(zero, _mm256_mul_ps(exp2_poly<L>(_mm256_sub_ps(x, n)), pow2i(n)));
}

// e^x for the fp32 backward; x is clamped so that 2^n stays a normal float.
inline __m256 exp_full(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Hi), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Lo), r);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  return _mm256_mul_ps(y, pow2i(n));
}
#endif

}  // namespace
}  // namespace cpu
}  // namespace hk
