// AVX2+FMA forward: every dtype through CoreF32 (bf16/fp16 K and V converted to fp32 once).
#include "cpu/forward/fwd_core_f32.h"
#include "cpu/forward/fwd_driver.h"

namespace hk {
namespace cpu {
namespace {
template <int DC, int DVC>
using CoreAvx2F32 = CoreF32<VecAvx2, 2, 4, 4, DC, DVC>;
}  // namespace

void attention_forward_avx2(const AttnParams& p) {
  run_with_head_dims<CoreAvx2F32>(
      p, p.dtype != DType::F32 || (p.k_stride[2] == p.D && p.v_stride[2] == p.Dv));
}

}  // namespace cpu
}  // namespace hk
