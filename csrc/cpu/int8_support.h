// Helpers of the INT8 forward driver: aligned buffers, dtype conversion of V rows and output
// rows, kernel-set selection. Baseline-ISA code only.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>

#include "common/attn_params.h"
#include "cpu/int8_kernels.h"

namespace hk {
namespace cpu {
namespace int8 {

// 64-byte aligned, uninitialized, move-only array.
template <class T>
struct AlignedBuf {
  T* p = nullptr;
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  AlignedBuf(AlignedBuf&& o) noexcept : p(o.p) { o.p = nullptr; }
  ~AlignedBuf() { std::free(p); }
  void alloc(int64_t n) {
    std::free(p);
    const size_t bytes = (size_t(n > 0 ? n : 1) * sizeof(T) + 63) / 64 * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
};

// n elements of `dtype` at src -> fp32 dst.
void to_float(const void* src, DType dtype, int64_t n, float* dst);
// n fp32 -> `dtype` at dst (round to nearest even).
void from_float(const float* src, DType dtype, int64_t n, void* dst);

// Kernel set for the ISA name from selected_isa() ("avx512", "avx2", "scalar"), downgraded to
// what this CPU really supports for the int8 path (AVX-512 needs VNNI).
const Kernels* select_kernels(const std::string& isa);

int default_threads();

}  // namespace int8
}  // namespace cpu
}  // namespace hk
