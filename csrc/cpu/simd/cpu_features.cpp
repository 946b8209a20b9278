// CPU feature detection (cpuid + xgetbv) and the ISA choice for the CPU kernels.
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

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

// Linux (>= 5.16) hands out the 8 KiB AMX tile-data state only to processes that ask for it;
// without the grant the first tile instruction raises SIGILL.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

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
  const bool os_amx = (xcr0 & (3u << 17)) == (3u << 17);  // XTILECFG + XTILEDATA state
  const bool amx_tile = os_amx && (e & (1u << 24));
  if (amx_tile && request_amx_permission()) {
    d.f.amx_tile = true;
    d.f.amx_bf16 = (e & (1u << 22)) != 0;
    d.f.amx_int8 = (e & (1u << 25)) != 0;
  }
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

// The amx kernels are the avx512 ones plus -mamx-tile/-mamx-bf16/-mamx-int8.
bool has_amx() {
#ifdef HK_NO_AMX  // built by a compiler without AMX support: no amx kernels in this module
  return false;
#endif
  const CpuFeatures& f = detected().f;
  return has_avx512() && f.amx_tile && f.amx_bf16 && f.amx_int8;
}

}  // namespace

CpuFeatures detect_cpu_features() { return detected().f; }

std::string selected_isa() {
  const std::string best = has_amx() ? "amx" : has_avx512() ? "avx512" : has_avx2() ? "avx2" : "scalar";
  const char* env = std::getenv("HYBRID_KERNELS_CPU_ISA");
  if (!env || !*env) return best;
  const std::string want(env);
  if (want == "scalar") return want;
  if (want == "avx2" && has_avx2()) return want;
  if (want == "avx512" && has_avx512()) return want;
  if (want == "amx" && has_amx()) return want;
  if (want == "avx2" || want == "avx512" || want == "amx")
    throw std::invalid_argument("HYBRID_KERNELS_CPU_ISA=" + want +
                                " but this CPU (or this build of hybrid_kernels) does not support it");
  throw std::invalid_argument("HYBRID_KERNELS_CPU_ISA must be amx, avx512, avx2 or scalar, got '" + want + "'");
}

}  // namespace cpu
}  // namespace hk
