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
// The pre-quantized int8 K cache (q8 / k8 given) on the decode path; avx512 build only.
void attention_forward_decode_int8_avx512(const AttnInt8Params& p);

namespace {

// Calls with at most this many query rows take the decode path: the blocked kernel holds one
// query row per SIMD lane and would leave most lanes idle. Measured (AVX-512, D = 64, 1 thread):
// the decode path is faster up to Nq = 8, the blocked kernel from Nq = 16.
constexpr int64_t kDecodeMaxNq = 8;

inline bool decode_path_applies(const AttnParams& p) { return p.Nq <= kDecodeMaxNq; }

// The int8 decode path: a pre-quantized K (Q pre-quantized or quantized first), few query rows,
// q8 . k8 exact in fp32 (D <= 1024); a softcap only with q quantized here (the smoothing shift
// joins the scores before the cap).
inline bool decode_int8_applies(const AttnInt8Params& p) {
  return p.k8 != nullptr && p.fwd.Nq <= kDecodeMaxNq && p.fwd.Nk > 0 &&
         (p.fwd.softcap == 0.f || p.q8 == nullptr) && p.fwd.D <= 1024;
}

}  // namespace
}  // namespace cpu
}  // namespace hk
