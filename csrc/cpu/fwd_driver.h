// Flash-style blocked forward attention, generic over a "Core" that supplies the two matrix
// microkernels (S = Q K^T and O += P V) and the K/V layouts. Included by the ISA translation units.
//
// Layout: a block holds BQ query rows with the rows in SIMD lanes (QV vectors of W lanes), so the
// online-softmax max/sum are lane-wise (no horizontal reductions). Per key tile of <= JT keys:
//   S[j][lane]  (JT x BQ, scores already multiplied by scale*log2(e))
//   Ot[e][lane] (Dv x BQ, the unnormalized output, transposed)
// Work per block: the window band [lo, hi) in tiles (only the edge tiles get a per-element mask),
// then one tile of the landmark keys outside the band. Landmark *query* rows, which see every key,
// are recomputed afterwards in a second pass that overwrites them.
//
// Core concept (see fwd_core_f32.h, fwd_core_bf16_avx512.h):
//   using V; QV, BQ = QV * V::W, JT; kPairKeys (band tiles must start at even keys)
//   static R exp2(R x);  (2^x for x <= 0, exactly 0 for -inf)
//   struct Prep { explicit Prep(const AttnParams&); KV band(b, h) const; KV landmarks(b, h) const; }
//   struct Work { explicit Work(const AttnParams&); }
//   static void thread_enter(); static void thread_exit();  (per-thread setup, e.g. AMX tile config)
//   using LandmarkCore: the core for the landmark-row pass (same Prep), e.g. narrower blocks
//   kOwnSoftmax: the core replaces the driver's online-softmax step with
//     static void softmax(Work&, const float* S, int n, R* m, R* l, R* alpha);
//   static void pack_q(Work&, const AttnParams&, const void* const* rows, int nr);
//   static void qk(Work&, const KV&, int64_t j0, int n, float* S);
//   static void pv(Work&, const KV&, int64_t j0, int n, const float* P, const R* alpha, float* Ot);
//   optional: static float lse_shift(const Work&, int lane);  (added to the lse of that lane)
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>

#include "common/pattern.h"
#include "cpu/fp_env.h"
#include "cpu/fwd_common.h"
#include "cpu/simd_common.h"

namespace hk {
namespace cpu {
namespace {

// Core::lse_shift(const Work&, int lane): an optional per-lane offset added to the lse of the
// rows last packed (e.g. a score shift the core's S leaves out).
template <class Core, class = void>
struct HasLseShift : std::false_type {};
template <class Core>
struct HasLseShift<Core, std::void_t<decltype(&Core::lse_shift)>> : std::true_type {};

template <class Core>
class ForwardDriver {
  using V = typename Core::V;
  using R = typename V::R;
  static constexpr int W = V::W;
  static constexpr int QV = Core::QV;
  static constexpr int BQ = Core::BQ;
  static constexpr int JT = Core::JT;

  struct ThreadState {
    explicit ThreadState(const AttnParams& p)
        : core(p), S(int64_t(JT) * BQ), Ot(p.Dv * BQ), DvP(ceil_div(p.Dv, W) * W), T(W * DvP),
          lo(JT), hi(JT) {}
    typename Core::Work core;
    AlignedBuf<float> S, Ot;
    int64_t DvP;       // Dv rounded up to W
    AlignedBuf<float> T;  // W output rows of DvP

    AlignedBuf<int> lo, hi;  // per-key visible lane range [lo, hi] of a masked tile
    R m[QV], l[QV], alpha[QV];
  };

 public:
  static void run(const AttnParams& p) { run(p, typename Core::Prep(p)); }

  // With a K/V prep built by the caller (a core whose Prep needs more than AttnParams).
  static void run(const AttnParams& p, const typename Core::Prep& prep) {
    const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
    const int64_t nqb = ceil_div(p.Nq, BQ);
    const int64_t block_items = p.B * p.Hq * nqb;
    for_each_item(p, nthreads, block_items, [&](ThreadState& ts, int64_t it) {
      const int64_t qb = it % nqb, bh = it / nqb;
      window_block(p, prep, ts, bh / p.Hq, bh % p.Hq, qb * BQ);
    });
    // Landmark rows overwrite what the window pass wrote for them. There are few of them (often
    // fewer than BQ), so a core with narrower blocks may take them.
    using Lm = ForwardDriver<typename Core::LandmarkCore>;
    if (p.num_landmarks > 0) Lm::landmark_pass(p, prep, nthreads);
  }

  template <class Prep>
  static void landmark_pass(const AttnParams& p, const Prep& prep, int nthreads) {
    static_assert(std::is_same<Prep, typename Core::Prep>::value, "a landmark core shares its K/V prep");
    for_each_item(p, nthreads, p.B * p.Hq,
                  [&](ThreadState& ts, int64_t it) { landmark_rows(p, prep, ts, it / p.Hq, it % p.Hq); });
  }

 private:
  // Runs fn(thread state, item) for items [0, n) on a static OpenMP schedule (deterministic).
  template <class Fn>
  static void for_each_item(const AttnParams& p, int nthreads, int64_t n, Fn&& fn) {
    if (n <= 0) return;
    nthreads = std::max(1, nthreads);
    std::unique_ptr<std::unique_ptr<ThreadState>[]> states(new std::unique_ptr<ThreadState>[size_t(nthreads)]);
    for (int t = 0; t < nthreads; ++t) states[t].reset(new ThreadState(p));
#pragma omp parallel num_threads(nthreads)
    {
      ThreadState& ts = *states[omp_get_thread_num()];
      const FlushDenormals ftz;
      Core::thread_enter();
#pragma omp for schedule(static)
      for (int64_t it = 0; it < n; ++it) fn(ts, it);
      Core::thread_exit();
    }
  }

  static const uint8_t* padding_of(const AttnParams& p, int64_t b) {
    return p.key_padding ? p.key_padding + b * p.Nk : nullptr;
  }
  static const uint8_t* lm_flags_of(const AttnParams& p, int64_t b) {
    return p.landmark_flags ? p.landmark_flags + b * p.landmark_flags_batch_stride : nullptr;
  }
  static const int32_t* landmarks_of(const AttnParams& p, int64_t b) {
    return p.landmarks + b * p.landmarks_batch_stride;
  }
  static const char* q_row(const AttnParams& p, int64_t b, int64_t h, int64_t i) {
    const int64_t es = p.dtype == DType::F32 ? 4 : 2;
    return static_cast<const char*>(p.q) + es * (b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2]);
  }

  static void begin_block(ThreadState& ts, const AttnParams& p) {
    for (int v = 0; v < QV; ++v) {
      ts.m[v] = V::set1(kNegInf);
      ts.l[v] = V::zero();
    }
    std::memset(ts.Ot.get(), 0, sizeof(float) * p.Dv * BQ);
  }

  // One key tile: scores, optional mask (lo/hi non-null), online softmax update, P V.
  static void tile(ThreadState& ts, const typename Core::KV& kv, int64_t j0, int n, bool masked) {
    float* S = ts.S.get();
    Core::qk(ts.core, kv, j0, n, S);
    if (masked) {
      R lanes[QV];
      for (int v = 0; v < QV; ++v) lanes[v] = lane_index(v);
      for (int j = 0; j < n; ++j) {
        const R lo = V::set1(float(ts.lo[j])), hi = V::set1(float(ts.hi[j]));
        for (int v = 0; v < QV; ++v)
          V::store(S + j * BQ + v * W, V::mask_range(V::load(S + j * BQ + v * W), lanes[v], lo, hi));
      }
    }
    if constexpr (Core::kOwnSoftmax) {
      Core::softmax(ts.core, S, n, ts.m, ts.l, ts.alpha);
    } else {
      for (int v = 0; v < QV; ++v) {
        R mt = V::set1(kNegInf);
        for (int j = 0; j < n; ++j) mt = V::max(mt, V::load(S + j * BQ + v * W));
        const R m_new = V::max(ts.m[v], mt);
        const R m_use = V::neg_inf_to_zero(m_new);  // rows that saw nothing yet keep p = 0
        ts.alpha[v] = Core::exp2(V::sub(ts.m[v], m_use));
        R sum = V::zero();
        for (int j = 0; j < n; ++j) {
          const R pj = Core::exp2(V::sub(V::load(S + j * BQ + v * W), m_use));
          V::store(S + j * BQ + v * W, pj);
          sum = V::add(sum, pj);
        }
        ts.l[v] = V::fma(ts.l[v], ts.alpha[v], sum);
        ts.m[v] = m_new;
      }
    }
    Core::pv(ts.core, kv, j0, n, S, ts.alpha, ts.Ot.get());
  }

  static R lane_index(int v) {
    alignas(64) float idx[W];
    for (int i = 0; i < W; ++i) idx[i] = float(v * W + i);
    return V::load(idx);
  }

  // Writes rows `rows[0..nr)` of (b, h): out = Ot / l, lse = (m + log2 l) * ln 2. Ot is
  // transposed back to rows W x W at a time.
  static void finish_block(const AttnParams& p, ThreadState& ts, int64_t b, int64_t h,
                           const int64_t* rows, int nr) {
    alignas(64) float m[BQ], l[BQ];
    for (int v = 0; v < QV; ++v) {
      V::store(m + v * W, ts.m[v]);
      V::store(l + v * W, ts.l[v]);
    }
    const int64_t Dv = p.Dv, DvP = ts.DvP;
    const float* Ot = ts.Ot.get();
    float* T = ts.T.get();
    for (int v = 0; v * W < nr; ++v) {
      int64_t e0 = 0;
      for (; e0 + W <= Dv; e0 += W) V::transpose(Ot + e0 * BQ + v * W, BQ, T + e0, DvP);
      for (; e0 < Dv; ++e0)
        for (int i = 0; i < W; ++i) T[i * DvP + e0] = Ot[e0 * BQ + v * W + i];
      for (int i = 0; i < W && v * W + i < nr; ++i) {
        const int lane = v * W + i;
        const int64_t row = rows[lane];
        const int64_t o_off = b * p.o_stride[0] + h * p.o_stride[1] + row * p.o_stride[2];
        const bool empty = l[lane] == 0.f;  // NaN (from NaN/inf inputs) propagates, as in SDPA
        const float inv = empty ? 0.f : 1.f / l[lane];
        float lse = empty ? kNegInf : (m[lane] + std::log2(l[lane])) * kLn2;
        if constexpr (HasLseShift<Core>::value)
          if (!empty) lse += Core::lse_shift(ts.core, lane);
        p.lse[(b * p.Hq + h) * p.Nq + row] = lse;
        float* t = T + i * DvP;
        for (int64_t e = 0; e < Dv; ++e) t[e] *= inv;
        if (p.dtype == DType::F32) {
          std::memcpy(static_cast<float*>(p.o) + o_off, t, sizeof(float) * Dv);
        } else if (p.dtype == DType::BF16) {
          V::f32_to_bf16_row(static_cast<uint16_t*>(p.o) + o_off, t, Dv);
        } else {
          V::f32_to_f16_row(static_cast<uint16_t*>(p.o) + o_off, t, Dv);
        }
      }
    }
  }

  static bool tile_has_padding(const uint8_t* pad, int64_t j0, int n) {
    return pad && std::memchr(pad + j0, 0, size_t(n)) != nullptr;
  }

  // Lane range [lo, hi] that sees key j; positions are lane = r - r0 (rows r0 .. r0 + BQ - 1).
  static void key_lanes(int64_t j, int64_t r0, const AttnParams& p, bool key_lm, bool key_real,
                        int* lo, int* hi) {
    if (!key_real) { *lo = 1; *hi = 0; return; }
    int64_t a = INT64_MIN / 4, z = INT64_MAX / 4;  // visible rows r in [a, z]
    if (!key_lm) {
      if (p.window_right >= 0) a = j - p.window_right;
      if (p.window_left >= 0) z = j + p.window_left;
    }
    if (p.causal) a = std::max(a, j);
    *lo = int(std::min<int64_t>(std::max<int64_t>(a - r0, -1), BQ));
    *hi = int(std::min<int64_t>(std::max<int64_t>(z - r0, -1), BQ));
  }

  static void window_block(const AttnParams& p, const typename Core::Prep& prep, ThreadState& ts,
                           int64_t b, int64_t h, int64_t i0) {
    const int nr = int(std::min<int64_t>(BQ, p.Nq - i0));
    const int64_t r0 = i0 + p.Nk - p.Nq, r_last = r0 + nr - 1;
    const int64_t kvh = h / (p.Hq / p.Hk);
    const void* qrows[BQ];
    int64_t rows[BQ];
    for (int i = 0; i < nr; ++i) {
      rows[i] = i0 + i;
      qrows[i] = q_row(p, b, h, i0 + i);
    }
    Core::pack_q(ts.core, p, qrows, nr);
    begin_block(ts, p);

    const uint8_t* pad = padding_of(p, b);
    const uint8_t* flags = lm_flags_of(p, b);
    KeyRange band = window_band(r0, r_last + 1, p.Nk, p.window_left, p.window_right, p.causal);
    if (Core::kPairKeys) band.lo &= ~int64_t(1);
    if (band.lo < band.hi) {
      const typename Core::KV kv = prep.band(b, kvh);
      for (int64_t j0 = band.lo; j0 < band.hi; j0 += JT) {
        const int n = int(std::min<int64_t>(JT, band.hi - j0));
        const int64_t j_last = j0 + n - 1;
        const bool inside = (p.window_left < 0 || j0 >= r_last - p.window_left) &&
                            (p.window_right < 0 || j_last <= r0 + p.window_right) &&
                            (!p.causal || j_last <= r0);
        const bool masked = !inside || tile_has_padding(pad, j0, n);
        if (masked)
          for (int j = 0; j < n; ++j)
            key_lanes(j0 + j, r0, p, flags && flags[j0 + j], !pad || pad[j0 + j], &ts.lo[j], &ts.hi[j]);
        tile(ts, kv, j0, n, masked);
      }
    }
    if (p.num_landmarks > 0) {
      // Landmark keys outside the band, as masked tiles over the prepacked landmark rows.
      const int32_t* lm = landmarks_of(p, b);
      const typename Core::KV kv = prep.landmarks(b, kvh);
      for (int64_t g0 = 0; g0 < p.num_landmarks; g0 += JT) {
        const int n = int(std::min<int64_t>(JT, p.num_landmarks - g0));
        bool any = false;
        for (int g = 0; g < n; ++g) {
          const int64_t j = lm[g0 + g];
          const bool in_band = j >= band.lo && j < band.hi;
          key_lanes(j, r0, p, true, !in_band && (!pad || pad[j]), &ts.lo[g], &ts.hi[g]);
          any |= ts.lo[g] <= ts.hi[g] && ts.hi[g] >= 0 && ts.lo[g] < nr;
        }
        if (any) tile(ts, kv, g0, n, true);
      }
    }
    finish_block(p, ts, b, h, rows, nr);
  }

  // Landmark query rows of (b, h) see every key (causally clipped): full-range blocks of BQ rows.
  static void landmark_rows(const AttnParams& p, const typename Core::Prep& prep, ThreadState& ts,
                            int64_t b, int64_t h) {
    const int32_t* lm = landmarks_of(p, b);
    const int64_t off = p.Nk - p.Nq;
    const int64_t kvh = h / (p.Hq / p.Hk);
    const uint8_t* pad = padding_of(p, b);
    const typename Core::KV kv = prep.band(b, kvh);
    int64_t g = 0;
    while (g < p.num_landmarks) {
      int64_t rows[BQ], pos[BQ];
      const void* qrows[BQ];
      int nr = 0;
      for (; g < p.num_landmarks && nr < BQ; ++g) {
        const int64_t i = lm[g] - off;
        if (i < 0 || i >= p.Nq) continue;
        rows[nr] = i;
        pos[nr] = lm[g];
        qrows[nr] = q_row(p, b, h, i);
        ++nr;
      }
      if (nr == 0) break;
      Core::pack_q(ts.core, p, qrows, nr);
      begin_block(ts, p);
      const int64_t hi = p.causal ? std::min<int64_t>(p.Nk, pos[nr - 1] + 1) : p.Nk;
      for (int64_t j0 = 0; j0 < hi; j0 += JT) {
        const int n = int(std::min<int64_t>(JT, hi - j0));
        const bool masked = (p.causal && j0 + n - 1 > pos[0]) || tile_has_padding(pad, j0, n);
        if (masked) {
          for (int j = 0; j < n; ++j) {
            const int64_t key = j0 + j;
            if (pad && !pad[key]) { ts.lo[j] = 1; ts.hi[j] = 0; continue; }
            // Rows are sorted by position: the lanes with pos >= key form a suffix.
            ts.lo[j] = p.causal ? int(std::lower_bound(pos, pos + nr, key) - pos) : 0;
            ts.hi[j] = BQ;
          }
        }
        tile(ts, kv, j0, n, masked);
      }
      finish_block(p, ts, b, h, rows, nr);
    }
  }
};

// Runs the driver with a compile-time head size (32, 64, 128 with D == Dv) when the core's K/V rows
// are contiguous; otherwise with runtime sizes and strides.
template <template <int, int> class CoreT>
void run_with_head_dims(const AttnParams& p, bool rows_contiguous) {
  if (rows_contiguous && p.D == p.Dv) {
    switch (p.D) {
      case 32: ForwardDriver<CoreT<32, 32>>::run(p); return;
      case 64: ForwardDriver<CoreT<64, 64>>::run(p); return;
      case 128: ForwardDriver<CoreT<128, 128>>::run(p); return;
      default: break;
    }
  }
  ForwardDriver<CoreT<0, 0>>::run(p);
}

}  // namespace
}  // namespace cpu
}  // namespace hk
