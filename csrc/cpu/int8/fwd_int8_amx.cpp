// quant="int8" with fused quantization on the forward driver with AMX tiles
// (fwd_core_int8_amx.h); attention_forward_int8 routes here (see int8_kernels.h).
#include "cpu/int8/fwd_core_int8_amx.h"
#include "cpu/forward/fwd_driver.h"

namespace hk {
namespace cpu {
namespace int8 {

void attention_forward_int8_amx(const AttnInt8Params& p, const Kernels& kern) {
  AttnParams f = p.fwd;
  // A window at least Nq + Nk wide covers every key (as attention_forward normalizes it).
  if (f.window_left >= f.Nq + f.Nk) f.window_left = -1;
  if (f.window_right >= f.Nq + f.Nk) f.window_right = -1;
  const PrepInt8Amx prep(p, f, kern);
  ForwardDriver<CoreInt8Amx>::run(prep.driver_params(), prep);
}

}  // namespace int8
}  // namespace cpu
}  // namespace hk
