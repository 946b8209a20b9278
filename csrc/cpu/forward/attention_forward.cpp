// CPU forward attention entry point: validates the parameters, then runs the kernel of the
// selected instruction set (fwd_kernel_{avx512,avx2,scalar}.cpp).
#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu/attention_cpu.h"
#include "cpu/forward/fwd_common.h"
#include "cpu/decode/fwd_decode_entry.h"

namespace hk {
namespace cpu {
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument("attention_forward: " + msg); }

// The message is a C string, made into a std::string only on failure: built on every check, the
// strings cost ~0.7 us of a ~7 us one-token call.
void require(bool ok, const char* msg) {
  if (!ok) fail(msg);
}

void check_strides(const int64_t* s, const char* name) {
  for (int i = 0; i < 3; ++i)
    if (s[i] < 0) fail(std::string(name) + " must be non-negative");
}

void check_landmarks(const AttnParams& p) {
  require(p.num_landmarks >= 0, "num_landmarks must be >= 0");
  if (p.num_landmarks == 0) return;
  require(p.landmarks != nullptr, "landmarks is null but num_landmarks > 0");
  require(p.landmark_flags != nullptr, "landmark_flags is null but num_landmarks > 0");
  require(p.landmarks_batch_stride >= 0, "landmarks_batch_stride must be >= 0");
  require(p.landmark_flags_batch_stride >= 0, "landmark_flags_batch_stride must be >= 0");
  for (int64_t b = 0; b < p.B; ++b) {
    const int32_t* lm = p.landmarks + b * p.landmarks_batch_stride;
    const uint8_t* flags = p.landmark_flags + b * p.landmark_flags_batch_stride;
    for (int64_t g = 0; g < p.num_landmarks; ++g) {
      require(lm[g] >= 0 && lm[g] < p.Nk, "landmarks must lie in [0, Nk)");
      require(g == 0 || lm[g] > lm[g - 1], "landmarks must be sorted and unique");
    }
    for (int64_t g = 0; g < p.num_landmarks; ++g)
      require(flags[lm[g]] != 0, "landmark_flags disagree with landmarks");
    int64_t count = 0;
    for (int64_t j = 0; j < p.Nk; ++j) count += flags[j] != 0;
    require(count == p.num_landmarks, "landmark_flags disagree with landmarks");
  }
}

void validate(const AttnParams& p) {
  require(p.B >= 0 && p.Nq >= 0 && p.Nk >= 0, "B, Nq and Nk must be >= 0");
  require(p.Hq > 0 && p.Hk > 0, "Hq and Hk must be > 0");
  require(p.Hq % p.Hk == 0, "Hq must be a multiple of Hk");
  require(p.D > 0, "D must be > 0");
  require(p.Dv > 0, "Dv must be > 0");
  require(p.Nk < (int64_t(1) << 31), "Nk must be < 2^31");
  require(p.dtype == DType::F32 || p.dtype == DType::BF16 || p.dtype == DType::F16, "dtype is invalid");
  require(std::isfinite(p.scale), "scale must be finite");
  require(!std::isnan(p.softcap) && !std::isinf(p.softcap), "softcap must be finite");
  check_strides(p.q_stride, "q_stride");
  check_strides(p.k_stride, "k_stride");
  check_strides(p.v_stride, "v_stride");
  check_strides(p.o_stride, "o_stride");
  if (p.B == 0 || p.Nq == 0) return;
  require(p.q != nullptr, "q is null");
  require(p.o != nullptr, "o is null");
  require(p.lse != nullptr, "lse is null");
  if (p.Nk > 0) {
    require(p.k != nullptr, "k is null");
    require(p.v != nullptr, "v is null");
  }
  check_landmarks(p);
}

}  // namespace

void attention_forward(const AttnParams& params) {
  validate(params);
  if (params.B == 0 || params.Nq == 0) return;
  AttnParams p = params;
  // A window at least Nq + Nk wide covers every key: same as unlimited, and keeps index math small.
  if (p.window_left >= p.Nq + p.Nk) p.window_left = -1;
  if (p.window_right >= p.Nq + p.Nk) p.window_right = -1;
  if (p.window_left < 0) p.window_left = -1;
  if (p.window_right < 0) p.window_right = -1;
  if (p.num_landmarks == 0) {
    p.landmarks = nullptr;
    p.landmark_flags = nullptr;
  }
  if (!(p.softcap > 0.f)) p.softcap = 0.f;
  const bool mods = p.softcap > 0.f || p.bias != nullptr;
  const std::string isa = selected_isa();
  if (decode_path_applies(p)) {
    if (isa == "amx" || isa == "avx512") {
      attention_forward_decode_avx512(p);
    } else if (isa == "avx2") {
      attention_forward_decode_avx2(p);
    } else {
      attention_forward_decode_scalar(p);
    }
    return;
  }
  // The AMX bf16 core folds the scale into its own softmax and never holds the scores in the
  // driver's units, so the score modifiers cannot be applied to its tiles: calls with a modifier
  // take the avx512 kernels (same instruction set minus the tiles).
  if (isa == "amx" && !mods) {
    attention_forward_amx(p);
  } else if (isa == "amx") {
    attention_forward_avx512(p);
  } else if (isa == "avx512") {
    attention_forward_avx512(p);
  } else if (isa == "avx2") {
    attention_forward_avx2(p);
  } else {
    attention_forward_scalar(p);
  }
}

#ifdef HK_NO_AMX
// This build has no amx translation units (see CMakeLists.txt); selected_isa() never says "amx".
void attention_forward_amx(const AttnParams& p) { attention_forward_avx512(p); }
#endif

}  // namespace cpu
}  // namespace hk
