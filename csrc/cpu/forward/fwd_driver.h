// Flash-style blocked forward attention, generic over a "Core" that supplies the two matrix
// microkernels (S = Q K^T and O += P V) and the K/V layouts. Included by the ISA translation units.
//
// Layout: a block holds BQ query rows with the rows in SIMD lanes (QV vectors of W lanes), so the
// online-softmax max/sum are lane-wise (no horizontal reductions). Per key tile of <= JT keys:
//   S[j][lane]  (JT x BQ, scores already multiplied by scale*log2(e))
//   Ot[e][lane] (Dv x BQ, the unnormalized output, transposed)
// Work per block: the window band [lo, hi) in tiles (only the edge tiles get a per-element mask),
// then one tile of the landmark keys outside the band. Landmark *query* rows, which see every key,
// ride along the window pass (see "Landmark query rows" below) and overwrite what it wrote for
// them.
//
// Score modifiers (AttnParams::softcap / bias) are applied in tile(), the one place every score
// tile passes, before the mask: S = C tanh(S / C) + bias * log2(e) with C = softcap * log2(e),
// in the log2 units of S. This needs S in those units, which the cores with kOwnSoftmax (the AMX
// bf16 core folds the scale into its softmax; the int8 core) do not give: calls with a modifier
// never reach them (attention_forward.cpp, attention_int8.cpp).
//
// Core concept (see fwd_core_f32.h, fwd_core_bf16_avx512.h):
//   using V; QV, BQ = QV * V::W, JT; kPairKeys (band tiles must start at even keys)
//   static R exp2(R x);  (2^x for x <= 0, exactly 0 for -inf)
//   struct Prep { explicit Prep(const AttnParams&); KV band(b, h) const; KV landmarks(b, h) const; }
//   struct Work { explicit Work(const AttnParams&); }
//   static void thread_enter(); static void thread_exit();  (per-thread setup, e.g. AMX tile config)
//   using LandmarkCore: the core for the landmark-row pass (same Prep), e.g. narrower blocks
//   kOwnSoftmax: the core replaces the driver's online-softmax step with
//     static void softmax(Work&, float* S, int n, R* m, R* l, R* alpha);
//   static void pack_q(Work&, const AttnParams&, const void* const* rows, int nr);
//   static void qk(Work&, const KV&, int64_t j0, int n, float* S);
//   static void pv(Work&, const KV&, int64_t j0, int n, const float* P, const R* alpha, float* Ot);
//   optional: static float lse_shift(const Work&, int lane);  (added to the lse of that lane)
//   optional: static void scale_scores(Work&, float* S, int n);  (see HasScaleScores)
//   optional: static void prefetch_keys(const KV&, int64_t j0, int n);  (see HasPrefetchKeys)
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#include "common/pattern.h"
#include "cpu/simd/fp_env.h"
#include "cpu/forward/fwd_common.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

// Core::lse_shift(const Work&, int lane): an optional per-lane offset added to the lse of the
// rows last packed (e.g. a score shift the core's S leaves out).
template <class Core, class = void>
struct HasLseShift : std::false_type {};
template <class Core>
struct HasLseShift<Core, std::void_t<decltype(&Core::lse_shift)>> : std::true_type {};

// V::log2(R): the vector trait has a vectorized log2 (finish_block's lse).
template <class V, class = void>
struct HasLog2 : std::false_type {};
template <class V>
struct HasLog2<V, std::void_t<decltype(sizeof(V::log2(std::declval<typename V::R>())))>> : std::true_type {};

// Core::scale_scores(Work&, float* S, int n): the core's qk may leave S unscaled for its own
// softmax to scale as it reads it; a tile the driver modifies or masks is scaled first.
template <class Core, class = void>
struct HasScaleScores : std::false_type {};
template <class Core>
struct HasScaleScores<Core, std::void_t<decltype(&Core::scale_scores)>> : std::true_type {};

// Core::prefetch_keys(kv, j0, n): the core asks for keys [j0, j0 + n) of kv to be brought into
// cache ahead of their tile (window_block calls it for the keys the next block adds to the band).
template <class Core, class = void>
struct HasPrefetchKeys : std::false_type {};
template <class Core>
struct HasPrefetchKeys<Core, std::void_t<decltype(&Core::prefetch_keys)>> : std::true_type {};

// The score modifiers of one call, in the driver's log2 units. The bias table of each head is
// stored reversed and scaled by log2(e): the bias of aligned row r and key j is
// rev[kPad + Nq - 1 + r - j], so consecutive rows (lanes) read consecutive floats. kPad zeros on
// both sides absorb the lanes of a block past the last row.
struct FwdMods {
  static constexpr int64_t kPad = 64;  // >= every core's BQ
  explicit FwdMods(const AttnParams& p)
      : cap(p.softcap > 0.f ? p.softcap * kLog2e : 0.f), Nq(p.Nq), L(p.Nq + p.Nk - 1) {
    if (!p.bias || L <= 0) return;
    stride = L + 2 * kPad;
    rev.reset(p.Hq * stride);
    for (int64_t h = 0; h < p.Hq; ++h) {
      float* row = rev.get() + h * stride;
      const float* src = p.bias + h * L;
      std::memset(row, 0, sizeof(float) * stride);
      for (int64_t o = 0; o < L; ++o) row[kPad + L - 1 - o] = src[o] * kLog2e;
    }
  }
  bool on() const { return cap > 0.f || rev.get() != nullptr; }
  const float* head(int64_t h) const { return rev.get() ? rev.get() + h * stride : nullptr; }
  float cap;  // softcap * log2(e); 0: none
  int64_t Nq, L, stride = 0;
  AlignedBuf<float> rev;  // Hq rows of `stride`, nullptr: no bias
};

// Positions of one score tile, for the modifiers: key of column j and aligned row of each lane.
struct ModTile {
  const float* rb;      // the head's reversed bias table (FwdMods::head), nullptr: no bias
  int64_t k0;           // keys == nullptr: column j is key k0 + j
  const int32_t* keys;  // else key keys[j]
  int64_t r0;           // rows == nullptr: lane x is row r0 + x
  const int64_t* rows;  // else rows[x], x < nr (other lanes are left as they are)
  int nr;
};

template <class Core>
class ForwardDriver {
  using V = typename Core::V;
  using R = typename V::R;
  static constexpr int W = V::W;
  static constexpr int QV = Core::QV;
  static constexpr int BQ = Core::BQ;
  static constexpr int JT = Core::JT;
  static_assert(BQ <= FwdMods::kPad, "the bias table's padding covers one block of lanes");

  struct ThreadState {
    explicit ThreadState(const AttnParams& p, const FwdMods* m = nullptr)
        : core(p), S(int64_t(JT) * BQ), Ot(p.Dv * BQ), DvP(ceil_div(p.Dv, W) * W), T(W * DvP),
          lo(JT), hi(JT), mods(m && m->on() ? m : nullptr),
          stream_out(p.B * p.Hq * p.Nq * p.Dv * (p.dtype == DType::F32 ? 4 : 2) >= kStreamOutBytes) {}
    typename Core::Work core;
    AlignedBuf<float> S, Ot;
    int64_t DvP;       // Dv rounded up to W
    AlignedBuf<float> T;  // W output rows of DvP

    AlignedBuf<int> lo, hi;  // per-key visible lane range [lo, hi] of a masked tile
    R m[QV], l[QV], alpha[QV];
    const FwdMods* mods;     // score modifiers of the call, nullptr: none
    bool stream_out;         // the output is large enough for non-temporal stores (store_out_row)
  };

 public:
  static void run(const AttnParams& p) { run(p, typename Core::Prep(p)); }

  // With a K/V prep built by the caller (a core whose Prep needs more than AttnParams).
  static void run(const AttnParams& p, const typename Core::Prep& prep) {
    const int nthreads = std::max(1, p.num_threads > 0 ? p.num_threads : omp_get_max_threads());
    const int64_t nqb = ceil_div(p.Nq, BQ);
    const FwdMods mods(p);
    if (p.num_landmarks > 0 && nqb > 0) {
      run_with_landmark_rows(p, prep, nthreads, nqb, &mods);
      return;
    }
    for_each_item(p, nthreads, p.B * p.Hq * nqb, &mods, [&](ThreadState& ts, int64_t it) {
      const int64_t qb = it % nqb, bh = it / nqb;
      window_block(p, prep, ts, bh / p.Hq, bh % p.Hq, qb * BQ);
    });
  }

 private:
  template <class>
  friend class ForwardDriver;  // the window driver runs its LandmarkCore's driver

  // ---- Landmark query rows.
  // They see every key. A pass of their own would stream all of K/V once more per head, bound
  // by memory bandwidth; instead every window block also runs them over the key tiles it owns
  // (those starting in its diagonal range, just brought into cache by its band). Their
  // online-softmax state lives per segment (SEG consecutive blocks of one head: one work item,
  // one thread, in order), and the segments are merged in order at the end, so results do not
  // depend on the thread count. The LandmarkCore's driver (Lm) computes them, in blocks of
  // Lm::BQ rows.
  using Lm = ForwardDriver<typename Core::LandmarkCore>;

  // Which landmark rows each batch has, and where their partial states live.
  struct LandmarkPlan {
    LandmarkPlan(const AttnParams& p, int64_t nqb)
        : G(p.num_landmarks), count(p.B), row(p.B * G), pos(p.B * G) {
      const int64_t off = p.Nk - p.Nq;
      int64_t most = 0;
      for (int64_t b = 0; b < p.B; ++b) {
        const int32_t* lm = p.landmarks + b * p.landmarks_batch_stride;
        int64_t n = 0;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t i = lm[g] - off;
          if (i < 0 || i >= p.Nq) continue;
          row[b * G + n] = i;
          pos[b * G + n] = lm[g];
          ++n;
        }
        count[b] = n;
        most = std::max(most, n);
      }
      nlb = ceil_div(most, Lm::BQ);
      // About 64 work items for balance, fewer where the partial states would pass 64 MiB. Only
      // the shapes decide (never the thread count).
      const int64_t heads = p.B * p.Hq;
      slot_floats = p.Dv * Lm::BQ + 2 * Lm::BQ;
      int64_t nseg = std::min(nqb, ceil_div(64, heads));
      const int64_t budget = (int64_t(64) << 20) / 4;
      while (nseg > 1 && heads * nseg * nlb * slot_floats > budget) nseg = (nseg + 1) / 2;
      seg = ceil_div(nqb, nseg);
      segs = ceil_div(nqb, seg);
      partial.reset(heads * segs * std::max<int64_t>(nlb, 1) * slot_floats);
    }
    float* slot(int64_t bh, int64_t s, int64_t lb) const {
      return partial.get() + ((bh * segs + s) * nlb + lb) * slot_floats;
    }
    int64_t G, nlb = 0, seg = 1, segs = 1, slot_floats = 0;
    AlignedBuf<int64_t> count, row, pos;  // per batch: rows and key positions, by position
    AlignedBuf<float> partial;  // per (b * Hq + h, segment, row block): Ot, m, l of Lm's state
  };

  // Landmark rows of one (b, h) segment: Lm thread states, one per block of Lm::BQ rows.
  struct LandmarkRows {
    LandmarkRows(const AttnParams& p, int64_t nlb, const FwdMods* mods)
        : ts(new std::unique_ptr<typename Lm::ThreadState>[size_t(std::max<int64_t>(nlb, 0))]) {
      for (int64_t i = 0; i < nlb; ++i) ts[i].reset(new typename Lm::ThreadState(p, mods));
    }
    std::unique_ptr<std::unique_ptr<typename Lm::ThreadState>[]> ts;
  };

  static void run_with_landmark_rows(const AttnParams& p, const typename Core::Prep& prep, int nthreads,
                                     int64_t nqb, const FwdMods* mods) {
    const LandmarkPlan plan(p, nqb);
    const auto lrows = per_thread<LandmarkRows>(nthreads, p, plan.nlb, mods);
    for_each_item(p, nthreads, p.B * p.Hq * plan.segs, mods, [&](ThreadState& ts, int64_t it) {
      LandmarkRows& lr = *lrows[omp_get_thread_num()];
      const int64_t bh = it / plan.segs, sg = it % plan.segs, b = bh / p.Hq, h = bh % p.Hq;
      const int64_t nlb = ceil_div(plan.count[b], Lm::BQ);
      for (int64_t lb = 0; lb < nlb; ++lb) Lm::landmark_begin(p, plan, *lr.ts[lb], b, h, lb);
      const int64_t qb1 = std::min(nqb, (sg + 1) * plan.seg);
      for (int64_t qb = sg * plan.seg; qb < qb1; ++qb) {
        window_block(p, prep, ts, b, h, qb * BQ);
        const int64_t k0 = owned_keys_start(p, qb, nqb), k1 = owned_keys_start(p, qb + 1, nqb);
        for (int64_t lb = 0; lb < nlb; ++lb) Lm::landmark_keys(p, prep, plan, *lr.ts[lb], b, h, lb, k0, k1);
      }
      for (int64_t lb = 0; lb < nlb; ++lb) Lm::landmark_save(p, *lr.ts[lb], plan.slot(bh, sg, lb));
    });
    // Merge the segments of each (b, h, row block) and write those rows (over the window pass's).
    Lm::for_each_item(p, nthreads, p.B * p.Hq * plan.nlb, nullptr, [&](typename Lm::ThreadState& lts, int64_t it) {
      const int64_t bh = it / plan.nlb, lb = it % plan.nlb;
      if (lb * Lm::BQ < plan.count[bh / p.Hq]) Lm::landmark_finish(p, plan, lts, bh, lb);
    });
  }

  // First key of the tiles (of Lm::JT keys) block qb owns for the landmark rows: tile starts in
  // the block's diagonal range [qb * BQ, (qb + 1) * BQ) + Nk - Nq; the first block also owns
  // everything before it, the last everything after.
  static int64_t owned_keys_start(const AttnParams& p, int64_t qb, int64_t nqb) {
    if (qb <= 0) return 0;
    if (qb >= nqb) return p.Nk;
    const int64_t d = std::max<int64_t>(0, qb * BQ + p.Nk - p.Nq);
    return std::min<int64_t>(p.Nk, ceil_div(d, Lm::JT) * Lm::JT);
  }

  // (Lm side) Packs the queries of row block lb of batch b's landmark rows for head h; returns
  // how many rows the block has.
  template <class Plan>
  static int pack_landmark_rows(const AttnParams& p, const Plan& plan, ThreadState& ts, int64_t b, int64_t h,
                                int64_t lb) {
    const int64_t* rows = plan.row.get() + b * plan.G + lb * BQ;
    const int nr = int(std::min<int64_t>(BQ, plan.count[b] - lb * BQ));
    const void* qrows[BQ];
    for (int i = 0; i < nr; ++i) qrows[i] = q_row(p, b, h, rows[i]);
    Core::pack_q(ts.core, p, qrows, nr);
    return nr;
  }

  // (Lm side) Starts row block lb of batch b's landmark rows for head h.
  template <class Plan>
  static void landmark_begin(const AttnParams& p, const Plan& plan, ThreadState& ts, int64_t b, int64_t h,
                             int64_t lb) {
    pack_landmark_rows(p, plan, ts, b, h, lb);
    begin_block(ts, p);
  }

  // (Lm side) Row block lb over the key tiles starting in [k0, k1) (multiples of JT), causally
  // clipped; only padding and causality need masks.
  template <class Plan, class Prep>
  static void landmark_keys(const AttnParams& p, const Prep& prep, const Plan& plan, ThreadState& ts,
                            int64_t b, int64_t h, int64_t lb, int64_t k0, int64_t k1) {
    static_assert(std::is_same<Prep, typename Core::Prep>::value, "a landmark core shares its K/V prep");
    const int64_t g0 = lb * BQ;
    const int nr = int(std::min<int64_t>(BQ, plan.count[b] - g0));
    const int64_t* pos = plan.pos.get() + b * plan.G + g0;
    const int64_t hi = p.causal ? std::min<int64_t>(p.Nk, pos[nr - 1] + 1) : p.Nk;
    if (k0 >= hi) return;
    const uint8_t* pad = padding_of(p, b);
    const typename Core::KV kv = prep.band(b, h / (p.Hq / p.Hk));
    for (int64_t j0 = k0; j0 < std::min(k1, hi); j0 += JT) {
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
      const ModTile mt{ts.mods ? ts.mods->head(h) : nullptr, j0, nullptr, 0, pos, nr};
      tile(ts, kv, j0, n, masked, mt);
    }
  }

  // (Lm side) Saves the block's state (Ot, then m and l per lane) into a partial slot.
  static void landmark_save(const AttnParams& p, const ThreadState& ts, float* slot) {
    std::memcpy(slot, ts.Ot.get(), sizeof(float) * p.Dv * BQ);
    for (int v = 0; v < QV; ++v) {
      V::store(slot + p.Dv * BQ + v * W, ts.m[v]);
      V::store(slot + p.Dv * BQ + BQ + v * W, ts.l[v]);
    }
  }

  // (Lm side) Merges row block lb of (b * Hq + h) over the segments, in order, and writes it.
  template <class Plan>
  static void landmark_finish(const AttnParams& p, const Plan& plan, ThreadState& ts, int64_t bh, int64_t lb) {
    const int64_t b = bh / p.Hq, h = bh % p.Hq, Dv = p.Dv;
    alignas(64) float m[BQ], l[BQ], f[BQ];
    for (int i = 0; i < BQ; ++i) {
      m[i] = kNegInf;
      for (int64_t s = 0; s < plan.segs; ++s) m[i] = std::max(m[i], plan.slot(bh, s, lb)[Dv * BQ + i]);
      l[i] = 0.f;
    }
    float* Ot = ts.Ot.get();
    std::memset(Ot, 0, sizeof(float) * Dv * BQ);
    for (int64_t s = 0; s < plan.segs; ++s) {
      const float* slot = plan.slot(bh, s, lb);
      for (int i = 0; i < BQ; ++i) {
        const float ms = slot[Dv * BQ + i];
        f[i] = ms == kNegInf ? 0.f : std::exp2(ms - m[i]);  // a segment that saw nothing adds 0
        l[i] += f[i] * slot[Dv * BQ + BQ + i];
      }
      for (int64_t e = 0; e < Dv; ++e)
        for (int i = 0; i < BQ; ++i) Ot[e * BQ + i] += f[i] * slot[e * BQ + i];
    }
    for (int v = 0; v < QV; ++v) {
      ts.m[v] = V::load(m + v * W);
      ts.l[v] = V::load(l + v * W);
    }
    // finish_block may ask the core about the rows it last packed (Core::lse_shift).
    const int nr = pack_landmark_rows(p, plan, ts, b, h, lb);
    finish_block(p, ts, b, h, plan.row.get() + b * plan.G + lb * BQ, nr);
  }

  // One T(args...) per thread, indexed by omp_get_thread_num(); nthreads >= 1.
  template <class T, class... Args>
  static std::unique_ptr<std::unique_ptr<T>[]> per_thread(int nthreads, const Args&... args) {
    std::unique_ptr<std::unique_ptr<T>[]> all(new std::unique_ptr<T>[size_t(std::max(1, nthreads))]);
    for (int t = 0; t < nthreads; ++t) all[t].reset(new T(args...));
    return all;
  }

  // Runs fn(thread state, item) for items [0, n) on a static OpenMP schedule (deterministic);
  // nthreads >= 1.
  template <class Fn>
  static void for_each_item(const AttnParams& p, int nthreads, int64_t n, const FwdMods* mods, Fn&& fn) {
    if (n <= 0) return;
    const auto states = per_thread<ThreadState>(nthreads, p, mods);
#pragma omp parallel num_threads(nthreads)
    {
      ThreadState& ts = *states[omp_get_thread_num()];
      const FlushDenormals ftz;
      Core::thread_enter();
#pragma omp for schedule(static)
      for (int64_t it = 0; it < n; ++it) fn(ts, it);
      _mm_sfence();  // streamed output stores are visible after the region
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

  // Score modifiers on a tile of n keys (see FwdMods), before its mask.
  static void apply_mods(const FwdMods& mods, const ModTile& mt, float* S, int n) {
    if (mods.cap > 0.f) softcap_inplace<V>(S, int64_t(n) * BQ, mods.cap);
    if (mt.rb) {
      const float* rb = mt.rb + FwdMods::kPad + mods.Nq - 1;  // + r - key
      for (int j = 0; j < n; ++j) {
        const int64_t key = mt.keys ? int64_t(mt.keys[j]) : mt.k0 + j;
        float* Sj = S + j * BQ;
        if (!mt.rows) {
          const float* b = rb + (mt.r0 - key);
          for (int v = 0; v < QV; ++v) V::store(Sj + v * W, V::add(V::load(Sj + v * W), V::load(b + v * W)));
        } else {
          for (int x = 0; x < mt.nr; ++x) Sj[x] += rb[mt.rows[x] - key];
        }
      }
    }
  }

  // One key tile: scores, score modifiers, optional mask (lo/hi non-null), online softmax
  // update, P V.
  static void tile(ThreadState& ts, const typename Core::KV& kv, int64_t j0, int n, bool masked,
                   const ModTile& mt) {
    float* S = ts.S.get();
    Core::qk(ts.core, kv, j0, n, S);
    if constexpr (HasScaleScores<Core>::value)
      if (ts.mods || masked) Core::scale_scores(ts.core, S, n);
    if (ts.mods) apply_mods(*ts.mods, mt, S, n);
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
    alignas(64) float m[BQ], l[BQ], lse2[BQ];  // lse2: m + log2(l), in log2 units
    for (int v = 0; v < QV; ++v) {
      V::store(m + v * W, ts.m[v]);
      V::store(l + v * W, ts.l[v]);
      if constexpr (HasLog2<V>::value) V::store(lse2 + v * W, V::add(ts.m[v], V::log2(ts.l[v])));
    }
    if constexpr (!HasLog2<V>::value)
      for (int i = 0; i < BQ; ++i) lse2[i] = m[i] + std::log2(l[i]);
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
        float lse = empty ? kNegInf : lse2[lane] * kLn2;
        if constexpr (HasLseShift<Core>::value)
          if (!empty) lse += Core::lse_shift(ts.core, lane);
        p.lse[(b * p.Hq + h) * p.Nq + row] = lse;
        float* t = T + i * DvP;
        for (int64_t e = 0; e < Dv; ++e) t[e] *= inv;
        store_out_row(p, ts.stream_out, o_off, t);
      }
    }
  }

  // Output rows of at least this many bytes in all go out with non-temporal stores.
  static constexpr int64_t kStreamOutBytes = int64_t(8) << 20;

  // Row t (Dv floats, normalized) into the output at element offset o_off, in p.dtype. With
  // `stream` (a large output: written once, not read again by the call, and past the caches
  // anyway) 64-byte aligned rows go out with non-temporal stores: no read-for-ownership of their
  // lines (for_each_item fences before its threads finish).
  static void store_out_row(const AttnParams& p, bool stream, int64_t o_off, const float* t) {
    const int64_t Dv = p.Dv;
    if (p.dtype == DType::F32) {
      float* o = static_cast<float*>(p.o) + o_off;
#if defined(__AVX512F__)
      if (stream && (reinterpret_cast<uintptr_t>(o) & 63) == 0 && Dv % 16 == 0) {
        for (int64_t e = 0; e < Dv; e += 16) _mm512_stream_ps(o + e, _mm512_loadu_ps(t + e));
        return;
      }
#endif
      std::memcpy(o, t, sizeof(float) * Dv);
    } else if (p.dtype == DType::BF16) {
      uint16_t* o = static_cast<uint16_t*>(p.o) + o_off;
#if defined(__AVX512BF16__)
      if (stream && (reinterpret_cast<uintptr_t>(o) & 63) == 0 && Dv % 32 == 0) {
        stream_bf16_row(o, t, Dv);
        return;
      }
#endif
      V::f32_to_bf16_row(o, t, Dv);
    } else {
      V::f32_to_f16_row(static_cast<uint16_t*>(p.o) + o_off, t, Dv);
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
    const float* rb = ts.mods ? ts.mods->head(h) : nullptr;
    KeyRange band = window_band(r0, r_last + 1, p.Nk, p.window_left, p.window_right, p.causal);
    if (Core::kPairKeys) band.lo &= ~int64_t(1);
    if (band.lo < band.hi) {
      const typename Core::KV kv = prep.band(b, kvh);
      // The next block's Q rows and the keys it adds to the band are read from memory while this
      // block computes, a share after each tile (a burst would stall on the line fill buffers);
      // a thread's blocks follow for_each_item's order, so its next block is usually this one's.
      const int64_t next = i0 + BQ, next_nr = std::max<int64_t>(0, std::min<int64_t>(BQ, p.Nq - next));
      const int64_t add = next_nr > 0 && p.window_right >= 0 ? std::min<int64_t>(p.Nk, band.hi + BQ) - band.hi : 0;
      const int64_t tiles = ceil_div(band.hi - band.lo, JT);
      const int64_t q_share = ceil_div(next_nr, tiles), k_share = ceil_div(std::max<int64_t>(add, 0), tiles);
      int64_t tile_index = 0;
      for (int64_t j0 = band.lo; j0 < band.hi; j0 += JT, ++tile_index) {
        if constexpr (HasPrefetchKeys<Core>::value) {
          const int64_t q0 = tile_index * q_share, k0 = tile_index * k_share;
          for (int64_t i = q0; i < std::min(next_nr, q0 + q_share); ++i)
            prefetch_l2(q_row(p, b, h, next + i), p.D * (p.dtype == DType::F32 ? 4 : 2));
          if (k0 < add) Core::prefetch_keys(kv, band.hi + k0, int(std::min(add - k0, k_share)));
        }
        const int n = int(std::min<int64_t>(JT, band.hi - j0));
        const int64_t j_last = j0 + n - 1;
        const bool inside = (p.window_left < 0 || j0 >= r_last - p.window_left) &&
                            (p.window_right < 0 || j_last <= r0 + p.window_right) &&
                            (!p.causal || j_last <= r0);
        const bool masked = !inside || tile_has_padding(pad, j0, n);
        if (masked)
          for (int j = 0; j < n; ++j)
            key_lanes(j0 + j, r0, p, flags && flags[j0 + j], !pad || pad[j0 + j], &ts.lo[j], &ts.hi[j]);
        tile(ts, kv, j0, n, masked, ModTile{rb, j0, nullptr, r0, nullptr, nr});
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
        if (any) tile(ts, kv, g0, n, true, ModTile{rb, 0, lm + g0, r0, nullptr, nr});
      }
    }
    finish_block(p, ts, b, h, rows, nr);
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
