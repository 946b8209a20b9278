// The rows both int8 driver cores prepare (fwd_core_int8.h, fwd_core_int8_amx.h), quantized here
// (fused: AttnInt8Params q8 / k8 null) or copied from the caller's pre-quantized Q / K:
//   K block: D int8 per key zero padded to Dp, one scale per block;
//   Q record: R = Dp + 8 bytes per query row (b, h, i): the int8 row zero padded to Dp, then fp32
//   q_scale * scale * log2 e, then fp32 scale * q . k_mean (the lse shift; 0 without k_mean). The
//   driver runs on AttnParams whose q points at the records (driver_params) and its cores read
//   them by row pointer (read_query_records).
// Baseline code with internal linkage: included by translation units of different ISA flags.
#pragma once
#include <algorithm>
#include <cstring>

#include "common/attn_params.h"
#include "cpu/forward/fwd_common.h"
#include "cpu/int8/int8_quantize.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

inline int64_t query_record_bytes(int64_t Dp) { return Dp + 8; }

// The smoothing mean of (b, kv head hk), D floats, or nullptr.
inline const float* key_mean(const AttnInt8Params& p, int64_t b, int64_t hk) {
  return p.k_mean ? p.k_mean + (b * p.fwd.Hk + hk) * p.fwd.D : nullptr;
}

// Keys [j0, min(j0 + k_block, Nk)) of kv head bh = b * Hk + hk into rows of Dp bytes at out;
// returns the block's scale. f: p.fwd normalized; wide: D floats of scratch.
inline float prepare_key_block(const AttnInt8Params& p, const AttnParams& f, const int8::Kernels& kern,
                               int64_t Dp, int64_t bh, int64_t j0, int8_t* out, float* wide) {
  const int64_t j1 = std::min(j0 + p.k_block, f.Nk);
  float scale;
  if (p.k8) {
    scale = p.k_scale[bh * ceil_div(f.Nk, p.k_block) + j0 / p.k_block];
    for (int64_t j = j0; j < j1; ++j) std::memcpy(out + (j - j0) * Dp, p.k8 + (bh * f.Nk + j) * f.D, size_t(f.D));
  } else {
    scale = int8::quantize_k_block(kern, f, bh / f.Hk, bh % f.Hk, key_mean(p, bh / f.Hk, bh % f.Hk), j0, j1, out,
                                   Dp, wide);
  }
  for (int64_t j = j0; j < j1; ++j) std::memset(out + (j - j0) * Dp + f.D, 0, size_t(Dp - f.D));
  return scale;
}

// Query block blk (rows blk * q_block ...) of head bh = b * Hq + h into records of R bytes at recs.
// wide: D floats, shift: q_block floats of scratch.
inline void prepare_query_block(const AttnInt8Params& p, const AttnParams& f, const int8::Kernels& kern,
                                int64_t Dp, int64_t bh, int64_t blk, char* recs, float* wide, float* shift) {
  const int64_t R = query_record_bytes(Dp), i0 = blk * p.q_block, n = std::min(i0 + p.q_block, f.Nq) - i0;
  float scale;
  if (p.q8) {
    scale = p.q_scale[bh * ceil_div(f.Nq, p.q_block) + blk];
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(recs + i * R, p.q8 + (bh * f.Nq + i0 + i) * f.D, size_t(f.D));
      shift[i] = 0.f;
    }
  } else {
    const int64_t b = bh / f.Hq, h = bh % f.Hq;
    const float* mean = f.Nk > 0 ? key_mean(p, b, h / (f.Hq / f.Hk)) : nullptr;
    scale = int8::quantize_q_block(kern, f, b, h, blk, p.q_block, mean, reinterpret_cast<int8_t*>(recs), R,
                                   shift, wide);
    if (!mean)
      for (int64_t i = 0; i < n; ++i) shift[i] = 0.f;
  }
  const float qs = scale * (f.scale * kLog2e);
  for (int64_t i = 0; i < n; ++i) {
    char* r = recs + i * R;
    std::memset(r + f.D, 0, size_t(Dp - f.D));
    std::memcpy(r + Dp, &qs, 4);
    std::memcpy(r + Dp + 4, shift + i, 4);
  }
}

// f with q pointing at the query records q (B, Hq, Nq) of Dp-byte rows (element strides in units of
// f.dtype).
inline AttnParams driver_params(const AttnParams& f, const char* q, int64_t Dp) {
  AttnParams d = f;
  const int64_t es = f.dtype == DType::F32 ? 4 : 2;
  d.q = q;
  d.q_stride[2] = query_record_bytes(Dp) / es;
  d.q_stride[1] = f.Nq * d.q_stride[2];
  d.q_stride[0] = f.Hq * d.q_stride[1];
  return d;
}

// The driver's pack_q, first half: records rows[0 .. nr) into X (BQ rows of Dp bytes), qs and
// shift (BQ lanes); lanes past nr get zero rows and scales.
inline void read_query_records(const void* const* rows, int nr, int BQ, int64_t Dp, uint32_t* X, float* qs,
                               float* shift) {
  for (int i = 0; i < BQ; ++i) {
    char* x = reinterpret_cast<char*>(X) + i * Dp;
    if (i < nr) {
      const char* rec = static_cast<const char*>(rows[i]);
      std::memcpy(x, rec, size_t(Dp));
      std::memcpy(&qs[i], rec + Dp, 4);
      std::memcpy(&shift[i], rec + Dp + 4, 4);
    } else {
      std::memset(x, 0, size_t(Dp));
      qs[i] = 0.f;
      shift[i] = 0.f;
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace hk
