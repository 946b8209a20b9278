// Helpers of the INT8 forward driver: aligned buffers, dtype conversion of V rows and output
// rows, kernel-set selection. Baseline-ISA code only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "common/attn_params.h"
#include "cpu/scratch_cache.h"
#include "cpu/int8/int8_kernels.h"

namespace hk {
namespace cpu {
namespace int8 {

// 64-byte aligned, uninitialized, move-only array; large ones come from the scratch cache.
template <class T>
struct AlignedBuf {
  T* p = nullptr;
  size_t bytes = 0;
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  AlignedBuf(AlignedBuf&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  ~AlignedBuf() { scratch_free(p, bytes); }
  void alloc(int64_t n) {
    scratch_free(p, bytes);
    p = nullptr;
    bytes = size_t(n > 0 ? n : 1) * sizeof(T);
    p = static_cast<T*>(scratch_alloc(bytes));
  }
};

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
