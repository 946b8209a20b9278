// INT8 compute core of the forward driver (fwd_driver.h) for the SIMD sets without AMX tiles
// (avx512, avx2, scalar), generic over an integer-dot trait Ops; the contract of
// int8_kernels.h (quant="int8": INT8 QK^T with int32 accumulation, fp32 online softmax, P and V
// rounded to bf16 for PV with fp32 accumulation).
//   qk: acc[j][lanes] = colcorr[j] + sum_t dot4(Qu8quad[t][lanes], bcast(K8quad[j][t]))
//       (Q as u8 = q + 128, the bias removed by colcorr[j] = -128 * sum_d k[j][d]), then
//       S = float(acc) * (k_scale[key] * q_scale[lane] * scale * log2 e) -- the AMX core's S.
//   Score modifiers (softcap, bias) are the driver's, on S in its log2 units. A softcap is not
//   shift-invariant, so under one the smoothing shift scale * q . k_mean is added to S here (as the
//   Triton kernel and the reference emulation do) instead of to the lse.
//   pv: the PV core Pv of the same lanes: CoreBF16 (V as bf16 key pairs, P rounded to bf16 pairs
//       by vdpbf16ps's packing) or CoreF32 on V rows rounded to bf16 values, P rounded here.
// PrepInt8 quantizes (or copies pre-quantized) K and Q and converts V once per call, all O(N D):
//   K8 rows of Dp = D rounded up to 4 bytes (zero padded), per-key colcorr and scale;
//   V as Pv wants it; landmark rows gathered the same way;
//   Q: one record per row (int8_prep_rows.h), which the driver reads through its q pointer.
// Ops concept: using I (W int32 lanes); static I load(const uint32_t*); static I set1(int32_t);
//   static I dot(I acc, I q_u8_quads, I k_s8_quad_bcast); static R to_float(I);
//   static constexpr bool kVPairs (Pv reads V as bf16 key pairs); static R round_bf16(R);
//   static R exp2(R) (2^x for x <= 0 at kBf16 accuracy: P is rounded to bf16 for PV, and the lse
//   keeps the 2e-5 of the decode kernel's).
#pragma once
#include <omp.h>

#include <cstring>

#include "common/attn_params.h"
#include "cpu/forward/fwd_common.h"
#include "cpu/forward/fwd_driver.h"
#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_prep_rows.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

struct KVInt8 {
  const int8_t* k;      // key row j at k + j * Dp (int8, zero padded past D)
  const int32_t* cc;    // colcorr of key j
  const float* ks;      // k_scale of key j
  const void* v;        // V rows (fp32, stride vs) or bf16 key pairs (uint32 words, stride vs)
  int64_t vs;
};

template <bool kVPairs>
class PrepInt8 {
 public:
  static int64_t padded_dim(int64_t D) { return ceil_div(D, 4) * 4; }

  // f: p.fwd with its pattern normalized (the driver's view, q still the caller's).
  PrepInt8(const AttnInt8Params& p, const AttnParams& f, const int8::Kernels& kern)
      : f_(f), kern_(kern), Dp_(padded_dim(f.D)), R_(query_record_bytes(Dp_)), G_(f.Nk > 0 ? f.num_landmarks : 0),
        BH_(f.B * f.Hk), VN_(kVPairs ? ceil_div(f.Nk, 2) : f.Nk), GN_(kVPairs ? ceil_div(G_, 2) : G_) {
    k8_.reset(BH_ * f.Nk * Dp_);
    cc_.reset(BH_ * f.Nk);
    ks_.reset(BH_ * f.Nk);
    v_.reset(BH_ * VN_ * f.Dv);
    q_.reset(f.B * f.Hq * f.Nq * R_);
    if (G_ > 0) {
      k8lm_.reset(BH_ * G_ * Dp_);
      cclm_.reset(BH_ * G_);
      kslm_.reset(BH_ * G_);
      vlm_.reset(BH_ * GN_ * f.Dv);
    }
    const int64_t nkb = ceil_div(f.Nk, p.k_block), nqb = ceil_div(f.Nq, p.q_block);
    const int nt = f.num_threads > 0 ? f.num_threads : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
    {
      // Per thread: a block of widened Q or K rows (or two V rows), a Q block's lse shifts.
      const int64_t kb = std::min(p.k_block, f.Nk), qb = std::min(p.q_block, f.Nq);
      AlignedBuf<float> wide(std::max(2 * f.Dv, std::max(kb, qb) * f.D)), shift(qb);
#pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < BH_ * nkb; ++it) keys(p, it / nkb, (it % nkb) * p.k_block, wide.get());
#pragma omp for schedule(static) nowait
      for (int64_t it = 0; it < BH_ * VN_; ++it) {
        const int64_t bh = it / VN_, j = it % VN_;
        value_row(bh, kVPairs ? 2 * j : j, kVPairs && 2 * j + 1 < f.Nk ? 2 * j + 1 : -1,
                  v_.get() + it * f.Dv, wide.get());
      }
#pragma omp for schedule(static)
      for (int64_t it = 0; it < f.B * f.Hq * nqb; ++it)
        prepare_query_block(p, f, kern, Dp_, it / nqb, it % nqb, q_.get() + (it / nqb * f.Nq + it % nqb * p.q_block) * R_,
                            wide.get(), shift.get());
      // The landmark gather reads the prepared K (the barrier above).
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < (G_ > 0 ? BH_ : 0); ++bh) gather_landmarks(bh, wide.get());
    }
  }

  KVInt8 band(int64_t b, int64_t h) const {
    const int64_t bh = b * f_.Hk + h;
    return {k8_.get() + bh * f_.Nk * Dp_, cc_.get() + bh * f_.Nk, ks_.get() + bh * f_.Nk,
            v_.get() + bh * VN_ * f_.Dv, f_.Dv};
  }

  KVInt8 landmarks(int64_t b, int64_t h) const {
    const int64_t bh = b * f_.Hk + h;
    return {k8lm_.get() + bh * G_ * Dp_, cclm_.get() + bh * G_, kslm_.get() + bh * G_,
            vlm_.get() + bh * GN_ * f_.Dv, f_.Dv};
  }

  AttnParams driver_params() const { return cpu::driver_params(f_, q_.get(), Dp_); }

 private:
  // K block [j0, j0 + k_block) of head bh, with colcorr and scales.
  void keys(const AttnInt8Params& p, int64_t bh, int64_t j0, float* wide) {
    const int64_t j1 = std::min(j0 + p.k_block, f_.Nk);
    int8_t* k8 = k8_.get() + (bh * f_.Nk + j0) * Dp_;
    const float scale = prepare_key_block(p, f_, kern_, Dp_, bh, j0, k8, wide);
    for (int64_t j = j0; j < j1; ++j) {
      const int8_t* row = k8 + (j - j0) * Dp_;
      int32_t sum = 0;
      for (int64_t d = 0; d < f_.D; ++d) sum += row[d];
      cc_[bh * f_.Nk + j] = -128 * sum;
      ks_[bh * f_.Nk + j] = scale;
    }
  }

  // V row j of head bh as bf16 bits (bf16 inputs exact; the others rounded to nearest even).
  void v_bits(int64_t bh, int64_t j, uint32_t* dst, float* wide) const {
    const int64_t off = (bh / f_.Hk) * f_.v_stride[0] + (bh % f_.Hk) * f_.v_stride[1] + j * f_.v_stride[2];
    const int64_t Dv = f_.Dv;
    if (f_.dtype == DType::BF16) {
      const uint16_t* src = static_cast<const uint16_t*>(f_.v) + off;
      for (int64_t e = 0; e < Dv; ++e) dst[e] = src[e];
      return;
    }
    const float* x = static_cast<const float*>(f_.v) + off;
    if (f_.dtype == DType::F16) {
      kern_.widen(static_cast<const uint16_t*>(f_.v) + off, false, Dv, wide);
      x = wide;
    }
    for (int64_t e = 0; e < Dv; ++e) dst[e] = f32_to_bf16(x[e]);
  }

  // Keys ja and, when kVPairs, jb (-1: a zero partner) of head bh into Dv words at dst: bf16 key
  // pairs (ja in the low half), or fp32 rows of bf16 values.
  void value_row(int64_t bh, int64_t ja, int64_t jb, uint32_t* dst, float* wide) const {
    const int64_t Dv = f_.Dv;
    v_bits(bh, ja, dst, wide);
    if constexpr (!kVPairs) {
      for (int64_t e = 0; e < Dv; ++e) dst[e] <<= 16;  // the fp32 bits of the bf16 value
    } else if (jb >= 0) {
      uint32_t* hi = reinterpret_cast<uint32_t*>(wide + Dv);
      v_bits(bh, jb, hi, wide);
      for (int64_t e = 0; e < Dv; ++e) dst[e] |= hi[e] << 16;
    }
  }

  void gather_landmarks(int64_t bh, float* wide) {
    const int32_t* lm = f_.landmarks + (bh / f_.Hk) * f_.landmarks_batch_stride;
    for (int64_t g = 0; g < G_; ++g) {
      const int64_t j = bh * f_.Nk + lm[g];
      std::memcpy(k8lm_.get() + (bh * G_ + g) * Dp_, k8_.get() + j * Dp_, size_t(Dp_));
      cclm_[bh * G_ + g] = cc_[j];
      kslm_[bh * G_ + g] = ks_[j];
    }
    for (int64_t g = 0; g < GN_; ++g) {
      const int64_t ga = kVPairs ? 2 * g : g, gb = kVPairs && 2 * g + 1 < G_ ? 2 * g + 1 : -1;
      value_row(bh, lm[ga], gb >= 0 ? lm[gb] : -1, vlm_.get() + (bh * GN_ + g) * f_.Dv, wide);
    }
  }

  const AttnParams& f_;
  const int8::Kernels& kern_;
  int64_t Dp_, R_, G_, BH_, VN_, GN_;
  AlignedBuf<int8_t> k8_, k8lm_;
  AlignedBuf<int32_t> cc_, cclm_;
  AlignedBuf<float> ks_, kslm_;
  AlignedBuf<uint32_t> v_, vlm_;  // fp32 rows or bf16 pairs: 4 bytes per (row, feature) either way
  AlignedBuf<char> q_;
};

// DC != 0 fixes D at compile time (the PV core Pv carries its own Dv).
template <class Vt, class Ops, class Pv, int JB, int DC>
struct CoreInt8 {
  using V = Vt;
  using R = typename V::R;
  using I = typename Ops::I;
  using KV = KVInt8;
  using Prep = PrepInt8<Ops::kVPairs>;
  static constexpr int W = V::W;
  static constexpr int QV = Pv::QV;
  static constexpr int BQ = QV * W;
  static constexpr int JT = 64;
  static constexpr bool kPairKeys = Ops::kVPairs;
  static constexpr bool kOwnSoftmax = false;
  using LandmarkCore = CoreInt8<Vt, Ops, typename Pv::LandmarkCore, JB, DC>;
  static_assert(Pv::JT == JT && Pv::W == W, "the PV core works on the driver's tiles");
  static void thread_enter() {}
  static void thread_exit() {}
  static R exp2(R x) { return Ops::exp2(x); }

  struct Work {
    explicit Work(const AttnParams& p)
        : pv(p), Dp(Prep::padded_dim(p.D)), X(BQ * Dp / 4), Qp(Dp / 4 * BQ), Pr(Ops::kVPairs ? 0 : JT * BQ),
          shift_in_scores(p.softcap > 0.f) {}
    typename Pv::Work pv;
    int64_t Dp;
    AlignedBuf<uint32_t> X;   // the block's int8 query rows, BQ x Dp bytes
    AlignedBuf<uint32_t> Qp;  // Qp[t * BQ + lane] = q8[lane][4t .. 4t + 3] + 128 (u8)
    AlignedBuf<float> Pr;     // P rounded to bf16 values (PV cores that do not round it)
    bool shift_in_scores;     // under a softcap: S gets the shift (log2 units), the lse none
    alignas(64) float qs[BQ];     // per lane q_scale * scale * log2 e (0 for unused lanes)
    alignas(64) float shift[BQ];  // per lane lse shift
  };

  // rows: query records (int8_prep_rows.h), nr <= BQ.
  static void pack_q(Work& w, const AttnParams&, const void* const* rows, int nr) {
    const int64_t D4 = w.Dp / 4;
    read_query_records(rows, nr, BQ, w.Dp, w.X.get(), w.qs, w.shift);
    for (int64_t t = 0; t < D4; ++t)
      for (int i = 0; i < BQ; ++i) w.Qp[t * BQ + i] = w.X[i * D4 + t] ^ 0x80808080u;
    if (w.shift_in_scores)
      for (int i = 0; i < BQ; ++i) w.shift[i] *= kLog2e;
  }

  template <int J>
  static void qk_block(const Work& w, const KV& kv, int64_t j0, float* S) {
    const int64_t Dp = DC ? Prep::padded_dim(DC) : w.Dp, D4 = Dp / 4;
    I acc[J][QV];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < QV; ++v) acc[j][v] = Ops::set1(kv.cc[j0 + j]);
    const int8_t* k = kv.k + j0 * Dp;
    for (int64_t t = 0; t < D4; ++t) {
      I q[QV];
      for (int v = 0; v < QV; ++v) q[v] = Ops::load(w.Qp.get() + t * BQ + v * W);
      for (int j = 0; j < J; ++j) {
        int32_t quad;
        std::memcpy(&quad, k + j * Dp + 4 * t, 4);
        const I kb = Ops::set1(quad);
        for (int v = 0; v < QV; ++v) acc[j][v] = Ops::dot(acc[j][v], q[v], kb);
      }
    }
    for (int j = 0; j < J; ++j) {
      const R ks = V::set1(kv.ks[j0 + j]);
      for (int v = 0; v < QV; ++v) {
        R s = V::mul(Ops::to_float(acc[j][v]), V::mul(ks, V::load(w.qs + v * W)));
        if (w.shift_in_scores) s = V::add(s, V::load(w.shift + v * W));
        V::store(S + j * BQ + v * W, s);
      }
    }
  }

  static void qk(Work& w, const KV& kv, int64_t j0, int n, float* S) {
    int j = 0;
    for (; j + JB <= n; j += JB) qk_block<JB>(w, kv, j0 + j, S + j * BQ);
    if (JB > 4)
      for (; j + 4 <= n; j += 4) qk_block<4>(w, kv, j0 + j, S + j * BQ);
    for (; j < n; ++j) qk_block<1>(w, kv, j0 + j, S + j * BQ);
  }

  static void pv(Work& w, const KV& kv, int64_t j0, int n, const float* P, const R* alpha, float* Ot) {
    if constexpr (Ops::kVPairs) {
      Pv::pv(w.pv, typename Pv::KV{nullptr, 0, static_cast<const uint32_t*>(kv.v), kv.vs}, j0, n, P, alpha, Ot);
    } else {
      float* Pr = w.Pr.get();
      for (int64_t x = 0; x < int64_t(n) * BQ; x += W) V::store(Pr + x, Ops::round_bf16(V::load(P + x)));
      Pv::pv(w.pv, typename Pv::KV{nullptr, 0, static_cast<const float*>(kv.v), kv.vs}, j0, n, Pr, alpha, Ot);
    }
  }

  static float lse_shift(const Work& w, int lane) { return w.shift_in_scores ? 0.f : w.shift[lane]; }
};

// The driver with the Core over its Prep (see int8_kernels.h).
template <class Core>
void run_int8_driver(const AttnInt8Params& p, const int8::Kernels& kern) {
  AttnParams f = p.fwd;
  // A window at least Nq + Nk wide covers every key (as attention_forward normalizes it).
  if (f.window_left >= f.Nq + f.Nk) f.window_left = -1;
  if (f.window_right >= f.Nq + f.Nk) f.window_right = -1;
  if (f.Nk == 0) f.num_landmarks = 0;
  const typename Core::Prep prep(p, f, kern);
  ForwardDriver<Core>::run(prep.driver_params(), prep);
}

// run_int8_driver with compile-time head dims (32, 64, 128 with D == Dv), else runtime ones.
template <template <int, int> class CoreT>
void run_int8_with_head_dims(const AttnInt8Params& p, const int8::Kernels& kern) {
  if (p.fwd.D == p.fwd.Dv) {
    switch (p.fwd.D) {
      case 32: run_int8_driver<CoreT<32, 32>>(p, kern); return;
      case 64: run_int8_driver<CoreT<64, 64>>(p, kern); return;
      case 128: run_int8_driver<CoreT<128, 128>>(p, kern); return;
      default: break;
    }
  }
  run_int8_driver<CoreT<0, 0>>(p, kern);
}

}  // namespace
}  // namespace cpu
}  // namespace hk
