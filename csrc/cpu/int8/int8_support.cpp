// Baseline-ISA helpers of the INT8 forward (see int8_support.h).
#include "cpu/int8/int8_support.h"

#include "cpu/attention_cpu.h"
#include "cpu/simd/simd_common.h"

#include <cpuid.h>

#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hk {
namespace cpu {
namespace int8 {
namespace {

struct Isa {
  bool avx2 = false, avx512 = false;
};

// Own cpuid probe: the int8 path also needs AVX-512 VNNI, which CpuFeatures may not
// report, and OS support of the register state (xgetbv).
Isa probe() {
  Isa isa;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return isa;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return isa;
  uint32_t xlo, xhi;
  __asm__("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const bool ymm_os = (xlo & 0x6) == 0x6, zmm_os = (xlo & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return isa;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool dq = b & (1u << 17), vnni = c & (1u << 11);
  __cpuid_count(7, 1, a, b, c, d);
  const bool bf16 = a & (1u << 5);
  isa.avx2 = ymm_os && avx2 && fma && f16c;
  isa.avx512 = isa.avx2 && zmm_os && f && bw && vl && dq && vnni && bf16;
  return isa;
}

// AMX tiles usable by this process (cpuid, OS state and the Linux permission grant).
#ifndef HK_NO_AMX
bool has_amx_int8_tiles() {
  const CpuFeatures f = detect_cpu_features();
  return f.amx_tile && f.amx_bf16 && f.amx_int8;
}
#endif

}  // namespace

void round_to_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}

void to_float(const void* src, DType dtype, int64_t n, float* dst) {
  if (dtype == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else if (dtype == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  } else {
    const _Float16* s = static_cast<const _Float16*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = float(s[i]);
  }
}

void from_float(const float* src, DType dtype, int64_t n, void* dst) {
  if (dtype == DType::F32) {
    std::memcpy(dst, src, size_t(n) * 4);
  } else if (dtype == DType::BF16) {
    uint16_t* o = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(src[i]);
  } else {
    _Float16* o = static_cast<_Float16*>(dst);
    for (int64_t i = 0; i < n; ++i) o[i] = _Float16(src[i]);
  }
}

const Kernels* select_kernels(const std::string& name) {
  static const Isa isa = probe();
#ifndef HK_NO_AMX  // built without the amx kernels when the compiler lacks AMX (CMakeLists.txt)
  if (name == "amx" && isa.avx512 && has_amx_int8_tiles()) return kernels_amx();
#endif
  if ((name == "amx" || name == "avx512") && isa.avx512) return kernels_avx512();
  if ((name == "amx" || name == "avx512" || name == "avx2") && isa.avx2) return kernels_avx2();
  return kernels_scalar();
}

int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace int8
}  // namespace cpu
}  // namespace hk
