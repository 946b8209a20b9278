// CPU attention backward: parameter validation and run-time ISA dispatch. The kernel itself is
// bwd_kernel_impl.h, compiled per ISA in bwd_amx.cpp / bwd_avx512.cpp / bwd_avx2.cpp /
// bwd_scalar.cpp.
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cpu/attention_cpu.h"
#include "cpu/backward/bwd_common.h"

namespace hk {
namespace cpu {
namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("attention_backward: " + msg);
}

void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

void validate(const AttnBwdParams& p) {
  const AttnParams& f = p.fwd;
  require(f.B >= 0, "B must be >= 0");
  require(f.Hq > 0, "Hq must be > 0");
  require(f.Hk > 0, "Hk must be > 0");
  require(f.Hq % f.Hk == 0, "Hq must be a multiple of Hk");
  require(f.Nq >= 0, "Nq must be >= 0");
  require(f.Nk >= 0, "Nk must be >= 0");
  require(f.Nk < (int64_t(1) << 31), "Nk must be < 2^31");
  require(f.D > 0, "D must be > 0");
  require(f.Dv > 0, "Dv must be > 0");
  require(f.dtype == DType::F32 || f.dtype == DType::BF16 || f.dtype == DType::F16,
          "dtype must be F32, BF16 or F16");
  require(std::isfinite(f.scale), "scale must be finite");
  require(!std::isnan(f.softcap) && !std::isinf(f.softcap), "softcap must be finite");
  require(p.grad_dtype == DType::F32 || p.grad_dtype == DType::BF16 || p.grad_dtype == DType::F16,
          "grad_dtype must be F32, BF16 or F16");
  const bool lp = p.grad_dtype != DType::F32;
  const bool has_q = f.B > 0 && f.Nq > 0, has_k = f.B > 0 && f.Nk > 0;
  if (has_q) {
    require(f.q != nullptr, "q is null");
    require(f.o != nullptr, "o is null");
    require(f.lse != nullptr, "lse is null");
    require(p.dout != nullptr, "dout is null");
    require(p.dq != nullptr || lp, "dq is null");
    require(!lp || p.dq_lp != nullptr, "dq_lp is null (grad_dtype is not F32)");
  }
  if (has_k) {
    require(f.k != nullptr, "k is null");
    require(f.v != nullptr, "v is null");
    require(p.dk != nullptr || lp, "dk is null");
    require((p.dk == nullptr) == (p.dv == nullptr), "dk and dv must be both null or both set");
    require(!lp || (p.dk_lp != nullptr && p.dv_lp != nullptr),
            "dk_lp / dv_lp are null (grad_dtype is not F32)");
  }
  require(f.num_landmarks >= 0, "num_landmarks must be >= 0");
  if (f.num_landmarks > 0 && f.B > 0) {
    require(f.landmarks != nullptr, "landmarks is null but num_landmarks > 0");
    require(f.landmark_flags != nullptr, "landmark_flags is null but num_landmarks > 0");
    require(f.landmarks_batch_stride >= 0, "landmarks_batch_stride must be >= 0");
    require(f.landmark_flags_batch_stride >= 0, "landmark_flags_batch_stride must be >= 0");
    const int64_t nb = f.landmarks_batch_stride == 0 ? 1 : f.B;
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t* lm = f.landmarks + b * f.landmarks_batch_stride;
      for (int64_t g = 0; g < f.num_landmarks; ++g) {
        if (lm[g] < 0 || lm[g] >= f.Nk) fail("landmarks must lie in [0, Nk)");
        if (g > 0 && lm[g] <= lm[g - 1]) fail("landmarks must be sorted and unique");
      }
    }
    // The kernel uses both forms: the flags must mark exactly the listed positions.
    const int64_t nbf = f.landmark_flags_batch_stride == 0 ? 1 : f.B;
    for (int64_t b = 0; b < (nb > nbf ? nb : nbf); ++b) {
      const int32_t* lm = f.landmarks + (nb == 1 ? 0 : b) * f.landmarks_batch_stride;
      const uint8_t* fl = f.landmark_flags + (nbf == 1 ? 0 : b) * f.landmark_flags_batch_stride;
      int64_t set = 0;
      for (int64_t j = 0; j < f.Nk; ++j) set += fl[j] != 0;
      bool ok = set == f.num_landmarks;
      for (int64_t g = 0; ok && g < f.num_landmarks; ++g) ok = fl[lm[g]] != 0;
      if (!ok) fail("landmark_flags must mark exactly the positions in landmarks");
    }
  }
}

int thread_count(const AttnParams& f) {
  if (f.num_threads > 0) return f.num_threads;
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

void attention_backward(const AttnBwdParams& p) {
  validate(p);
  const int nth = thread_count(p.fwd);
  // selected_isa() applies the cpuid check and the HYBRID_KERNELS_CPU_ISA override; the feature
  // re-check keeps a wrong answer from turning into SIGILL.
  const std::string isa = selected_isa();
  const CpuFeatures cpu = detect_cpu_features();
  // (The avx512 build runs bf16 inputs on vdpbf16ps, hence avx512bf16. The AMX build only
  // changes the bf16 products; fp32 / fp16 inputs run the avx512 build.)
  const bool avx512 = isa == "amx" || isa == "avx512";
  const bool avx512_ok = cpu.avx512f && cpu.avx512bw && cpu.avx512vl && cpu.avx512bf16;
  // Score modifiers are applied by one fp32 helper of the backward (bwd_kernel_impl.h) that the
  // AMX tile step does not call: calls with them run the avx512 build.
  if (isa == "amx" && p.fwd.dtype == DType::BF16 && avx512_ok && cpu.amx_tile && cpu.amx_bf16 &&
      !has_score_mods(p)) {
    attention_backward_amx(p, nth);
  } else if (avx512 && avx512_ok) {
    attention_backward_avx512(p, nth);
  } else if ((avx512 || isa == "avx2") && cpu.avx2 && cpu.fma && cpu.f16c) {
    attention_backward_avx2(p, nth);
  } else {
    attention_backward_scalar(p, nth);
  }
}

#ifdef HK_NO_AMX
// This build has no amx translation units (see CMakeLists.txt); selected_isa() never says "amx".
void attention_backward_amx(const AttnBwdParams& p, int num_threads) {
  attention_backward_avx512(p, num_threads);
}
#endif

}  // namespace cpu
}  // namespace hk
