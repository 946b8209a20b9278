// quant="int8" on the forward driver with AVX2: QK^T as u8 x s8 products summed in pairs by
// vpmaddwd (exact int32), PV through the fp32 core on bf16-rounded P and V; see fwd_core_int8.h.
#include <immintrin.h>

#include "cpu/forward/fwd_core_f32.h"
#include "cpu/int8/fwd_core_int8.h"
#include "cpu/simd/exp2.h"
#include "cpu/int8/int8_quantize_avx2.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

struct OpsAvx2 {
  using I = __m256i;
  static constexpr bool kVPairs = false;
  static I load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I set1(int32_t x) { return _mm256_set1_epi32(x); }
  // acc + sum of the 4 products u8(q byte) * s8(k byte) per 32-bit lane: bytes 0, 2 and 1, 3 as
  // 16-bit pairs (|u8 * s8| < 2^15, so a pair sum fits vpmaddwd's int32).
  static I dot(I acc, I q, I k) {
    const __m256i q02 = _mm256_and_si256(q, _mm256_set1_epi32(0x00ff00ff)), q13 = _mm256_srli_epi16(q, 8);
    const __m256i k02 = _mm256_srai_epi16(_mm256_slli_epi16(k, 8), 8), k13 = _mm256_srai_epi16(k, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(q02, k02), _mm256_madd_epi16(q13, k13)));
  }
  static __m256 to_float(I x) { return _mm256_cvtepi32_ps(x); }
  static __m256 exp2(__m256 x) { return cpu::exp2<Exp2::kBf16>(x); }
  // Nearest bf16 value (ties to even); NaN passes through.
  static __m256 round_bf16(__m256 x) {
    const __m256i b = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                       _mm256_set1_epi32(int(0xffff0000u)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
};

template <int DC, int DVC>
using CoreAvx2Int8 = CoreInt8<VecAvx2, OpsAvx2, CoreF32<VecAvx2, 2, 4, 4, 0, DVC>, 4, DC>;

void forward_avx2(const AttnInt8Params& p, const Kernels& kern) {
  run_int8_with_head_dims<CoreAvx2Int8>(p, kern);
}

const Kernels kAvx2 = {"avx2", absmax_avx2, quantize_avx2, widen_avx2, forward_avx2};

}  // namespace

const Kernels* kernels_avx2() { return &kAvx2; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
