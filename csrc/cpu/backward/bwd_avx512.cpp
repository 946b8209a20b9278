// AVX-512 build of the CPU attention backward (bwd_kernel_impl.h). Only called after the run-time
// ISA check in attention_backward.cpp.
// GCC 12 warns spuriously about _mm512_undefined_ps() inside its own AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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
namespace bwd_avx512 {

#include "cpu/backward/bwd_vec_avx512.h"
#include "cpu/backward/bwd_kernel_impl.h"

}  // namespace bwd_avx512

void attention_backward_avx512(const AttnBwdParams& p, int num_threads) {
  bwd_avx512::run(p, num_threads);
}

}  // namespace cpu
}  // namespace hk
