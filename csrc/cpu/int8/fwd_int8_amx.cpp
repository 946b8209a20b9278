// quant="int8" on AMX tiles: the forward driver with the AMX int8 core (fwd_core_int8_amx.h) for
// calls with Nk > 0, Dv % 16 == 0 and no score modifier (its softmax folds the scale, so the
// driver cannot modify its scores), quantizing inside (fused) or taking pre-quantized Q / K (the
// same core either way, so both give the same bits); every other call on the avx512 set's driver
// core, which this CPU also runs.
#include "cpu/forward/fwd_driver.h"
#include "cpu/int8/fwd_core_int8_amx.h"
#include "cpu/int8/int8_quantize_avx2.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

void forward_amx(const AttnInt8Params& p, const Kernels& kern) {
  if (p.fwd.Nk == 0 || p.fwd.Dv % 16 != 0 || p.fwd.softcap > 0.f || p.fwd.bias != nullptr) {
    kernels_avx512()->forward(p, kern);
    return;
  }
  AttnParams f = p.fwd;
  // A window at least Nq + Nk wide covers every key (as attention_forward normalizes it).
  if (f.window_left >= f.Nq + f.Nk) f.window_left = -1;
  if (f.window_right >= f.Nq + f.Nk) f.window_right = -1;
  const PrepInt8Amx prep(p, f, kern);
  ForwardDriver<CoreInt8Amx>::run(prep.driver_params(), prep);
}

const Kernels kAmx = {"amx", absmax_avx2, quantize_avx2, widen_avx2, forward_amx};

}  // namespace

const Kernels* kernels_amx() { return &kAmx; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
