// Decode fast path of the forward (few query rows), avx2 build; see fwd_decode.h.
#include "cpu/decode/fwd_decode.h"

namespace hk {
namespace cpu {

void attention_forward_decode_avx2(const AttnParams& p) { DecodeForward<VecAvx2>::run(p); }

}  // namespace cpu
}  // namespace hk
