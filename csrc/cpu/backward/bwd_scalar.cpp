// Portable (baseline x86-64 / any CPU) build of the CPU attention backward (bwd_kernel_impl.h).
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
namespace bwd_scalar {

struct Vec {
  static constexpr int W = 1;
  static constexpr int MR = 4;
  static constexpr int NVMAX = 4;
  using R = float;
  using Simd = VecScalar;  // cpu/simd_common.h: tanh, add for the score modifiers
  static inline R zero() { return 0.f; }
  static inline R load(const float* p) { return *p; }
  static inline void store(float* p, R v) { *p = v; }
  static inline R set1(float x) { return x; }
  static inline R fma(R a, R b, R c) { return a * b + c; }
  static inline R sub(R a, R b) { return a - b; }
  static inline R mul(R a, R b) { return a * b; }
  static inline R maskz(unsigned bits, R v) { return (bits & 1u) ? v : 0.f; }
  static inline R exp(R x) { return std::exp(x); }
};

#include "cpu/backward/bwd_kernel_impl.h"

}  // namespace bwd_scalar

void attention_backward_scalar(const AttnBwdParams& p, int num_threads) {
  bwd_scalar::run(p, num_threads);
}

}  // namespace cpu
}  // namespace hk
