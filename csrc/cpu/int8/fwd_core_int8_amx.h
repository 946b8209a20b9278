// INT8 compute core of the forward driver (fwd_driver.h) on AMX tiles: quant="int8" with fused
// quantization (AttnInt8Params with q8 == nullptr), the contract of int8_kernels.h.
//   qk: S^T tile [16 keys][16 lanes] = K8[16 keys][64 dims] . Q8quad[16 dim quads][16 lanes]
//       (tdpbssd, exact int32), then S = float(S) * (k_scale[key] * q_scale[lane] * scale * log2 e)
//       -- the avx512 int8 core's S (fwd_core_int8.h), bit for bit.
//   softmax, pv: AmxLanes (fwd_core_amx.h), P as bf16 pairs, O^T += V^T P on bf16 tiles. The max
//       moves only when a tile's max exceeds it by more than 8, to
//       that max rounded up to an integer (P then differs from quant.int8_reference's by a power
//       of 2, which bf16 rounding commutes with; alpha is mostly exactly 1).
// PrepInt8Amx quantizes Q and K and converts V once per call (all O(N D)):
//   K8: per (b, kv head), rows [NKP][Dp] (Dp = D rounded up to 64, zero padded), per-key scales;
//   Vt: bf16 V transposed, feature e of key j at vt[e * NKP + j] (as PrepAmx);
//   landmark K8 / scales / Vt gathered into zero-padded buffers of GP keys;
//   Q: one record per row (int8_prep_rows.h), which the driver reads through its q pointer.
// Keys past a tile are read only from zero-padded K8 rows (whole 16-key groups); the V of a
// partial 32-key chunk is copied with the keys past the tile zeroed, so a non-finite V there
// never meets a zero P. The buffers are written with non-temporal stores: prep is bound by
// memory traffic, and they are read much later.
#pragma once
#if !defined(__AMX_INT8__)
#error "fwd_core_int8_amx.h needs -mamx-int8 (include it from *_amx.cpp only)"
#endif
#include <omp.h>

#include <cstring>

#include "common/attn_params.h"
#include "cpu/forward/fwd_core_amx.h"
#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_prep_rows.h"
#include "cpu/simd/exp2.h"

namespace hk {
namespace cpu {
namespace {

struct KVInt8Amx {
  const int8_t* k;     // key row j at k + j * Dp (int8; zero rows up to a whole 16-key group)
  const float* ks;     // k_scale of key j
  const uint16_t* vt;  // feature e of key j at vt[e * vts + j] (bf16)
  int64_t vts;
  int64_t dp, dv;
};

class PrepInt8Amx {
 public:
  static int64_t padded_dim(int64_t D) { return ceil_div(D, 64) * 64; }

  // f: p.fwd with its pattern normalized (the driver's view, q still the caller's).
  PrepInt8Amx(const AttnInt8Params& p, const AttnParams& f, const int8::Kernels& kern)
      : f_(f), kern_(kern), Dp_(padded_dim(f.D)), R_(query_record_bytes(padded_dim(f.D))), G_(f.num_landmarks),
        NKP_(ceil_div(f.Nk, 32) * 32 + 32), GP_(ceil_div(G_, 32) * 32), BH_(f.B * f.Hk) {
    // NKP_ is padded by one cache line past a multiple of 32 keys (see PrepAmx).
    k8_.reset(BH_ * NKP_ * Dp_);
    ks_.reset(BH_ * NKP_);
    vt_.reset(BH_ * f.Dv * NKP_);
    q_.reset(f.B * f.Hq * f.Nq * R_);
    if (G_ > 0) {
      k8lm_.reset(BH_ * GP_ * Dp_);
      kslm_.reset(BH_ * GP_);
      vtlm_.reset(BH_ * f.Dv * GP_);
    }
    const int64_t nkb = ceil_div(f.Nk, p.k_block), nkc = ceil_div(f.Nk, 32), nqb = ceil_div(f.Nq, p.q_block);
    const int nt = f.num_threads > 0 ? f.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
    {
      // Per thread: a block of widened Q or K rows, a Q block's lse shifts, one K or Q block before
      // streaming it out.
      const int64_t kb = std::min(p.k_block, f.Nk), qb = std::min(p.q_block, f.Nq);
      AlignedBuf<float> wide(std::max(kb, qb) * f.D), shift(qb);
      AlignedBuf<char> block(std::max(kb * Dp_, qb * R_));
#pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < BH_ * nkb; ++it)
        quantize_k(p, it / nkb, (it % nkb) * p.k_block, wide.get(), reinterpret_cast<int8_t*>(block.get()));
#pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < BH_ * nkc; ++it) transpose_v(it / nkc, (it % nkc) * 32);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < f.B * f.Hq * nqb; ++it)
        quantize_q(p, it / nqb, (it % nqb) * p.q_block, wide.get(), shift.get(), block.get());
      // The landmark gather reads the quantized K (the barrier above).
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < (G_ > 0 ? BH_ : 0); ++bh) gather_landmarks(bh);
      _mm_sfence();  // the streamed stores are visible to the driver's threads
    }
  }

  KVInt8Amx band(int64_t b, int64_t h) const {
    const int64_t bh = b * f_.Hk + h;
    return {k8_.get() + bh * NKP_ * Dp_, ks_.get() + bh * NKP_, vt_.get() + bh * f_.Dv * NKP_, NKP_, Dp_, f_.Dv};
  }

  KVInt8Amx landmarks(int64_t b, int64_t h) const {
    const int64_t bh = b * f_.Hk + h;
    return {k8lm_.get() + bh * GP_ * Dp_, kslm_.get() + bh * GP_, vtlm_.get() + bh * f_.Dv * GP_, GP_, Dp_, f_.Dv};
  }

  AttnParams driver_params() const { return cpu::driver_params(f_, q_.get(), Dp_); }

 private:
  // K block [j0, j0 + k_block) of head bh via `rows` (k_block x Dp bytes); the zero rows and
  // scales past Nk with the last block.
  void quantize_k(const AttnInt8Params& p, int64_t bh, int64_t j0, float* wide, int8_t* rows) {
    const int64_t j1 = std::min(j0 + p.k_block, f_.Nk), jend = j1 == f_.Nk ? NKP_ : j1;
    int8_t* k8 = k8_.get() + bh * NKP_ * Dp_;
    float* ks = ks_.get() + bh * NKP_;
    const float scale = prepare_key_block(p, f_, kern_, Dp_, bh, j0, rows, wide);
    for (int64_t j = j0; j < j1; ++j) ks[j] = scale;
    stream_copy(k8 + j0 * Dp_, rows, (j1 - j0) * Dp_);
    std::memset(k8 + j1 * Dp_, 0, size_t((jend - j1) * Dp_));
    for (int64_t j = j1; j < jend; ++j) ks[j] = 0.f;
  }

  // Q block [i0, i0 + q_block) of (b, h) = item bh into its records, via `recs`.
  void quantize_q(const AttnInt8Params& p, int64_t bh, int64_t i0, float* wide, float* shift, char* recs) {
    prepare_query_block(p, f_, kern_, Dp_, bh, i0 / p.q_block, recs, wide, shift);
    stream_copy(q_.get() + (bh * f_.Nq + i0) * R_, recs, (std::min(i0 + p.q_block, f_.Nq) - i0) * R_);
  }

  // dst[0, n) = src[0, n) with non-temporal stores (dst 8-byte aligned, n % 8 == 0): written once
  // and read much later, so no read-for-ownership of the lines.
  static void stream_copy(void* dst, const void* src, int64_t n) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    int64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 63); i += 8) {
      long long x;
      std::memcpy(&x, s + i, 8);
      _mm_stream_si64(reinterpret_cast<long long*>(d + i), x);
    }
    for (; i + 64 <= n; i += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
    for (; i < n; i += 8) {
      long long x;
      std::memcpy(&x, s + i, 8);
      _mm_stream_si64(reinterpret_cast<long long*>(d + i), x);
    }
  }

  // V of 16 features of key j as bf16 (round to nearest even) in the low halves of 32-bit lanes.
  __m512i v_bf16(int64_t b, int64_t h, int64_t j, int64_t e0) const {
    const int64_t off = b * f_.v_stride[0] + h * f_.v_stride[1] + j * f_.v_stride[2] + e0;
    if (f_.dtype == DType::BF16)
      return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(f_.v) + off)));
    const __m512 x = f_.dtype == DType::F32
                         ? _mm512_loadu_ps(static_cast<const float*>(f_.v) + off)
                         : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(f_.v) + off)));
    return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
  }

  // Keys pos(0 .. n) of head bh -> dst[e * ld + j], zero for n <= j < 32 (see transpose_key_pairs).
  template <bool kStream, class Pos>
  void transpose_v_keys(int64_t bh, int n, uint16_t* dst, int64_t ld, Pos&& pos) const {
    const int64_t b = bh / f_.Hk, h = bh % f_.Hk;
    transpose_key_pairs<kStream>(f_.Dv, dst, ld, [&](int j, int64_t e0) {
      return j < n ? v_bf16(b, h, pos(j), e0) : _mm512_setzero_si512();
    });
  }

  // Keys [j0, j0 + 32) of head bh, streamed: no read-for-ownership of the Vt lines.
  void transpose_v(int64_t bh, int64_t j0) {
    const int n = int(std::min<int64_t>(32, f_.Nk - j0));
    uint16_t* dst = vt_.get() + bh * f_.Dv * NKP_ + j0;
    if (f_.dtype == DType::BF16 && f_.Dv % 32 == 0) {
      const int64_t b = bh / f_.Hk, h = bh % f_.Hk;
      const uint16_t* v = static_cast<const uint16_t*>(f_.v) + b * f_.v_stride[0] + h * f_.v_stride[1] + j0 * f_.v_stride[2];
      transpose_bf16_keys32<true>(v, f_.v_stride[2], n, f_.Dv, dst, NKP_);
      return;
    }
    transpose_v_keys<true>(bh, n, dst, NKP_, [&](int j) { return j0 + j; });
  }

  void gather_landmarks(int64_t bh) {
    const int32_t* lm = f_.landmarks + (bh / f_.Hk) * f_.landmarks_batch_stride;
    const int8_t* k8 = k8_.get() + bh * NKP_ * Dp_;
    const float* ks = ks_.get() + bh * NKP_;
    int8_t* dk = k8lm_.get() + bh * GP_ * Dp_;
    float* dks = kslm_.get() + bh * GP_;
    for (int64_t g = 0; g < GP_; ++g) {
      if (g < G_) {
        std::memcpy(dk + g * Dp_, k8 + int64_t(lm[g]) * Dp_, size_t(Dp_));
        dks[g] = ks[lm[g]];
      } else {
        std::memset(dk + g * Dp_, 0, size_t(Dp_));
        dks[g] = 0.f;
      }
    }
    for (int64_t g0 = 0; g0 < GP_; g0 += 32)
      transpose_v_keys<false>(bh, int(std::min<int64_t>(32, G_ - g0)), vtlm_.get() + bh * f_.Dv * GP_ + g0, GP_,
                       [&](int g) { return int64_t(lm[g0 + g]); });
  }

  const AttnParams& f_;
  const int8::Kernels& kern_;
  int64_t Dp_, R_, G_, NKP_, GP_, BH_;
  AlignedBuf<int8_t> k8_, k8lm_;
  AlignedBuf<float> ks_, kslm_;
  AlignedBuf<uint16_t> vt_, vtlm_;
  AlignedBuf<char> q_;
};

struct CoreInt8Amx {
  using V = VecAvx512;
  using R = __m512;
  using KV = KVInt8Amx;
  using Prep = PrepInt8Amx;
  static constexpr int W = AmxLanes::W;
  static constexpr int QV = AmxLanes::QV;
  static constexpr int BQ = AmxLanes::BQ;
  static constexpr int JT = 64;
  static constexpr bool kPairKeys = true;
  static constexpr bool kOwnSoftmax = true;
  using LandmarkCore = CoreInt8Amx;
  static void thread_enter() { amx_configure_16x64(); }
  static void thread_exit() { _tile_release(); }

  struct Work {
    explicit Work(const AttnParams& p)
        : Dp(PrepInt8Amx::padded_dim(p.D)), Dv(p.Dv), X(BQ * Dp / 4), Qp(Dp / 4 * BQ), Pp(JT / 2 * BQ),
          Vc(p.Dv * 32) {}
    int64_t Dp, Dv;
    AlignedBuf<uint32_t> X;   // the block's int8 query rows, BQ x Dp bytes, before transposing
    AlignedBuf<uint32_t> Qp;  // Qp[t * BQ + lane] = q8[lane][4t .. 4t + 3]
    AlignedBuf<uint32_t> Pp;  // Pp[jp * BQ + lane] = (p[2jp][lane], p[2jp+1][lane]) as bf16
    AlignedBuf<uint16_t> Vc;  // Vt of a partial 32-key chunk, keys past the tile zeroed
    alignas(64) float qs[BQ];     // per lane q_scale * scale * log2 e (0 for unused lanes)
    alignas(64) float shift[BQ];  // per lane lse shift
    int halves = QV;              // lane halves holding rows of the packed block
    const float* ks = nullptr;    // k_scale of the tile's keys (qk)
    bool raw = false;             // S holds qk's int32 dot products, not yet scaled
  };

  // 2^x for x <= 0 at kCoarse accuracy (rel. error < 1.4e-4): P is rounded to bf16 for PV anyway,
  // and the same P feeds the softmax sum.
  static R exp2(R x) { return cpu::exp2_ftz<Exp2::kCoarse>(x); }  // the driver runs with FTZ

  // rows: query records (see PrepInt8Amx), nr <= BQ.
  static void pack_q(Work& w, const AttnParams&, const void* const* rows, int nr) {
    const int64_t D4 = w.Dp / 4;
    read_query_records(rows, nr, BQ, w.Dp, w.X.get(), w.qs, w.shift);
    w.halves = AmxLanes::halves_of(nr);
    // Transposing 32-bit quads as floats is bit-exact (pure shuffles).
    const float* Xf = reinterpret_cast<const float*>(w.X.get());
    float* Qf = reinterpret_cast<float*>(w.Qp.get());
    for (int v = 0; v < QV; ++v)
      for (int64_t t0 = 0; t0 < D4; t0 += W) V::transpose(Xf + v * W * D4 + t0, D4, Qf + t0 * BQ + v * W, BQ);
  }

  // S^T for the tile's whole 16-key groups (K8 is zero padded: rows past n are computed, never
  // read) as raw int32 dot products; scaled as the int8 contract says by scale_scores, or inside
  // the softmax's stale-max pass.
  static void qk(Work& w, const KV& kv, int64_t j0, int n, float* S) {
    const int64_t Dp = w.Dp;
    amx_gemm<AmxDot::kS8, false>(16 * ceil_div(n, 16), W * w.halves, Dp / 4, kv.k + j0 * Dp, Dp, w.Qp.get(), BQ, S, BQ);
    w.ks = kv.ks + j0;
    w.raw = true;
  }

  // S = float(S) * (k_scale[key] * q_scale[lane] * scale * log2 e), in place, once.
  static void scale_scores(Work& w, float* S, int n) {
    if (!w.raw) return;
    for (int v = 0; v < w.halves; ++v)
      for (int j = 0; j < n; ++j) _mm512_storeu_ps(S + j * BQ + v * W, scaled(w, S, j, v));
    w.raw = false;
  }

  // Raw S (after qk) is scaled as it is read by the stale-max try; a tile the driver masks, or
  // whose try fails, is scaled in place first. The same products either way, so the same bits.
  static void softmax(Work& w, float* S, int n, R* m, R* l, R* alpha) {
    uint32_t* Pp = w.Pp.get();
    for (int v = w.halves; v < QV; ++v) alpha[v] = _mm512_set1_ps(1.f);
    for (int v = 0; v < w.halves; ++v) {
      if (!w.raw) {
        AmxLanes::step<CoreInt8Amx>(Pp, 1.f, S, n, v, m, l, alpha);
        continue;
      }
      if (AmxLanes::stale_step<CoreInt8Amx>(Pp, 1.f, n, v, m, l, alpha, [&](int j) { return scaled(w, S, j, v); }))
        continue;
      scale_scores(w, S, n);
      AmxLanes::max_step<CoreInt8Amx>(Pp, 1.f, S, n, v, m, l, alpha);
    }
  }
  // A tile is first tried against the running max, with the tile max taken in the same pass, and
  // kept where next_max keeps the max anyway: the same bits as a max pass first.
  static constexpr bool kStaleMax = true;
  static constexpr bool kBf16Sum = false;  // the contract's sum: the fp32 P
  static constexpr bool kStaleNeedsTileMax = true;
  static bool stale_max_holds(R m, R tile_max, R) {
    return _mm512_cmp_ps_mask(next_max(m, tile_max), m, _CMP_EQ_OQ) == 0xffff;
  }
  // The max stays while the tile's is at most 8 above it, else moves to that max rounded up.
  static R next_max(R m, R tile_max) {
    const R mx = _mm512_max_ps(m, tile_max);
    const __mmask16 keep = _mm512_cmp_ps_mask(mx, _mm512_add_ps(m, _mm512_set1_ps(8.f)), _CMP_LE_OQ);
    return _mm512_mask_blend_ps(keep, _mm512_roundscale_ps(mx, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC), m);
  }
  // Ot = Ot * alpha + Vt . P: whole 32-key chunks straight from Vt, a partial one from a copy.
  static void pv(Work& w, const KV& kv, int64_t j0, int n, const float*, const R* alpha, float* Ot) {
    const int64_t Dv = w.Dv;
    const int full = n / 32, rest = n % 32;
    AmxLanes::pv_chunks(w.Pp.get(), kv.vt + j0, kv.vts, Dv, full, alpha, Ot, w.halves);
    if (rest == 0) return;
    const __mmask32 keys = (__mmask32(1) << rest) - 1;
    const uint16_t* src = kv.vt + j0 + 32 * full;
    uint16_t* vc = w.Vc.get();
    for (int64_t e = 0; e < Dv; ++e)
      _mm512_store_si512(vc + e * 32, _mm512_maskz_loadu_epi16(keys, src + e * kv.vts));
    amx_gemm_bf16<true>(Dv, W * w.halves, 16, vc, 64, w.Pp.get() + 16 * full * BQ, BQ, Ot, BQ);
  }

  static float lse_shift(const Work& w, int lane) { return w.shift[lane]; }

  // K8 rows and V^T columns of keys [j0, j0 + n) into L2 (see HasPrefetchKeys).
  static void prefetch_keys(const KV& kv, int64_t j0, int n) {
    const int64_t Dp = kv.dp, Dv = kv.dv;
    prefetch_l2(kv.k + j0 * Dp, n * Dp);
    for (int64_t e = 0; e < Dv; ++e) prefetch_l2(kv.vt + e * kv.vts + j0, n * 2);
  }

 private:
  // The contract's S of key j in lane half v, from raw S.
  static R scaled(const Work& w, const float* S, int j, int v) {
    const R kq = _mm512_mul_ps(_mm512_set1_ps(w.ks[j]), _mm512_load_ps(w.qs + v * W));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(S + j * BQ + v * W)), kq);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace hk
