// Floating-point environment of the CPU kernels' worker threads.
#pragma once
#include <xmmintrin.h>

namespace hk {
namespace cpu {

// Flush-to-zero and denormals-are-zero for the calling thread while in scope (restored after).
// Every masked score goes through exp2(-inf) = 0, an underflowing vscalefps; without FTZ each
// such vector instruction takes a microcode assist (~100+ cycles on Intel cores), which made the
// masked edge tiles cost as much as the rest of a query block. Values below 2^-126 (1.2e-38)
// become 0, far below the fp32 rounding of any attention output.
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  static constexpr unsigned kFtzDaz = 0x8040u;  // MXCSR bits 15 (FTZ) and 6 (DAZ)
  unsigned saved_;
};

}  // namespace cpu
}  // namespace hk
