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
// query row per SIMD lane and would leave most lanes idle. Measured (AVX-512, D = 64, 1 thread):
// the decode path is faster up to Nq = 8, the blocked kernel from Nq = 16.
constexpr int64_t kDecodeMaxNq = 8;

inline bool decode_path_applies(const AttnParams& p) { return p.Nq <= kDecodeMaxNq; }

}  // namespace
}  // namespace cpu
}  // namespace hk
