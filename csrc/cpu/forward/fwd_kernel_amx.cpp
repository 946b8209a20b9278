// AMX forward: bf16 inputs through the AMX tile core (fwd_core_amx.h) when the head sizes fit its
// 16 x 64-byte tiles; everything else exactly as the avx512 build.
#include "cpu/forward/fwd_core_amx.h"
#include "cpu/forward/fwd_driver.h"

namespace hk {
namespace cpu {

void attention_forward_amx(const AttnParams& p) {
  if (p.dtype == DType::BF16 && p.D % 32 == 0 && p.Dv % 16 == 0) {
    run_with_head_dims<CoreAmx>(p, true);  // tiles take any K row stride
  } else {
    attention_forward_avx512(p);
  }
}

}  // namespace cpu
}  // namespace hk
