// fp32 compute core of the forward driver (fwd_driver.h), generic over a vector trait V.
// fp32 inputs are read in place; bf16/fp16 K and V rows are converted per key tile into a small
// per-thread fp32 tile (no full-size copies; ~3% extra work at D = 64).
//
// Microkernels (rows of the query block in lanes, QV vectors):
//   qk: acc[j][v] += Qt[d][v] * bcast(K[j][d])   register tile JB keys x QV vectors
//   pv: acc[e][v] += P[j][v]  * bcast(V[j][e])   register tile EB features x QV vectors
// DC / DVC != 0 fix D / Dv (and the K / V row strides) at compile time for the common head sizes.
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu/forward/fwd_common.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

struct KVF32 {
  const float* k;  // fp32 row j at k + j * ks (fp32 inputs and the gathered landmark tile)
  int64_t ks;
  const float* v;
  int64_t vs;
  const uint16_t* k16 = nullptr;  // bf16/fp16 inputs: row j at k16 + j * ks, converted per tile
  const uint16_t* v16 = nullptr;
};

template <class V>
void convert_row_to_f32(float* dst, const uint16_t* src, int64_t n, DType dt) {
  if (dt == DType::F16) {
    V::f16_to_f32_row(dst, src, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
  }
}

// Per call: views of K and V per (b, kv head) and the landmark rows gathered (as fp32) per (b, kv head).
template <class V>
class PrepF32 {
 public:
  explicit PrepF32(const AttnParams& p) : p_(p), G_(p.num_landmarks) {
    if (G_ <= 0) return;
    const int64_t BH = p.B * p.Hk;
    klm_.reset(BH * G_ * p.D);
    vlm_.reset(BH * G_ * p.Dv);
    for (int64_t bh = 0; bh < BH; ++bh) {
      const KVF32 src = band(bh / p.Hk, bh % p.Hk);
      const int32_t* lm = p.landmarks + (bh / p.Hk) * p.landmarks_batch_stride;
      for (int64_t g = 0; g < G_; ++g) {
        float* kd = klm_.get() + (bh * G_ + g) * p.D;
        float* vd = vlm_.get() + (bh * G_ + g) * p.Dv;
        if (src.k16) {
          convert_row_to_f32<V>(kd, src.k16 + lm[g] * src.ks, p.D, p.dtype);
          convert_row_to_f32<V>(vd, src.v16 + lm[g] * src.vs, p.Dv, p.dtype);
        } else {
          std::memcpy(kd, src.k + lm[g] * src.ks, sizeof(float) * p.D);
          std::memcpy(vd, src.v + lm[g] * src.vs, sizeof(float) * p.Dv);
        }
      }
    }
  }

  KVF32 band(int64_t b, int64_t h) const {
    const int64_t ko = b * p_.k_stride[0] + h * p_.k_stride[1], vo = b * p_.v_stride[0] + h * p_.v_stride[1];
    if (p_.dtype != DType::F32)
      return {nullptr, p_.k_stride[2], nullptr, p_.v_stride[2], static_cast<const uint16_t*>(p_.k) + ko,
              static_cast<const uint16_t*>(p_.v) + vo};
    return {static_cast<const float*>(p_.k) + ko, p_.k_stride[2], static_cast<const float*>(p_.v) + vo,
            p_.v_stride[2]};
  }

  KVF32 landmarks(int64_t b, int64_t h) const {
    const int64_t bh = b * p_.Hk + h;
    return {klm_.get() + bh * G_ * p_.D, p_.D, vlm_.get() + bh * G_ * p_.Dv, p_.Dv};
  }

 private:
  const AttnParams& p_;
  int64_t G_;
  AlignedBuf<float> klm_, vlm_;
};

template <class Vt, int QVt, int JB, int EB, int DC, int DVC>
struct CoreF32 {
  using V = Vt;
  using R = typename V::R;
  using KV = KVF32;
  using Prep = PrepF32<V>;
  static constexpr int W = V::W;
  static constexpr int QV = QVt;
  static constexpr int BQ = QV * W;
  static constexpr int JT = 64;
  static constexpr bool kPairKeys = false;
  static R exp2(R x) { return V::exp2(x); }
  static constexpr bool kOwnSoftmax = false;
  using LandmarkCore = CoreF32<Vt, 1, JB, EB, DC, DVC>;  // landmark rows come in few rows
  static void thread_enter() {}
  static void thread_exit() {}

  struct Work {
    explicit Work(const AttnParams& p)
        : Qt(p.D * BQ), DP(ceil_div(p.D, W) * W), X(BQ * DP), D(p.D), Dv(p.Dv), dt(p.dtype),
          Ktile(p.dtype == DType::F32 ? 0 : JT * p.D), Vtile(p.dtype == DType::F32 ? 0 : JT * p.Dv) {}
    AlignedBuf<float> Qt;  // Qt[d * BQ + lane] = q[lane][d] * scale * log2(e)
    int64_t DP;            // D rounded up to W
    AlignedBuf<float> X;   // the block's query rows, row-major BQ x DP, before transposing
    int64_t D, Dv;
    DType dt;
    AlignedBuf<float> Ktile, Vtile;  // bf16/fp16 inputs: the current key tile's K / V rows as fp32
  };

  static void pack_q(Work& w, const AttnParams& p, const void* const* rows, int nr) {
    const float c = p.scale * kLog2e;
    const int64_t D = w.D, DP = w.DP;
    float* X = w.X.get();
    for (int i = 0; i < BQ; ++i) {
      float* x = X + i * DP;
      if (i >= nr) {
        std::memset(x, 0, sizeof(float) * D);
        continue;
      }
      if (p.dtype == DType::F32) {
        std::memcpy(x, rows[i], sizeof(float) * D);
      } else if (p.dtype == DType::F16) {
        V::f16_to_f32_row(x, static_cast<const uint16_t*>(rows[i]), D);
      } else {
        const uint16_t* src = static_cast<const uint16_t*>(rows[i]);
        for (int64_t d = 0; d < D; ++d) x[d] = bf16_to_f32(src[d]);
      }
      for (int64_t d = 0; d < D; ++d) x[d] *= c;
    }
    float* Qt = w.Qt.get();
    for (int v = 0; v < QV; ++v) {
      int64_t d0 = 0;
      for (; d0 + W <= D; d0 += W) V::transpose(X + v * W * DP + d0, DP, Qt + d0 * BQ + v * W, BQ);
      for (; d0 < D; ++d0)
        for (int i = 0; i < W; ++i) Qt[d0 * BQ + v * W + i] = X[(v * W + i) * DP + d0];
    }
  }

  template <int J>
  static void qk_block(const float* Qt, const float* kp, int64_t ks, int64_t D, float* S) {
    R acc[J][QV];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < QV; ++v) acc[j][v] = V::zero();
    for (int64_t d = 0; d < D; ++d) {
      R q[QV];
      for (int v = 0; v < QV; ++v) q[v] = V::load(Qt + d * BQ + v * W);
      for (int j = 0; j < J; ++j) {
        const R kb = V::bcast(kp + j * ks + d);
        for (int v = 0; v < QV; ++v) acc[j][v] = V::fma(q[v], kb, acc[j][v]);
      }
    }
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < QV; ++v) V::store(S + j * BQ + v * W, acc[j][v]);
  }

  static void qk(Work& w, const KV& kv, int64_t j0, int n, float* S) {
    const int64_t D = DC ? DC : w.D;
    const float* kp;
    int64_t ks;
    if (kv.k16) {
      for (int j = 0; j < n; ++j) convert_row_to_f32<V>(w.Ktile.get() + j * D, kv.k16 + (j0 + j) * kv.ks, D, w.dt);
      kp = w.Ktile.get();
      ks = D;
    } else {
      ks = DC ? DC : kv.ks;
      kp = kv.k + j0 * ks;
    }
    const float* Qt = w.Qt.get();
    int j = 0;
    for (; j + JB <= n; j += JB) qk_block<JB>(Qt, kp + j * ks, ks, D, S + j * BQ);
    if (JB > 4)
      for (; j + 4 <= n; j += 4) qk_block<4>(Qt, kp + j * ks, ks, D, S + j * BQ);
    for (; j < n; ++j) qk_block<1>(Qt, kp + j * ks, ks, D, S + j * BQ);
  }

  template <int E>
  static void pv_block(const float* P, int n, const float* vp, int64_t vs, const R* alpha, float* Ot) {
    R acc[E][QV];
    for (int e = 0; e < E; ++e)
      for (int v = 0; v < QV; ++v) acc[e][v] = V::mul(V::load(Ot + e * BQ + v * W), alpha[v]);
    for (int j = 0; j < n; ++j) {
      R pj[QV];
      for (int v = 0; v < QV; ++v) pj[v] = V::load(P + j * BQ + v * W);
      for (int e = 0; e < E; ++e) {
        const R vb = V::bcast(vp + j * vs + e);
        for (int v = 0; v < QV; ++v) acc[e][v] = V::fma(pj[v], vb, acc[e][v]);
      }
    }
    for (int e = 0; e < E; ++e)
      for (int v = 0; v < QV; ++v) V::store(Ot + e * BQ + v * W, acc[e][v]);
  }

  static void pv(Work& w, const KV& kv, int64_t j0, int n, const float* P, const R* alpha, float* Ot) {
    const int64_t Dv = DVC ? DVC : w.Dv;
    const float* vp;
    int64_t vs;
    if (kv.v16) {
      for (int j = 0; j < n; ++j) convert_row_to_f32<V>(w.Vtile.get() + j * Dv, kv.v16 + (j0 + j) * kv.vs, Dv, w.dt);
      vp = w.Vtile.get();
      vs = Dv;
    } else {
      vs = DVC ? DVC : kv.vs;
      vp = kv.v + j0 * vs;
    }
    const int nv = int(Dv);
    int e = 0;
    for (; e + EB <= nv; e += EB) pv_block<EB>(P, n, vp + e, vs, alpha, Ot + e * BQ);
    if (EB > 4)
      for (; e + 4 <= nv; e += 4) pv_block<4>(P, n, vp + e, vs, alpha, Ot + e * BQ);
    for (float* ot = Ot + e * BQ; e < nv; ++e, ot += BQ) pv_block<1>(P, n, vp + e, vs, alpha, ot);
  }
};

}  // namespace
}  // namespace cpu
}  // namespace hk
