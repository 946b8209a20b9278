// AVX2 + FMA build of the CPU attention backward (bwd_kernel_impl.h). Only called after the
// run-time ISA check in attention_backward.cpp.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "common/attn_params.h"
#include "common/pattern.h"
#include "cpu/backward/bwd_common.h"
#include "cpu/simd/fp_env.h"
#include "cpu/scratch_cache.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace bwd_avx2 {

struct Vec {
  static constexpr int W = 8;
  static constexpr int MR = 6;     // 6 x 2 accumulators + 2 loads + 1 broadcast = 15 ymm
  static constexpr int NVMAX = 2;
  using R = __m256;
  using Simd = VecAvx2;  // cpu/simd_common.h: tanh, add for the score modifiers
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static inline R set1(float x) { return _mm256_set1_ps(x); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R maskz(unsigned bits, R v) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane);
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane)), v);
  }
  // exp(x) = 2^n * e^r, |r| <= ln2/2, Cephes polynomial (~1 ulp). x is clamped so that 2^n stays
  // a normal float; results below ~1e-38 are not flushed to 0 (irrelevant next to lse-scaled P).
  static inline R exp(R x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    const R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    R y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  }
};

#include "cpu/backward/bwd_kernel_impl.h"

}  // namespace bwd_avx2

void attention_backward_avx2(const AttnBwdParams& p, int num_threads) {
  bwd_avx2::run(p, num_threads);
}

}  // namespace cpu
}  // namespace hk
