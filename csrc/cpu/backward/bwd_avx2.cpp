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
    static inline R exp(R x) { return exp_full(x); }  // cpu/simd/exp2.h
};

#include "cpu/backward/bwd_kernel_impl.h"

}  // namespace bwd_avx2

void attention_backward_avx2(const AttnBwdParams& p, int num_threads) {
  bwd_avx2::run(p, num_threads);
}

}  // namespace cpu
}  // namespace hk
