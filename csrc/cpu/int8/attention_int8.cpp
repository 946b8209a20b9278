// CPU INT8 forward (SageAttention-style): INT8 QK^T with int32 accumulation, fp32 online softmax,
// PV with P and V rounded to bf16 and fp32 accumulation (every input dtype and ISA; see
// int8_kernels.h "PV precision"). Same tile visiting as the fp32 forward: per query block of
// kTile rows, the window band (tiles of kTile keys) plus the landmark keys outside it (gathered,
// pre-packed per kv head); landmark query rows are computed by their own tasks over their full
// key range (band blocks skip writing them). Only edge tiles are masked per element. The
// pattern logic lives here; the per-tile math is in int8_kernels_*.cpp.
// Fused mode (q8 == nullptr): Q is quantized per query block as it is loaded (begin_block) and K
// per kv head straight into the packed layout (pack_one); see int8_quantize.h. On the amx set the
// fused mode runs on the forward driver instead (fwd_int8_amx.cpp, see amx_driver_applies).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <emmintrin.h>

#include "common/pattern.h"
#include "cpu/attention_cpu.h"
#include "cpu/decode/fwd_decode_entry.h"
#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_quantize.h"
#include "cpu/int8/int8_support.h"

namespace hk {
namespace cpu {
namespace {

using int8::kChunk;
using int8::kTile;
using int8::Kernels;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kMaxHeadDim = 8192;  // keeps (q + 128) * k * D inside int32

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
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
  if (f.Nk < 0 || f.Nk >= (int64_t(1) << 31) - kTile) fail("Nk", "must be in [0, 2^31 - 64)");
  if (f.D < 1 || f.D > kMaxHeadDim) fail("D", "must be in [1, 8192]");
  if (f.Dv < 1) fail("Dv", "must be >= 1");
  if (f.dtype != DType::F32 && f.dtype != DType::BF16 && f.dtype != DType::F16)
    fail("dtype", "must be F32, BF16 or F16");
  if (!std::isfinite(f.scale)) fail("scale", "must be finite");
  // The int8 kernels take no score modifiers (the Python side routes such calls elsewhere).
  if (f.softcap > 0.f) fail("softcap", "is not supported by the int8 kernels (must be 0)");
  if (f.bias) fail("bias", "is not supported by the int8 kernels (must be null)");
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

// Per (b, kv head): K packed for vpdpbusd, the +128 correction, per-key scales; the landmark keys
// packed the same way; V (and the landmark V rows) as bf16 key pairs for Kernels::pv_bf16, else
// as fp32 rows rounded to bf16 values for Kernels::pv.
struct KvPack {
  int8::AlignedBuf<int8_t> k;          // ceil(Nk / 16) chunks of 16 * Dp bytes
  int8::AlignedBuf<int32_t> colcorr;   // -128 * sum_d k[j][d]
  int8::AlignedBuf<float> kscale;      // k_scale of key j's block (0 for padded keys)
  int8::AlignedBuf<int8_t> lk;         // landmark keys, same layout
  int8::AlignedBuf<int32_t> lcolcorr;
  int8::AlignedBuf<float> lkscale;
  int8::AlignedBuf<float> lv;          // (G, Dv) bf16-rounded fp32, row stride Dvp
  int8::AlignedBuf<float> v;           // (Nk, Dv) bf16-rounded fp32 (sets without pv_bf16)
  int8::AlignedBuf<uint16_t> vp, lvp;  // bf16 V / landmark V in key pairs (Kernels::pv_bf16)
};

// bf16 rows a, b (b nullptr: zeros) -> dst[2 d] = a[d], dst[2 d + 1] = b[d], d < n. SSE2
// (baseline) interleaving.
void interleave_bf16(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst) {
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + d));
    const __m128i vb = b ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + d))
                         : _mm_setzero_si128();
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * d), _mm_unpacklo_epi16(va, vb));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * d + 8), _mm_unpackhi_epi16(va, vb));
  }
  for (; d < n; ++d) {
    dst[2 * d] = a[d];
    dst[2 * d + 1] = b ? b[d] : 0;
  }
}

// V rows of one (b, kv head) packed as bf16 key pairs (round to nearest even).
struct VPairPacker {
  const Kernels* kern;
  const char* base;  // row 0 of the head
  int64_t ld, Dv;    // row stride (elements), row length
  DType dtype;
  int8::AlignedBuf<float> wide[2];  // fp16 rows widened to fp32
  VPairPacker(const Kernels* k, const AttnParams& f, int64_t b, int64_t hk)
      : kern(k), ld(f.v_stride[2]), Dv(f.Dv), dtype(f.dtype) {
    const size_t esz = f.dtype == DType::F32 ? 4 : 2;
    base = static_cast<const char*>(f.v) + (b * f.v_stride[0] + hk * f.v_stride[1]) * esz;
    if (dtype == DType::F16) {
      wide[0].alloc(Dv);
      wide[1].alloc(Dv);
    }
  }
  // Rows ja and jb (jb < 0: a zero partner) -> dst[2 d + 0 / 1], d < Dv.
  void pack(int64_t ja, int64_t jb, uint16_t* dst) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(base);
    if (dtype == DType::BF16) {
      interleave_bf16(h + ja * ld, jb >= 0 ? h + jb * ld : nullptr, Dv, dst);
      return;
    }
    const float* a = reinterpret_cast<const float*>(base) + ja * ld;
    const float* b = jb >= 0 ? reinterpret_cast<const float*>(base) + jb * ld : nullptr;
    if (dtype == DType::F16) {
      kern->widen(h + ja * ld, false, Dv, wide[0].p);
      a = wide[0].p;
      if (b) {
        kern->widen(h + jb * ld, false, Dv, wide[1].p);
        b = wide[1].p;
      }
    }
    kern->pack_pair_bf16(a, b, Dv, dst);
  }
};

// V rows idx[j] (j itself when idx is null; n rows) -> key-pair layout
// dst[(j / 2) * 2 * Dvp + 2 * d + j % 2], zero past Dv and for the missing partner of an odd last
// row.
void pack_v_pairs(VPairPacker& src, const int32_t* idx, int64_t n, int64_t Dv, int64_t Dvp,
                  uint16_t* dst) {
  for (int64_t j = 0; j < n; j += 2) {
    const int64_t ja = idx ? int64_t(idx[j]) : j;
    const int64_t jb = j + 1 < n ? (idx ? int64_t(idx[j + 1]) : j + 1) : -1;
    uint16_t* out = dst + (j / 2) * 2 * Dvp;
    src.pack(ja, jb, out);
    std::memset(out + 2 * Dv, 0, sizeof(uint16_t) * size_t(2 * (Dvp - Dv)));
  }
}

void pack_keys(const int8_t* k8, int64_t D, int64_t Dp, const int32_t* idx, int64_t n,
               int64_t n_padded, const float* kscale_blocks, int64_t k_block, int8_t* out,
               int32_t* colcorr, float* kscale) {
  std::memset(out, 0, size_t(n_padded * Dp));
  for (int64_t j = 0; j < n_padded; ++j) {
    if (j >= n) {
      colcorr[j] = 0;
      kscale[j] = 0.f;
      continue;
    }
    const int64_t src = idx ? idx[j] : j;
    const int8_t* row = k8 + src * D;
    int8_t* chunk = out + (j / kChunk) * kChunk * Dp + (j % kChunk) * 4;
    int32_t sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += row[d];
    for (int64_t d = 0; d < D; d += 4)  // 4-dim groups; a partial last group stays zero-padded
      std::memcpy(chunk + d * kChunk, row + d, size_t(std::min<int64_t>(4, D - d)));
    colcorr[j] = -128 * sum;
    kscale[j] = kscale_blocks[src / k_block];
  }
}

// Landmark keys (positions idx[0..n)) gathered from the packed K of all keys; tail keys zero.
void gather_packed_keys(const int8_t* packed, const int32_t* colcorr_all, const float* kscale_all,
                        int64_t Dp, const int32_t* idx, int64_t n, int64_t n_padded, int8_t* out,
                        int32_t* colcorr, float* kscale) {
  std::memset(out, 0, size_t(n_padded * Dp));
  for (int64_t g = 0; g < n_padded; ++g) {
    if (g >= n) {
      colcorr[g] = 0;
      kscale[g] = 0.f;
      continue;
    }
    const int64_t j = idx[g];
    const int8_t* src = packed + (j / kChunk) * kChunk * Dp + (j % kChunk) * 4;
    int8_t* dst = out + (g / kChunk) * kChunk * Dp + (g % kChunk) * 4;
    for (int64_t d = 0; d < Dp; d += 4) std::memcpy(dst + d * kChunk, src + d * kChunk, 4);
    colcorr[g] = colcorr_all[j];
    kscale[g] = kscale_all[j];
  }
}

struct Ctx {
  const AttnInt8Params* p;
  const Kernels* kern;
  int64_t Dp, Dvp, nqb, nkb, groups, offset, G;
  bool bf16_pv;  // bf16 V multiplied in bf16 pairs (fp32 accumulation) by Kernels::pv_bf16
  std::vector<KvPack>* packs;
  const std::vector<int32_t>* real_prefix;  // (B, Nk + 1) count of real keys, empty: no padding
  bool fused;  // p.q8 == nullptr: Q quantized per block in begin_block, K in pack_one
};

// V row (Dv values of fwd.dtype) -> fp32 rounded to bf16 values (the pv operand).
void widen_v_row(const Ctx& c, const char* src, float* dst) {
  const AttnParams& f = c.p->fwd;
  if (f.dtype == DType::F32)
    std::memcpy(dst, src, sizeof(float) * size_t(f.Dv));
  else
    c.kern->widen(reinterpret_cast<const uint16_t*>(src), f.dtype == DType::BF16, f.Dv, dst);
  if (f.dtype != DType::BF16) int8::round_to_bf16(dst, f.Dv);
}

const int32_t* landmarks_of(const AttnParams& f, int64_t b) {
  return f.landmarks + b * f.landmarks_batch_stride;
}
const uint8_t* landmark_flags_of(const AttnParams& f, int64_t b) {
  return f.landmark_flags + b * f.landmark_flags_batch_stride;
}

bool all_real(const Ctx& c, int64_t b, int64_t j0, int64_t j1) {
  if (c.real_prefix->empty()) return true;
  const int32_t* pre = c.real_prefix->data() + b * (c.p->fwd.Nk + 1);
  return pre[j1] - pre[j0] == j1 - j0;
}

void pack_one(const Ctx& c, int64_t b, int64_t hk) {
  const AttnInt8Params& p = *c.p;
  const AttnParams& f = p.fwd;
  KvPack& kv = (*c.packs)[b * f.Hk + hk];
  const int8_t* k8 = c.fused ? nullptr : p.k8 + (b * f.Hk + hk) * f.Nk * f.D;
  const float* ks = c.fused ? nullptr : p.k_scale + (b * f.Hk + hk) * c.nkb;
  const int64_t nk16 = round_up(f.Nk, kChunk);
  kv.k.alloc(nk16 * c.Dp);
  kv.colcorr.alloc(nk16);
  kv.kscale.alloc(nk16);
  if (c.fused)
    int8::quantize_k_head_packed(*c.kern, f, b, hk,
                                 p.k_mean ? p.k_mean + (b * f.Hk + hk) * f.D : nullptr,
                                 p.k_block, c.Dp, kv.k.p, kv.colcorr.p, kv.kscale.p);
  else
    pack_keys(k8, f.D, c.Dp, nullptr, f.Nk, nk16, ks, p.k_block, kv.k.p, kv.colcorr.p,
              kv.kscale.p);
  const char* vbase = static_cast<const char*>(f.v);
  const size_t esz = f.dtype == DType::F32 ? 4 : 2;
  const int64_t voff = b * f.v_stride[0] + hk * f.v_stride[1];
  if (c.bf16_pv) {
    VPairPacker rows(c.kern, f, b, hk);
    kv.vp.alloc((f.Nk + 1) / 2 * 2 * c.Dvp);
    pack_v_pairs(rows, nullptr, f.Nk, f.Dv, c.Dvp, kv.vp.p);
    if (c.G > 0) {
      kv.lvp.alloc((c.G + 1) / 2 * 2 * c.Dvp);
      pack_v_pairs(rows, landmarks_of(f, b), c.G, f.Dv, c.Dvp, kv.lvp.p);
    }
  } else {
    kv.v.alloc(f.Nk * f.Dv);
    for (int64_t j = 0; j < f.Nk; ++j)
      widen_v_row(c, vbase + (voff + j * f.v_stride[2]) * esz, kv.v.p + j * f.Dv);
  }
  if (c.G > 0) {
    const int64_t g16 = round_up(c.G, kChunk);
    kv.lk.alloc(g16 * c.Dp);
    kv.lcolcorr.alloc(g16);
    kv.lkscale.alloc(g16);
    if (c.fused)
      gather_packed_keys(kv.k.p, kv.colcorr.p, kv.kscale.p, c.Dp, landmarks_of(f, b), c.G, g16,
                         kv.lk.p, kv.lcolcorr.p, kv.lkscale.p);
    else
      pack_keys(k8, f.D, c.Dp, landmarks_of(f, b), c.G, g16, ks, p.k_block, kv.lk.p,
                kv.lcolcorr.p, kv.lkscale.p);
    if (c.bf16_pv) return;
    kv.lv.alloc(c.G * c.Dvp);
    const int32_t* lm = landmarks_of(f, b);
    for (int64_t g = 0; g < c.G; ++g)
      widen_v_row(c, vbase + (voff + int64_t(lm[g]) * f.v_stride[2]) * esz,
                  kv.lv.p + g * c.Dvp);
  }
}

// Per-thread buffers for one block of up to kTile query rows.
struct Scratch {
  int8::AlignedBuf<uint8_t> q;
  int8::AlignedBuf<float> S, O;
  float rs[kTile], m[kTile], l[kTile], alpha[kTile];
  int64_t wlo[kTile], whi[kTile], clim[kTile];
  int32_t first[kTile], last[kTile], kidx[kTile];
  uint8_t kflags[kTile];
  float lse_shift[kTile];
  int8::AlignedBuf<float> xrow;  // one fp32 row of q (fused quantization)
  // q and O are zeroed once: tile kernels may read whole 16-row groups past a block's rows.
  explicit Scratch(const Ctx& c) {
    q.alloc(kTile * c.Dp);
    xrow.alloc(c.p->fwd.D);
    S.alloc(kTile * kTile);
    O.alloc(kTile * c.Dvp);
    std::memset(q.p, 0, size_t(kTile * c.Dp));
    std::memset(O.p, 0, sizeof(float) * size_t(kTile * c.Dvp));
  }
};

// Loads query rows `rows_i` of head (b, h) into the scratch and resets the softmax state.
void begin_block(const Ctx& c, Scratch& s, int64_t b, int64_t h, const int64_t* rows_i,
                 int rows) {
  const AttnInt8Params& p = *c.p;
  const AttnParams& f = p.fwd;
  const int64_t bh = b * f.Hq + h;
  const float base = f.scale * kLog2e;
  if (c.fused) {
    const float* mean = p.k_mean && f.Nk > 0 ? p.k_mean + (b * f.Hk + h / c.groups) * f.D
                                               : nullptr;
    int8::quantize_q_rows(*c.kern, f, b, h, rows_i, rows, p.q_block, mean, c.Dp, s.q.p, s.rs,
                          s.lse_shift, s.xrow.p);
    for (int r = 0; r < rows; ++r) {
      s.rs[r] *= base;
      if (!mean) s.lse_shift[r] = 0.f;
    }
  }
  for (int r = 0; r < rows; ++r) {
    if (!c.fused) {
      const int8_t* src = p.q8 + (bh * f.Nq + rows_i[r]) * f.D;
      uint8_t* dst = s.q.p + r * c.Dp;
      for (int64_t d = 0; d < f.D; ++d) dst[d] = uint8_t(src[d]) ^ 0x80u;
      for (int64_t d = f.D; d < c.Dp; ++d) dst[d] = 0x80u;
      s.rs[r] = p.q_scale[bh * c.nqb + rows_i[r] / p.q_block] * base;
      s.lse_shift[r] = 0.f;
    }
    s.m[r] = -std::numeric_limits<float>::infinity();
    s.l[r] = 0.f;
  }
  std::memset(s.O.p, 0, sizeof(float) * size_t(rows * c.Dvp));
}

// One tile: scores, optional mask, online softmax, PV.
// V: bf16-rounded fp32 rows (stride ldv), or with c.bf16_pv the key-pair bf16 V starting at this
// tile's key.
void run_tile(const Ctx& c, Scratch& s, int rows, int cols, const int8_t* k,
              const int32_t* colcorr, const float* kscale, bool masked, const void* V,
              int64_t ldv) {
  const Kernels& K = *c.kern;
  K.qk(s.q.p, c.Dp, rows, k, int(ceil_div(cols, kChunk)), colcorr, kscale, s.rs, s.S.p);
  if (masked)
    K.mask(s.S.p, rows, cols, s.kidx, s.kflags, s.wlo, s.whi, s.clim, s.first, s.last);
  K.softmax(s.S.p, rows, cols, s.m, s.l, s.alpha);
  const int32_t* first = masked ? s.first : nullptr;
  const int32_t* last = masked ? s.last : nullptr;
  if (c.bf16_pv)
    K.pv_bf16(s.O.p, c.Dvp, s.S.p, rows, cols, first, last, s.alpha,
              static_cast<const uint16_t*>(V), 2 * c.Dvp, c.p->fwd.Dv);
  else
    K.pv(s.O.p, c.Dvp, s.S.p, rows, cols, first, last, s.alpha, static_cast<const float*>(V),
         ldv, c.p->fwd.Dv);
}

// Query row i of batch b is a landmark row (landmark_rows_block computes it).
bool is_landmark_row(const Ctx& c, int64_t b, int64_t i) {
  const int64_t j = i + c.offset;
  return c.G > 0 && j >= 0 && j < c.p->fwd.Nk && landmark_flags_of(c.p->fwd, b)[j] != 0;
}

// Normalizes and writes the block's rows; with skip_landmark_rows, not the landmark rows (the
// landmark pass writes them, possibly at the same time).
void end_block(const Ctx& c, Scratch& s, int64_t b, int64_t h, const int64_t* rows_i, int rows,
               bool skip_landmark_rows) {
  const AttnParams& f = c.p->fwd;
  const size_t esz = f.dtype == DType::F32 ? 4 : 2;
  for (int r = 0; r < rows; ++r) {
    const int64_t i = rows_i[r];
    if (skip_landmark_rows && is_landmark_row(c, b, i)) continue;
    char* dst = static_cast<char*>(f.o) +
                (b * f.o_stride[0] + h * f.o_stride[1] + i * f.o_stride[2]) * esz;
    float* o = s.O.p + r * c.Dvp;
    const bool any = s.l[r] > 0.f;
    const float inv = any ? 1.f / s.l[r] : 0.f;
    for (int64_t d = 0; d < f.Dv; ++d) o[d] = any ? o[d] * inv : 0.f;
    int8::from_float(o, f.dtype, f.Dv, dst);
    const int64_t row = (b * f.Hq + h) * f.Nq + i;
    float lse = any ? (s.m[r] + std::log2(s.l[r])) * kLn2 : -std::numeric_limits<float>::infinity();
    if (any) lse += s.lse_shift[r];  // 0 unless fused with k_mean
    f.lse[row] = lse;
  }
}

// V operand of run_tile for band keys from j0 (even when c.bf16_pv).
const void* v_rows(const Ctx& c, int64_t b, int64_t hk, int64_t j0, int64_t* ldv) {
  const AttnParams& f = c.p->fwd;
  const KvPack& kv = (*c.packs)[b * f.Hk + hk];
  if (c.bf16_pv) {
    *ldv = 2 * c.Dvp;
    return kv.vp.p + j0 / 2 * 2 * c.Dvp;
  }
  *ldv = f.Dv;
  return kv.v.p + j0 * f.Dv;
}

// Key tiles [t0, t0 + kTile) over [lo, hi) (lo a multiple of kChunk) from the packed K.
void visit_range(const Ctx& c, Scratch& s, int64_t b, int64_t hk, int rows, int64_t lo,
                 int64_t hi, int64_t full_lo, int64_t r_min, int64_t r_max) {
  const AttnParams& f = c.p->fwd;
  const KvPack& kv = (*c.packs)[b * f.Hk + hk];
  const uint8_t* lmf = f.landmark_flags ? landmark_flags_of(f, b) : nullptr;
  const uint8_t* pad = f.key_padding ? f.key_padding + b * f.Nk : nullptr;
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int cols = int(std::min<int64_t>(kTile, hi - t0));
    const int64_t t1 = t0 + cols - 1;  // last key of the tile
    // Full tile: every key real and inside every row's window (and causal limit).
    const bool full = t0 >= full_lo && all_real(c, b, t0, t0 + cols) &&
                      (f.window_left < 0 || t0 >= r_max - f.window_left) &&
                      (f.window_right < 0 || t1 <= r_min + f.window_right) &&
                      (!f.causal || t1 <= r_min);
    if (!full) {
      for (int cc = 0; cc < cols; ++cc) {
        const int64_t j = t0 + cc;
        s.kidx[cc] = int32_t(j);
        s.kflags[cc] = uint8_t((pad ? (pad[j] != 0) : 1) | (lmf && lmf[j] ? 2 : 0));
      }
    }
    int64_t ldv;
    const void* V = v_rows(c, b, hk, t0, &ldv);
    run_tile(c, s, rows, cols, kv.k.p + t0 * c.Dp, kv.colcorr.p + t0, kv.kscale.p + t0, !full,
             V, ldv);
  }
}

void band_block(const Ctx& c, Scratch& s, int64_t b, int64_t h, int64_t qb) {
  const AttnParams& f = c.p->fwd;
  const int64_t hk = h / c.groups;
  const int64_t i0 = qb * kTile, i1 = std::min(i0 + kTile, f.Nq);
  const int rows = int(i1 - i0);
  int64_t rows_i[kTile];
  for (int r = 0; r < rows; ++r) rows_i[r] = i0 + r;
  begin_block(c, s, b, h, rows_i, rows);
  const int64_t r0 = i0 + c.offset, r1 = i1 + c.offset;
  for (int r = 0; r < rows; ++r) {
    const int64_t rr = r0 + r;
    int64_t hi = f.window_right < 0 ? f.Nk - 1 : rr + f.window_right;
    if (f.causal) hi = std::min(hi, rr);
    s.wlo[r] = f.window_left < 0 ? 0 : rr - f.window_left;
    s.whi[r] = hi;
    s.clim[r] = f.causal ? rr : f.Nk - 1;
  }
  const KeyRange band = window_band(r0, r1, f.Nk, f.window_left, f.window_right, f.causal);
  const int64_t blo = band.hi > band.lo ? band.lo / kChunk * kChunk : 0;
  const int64_t bhi = band.hi > band.lo ? band.hi : 0;
  visit_range(c, s, b, hk, rows, blo, bhi, band.lo, r0, r1 - 1);
  if (c.G > 0) {
    // Landmark keys outside the visited band, in tiles of the pre-packed landmark list.
    const KvPack& kv = (*c.packs)[b * f.Hk + hk];
    const int32_t* lm = landmarks_of(f, b);
    const uint8_t* pad = f.key_padding ? f.key_padding + b * f.Nk : nullptr;
    for (int64_t g0 = 0; g0 < c.G; g0 += kTile) {
      const int cols = int(std::min<int64_t>(kTile, c.G - g0));
      bool any = false;
      for (int cc = 0; cc < cols; ++cc) {
        const int64_t j = lm[g0 + cc];
        const bool take = (j < blo || j >= bhi) && (!f.causal || j < r1) &&
                          (!pad || pad[j] != 0);
        s.kidx[cc] = int32_t(j);
        s.kflags[cc] = uint8_t(take ? 3 : 2);
        any |= take;
      }
      if (!any) continue;
      const void* V = c.bf16_pv ? static_cast<const void*>(kv.lvp.p + g0 / 2 * 2 * c.Dvp)
                                : static_cast<const void*>(kv.lv.p + g0 * c.Dvp);
      run_tile(c, s, rows, cols, kv.lk.p + g0 * c.Dp, kv.lcolcorr.p + g0, kv.lkscale.p + g0,
               true, V, c.Dvp);
    }
  }
  end_block(c, s, b, h, rows_i, rows, true);
}

// Landmark query rows (they see every key up to the causal limit), chunk `ci` of batch b's list.
void landmark_rows_block(const Ctx& c, Scratch& s, int64_t b, int64_t h, int64_t ci) {
  const AttnParams& f = c.p->fwd;
  const int64_t hk = h / c.groups;
  const int32_t* lm = landmarks_of(f, b);
  // Landmark positions r with query row i = r - offset in [0, Nq).
  int64_t rows_i[kTile];
  int rows = 0;
  int64_t seen = 0;
  for (int64_t g = 0; g < c.G && rows < kTile; ++g) {
    const int64_t i = lm[g] - c.offset;
    if (i < 0 || i >= f.Nq) continue;
    if (seen++ < ci * kTile) continue;
    rows_i[rows++] = i;
  }
  if (rows == 0) return;
  begin_block(c, s, b, h, rows_i, rows);
  int64_t r_min = f.Nk, hi = 0;
  for (int r = 0; r < rows; ++r) {
    const int64_t rr = rows_i[r] + c.offset;
    const KeyRange kr = landmark_row_range(rr, f.Nk, f.causal);
    s.wlo[r] = 0;
    s.whi[r] = kr.hi - 1;
    s.clim[r] = kr.hi - 1;
    r_min = std::min(r_min, rr);
    hi = std::max(hi, kr.hi);
  }
  // These rows see every key of their range: only padding and causality need masks.
  {
    const KvPack& kv = (*c.packs)[b * f.Hk + hk];
    const uint8_t* pad = f.key_padding ? f.key_padding + b * f.Nk : nullptr;
    for (int64_t t0 = 0; t0 < hi; t0 += kTile) {
      const int cols = int(std::min<int64_t>(kTile, hi - t0));
      const int64_t t1 = t0 + cols - 1;
      const bool full = all_real(c, b, t0, t0 + cols) && (!f.causal || t1 <= r_min);
      if (!full) {
        for (int cc = 0; cc < cols; ++cc) {
          s.kidx[cc] = int32_t(t0 + cc);
          s.kflags[cc] = uint8_t(pad ? (pad[t0 + cc] != 0) : 1);
        }
      }
      int64_t ldv;
      const void* V = v_rows(c, b, hk, t0, &ldv);
      run_tile(c, s, rows, cols, kv.k.p + t0 * c.Dp, kv.colcorr.p + t0, kv.kscale.p + t0, !full,
               V, ldv);
    }
  }
  end_block(c, s, b, h, rows_i, rows, false);
}

// Kernels::begin_thread / end_thread around one thread's share of a parallel region.
struct ThreadTiles {
  const Kernels& k;
  explicit ThreadTiles(const Kernels& kern) : k(kern) {
    if (k.begin_thread) k.begin_thread();
  }
  ~ThreadTiles() {
    if (k.end_thread) k.end_thread();
  }
  ThreadTiles(const ThreadTiles&) = delete;
  ThreadTiles& operator=(const ThreadTiles&) = delete;
};

// The fused path on the amx set runs on the forward driver (fwd_int8_amx.cpp), unless the
// shape does not fit it or HYBRID_KERNELS_INT8_AMX_DRIVER=0 asks for the tile kernels here (tests
// compare the two).
bool amx_driver_applies(const AttnInt8Params& p) {
  const char* env = std::getenv("HYBRID_KERNELS_INT8_AMX_DRIVER");
  if (env && std::string(env) == "0") return false;
  return p.q8 == nullptr && p.fwd.Nk > 0 && p.fwd.Dv % 16 == 0;
}

void forward_quantizing_q(const AttnInt8Params& p);

}  // namespace

void attention_forward_int8(const AttnInt8Params& p) {
  validate(p);
  const AttnParams& f = p.fwd;
  if (f.B == 0 || f.Nq == 0) return;
  if (p.q8 == nullptr && p.k8 != nullptr) {
    forward_quantizing_q(p);
    return;
  }
  // Decode against pre-quantized Q/K (an Int8KVCache): the decode path reads k8 and V in place
  // (this kernel would repack the whole cache on every call).
  {
    const std::string isa = selected_isa();
    if ((isa == "avx512" || isa == "amx") && decode_int8_applies(p)) {
      AttnInt8Params d = p;
      AttnParams& df = d.fwd;
      if (df.window_left >= df.Nq + df.Nk || df.window_left < 0) df.window_left = -1;
      if (df.window_right >= df.Nq + df.Nk || df.window_right < 0) df.window_right = -1;
      if (df.num_landmarks == 0) {
        df.landmarks = nullptr;
        df.landmark_flags = nullptr;
      }
      attention_forward_decode_int8_avx512(d);
      return;
    }
  }
  Ctx c;
  c.p = &p;
  c.kern = int8::select_kernels(selected_isa());
#ifndef HK_NO_AMX
  if (c.kern == int8::kernels_amx() && amx_driver_applies(p)) {
    int8::attention_forward_int8_amx(p, *c.kern);
    return;
  }
#endif
  c.Dp = round_up(f.D, c.kern->dp_align > 0 ? c.kern->dp_align : 4);
  c.Dvp = round_up(f.Dv, 16);
  c.nqb = ceil_div(f.Nq, p.q_block);
  c.nkb = ceil_div(f.Nk, p.k_block);
  c.groups = f.Hq / f.Hk;
  c.offset = f.Nk - f.Nq;
  c.G = f.Nk > 0 ? f.num_landmarks : 0;
  c.bf16_pv = c.kern->pv_bf16 != nullptr;
  const int nthreads = f.num_threads > 0 ? f.num_threads : int8::default_threads();

  std::vector<int32_t> real_prefix;
  if (f.key_padding && f.Nk > 0) {
    real_prefix.assign(size_t(f.B * (f.Nk + 1)), 0);
    for (int64_t b = 0; b < f.B; ++b) {
      int32_t* pre = real_prefix.data() + b * (f.Nk + 1);
      for (int64_t j = 0; j < f.Nk; ++j) pre[j + 1] = pre[j] + (f.key_padding[b * f.Nk + j] != 0);
    }
  }
  c.real_prefix = &real_prefix;
  std::vector<KvPack> packs(size_t(f.B * f.Hk));
  c.packs = &packs;

  c.fused = p.q8 == nullptr;
  const int64_t n_kv = f.Nk > 0 ? f.B * f.Hk : 0;
  const int64_t nblocks = ceil_div(f.Nq, kTile);
  const int64_t n_band = f.B * f.Hq * nblocks;
  const int64_t nchunks = ceil_div(c.G, kTile);
  const int64_t n_lm = f.B * f.Hq * nchunks;
  // One region: packing, then the landmark-row tasks (the big ones, first for balance) and the
  // band blocks in one dynamic loop; band blocks leave the landmark rows to their tasks.
#pragma omp parallel num_threads(nthreads)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_kv; ++t) pack_one(c, t / f.Hk, t % f.Hk);
    Scratch s(c);
    ThreadTiles tiles(*c.kern);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_lm + n_band; ++t) {
      if (t < n_lm) {
        landmark_rows_block(c, s, t / (f.Hq * nchunks), (t / nchunks) % f.Hq, t % nchunks);
      } else {
        const int64_t u = t - n_lm;
        band_block(c, s, u / (f.Hq * nblocks), (u / nblocks) % f.Hq, u % nblocks);
      }
    }
  }
}

namespace {

// q8 == nullptr with k8 given (Int8KVCache on the CPU): Q quantized here per block of q_block rows,
// bit for bit as quant.quantize_qk (int8::quantize_q_block), then the pre-quantized forward; with
// k_mean the lse gets scale * q . k_mean added back (the lse of the exact, unsmoothed scores).
void forward_quantizing_q(const AttnInt8Params& p) {
  const AttnParams& f = p.fwd;
  const int8::Kernels& kern = *int8::select_kernels(selected_isa());
  const int64_t nqb = ceil_div(f.Nq, p.q_block), groups = f.Hq / f.Hk;
  std::vector<int8_t> q8(size_t(f.B * f.Hq * f.Nq * f.D));
  std::vector<float> qs(size_t(f.B * f.Hq * nqb)), shift(size_t(f.B * f.Hq * f.Nq), 0.f);
  std::vector<float> buf(size_t(f.D) + 64);
  for (int64_t b = 0; b < f.B; ++b)
    for (int64_t h = 0; h < f.Hq; ++h)
      for (int64_t blk = 0; blk < nqb; ++blk) {
        const int64_t row0 = (b * f.Hq + h) * f.Nq + blk * p.q_block;
        const float* mean = p.k_mean && f.Nk > 0 ? p.k_mean + (b * f.Hk + h / groups) * f.D : nullptr;
        qs[size_t((b * f.Hq + h) * nqb + blk)] = int8::quantize_q_block(
            kern, f, b, h, blk, p.q_block, mean, q8.data() + row0 * f.D, f.D, shift.data() + row0,
            buf.data());
      }
  AttnInt8Params d = p;
  d.q8 = q8.data();
  d.q_scale = qs.data();
  d.k_mean = nullptr;
  attention_forward_int8(d);
  if (p.k_mean && f.Nk > 0)
    for (int64_t r = 0; r < f.B * f.Hq * f.Nq; ++r) f.lse[r] += shift[size_t(r)];
}

}  // namespace

}  // namespace cpu
}  // namespace hk
