// CPU INT8 forward (quant="int8", the contract of int8_kernels.h): validation, the decode route
// for a pre-quantized K cache (Int8KVCache), and the selected kernel set's forward -- the forward
// driver (fwd_driver.h) with an int8 core, the one walker of the window + landmark pattern.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/pattern.h"
#include "cpu/attention_cpu.h"
#include "cpu/decode/fwd_decode_entry.h"
#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_quantize.h"
#include "cpu/int8/int8_support.h"

namespace hk {
namespace cpu {
namespace {

constexpr int64_t kMaxHeadDim = 8192;  // keeps (q + 128) * k * D inside int32

int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

[[noreturn]] void fail(const std::string& field, const std::string& why) {
  throw std::invalid_argument("attention_forward_int8: " + field + " " + why);
}

void validate(const AttnInt8Params& p) {
  const AttnParams& f = p.fwd;
  if (f.B < 0) fail("B", "must be >= 0");
  if (f.Hq < 1) fail("Hq", "must be >= 1");
  if (f.Hk < 1) fail("Hk", "must be >= 1");
  if (f.Hq % f.Hk != 0) fail("Hq", "must be a multiple of Hk");
  if (f.Nq < 0) fail("Nq", "must be >= 0");
  if (f.Nk < 0 || f.Nk >= (int64_t(1) << 31) - 64) fail("Nk", "must be in [0, 2^31 - 64)");
  if (f.D < 1 || f.D > kMaxHeadDim) fail("D", "must be in [1, 8192]");
  if (f.Dv < 1) fail("Dv", "must be >= 1");
  if (f.dtype != DType::F32 && f.dtype != DType::BF16 && f.dtype != DType::F16)
    fail("dtype", "must be F32, BF16 or F16");
  if (!std::isfinite(f.scale)) fail("scale", "must be finite");
  if (f.softcap < 0.f || !std::isfinite(f.softcap)) fail("softcap", "must be finite and >= 0");
  // A softcap needs the smoothing shift scale * q . k_mean, which a pre-quantized q8 cannot give.
  if (f.softcap > 0.f && p.q8) fail("softcap", "needs q (q8 must be null: the kernel quantizes q)");
  if (p.q_block < 1) fail("q_block", "must be >= 1");
  if (p.k_block < 1) fail("k_block", "must be >= 1");
  if (f.num_landmarks < 0) fail("num_landmarks", "must be >= 0");
  if (f.landmarks_batch_stride < 0) fail("landmarks_batch_stride", "must be >= 0");
  if (f.landmark_flags_batch_stride < 0) fail("landmark_flags_batch_stride", "must be >= 0");
  if (f.B == 0 || f.Nq == 0) return;
  // fused: the kernel quantizes fwd.q / fwd.k itself; q8 null with k8 given: it quantizes q only
  // (a pre-quantized K cache, see forward_quantizing_q).
  const bool fused = p.q8 == nullptr && p.k8 == nullptr;
  if (p.q8 == nullptr && !f.q) fail("q", "is null (q8 is null: the kernel quantizes q)");
  if (p.q8 && !p.q_scale) fail("q_scale", "is null");
  if (!f.o) fail("o", "is null");
  if (!f.lse) fail("lse", "is null");
  if (f.Nk == 0) return;
  if (fused && !f.k) fail("k", "is null (k8 is null: fused quantization reads k)");
  if (p.q8 && !p.k8) fail("k8", "is null");
  if (p.k8 && !p.k_scale) fail("k_scale", "is null");
  if (!f.v) fail("v", "is null");
  if (f.num_landmarks > 0) {
    if (!f.landmarks) fail("landmarks", "is null but num_landmarks > 0");
    if (!f.landmark_flags) fail("landmark_flags", "is null but num_landmarks > 0");
    const int64_t nb = f.landmarks_batch_stride == 0 ? 1 : f.B;
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t* lm = f.landmarks + b * f.landmarks_batch_stride;
      for (int64_t g = 0; g < f.num_landmarks; ++g) {
        if (lm[g] < 0 || lm[g] >= f.Nk) fail("landmarks", "holds a position outside [0, Nk)");
        if (g > 0 && lm[g] <= lm[g - 1]) fail("landmarks", "must be sorted and unique");
      }
    }
  }
}

// Decode against a pre-quantized K cache (Int8KVCache): the decode kernel reads k8 and V in place
// (the driver would prepare the whole cache on every call). Q is quantized here when q8 is null,
// bit for bit as quant.quantize_qk (int8::quantize_q_block); with k_mean the lse gets
// scale * q . k_mean added back (the lse of the exact, unsmoothed scores).
void decode_int8(const AttnInt8Params& p, const int8::Kernels& kern) {
  AttnInt8Params d = p;
  AttnParams& df = d.fwd;
  if (df.window_left >= df.Nq + df.Nk || df.window_left < 0) df.window_left = -1;
  if (df.window_right >= df.Nq + df.Nk || df.window_right < 0) df.window_right = -1;
  if (df.num_landmarks == 0) {
    df.landmarks = nullptr;
    df.landmark_flags = nullptr;
  }
  const AttnParams& f = p.fwd;
  std::vector<int8_t> q8;
  std::vector<float> qs, shift;
  if (p.q8 == nullptr) {
    const int64_t nqb = ceil_div(f.Nq, p.q_block), groups = f.Hq / f.Hk;
    q8.resize(size_t(f.B * f.Hq * f.Nq * f.D));
    qs.resize(size_t(f.B * f.Hq * nqb));
    shift.assign(size_t(f.B * f.Hq * f.Nq), 0.f);
    std::vector<float> buf(size_t(std::min(p.q_block, f.Nq) * f.D));
    for (int64_t b = 0; b < f.B; ++b)
      for (int64_t h = 0; h < f.Hq; ++h)
        for (int64_t blk = 0; blk < nqb; ++blk) {
          const int64_t row0 = (b * f.Hq + h) * f.Nq + blk * p.q_block;
          const float* mean = p.k_mean ? p.k_mean + (b * f.Hk + h / groups) * f.D : nullptr;
          qs[size_t((b * f.Hq + h) * nqb + blk)] = int8::quantize_q_block(
              kern, f, b, h, blk, p.q_block, mean, q8.data() + row0 * f.D, f.D, shift.data() + row0,
              buf.data());
        }
    d.q8 = q8.data();
    d.q_scale = qs.data();
    d.k_mean = nullptr;
    // Under a softcap the shift joins the scores (the cap is not shift-invariant), so the lse
    // the kernel writes is already that of the exact scores.
    if (f.softcap > 0.f) d.score_shift = shift.data();
  }
  attention_forward_decode_int8_avx512(d);
  if (p.q8 == nullptr && p.k_mean && !(f.softcap > 0.f))
    for (int64_t r = 0; r < f.B * f.Hq * f.Nq; ++r) f.lse[r] += shift[size_t(r)];
}

}  // namespace

void attention_forward_int8(const AttnInt8Params& p) {
  validate(p);
  const AttnParams& f = p.fwd;
  if (f.B == 0 || f.Nq == 0) return;
  const std::string isa = selected_isa();
  const int8::Kernels& kern = *int8::select_kernels(isa);
  if ((isa == "avx512" || isa == "amx") && decode_int8_applies(p)) {
    decode_int8(p, kern);
    return;
  }
  kern.forward(p, kern);
}

}  // namespace cpu
}  // namespace hk
