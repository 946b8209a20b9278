// Decode fast path of the forward (few query rows), avx512 build; see fwd_decode.h.
#include "cpu/decode/fwd_decode.h"

namespace hk {
namespace cpu {

void attention_forward_decode_avx512(const AttnParams& p) { DecodeForward<VecAvx512>::run(p); }

void attention_forward_decode_int8_avx512(const AttnInt8Params& p) { DecodeForward<VecAvx512>::run_int8(p); }

}  // namespace cpu
}  // namespace hk
