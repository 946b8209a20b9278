// AMX build of the CPU attention backward (bwd_kernel_impl.h): the avx512 build plus AMX tile
// products for bf16 inputs (bwd_amx_impl.h). Only called after the run-time ISA check in
// attention_backward.cpp, for bf16 inputs; shapes the tiles cannot take go to the avx512 build.
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
#include "cpu/simd/amx_tiles.h"
#include "cpu/backward/bwd_common.h"
#include "cpu/simd/fp_env.h"
#include "cpu/scratch_cache.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace bwd_amx {

#include "cpu/backward/bwd_vec_avx512.h"
#include "cpu/backward/bwd_kernel_impl.h"

}  // namespace bwd_amx

void attention_backward_amx(const AttnBwdParams& p, int num_threads) {
  if (bwd_amx::use_amx(p.fwd) && !has_score_mods(p)) {
    bwd_amx::run(p, num_threads);
  } else {
    attention_backward_avx512(p, num_threads);
  }
}

}  // namespace cpu
}  // namespace hk
