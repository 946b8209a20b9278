// AVX-512 forward: fp32 and fp16 (converted to fp32) through CoreF32, bf16 through vdpbf16ps.
#include "cpu/forward/fwd_core_bf16.h"
#include "cpu/forward/fwd_core_f32.h"
#include "cpu/forward/fwd_driver.h"

namespace hk {
namespace cpu {
namespace {
template <int DC, int DVC>
using CoreAvx512F32 = CoreF32<VecAvx512, 2, 12, 8, DC, DVC>;  // 24 + 3 of the 32 zmm registers in qk
}  // namespace

void attention_forward_avx512(const AttnParams& p) {
  if (p.dtype == DType::BF16) {
    run_with_head_dims<CoreBF16>(p, p.k_stride[2] == p.D);
  } else {
    run_with_head_dims<CoreAvx512F32>(
        p, p.dtype != DType::F32 || (p.k_stride[2] == p.D && p.v_stride[2] == p.Dv));
  }
}

}  // namespace cpu
}  // namespace hk
