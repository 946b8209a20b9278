// quant="int8" on the forward driver with AVX-512 VNNI (QK^T, vpdpbusd) and BF16 (PV, the bf16
// core's vdpbf16ps on V as bf16 key pairs); see fwd_core_int8.h.
#include <immintrin.h>

#include "cpu/forward/fwd_core_bf16.h"
#include "cpu/int8/fwd_core_int8.h"
#include "cpu/simd/exp2.h"
#include "cpu/int8/int8_quantize_avx2.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

struct OpsAvx512 {
  using I = __m512i;
  static constexpr bool kVPairs = true;
  static I load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static I set1(int32_t x) { return _mm512_set1_epi32(x); }
  static I dot(I acc, I q, I k) { return _mm512_dpbusd_epi32(acc, q, k); }
  static __m512 to_float(I x) { return _mm512_cvtepi32_ps(x); }
  static __m512 exp2(__m512 x) { return cpu::exp2<Exp2::kBf16>(x); }
};

template <int DC, int DVC>
// 8 keys per QK register tile (16 + 3 zmm). With 12 (24 + 3 zmm) GCC 12 copied every vpdpbusd
// result to the stack and the int8 forward ran 16% slower (N = 16384, D = 64, one Zen 4 core).
using CoreAvx512Int8 = CoreInt8<VecAvx512, OpsAvx512, CoreBF16<0, DVC>, 8, DC>;

void forward_avx512(const AttnInt8Params& p, const Kernels& kern) {
  run_int8_with_head_dims<CoreAvx512Int8>(p, kern);
}

const Kernels kAvx512 = {"avx512", absmax_avx2, quantize_avx2, widen_avx2, forward_avx512};

}  // namespace

const Kernels* kernels_avx512() { return &kAvx512; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
