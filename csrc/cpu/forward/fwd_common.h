// Internal interface of the CPU forward kernel: one entry point per instruction set (each in its
// own translation unit, compiled with that ISA's flags) and a few ISA-free helpers.
#pragma once
#include <xmmintrin.h>

#include <cstdint>

#include "common/attn_params.h"
#include "cpu/scratch_cache.h"

namespace hk {
namespace cpu {

// Called by attention_forward() after validation and ISA selection.
void attention_forward_amx(const AttnParams& p);  // bf16 on AMX tiles, the rest as avx512
void attention_forward_avx512(const AttnParams& p);
void attention_forward_avx2(const AttnParams& p);
void attention_forward_scalar(const AttnParams& p);

namespace {

// 64-byte aligned scratch buffer (no std::vector: see simd_common.h on ISA-specific inlines);
// large ones come from the scratch cache (scratch_cache.h).
template <class T>
class AlignedBuf {
 public:
  AlignedBuf() = default;
  explicit AlignedBuf(int64_t n) { reset(n); }
  ~AlignedBuf() { scratch_free(ptr_, bytes_); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  void reset(int64_t n) {
    scratch_free(ptr_, bytes_);
    ptr_ = nullptr;
    bytes_ = 0;
    if (n <= 0) return;
    bytes_ = static_cast<size_t>(n) * sizeof(T);
    ptr_ = static_cast<T*>(scratch_alloc(bytes_));
  }
  T* get() const { return ptr_; }
  T& operator[](int64_t i) const { return ptr_[i]; }

 private:
  T* ptr_ = nullptr;
  size_t bytes_ = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Asks for the cache lines of the `bytes` bytes from `p` into L2.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

}  // namespace
}  // namespace cpu
}  // namespace hk
