// Decode fast path of the CPU forward (fwd_decode.h): entry points per instruction set and the
// rule that routes a call to it.
#pragma once
#include <cstdint>

#include "common/attn_params.h"

namespace hk {
namespace cpu {

void attention_forward_decode_avx512(const AttnParams& p);
void attention_forward_decode_avx2(const AttnParams& p);
void attention_forward_decode_scalar(const AttnParams& p);

namespace {

// Calls with at most this many query rows take the decode path: the blocked kernel holds one
// query row per SIMD lane and would leave most lanes idle. Chosen by measurement (see fwd_decode.h).
constexpr int64_t kDecodeMaxNq = 4;

inline bool decode_path_applies(const AttnParams& p) { return p.Nq <= kDecodeMaxNq; }

}  // namespace
}  // namespace cpu
}  // namespace hk
