// Entry points of the CPU attention kernels (implemented in csrc/cpu/*.cpp).
// All functions validate what they rely on and throw std::invalid_argument with a message naming
// the offending field; pybind11 turns that into ValueError.
#pragma once
#include <string>

#include "common/attn_params.h"

namespace hk {
namespace cpu {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
  bool avx512vnni = false;
  bool amx_tile = false;  // AMX tile state enabled by the OS *and* granted to this process
  bool amx_bf16 = false;
  bool amx_int8 = false;
};

CpuFeatures detect_cpu_features();
// The instruction set the kernels dispatch to on this machine: "amx" (AVX-512 plus AMX tiles for
// the bf16 and int8 products), "avx512", "avx2" or "scalar".
// Overridable for testing with the environment variable HYBRID_KERNELS_CPU_ISA.
std::string selected_isa();

void attention_forward(const AttnParams& p);
void attention_backward(const AttnBwdParams& p);
void attention_forward_int8(const AttnInt8Params& p);

}  // namespace cpu
}  // namespace hk
