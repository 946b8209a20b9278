// Entry points of the per-ISA CPU backward kernels (bwd_amx.cpp, bwd_avx512.cpp, bwd_avx2.cpp,
// bwd_scalar.cpp).
// attention_backward.cpp validates the parameters and picks one of these at run time; each runs
// the same algorithm (bwd_kernel_impl.h) compiled for its instruction set.
#pragma once

#include "common/attn_params.h"

namespace hk {
namespace cpu {

namespace {  // internal linkage: this header is compiled with different ISA flags

// A call with score modifiers (or asking for dbias, the gradient at bias = 0 without a bias):
// these run the avx512 / avx2 / scalar builds, never the AMX tile step.
inline bool has_score_mods(const AttnBwdParams& p) {
  return p.fwd.softcap > 0.f || p.fwd.bias != nullptr || p.dbias != nullptr;
}

}  // namespace

// All expect validated parameters and num_threads >= 1; the amx one bf16 inputs (it hands shapes
// its tiles cannot take to the avx512 build).
void attention_backward_amx(const AttnBwdParams& p, int num_threads);
void attention_backward_avx512(const AttnBwdParams& p, int num_threads);
void attention_backward_avx2(const AttnBwdParams& p, int num_threads);
void attention_backward_scalar(const AttnBwdParams& p, int num_threads);

}  // namespace cpu
}  // namespace hk
