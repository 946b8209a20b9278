// Entry points of the per-ISA CPU backward kernels (bwd_amx.cpp, bwd_avx512.cpp, bwd_avx2.cpp,
// bwd_scalar.cpp).
// attention_backward.cpp validates the parameters and picks one of these at run time; each runs
// the same algorithm (bwd_kernel_impl.h) compiled for its instruction set.
#pragma once

#include "common/attn_params.h"

namespace hk {
namespace cpu {

// All expect validated parameters and num_threads >= 1; the amx one bf16 inputs (it hands shapes
// its tiles cannot take to the avx512 build).
void attention_backward_amx(const AttnBwdParams& p, int num_threads);
void attention_backward_avx512(const AttnBwdParams& p, int num_threads);
void attention_backward_avx2(const AttnBwdParams& p, int num_threads);
void attention_backward_scalar(const AttnBwdParams& p, int num_threads);

}  // namespace cpu
}  // namespace hk
