// CPU feature detection (cpuid + xgetbv) and the ISA choice for the CPU kernels.
#include <cpuid.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cpu/attention_cpu.h"

namespace hk {
namespace cpu {
namespace {

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

struct Detected {
  CpuFeatures f;
  bool avx512dq = false;
};

Detected detect() {
  Detected d;
  unsigned a, b, c, e;
  if (!__get_cpuid(1, &a, &b, &c, &e)) return d;
  const bool osxsave = c & (1u << 27);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;                  // XMM + YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;   // + opmask, ZMM state
  d.f.fma = os_avx && (c & (1u << 12));
  d.f.f16c = os_avx && (c & (1u << 29));
  if (__get_cpuid_max(0, nullptr) < 7) return d;
  __cpuid_count(7, 0, a, b, c, e);
  d.f.avx2 = os_avx && (b & (1u << 5));
  d.f.avx512f = os_avx512 && (b & (1u << 16));
  d.avx512dq = os_avx512 && (b & (1u << 17));
  d.f.avx512bw = os_avx512 && (b & (1u << 30));
  d.f.avx512vl = os_avx512 && (b & (1u << 31));
  d.f.avx512vnni = os_avx512 && (c & (1u << 11));
  const unsigned max_sub = a;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, e);
    d.f.avx512bf16 = os_avx512 && (a & (1u << 5));
  }
  return d;
}

const Detected& detected() {
  static const Detected d = detect();
  return d;
}

// The avx512 kernels are compiled with f/bw/vl/dq/bf16/vnni (+ avx2/fma/f16c); avx2 ones with
// avx2/fma/f16c. Only offer an ISA when every one of its compile flags is backed by the CPU.
bool has_avx2() {
  const CpuFeatures& f = detected().f;
  return f.avx2 && f.fma && f.f16c;
}
bool has_avx512() {
  const Detected& d = detected();
  return has_avx2() && d.f.avx512f && d.f.avx512bw && d.f.avx512vl && d.avx512dq &&
         d.f.avx512bf16 && d.f.avx512vnni;
}

}  // namespace

CpuFeatures detect_cpu_features() { return detected().f; }

std::string selected_isa() {
  const std::string best = has_avx512() ? "avx512" : has_avx2() ? "avx2" : "scalar";
  const char* env = std::getenv("HYBRID_KERNELS_CPU_ISA");
  if (!env || !*env) return best;
  const std::string want(env);
  if (want == "scalar") return want;
  if (want == "avx2" && has_avx2()) return want;
  if (want == "avx512" && has_avx512()) return want;
  if (want == "avx2" || want == "avx512")
    throw std::invalid_argument("HYBRID_KERNELS_CPU_ISA=" + want + " but this CPU does not support it");
  throw std::invalid_argument("HYBRID_KERNELS_CPU_ISA must be avx512, avx2 or scalar, got '" + want + "'");
}

}  // namespace cpu
}  // namespace hk
