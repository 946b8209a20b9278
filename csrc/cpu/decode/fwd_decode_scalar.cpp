// Decode fast path of the forward (few query rows), scalar build; see fwd_decode.h.
#include "cpu/decode/fwd_decode.h"

namespace hk {
namespace cpu {

void attention_forward_decode_scalar(const AttnParams& p) { DecodeForward<VecScalar>::run(p); }

}  // namespace cpu
}  // namespace hk
