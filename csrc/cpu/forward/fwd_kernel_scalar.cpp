// Portable forward (no intrinsics): every dtype through CoreF32 with one-lane "vectors".
#include "cpu/forward/fwd_core_f32.h"
#include "cpu/forward/fwd_driver.h"

namespace hk {
namespace cpu {
namespace {
template <int DC, int DVC>
using CoreScalarF32 = CoreF32<VecScalar, 8, 2, 2, DC, DVC>;
}  // namespace

void attention_forward_scalar(const AttnParams& p) {
  run_with_head_dims<CoreScalarF32>(
      p, p.dtype != DType::F32 || (p.k_stride[2] == p.D && p.v_stride[2] == p.Dv));
}

}  // namespace cpu
}  // namespace hk
