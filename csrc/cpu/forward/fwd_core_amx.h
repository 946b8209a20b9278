// bf16 compute core of the forward driver (fwd_driver.h) on AMX tiles (amx_gemm_bf16, fp32
// accumulation):
//   qk: S^T tile [16 keys][16 lanes] = K[16 keys][32 dims] . Qpair[16 dim pairs][16 lanes]
//       (K read in place, Q packed as bf16 pairs exactly as in CoreBF16)
//   pv: Ot tile [16 features][16 lanes] += Vt[16 features][32 keys] . Ppair[16 key pairs][16 lanes]
//       (Vt: V transposed per thread into a ring as the tiles reach it (VtRings), P rounded to
//       bf16 pairs)
// Key groups / chunks that run past the tile (band edges) are finished with vdpbf16ps (qk) and
// fp32 FMAs (pv), so keys outside the tile are never touched: a NaN/inf there cannot leak in.
// Landmark K/V are gathered into zero-padded buffers, which the tiles may read whole.
// Needs D % 32 == 0 and Dv % 16 == 0 (see attention_forward_amx). The softmax and PV steps
// (AmxLanes) and the key-pair transpose are shared with the int8 core (fwd_core_int8_amx.h).
#pragma once
#if !defined(__AMX_BF16__) || !defined(__AMX_TILE__)
#error "fwd_core_amx.h needs -mamx-tile -mamx-bf16 (include it from *_amx.cpp only)"
#endif
#include <immintrin.h>
#include <omp.h>

#include <cstring>
#include <vector>

#include "cpu/simd/amx_tiles.h"
#include "cpu/forward/fwd_common.h"
#include "cpu/forward/fwd_core_bf16.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

// dst[e * ld + j] = key j's feature e as bf16, keys j < 32, e < Dv (Dv % 16 == 0, ld even). key(j,
// e0) gives key j's features e0 .. e0 + 15 as bf16 in the low halves of 16 32-bit lanes (zeros
// for a missing key). Keys are paired into 32-bit words (even key low), and 16 pairs x 16
// features transposed as 32-bit values. kStream: non-temporal stores (dst and ld * 2 bytes
// 64-byte aligned; the caller fences): no read-for-ownership of dst.
template <bool kStream = false, class KeyBf16>
inline void transpose_key_pairs(int64_t Dv, uint16_t* dst, int64_t ld, KeyBf16&& key) {
  alignas(64) uint32_t X[16 * 16];
  for (int64_t e0 = 0; e0 < Dv; e0 += 16) {
    for (int jp = 0; jp < 16; ++jp)
      _mm512_store_si512(X + jp * 16, _mm512_or_si512(key(2 * jp, e0), _mm512_slli_epi32(key(2 * jp + 1, e0), 16)));
    if constexpr (kStream) {
      alignas(64) uint32_t T[16 * 16];
      VecAvx512::transpose(reinterpret_cast<const float*>(X), 16, reinterpret_cast<float*>(T), 16);
      for (int r = 0; r < 16; ++r)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + (e0 + r) * ld), _mm512_load_si512(T + 16 * r));
    } else {
      VecAvx512::transpose(reinterpret_cast<const float*>(X), 16, reinterpret_cast<float*>(dst + e0 * ld), ld / 2);
    }
  }
}

// Keys j < m (m <= 32) of bf16 rows v (row stride vs) -> dst[e * ld + j] for j < 32, e < Dv (0
// from key m on), Dv % 32 == 0 (transpose_key_pairs' result, faster): two keys' rows interleave
// into pair words by vpunpck{l,h}wd (features 8L .. 8L + 3 and 8L + 4 .. 8L + 7 of 128-bit lane
// L), one vpermt2q each puts 16 features in order, then 16 pairs x 16 features are transposed in
// registers. kStream: non-temporal stores (dst and ld * 2 bytes 64-byte aligned; the caller
// fences).
template <bool kStream = false>
inline void transpose_bf16_keys32(const uint16_t* v, int64_t vs, int m, int64_t Dv, uint16_t* dst, int64_t ld) {
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t e0 = 0; e0 < Dv; e0 += 32) {
    __m512 lo[16], hi[16];  // pair jp: features e0 .. e0 + 15, e0 + 16 .. e0 + 31
    for (int jp = 0; jp < 16; ++jp) {
      const __m512i a = 2 * jp < m ? _mm512_loadu_si512(v + 2 * jp * vs + e0) : _mm512_setzero_si512();
      const __m512i b = 2 * jp + 1 < m ? _mm512_loadu_si512(v + (2 * jp + 1) * vs + e0) : _mm512_setzero_si512();
      const __m512i u = _mm512_unpacklo_epi16(a, b), h = _mm512_unpackhi_epi16(a, b);
      lo[jp] = _mm512_castsi512_ps(_mm512_permutex2var_epi64(u, first, h));
      hi[jp] = _mm512_castsi512_ps(_mm512_permutex2var_epi64(u, second, h));
    }
    VecAvx512::transpose_regs<kStream>(lo, reinterpret_cast<float*>(dst + e0 * ld), ld / 2);
    VecAvx512::transpose_regs<kStream>(hi, reinterpret_cast<float*>(dst + (e0 + 16) * ld), ld / 2);
  }
}

class VtRings;

struct KVAmx {
  const uint16_t* k;  // key row j at k + j * ks (bf16)
  int64_t ks;
  const uint16_t* vt;  // feature e of key j at vt[e * vts + j] (bf16); nullptr: from `rings`
  int64_t vts;
  const uint16_t* v;  // key row j at v + j * vs (bf16): the fp32 tail of pv
  int64_t vs;
  int64_t keys;  // keys the tiles may read from j = 0 (zero padded past the real ones)
  const VtRings* rings = nullptr;  // transposes V as the tiles reach it (vt == nullptr)
};

// V^T of the band keys, transposed when a tile first reads them into a ring per thread, instead
// of a transposed copy of all of V written out and read back through memory: a thread's window
// blocks walk a head's keys in order, so the ring holds the band and the keys stay in cache
// between their transpose and their tiles.
// A thread's ring: Dv rows of R + 96 key columns (R a multiple of 32; the last 32 only keep rows
// from lying 2^k bytes apart); 32-key chunk c lives at column 32 * (c % (R / 32)), and chunks at
// columns 0 and 32 are also written at R and R + 32,
// so a tile's (at most two) chunks read contiguously across the wrap. Which chunk each slot
// holds is tagged, with the (b, kv head) it came from (V's first row): any range of keys can be
// asked for, in any order; only the refills cost.
class VtRings {
 public:
  VtRings(const AttnParams& p, int nthreads)
      : Dv_(p.Dv), Nk_(p.Nk), slots_(ring_keys(p) / 32), ld_(ring_keys(p) + 96), threads_(std::max(1, nthreads)),
        cols_(int64_t(threads_) * p.Dv * ld_), tags_(size_t(threads_)) {
    for (Tag& tag : tags_) tag.chunk.reset(slots_);
  }

  int64_t ld() const { return ld_; }

  // Column of key j0 in the calling thread's ring, keys [j0, j0 + n) present there (n <= 64, a
  // run of whole 32-key chunks from j0 read by pv; keys past Nk read as zero). v: key row j at
  // v + j * vs (bf16).
  const uint16_t* columns(const uint16_t* v, int64_t vs, int64_t j0, int n) const {
    const int t = omp_get_thread_num();
    Tag& tag = tags_[t];
    uint16_t* ring = cols_.get() + int64_t(t) * Dv_ * ld_;
    if (tag.v != v) {
      tag.v = v;
      for (int64_t s = 0; s < slots_; ++s) tag.chunk[s] = -1;
    }
    for (int64_t c = j0 / 32; c * 32 < j0 + n; ++c) {
      const int64_t s = c % slots_;
      if (tag.chunk[s] == c) continue;
      const int m = int(std::max<int64_t>(0, std::min<int64_t>(32, Nk_ - c * 32)));
      transpose_chunk(v + c * 32 * vs, vs, m, ring + s * 32);
      // The next chunk's rows into L2: a band grows a chunk at a time (each block adds 32 keys),
      // so they are the next refill's, a block ahead. (Asked for by the driver with the next
      // block's K and Q rows instead, the bf16 forward took 6-7% longer.)
      for (int64_t j = (c + 1) * 32; j < std::min(Nk_, (c + 2) * 32); ++j) prefetch_l2(v + j * vs, Dv_ * 2);
      if (s < 2)  // its mirror past the wrap
        for (int64_t e = 0; e < Dv_; ++e)
          std::memcpy(ring + e * ld_ + slots_ * 32 + s * 32, ring + e * ld_ + s * 32, 32 * sizeof(uint16_t));
      tag.chunk[s] = c;
    }
    return ring + (j0 % (slots_ * 32));
  }

 private:
  // Keys j < m (m <= 32) of bf16 rows v (stride vs) -> dst[e * ld + j] for j < 32 (0 from m on).
  void transpose_chunk(const uint16_t* v, int64_t vs, int m, uint16_t* dst) const {
    if (Dv_ % 32 == 0) {
      transpose_bf16_keys32(v, vs, m, Dv_, dst, ld_);
      return;
    }
    transpose_key_pairs(Dv_, dst, ld_, [&](int j, int64_t e0) {
      return j < m ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j * vs + e0)))
                   : _mm512_setzero_si512();
    });
  }

  // The ring's keys: the band of a window block, one landmark-row tile of its diagonal and a tile
  // each side, in whole chunks (all keys when the window is unbounded); at least 4 chunks.
  static int64_t ring_keys(const AttnParams& p) {
    const int64_t all = ceil_div(p.Nk, 32) * 32;
    if (p.window_left < 0 || p.window_right < 0) return std::max<int64_t>(all, 128);
    const int64_t band = p.window_left + p.window_right + 32 + 3 * 64;
    return std::max<int64_t>(128, std::min(all, ceil_div(band, 32) * 32));
  }

  struct Tag {
    const uint16_t* v = nullptr;  // the (b, kv head) the ring holds keys of
    AlignedBuf<int64_t> chunk;    // per slot: the chunk it holds, -1: none
  };
  int64_t Dv_, Nk_, slots_, ld_;
  int threads_;
  AlignedBuf<uint16_t> cols_;
  mutable std::vector<Tag> tags_;  // per thread, written only by that thread
};

class PrepAmx {
 public:
  explicit PrepAmx(const AttnParams& p)
      : p_(p), G_(p.num_landmarks), GP_(ceil_div(G_, 32) * 32),
        rings_(p, p.num_threads > 0 ? p.num_threads : omp_get_max_threads()) {
    const int64_t BH = p.B * p.Hk;
    if (G_ > 0) {
      klm_.reset(BH * GP_ * p.D);
      vtlm_.reset(BH * p.Dv * GP_);
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / p.Hk, h = bh % p.Hk;
        const int32_t* lm = p.landmarks + b * p.landmarks_batch_stride;
        uint16_t* kd = klm_.get() + bh * GP_ * p.D;
        std::memset(kd, 0, sizeof(uint16_t) * GP_ * p.D);
        for (int64_t g = 0; g < G_; ++g) std::memcpy(kd + g * p.D, k_row(b, h, lm[g]), sizeof(uint16_t) * p.D);
        for (int64_t g0 = 0; g0 < GP_; g0 += 32) {
          const int n = int(std::min<int64_t>(32, std::max<int64_t>(0, G_ - g0)));
          const uint16_t* rows[32];
          for (int g = 0; g < n; ++g) rows[g] = v_row(b, h, lm[g0 + g]);
          transpose_keys(rows, n, vtlm_.get() + bh * p.Dv * GP_ + g0, GP_);
        }
      }
    }
  }

  KVAmx band(int64_t b, int64_t h) const {
    return {k_row(b, h, 0), p_.k_stride[2], nullptr, rings_.ld(), v_row(b, h, 0), p_.v_stride[2], 0, &rings_};
  }

  KVAmx landmarks(int64_t b, int64_t h) const {
    const int64_t bh = b * p_.Hk + h;
    return {klm_.get() + bh * GP_ * p_.D, p_.D, vtlm_.get() + bh * p_.Dv * GP_, GP_, nullptr, 0, GP_};
  }

 private:
  const uint16_t* k_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<const uint16_t*>(p_.k) + b * p_.k_stride[0] + h * p_.k_stride[1] + j * p_.k_stride[2];
  }
  const uint16_t* v_row(int64_t b, int64_t h, int64_t j) const {
    return static_cast<const uint16_t*>(p_.v) + b * p_.v_stride[0] + h * p_.v_stride[1] + j * p_.v_stride[2];
  }
  // dst[e * ld + j] = rows[j][e] for j < n, 0 for n <= j < 32.
  void transpose_keys(const uint16_t* const* rows, int n, uint16_t* dst, int64_t ld) const {
    transpose_key_pairs(p_.Dv, dst, ld, [&](int j, int64_t e0) {
      return j < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + e0)))
                   : _mm512_setzero_si512();
    });
  }

  const AttnParams& p_;
  int64_t G_, GP_;
  VtRings rings_;
  AlignedBuf<uint16_t> klm_, vtlm_;
};

// The softmax and PV steps shared by the amx cores (CoreAmx, CoreInt8Amx): S^T tiles of n keys x
// BQ = 32 query lanes (two vectors), P as bf16 key pairs Pp[jp * BQ + lane], O^T as Ot[e * BQ +
// lane].
struct AmxLanes {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr int QV = 2;
  static constexpr int BQ = 32;

  // Online softmax step: per lane half, m_new = Rule::next_max(m, c * max_j S), P =
  // Rule::exp2(c * S - m_new) written into Pp as bf16 key pairs (zero up to a whole number of
  // 32-key chunks), alpha = Rule::exp2(m - m_new) (1 where the max stays), l = l * alpha + the
  // sum exp_pairs returns.
  // Rule::kStaleMax: once every lane of the half has a max, the tile is first tried against it
  // without a max pass (a sixth of the step's vector work), and kept (alpha 1) when
  // Rule::stale_max_holds(m, c * tile max, sum of P) says so; otherwise (a much larger score, inf,
  // NaN) the tile is redone with the max pass. The tile max comes from the same pass when
  // Rule::kStaleNeedsTileMax.
  // Only the first `halves` lane halves hold rows (a block of at most 16 rows: 1); the others keep
  // alpha = 1 and are not touched.
  template <class Rule>
  static void softmax(uint32_t* Pp, float scale, const float* S, int n, R* m, R* l, R* alpha, int halves = QV) {
    for (int v = halves; v < QV; ++v) alpha[v] = _mm512_set1_ps(1.f);
    for (int v = 0; v < halves; ++v) step<Rule>(Pp, scale, S, n, v, m, l, alpha);
  }

  // The step of lane half v on fp32 scores S: the stale-max try, else the max pass.
  template <class Rule>
  static void step(uint32_t* Pp, float scale, const float* S, int n, int v, R* m, R* l, R* alpha) {
    const float* Sv = S + v * W;
    if (!stale_step<Rule>(Pp, scale, n, v, m, l, alpha, [&](int j) { return _mm512_loadu_ps(Sv + j * BQ); }))
      max_step<Rule>(Pp, scale, S, n, v, m, l, alpha);
  }

  // Rule::kStaleMax's try of lane half v against its running max; true when it kept it.
  // score(j): S of key j in the half's lanes.
  template <class Rule, class Score>
  static bool stale_step(uint32_t* Pp, float scale, int n, int v, R* m, R* l, R* alpha, Score&& score) {
    if constexpr (!Rule::kStaleMax) {
      return false;
    } else {
      const bool every_lane_has_a_max = _mm512_cmp_ps_mask(m[v], _mm512_set1_ps(kNegInf), _CMP_EQ_OQ) == 0;
      if (!every_lane_has_a_max) return false;
      const R c = _mm512_set1_ps(scale);
      R mt;
      const R sum = exp_pairs<Rule>(Pp + v * W, n, score, c, m[v], &mt);
      if (!Rule::stale_max_holds(m[v], _mm512_mul_ps(mt, c), sum)) return false;
      alpha[v] = _mm512_set1_ps(1.f);
      l[v] = _mm512_add_ps(l[v], sum);
      return true;
    }
  }

  // The step of lane half v with a max pass first.
  template <class Rule>
  static void max_step(uint32_t* Pp, float scale, const float* S, int n, int v, R* m, R* l, R* alpha) {
    const R c = _mm512_set1_ps(scale);
    const float* Sv = S + v * W;
    const R mt = tile_max(Sv, n);
    const R m_new = Rule::next_max(m[v], _mm512_mul_ps(mt, c));
    const R m_use = VecAvx512::neg_inf_to_zero(m_new);  // rows that saw nothing yet keep p = 0
    // Exactly 1 where the max did not move (Rule::exp2(0) need not be 1): earlier tiles keep
    // their weight, and pv_chunks skips rescaling O.
    const __mmask16 same = _mm512_cmp_ps_mask(m[v], m_new, _CMP_EQ_OQ) |
                           _mm512_cmp_ps_mask(m_new, _mm512_set1_ps(kNegInf), _CMP_EQ_OQ);
    alpha[v] = _mm512_mask_blend_ps(same, Rule::exp2(_mm512_sub_ps(m[v], m_use)), _mm512_set1_ps(1.f));
    const R sum = exp_pairs<Rule>(Pp + v * W, n, [&](int j) { return _mm512_loadu_ps(Sv + j * BQ); }, c, m_use);
    l[v] = _mm512_fmadd_ps(l[v], alpha[v], sum);
    m[v] = m_new;
  }

  // P = Rule::exp2(c * S - m) of one lane half (S of key j: score(j); Pp from the half's first
  // lane) into Pp as bf16 key pairs, zero up to a whole number of 32-key chunks; returns the sum
  // of the fp32 P, or with Rule::kBf16Sum of the bf16 P (the weights P V applies: with a stale max
  // the largest P is not 1, and a key that dominates a row must still give its V exactly). With
  // Rule::kStaleNeedsTileMax and tile_max, *tile_max = max_j S.
  template <class Rule, class Score>
  static R exp_pairs(uint32_t* Pp, int n, Score&& score, R c, R m, R* tile_max = nullptr) {
    constexpr bool kMax = Rule::kStaleNeedsTileMax;
    const int np = (n + 1) / 2, np_pad = int(ceil_div(np, 16) * 16);
    R sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    R mx[2] = {_mm512_set1_ps(kNegInf), _mm512_set1_ps(kNegInf)};
    // Key pair jp into Pp, its P added to the sums: with kBf16Sum the two bf16 P in one
    // vdpbf16ps against bf16 1.0 (chain jp % 2: two chains hide the latency), else the fp32 P
    // (even keys into sum[0], odd keys into sum[1]).
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
    auto pair = [&](int jp, int chain, R p0, R p1) {
      const __m512i pr = bf16_pairs(p0, p1);
      _mm512_storeu_si512(Pp + jp * BQ, pr);
      if constexpr (Rule::kBf16Sum) {
        sum[chain] = _mm512_dpbf16_ps(sum[chain], (__m512bh)pr, ones);
      } else {
        sum[0] = _mm512_add_ps(sum[0], p0);
        sum[1] = _mm512_add_ps(sum[1], p1);
      }
    };
    auto p_of = [&](int j) {
      const R x = score(j);
      if constexpr (kMax) mx[j & 1] = _mm512_max_ps(mx[j & 1], x);
      return Rule::exp2(_mm512_fmsub_ps(x, c, m));
    };
    int jp = 0;
    for (; jp + 2 <= n / 2; jp += 2) {  // whole pairs, two at a time (no branch in the body)
      pair(jp, 0, p_of(2 * jp), p_of(2 * jp + 1));
      pair(jp + 1, 1, p_of(2 * jp + 2), p_of(2 * jp + 3));
    }
    for (; jp < n / 2; ++jp) pair(jp, 0, p_of(2 * jp), p_of(2 * jp + 1));
    if (n & 1) pair(jp++, 0, p_of(n - 1), _mm512_setzero_ps());  // the last key pairs with p = 0
    for (; jp < np_pad; ++jp) _mm512_storeu_si512(Pp + jp * BQ, _mm512_setzero_si512());
    if (kMax && tile_max) *tile_max = _mm512_max_ps(mx[0], mx[1]);
    return _mm512_add_ps(sum[0], sum[1]);
  }

  // max_j S[j * BQ] over 16 lanes (four chains: max is exact, the order does not matter).
  static R tile_max(const float* S, int n) {
    R mt[4] = {_mm512_set1_ps(kNegInf), _mm512_set1_ps(kNegInf), _mm512_set1_ps(kNegInf), _mm512_set1_ps(kNegInf)};
    int j = 0;
    for (; j + 4 <= n; j += 4)
      for (int u = 0; u < 4; ++u) mt[u] = _mm512_max_ps(mt[u], _mm512_loadu_ps(S + (j + u) * BQ));
    for (; j < n; ++j) mt[0] = _mm512_max_ps(mt[0], _mm512_loadu_ps(S + j * BQ));
    return _mm512_max_ps(_mm512_max_ps(mt[0], mt[1]), _mm512_max_ps(mt[2], mt[3]));
  }

  // Ot = Ot * alpha + Vt . P over `chunks` whole 32-key chunks (vt: feature e of key j at
  // vt[e * vts + j], from the tile's first key; Dv % 16 == 0), in the first `halves` lane halves.
  static void pv_chunks(const uint32_t* Pp, const uint16_t* vt, int64_t vts, int64_t Dv, int chunks,
                        const R* alpha, float* Ot, int halves = QV) {
    const R one = _mm512_set1_ps(1.f);
    if (_mm512_cmp_ps_mask(alpha[0], one, _CMP_NEQ_UQ) | _mm512_cmp_ps_mask(alpha[1], one, _CMP_NEQ_UQ))
      for (int64_t e = 0; e < Dv; ++e)
        for (int v = 0; v < halves; ++v)
          _mm512_storeu_ps(Ot + e * BQ + v * W, _mm512_mul_ps(_mm512_loadu_ps(Ot + e * BQ + v * W), alpha[v]));
    if (chunks > 0) amx_gemm_bf16<true>(Dv, W * halves, 16 * chunks, vt, vts * 2, Pp, BQ, Ot, BQ);
  }

  // Lane halves that hold rows of a block of nr rows.
  static int halves_of(int nr) { return nr > W ? 2 : 1; }
};

template <int DC, int DVC>
struct CoreAmx {
  using Base = CoreBF16<DC, DVC>;  // Q packing and the vdpbf16ps tail of qk
  using V = VecAvx512;
  using R = __m512;
  using KV = KVAmx;
  using Prep = PrepAmx;
  struct Work : Base::Work {
    using Base::Work::Work;
    int halves = AmxLanes::QV;  // lane halves holding rows of the packed block
  };
  static constexpr int W = AmxLanes::W;
  static constexpr int QV = AmxLanes::QV;
  static constexpr int BQ = AmxLanes::BQ;
  static constexpr int JT = 64;
  static constexpr bool kPairKeys = true;
  static_assert(Base::BQ == BQ, "the Q pair layout is shared with CoreBF16");

  using LandmarkCore = CoreAmx;
  static void thread_enter() { amx_configure_16x64(); }
  static void thread_exit() { _tile_release(); }
  static void pack_q(Work& w, const AttnParams& p, const void* const* rows, int nr) {
    Base::pack_q(w, p, rows, nr);
    w.halves = AmxLanes::halves_of(nr);
  }

  // 2^x, kCoarse accuracy: P is rounded to bf16 (2^-9) anyway.
  static R exp2(R x) { return cpu::exp2_ftz<Exp2::kCoarse>(x); }  // the driver runs with FTZ

  // S^T = K . Q^T for the tile's whole 16-key groups (all groups for zero-padded K), the rest
  // with vdpbf16ps.
  static void qk(Work& w, const KV& kv, int64_t j0, int n, float* S) {
    const int64_t D = DC ? DC : w.D2 * 2;
    const uint32_t* Qp = w.Qp.get();
    const uint16_t* kp = kv.k + j0 * kv.ks;
    const int groups = kv.keys ? int(ceil_div(n, 16)) : n / 16;
    if (groups > 0) amx_gemm_bf16<false>(16 * groups, W * w.halves, D / 2, kp, kv.ks * 2, Qp, BQ, S, BQ);
    // S stays unscaled when softmax() can fold a positive scale into its exponent.
    const float cs = softmax_scale(w) == 1.f ? w.c : 1.f;
    const int done = std::min(n, 16 * groups);
    if (cs != 1.f) {
      const R cv = _mm512_set1_ps(cs);
      for (int i = 0; i < done * QV; ++i) _mm512_storeu_ps(S + i * W, _mm512_mul_ps(_mm512_loadu_ps(S + i * W), cv));
    }
    int j = done;
    for (; j + 4 <= n; j += 4) Base::template qk_block<4>(Qp, kp + j * kv.ks, kv.ks, D / 2, cs, S + j * BQ);
    for (; j < n; ++j) Base::template qk_block<1>(Qp, kp + j * kv.ks, kv.ks, D / 2, cs, S + j * BQ);
  }

  // K rows of keys [j0, j0 + n) into L2 (see HasPrefetchKeys; VtRings asks for the V rows).
  static void prefetch_keys(const KV& kv, int64_t j0, int n) {
    const int64_t D = DC ? DC : 0;
    if (D == 0) return;  // runtime sizes: left to the hardware prefetchers
    for (int j = 0; j < n; ++j) prefetch_l2(kv.k + (j0 + j) * kv.ks, D * 2);
  }

  // Ot = Ot * alpha + Vt . P (P from softmax(), already bf16 pairs in w.Pp).
  static void pv(Work& w, const KV& kv, int64_t j0, int n, const float* P, const R* alpha, float* Ot) {
    const int64_t Dv = DVC ? DVC : w.Dv;
    // Whole 32-key chunks on tiles; padded buffers (landmarks) may round the last one up.
    const int chunks = kv.keys ? int(ceil_div(n, 32)) : n / 32;
    const int tiled = std::min(n, 32 * chunks);
    (void)P;  // softmax() left P as bf16 pairs in w.Pp
    const uint32_t* Pp = w.Pp.get();
    const uint16_t* vt = kv.vt ? kv.vt + j0 : chunks > 0 ? kv.rings->columns(kv.v, kv.vs, j0, 32 * chunks) : nullptr;
    AmxLanes::pv_chunks(Pp, vt, kv.vts, Dv, chunks, alpha, Ot, w.halves);
    // Keys of a partial chunk at the end of the band: fp32 FMAs (P widened back from bf16).
    for (int j = tiled; j < n; ++j) {
      const uint16_t* vrow = kv.v + (j0 + j) * kv.vs;
      R pj[QV];
      for (int v = 0; v < w.halves; ++v) pj[v] = unpair(Pp + (j / 2) * BQ + v * W, j & 1);
      for (int64_t e = 0; e < Dv; ++e) {
        const R ve = _mm512_set1_ps(bf16_to_f32(vrow[e]));
        for (int v = 0; v < w.halves; ++v) {
          float* o = Ot + e * BQ + v * W;
          _mm512_storeu_ps(o, _mm512_fmadd_ps(pj[v], ve, _mm512_loadu_ps(o)));
        }
      }
    }
  }

 private:
  // The factor softmax() applies to raw scores: w.c when positive (max commutes with it), else
  // 1 (qk scaled S itself).
  static float softmax_scale(const Work& w) { return w.c > 0.f ? w.c : 1.f; }

  // fp32 value of the even (hi = 0) or odd key of 16 lanes of bf16 pairs.
  static R unpair(const uint32_t* pairs, int hi) {
    const __m512i x = _mm512_loadu_si512(pairs);
    return _mm512_castsi512_ps(hi ? _mm512_and_si512(x, _mm512_set1_epi32(int(0xffff0000u)))
                                  : _mm512_slli_epi32(x, 16));
  }

 public:
  // The driver's online-softmax step (AmxLanes::softmax with the running max, P into w.Pp).
  static constexpr bool kOwnSoftmax = true;
  static void softmax(Work& w, const float* S, int n, R* m, R* l, R* alpha) {
    AmxLanes::softmax<CoreAmx>(w.Pp.get(), softmax_scale(w), S, n, m, l, alpha, w.halves);
  }
  static R next_max(R m, R tile_max) { return _mm512_max_ps(m, tile_max); }
  static constexpr bool kStaleMax = true;
  static constexpr bool kBf16Sum = true;
  static constexpr bool kStaleNeedsTileMax = false;
  // Every lane's sum of P at most 2^64 (so is every P: nothing can overflow later).
  static bool stale_max_holds(R, R, R sum) {
    return _mm512_cmp_ps_mask(sum, _mm512_set1_ps(0x1p64f), _CMP_LE_OQ) == 0xffff;
  }
};

}  // namespace
}  // namespace cpu
}  // namespace hk
