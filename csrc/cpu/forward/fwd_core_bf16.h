// bf16 compute core of the forward driver (fwd_driver.h), AVX-512 BF16 only: both products use
// vdpbf16ps (pairs of bf16 products accumulated in fp32).
//   qk: S[j][lanes] += dot2(Qpair[t][lanes], bcast32(K[j][2t .. 2t+1]))   K read in place (even D)
//   pv: Ot[e][lanes] += dot2(Ppair[jp][lanes], bcast32(Vpair[jp][e]))     V prepacked as key pairs
// P is rounded to bf16 for the PV product (as FlashAttention does); the softmax sum uses fp32 P.
#pragma once
#if !defined(__AVX512BF16__)
#error "fwd_core_bf16.h needs -mavx512bf16 (include it from *_avx512.cpp only)"
#endif
#include <immintrin.h>
#include <omp.h>

#include <cstring>

#include "cpu/forward/fwd_common.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

struct KVBF16 {
  const uint16_t* k;  // key row j at k + j * ks (bf16, even row length, zero padded if D is odd)
  int64_t ks;
  const uint32_t* vp;  // key pair jp = (2jp, 2jp+1): word e at vp + jp * vps + e, low half = even key
  int64_t vps;
};

inline uint32_t load_u32(const uint16_t* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

class PrepBF16 {
 public:
  explicit PrepBF16(const AttnParams& p) : p_(p), Dp_(p.D + (p.D & 1)), G_(p.num_landmarks) {
    const int64_t BH = p.B * p.Hk, NP = ceil_div(p.Nk, 2);
    const int nt = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
    if (p.D & 1) {
      kc_.reset(BH * p.Nk * Dp_);
#pragma omp parallel for schedule(static) num_threads(nt)
      for (int64_t bhj = 0; bhj < BH * p.Nk; ++bhj) {
        const int64_t j = bhj % p.Nk, bh = bhj / p.Nk;
        pad_row(kc_.get() + bhj * Dp_, k_row(bh / p.Hk, bh % p.Hk, j));
      }
    }
    vp_.reset(BH * NP * p.Dv);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t bhp = 0; bhp < BH * NP; ++bhp) {
      const int64_t jp = bhp % NP, bh = bhp / NP, b = bh / p.Hk, h = bh % p.Hk;
      const uint16_t* v1 = 2 * jp + 1 < p.Nk ? v_row(b, h, 2 * jp + 1) : nullptr;
      pair_rows(vp_.get() + bhp * p.Dv, v_row(b, h, 2 * jp), v1);
    }
    if (G_ > 0) {
      const int64_t GP = ceil_div(G_, 2);
      klm_.reset(BH * G_ * Dp_);
      vlm_.reset(BH * GP * p.Dv);
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / p.Hk, h = bh % p.Hk;
        const int32_t* lm = p.landmarks + b * p.landmarks_batch_stride;
        for (int64_t g = 0; g < G_; ++g) pad_row(klm_.get() + (bh * G_ + g) * Dp_, k_row(b, h, lm[g]));
        for (int64_t gp = 0; gp < GP; ++gp) {
          const uint16_t* v1 = 2 * gp + 1 < G_ ? v_row(b, h, lm[2 * gp + 1]) : nullptr;
          pair_rows(vlm_.get() + (bh * GP + gp) * p.Dv, v_row(b, h, lm[2 * gp]), v1);
        }
      }
    }
  }

  KVBF16 band(int64_t b, int64_t h) const {
    const int64_t bh = b * p_.Hk + h;
    const uint32_t* vp = vp_.get() + bh * ceil_div(p_.Nk, 2) * p_.Dv;
    if (p_.D & 1) return {kc_.get() + bh * p_.Nk * Dp_, Dp_, vp, p_.Dv};
    return {k_row(b, h, 0), p_.k_stride[2], vp, p_.Dv};
  }

  KVBF16 landmarks(int64_t b, int64_t h) const {
    const int64_t bh = b * p_.Hk + h;
    return {klm_.get() + bh * G_ * Dp_, Dp_, vlm_.get() + bh * ceil_div(G_, 2) * p_.Dv, p_.Dv};
  }

 private:
  const uint16_t* k_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<const uint16_t*>(p_.k) + b * p_.k_stride[0] + h * p_.k_stride[1] + j * p_.k_stride[2];
  }
  const uint16_t* v_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<const uint16_t*>(p_.v) + b * p_.v_stride[0] + h * p_.v_stride[1] + j * p_.v_stride[2];
  }
  void pad_row(uint16_t* dst, const uint16_t* src) const {
    std::memcpy(dst, src, sizeof(uint16_t) * p_.D);
    if (Dp_ > p_.D) dst[p_.D] = 0;
  }
  void pair_rows(uint32_t* dst, const uint16_t* v0, const uint16_t* v1) const {
    if (v1) {
      for (int64_t e = 0; e < p_.Dv; ++e) dst[e] = uint32_t(v0[e]) | uint32_t(v1[e]) << 16;
    } else {
      for (int64_t e = 0; e < p_.Dv; ++e) dst[e] = v0[e];
    }
  }

  const AttnParams& p_;
  int64_t Dp_, G_;
  AlignedBuf<uint16_t> kc_, klm_;
  AlignedBuf<uint32_t> vp_, vlm_;
};

template <int DC, int DVC>
struct CoreBF16 {
  using V = VecAvx512;
  using R = __m512;
  using KV = KVBF16;
  using Prep = PrepBF16;
  static constexpr int W = 16;
  static constexpr int QV = 2;
  static constexpr int BQ = QV * W;
  static constexpr int JT = 64;  // even: tiles start on key pairs
  static constexpr int JB = 8;
  static constexpr int EB = 8;
  static constexpr bool kPairKeys = true;
  static constexpr bool kOwnSoftmax = false;
  using LandmarkCore = CoreBF16;
  static void thread_enter() {}
  static void thread_exit() {}

  // 2^x, kBf16 accuracy: P is rounded to bf16 (2^-9) anyway.
  static R exp2(R x) { return cpu::exp2<Exp2::kBf16>(x); }

  struct Work {
    explicit Work(const AttnParams& p)
        : Qp(ceil_div(p.D, 2) * BQ), Pp(JT / 2 * BQ), D2(ceil_div(p.D, 2)), D2P(ceil_div(D2, W) * W),
          X(BQ * D2P), Dv(p.Dv), c(p.scale * kLog2e) {}
    AlignedBuf<uint32_t> Qp;  // Qp[t * BQ + lane] = (q[lane][2t], q[lane][2t+1]) as bf16
    AlignedBuf<uint32_t> Pp;  // Pp[jp * BQ + lane] = (p[2jp][lane], p[2jp+1][lane]) as bf16
    int64_t D2, D2P;          // bf16 pairs per query row, rounded up to W
    AlignedBuf<uint32_t> X;   // the block's query rows as pairs, BQ x D2P, before transposing
    int64_t Dv;
    float c;
  };

  static void pack_q(Work& w, const AttnParams& p, const void* const* rows, int nr) {
    const int64_t D2 = w.D2, D2P = w.D2P;
    uint32_t* X = w.X.get();
    for (int i = 0; i < BQ; ++i) {
      uint32_t* x = X + i * D2P;
      if (i >= nr) {
        std::memset(x, 0, sizeof(uint32_t) * D2);
        continue;
      }
      const uint16_t* q = static_cast<const uint16_t*>(rows[i]);
      std::memcpy(x, q, sizeof(uint16_t) * (p.D & ~int64_t(1)));
      if (p.D & 1) x[D2 - 1] = q[p.D - 1];  // odd D: the last pair is (q[D-1], 0)
    }
    // Transposing 32-bit pairs as floats is bit-exact (pure shuffles).
    const float* Xf = reinterpret_cast<const float*>(X);
    float* Qf = reinterpret_cast<float*>(w.Qp.get());
    for (int v = 0; v < QV; ++v) {
      int64_t t0 = 0;
      for (; t0 + W <= D2; t0 += W) V::transpose(Xf + v * W * D2P + t0, D2P, Qf + t0 * BQ + v * W, BQ);
      uint32_t* Qp = w.Qp.get();
      for (; t0 < D2; ++t0)
        for (int i = 0; i < W; ++i) Qp[t0 * BQ + v * W + i] = X[(v * W + i) * D2P + t0];
    }
  }

  template <int J>
  static void qk_block(const uint32_t* Qp, const uint16_t* kp, int64_t ks, int64_t D2, float c, float* S) {
    R acc[J][QV];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < QV; ++v) acc[j][v] = _mm512_setzero_ps();
    for (int64_t t = 0; t < D2; ++t) {
      __m512bh q[QV];
      for (int v = 0; v < QV; ++v) q[v] = (__m512bh)_mm512_loadu_si512(Qp + t * BQ + v * W);
      for (int j = 0; j < J; ++j) {
        const __m512bh kb = (__m512bh)_mm512_set1_epi32(int(load_u32(kp + j * ks + 2 * t)));
        for (int v = 0; v < QV; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], q[v], kb);
      }
    }
    const R cv = _mm512_set1_ps(c);
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < QV; ++v) _mm512_storeu_ps(S + j * BQ + v * W, _mm512_mul_ps(acc[j][v], cv));
  }

  static void qk(Work& w, const KV& kv, int64_t j0, int n, float* S) {
    const int64_t D2 = DC ? DC / 2 : w.D2;
    const int64_t ks = DC ? DC : kv.ks;
    const uint16_t* kp = kv.k + j0 * ks;
    const uint32_t* Qp = w.Qp.get();
    int j = 0;
    for (; j + JB <= n; j += JB) qk_block<JB>(Qp, kp + j * ks, ks, D2, w.c, S + j * BQ);
    for (; j + 4 <= n; j += 4) qk_block<4>(Qp, kp + j * ks, ks, D2, w.c, S + j * BQ);
    for (; j + 2 <= n; j += 2) qk_block<2>(Qp, kp + j * ks, ks, D2, w.c, S + j * BQ);
    for (; j < n; ++j) qk_block<1>(Qp, kp + j * ks, ks, D2, w.c, S + j * BQ);
  }

  template <int E>
  static void pv_block(const uint32_t* Pp, int np, const uint32_t* vp, int64_t vps, const R* alpha, float* Ot) {
    R acc[E][QV];
    for (int e = 0; e < E; ++e)
      for (int v = 0; v < QV; ++v) acc[e][v] = _mm512_mul_ps(_mm512_loadu_ps(Ot + e * BQ + v * W), alpha[v]);
    for (int jp = 0; jp < np; ++jp) {
      __m512bh pj[QV];
      for (int v = 0; v < QV; ++v) pj[v] = (__m512bh)_mm512_loadu_si512(Pp + jp * BQ + v * W);
      for (int e = 0; e < E; ++e) {
        const __m512bh vb = (__m512bh)_mm512_set1_epi32(int(vp[jp * vps + e]));
        for (int v = 0; v < QV; ++v) acc[e][v] = _mm512_dpbf16_ps(acc[e][v], pj[v], vb);
      }
    }
    for (int e = 0; e < E; ++e)
      for (int v = 0; v < QV; ++v) _mm512_storeu_ps(Ot + e * BQ + v * W, acc[e][v]);
  }

  static void pv(Work& w, const KV& kv, int64_t j0, int n, const float* P, const R* alpha, float* Ot) {
    // Interleave P rows 2jp, 2jp+1 into bf16 pairs (a missing odd key counts as p = 0).
    const int np = (n + 1) / 2;
    uint32_t* Pp = w.Pp.get();
    for (int jp = 0; jp < np; ++jp) {
      for (int v = 0; v < QV; ++v) {
        const R p0 = _mm512_loadu_ps(P + 2 * jp * BQ + v * W);
        const R p1 = 2 * jp + 1 < n ? _mm512_loadu_ps(P + (2 * jp + 1) * BQ + v * W) : _mm512_setzero_ps();
        _mm512_storeu_si512(Pp + jp * BQ + v * W, bf16_pairs(p0, p1));
      }
    }
    const int64_t Dv = DVC ? DVC : w.Dv;
    const int64_t vps = DVC ? DVC : kv.vps;
    const uint32_t* vp = kv.vp + (j0 / 2) * vps;
    const int nv = int(Dv);
    int e = 0;
    for (; e + EB <= nv; e += EB) pv_block<EB>(Pp, np, vp + e, vps, alpha, Ot + e * BQ);
    for (; e + 4 <= nv; e += 4) pv_block<4>(Pp, np, vp + e, vps, alpha, Ot + e * BQ);
    for (; e < nv; ++e) pv_block<1>(Pp, np, vp + e, vps, alpha, Ot + e * BQ);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace hk
