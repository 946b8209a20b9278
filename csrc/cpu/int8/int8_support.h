// Helpers of the INT8 forward: dtype conversion of rows, kernel-set selection. Baseline-ISA code only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/attn_params.h"
#include "cpu/int8/int8_kernels.h"

namespace hk {
namespace cpu {
namespace int8 {

// n elements of `dtype` at src -> fp32 dst.
void to_float(const void* src, DType dtype, int64_t n, float* dst);
// x[i] <- the nearest bf16 value (ties to even; NaN stays NaN).
void round_to_bf16(float* x, int64_t n);
// n fp32 -> `dtype` at dst (round to nearest even).
void from_float(const float* src, DType dtype, int64_t n, void* dst);

// Kernel set for the ISA name from selected_isa() ("amx", "avx512", "avx2", "scalar"), downgraded
// to what this CPU really supports for the int8 path (AVX-512 needs VNNI, amx the AMX tiles).
const Kernels* select_kernels(const std::string& isa);

int default_threads();

}  // namespace int8
}  // namespace cpu
}  // namespace hk
