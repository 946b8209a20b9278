// Decode fast path of the CPU forward, for calls with few query rows (fwd_decode_entry.h): the
// blocked kernel (fwd_driver.h) holds one query row per SIMD lane, so with Nq = 1 it would use 1
// lane of 16. Here the lanes run over keys (scores: W keys at a time, reduced by one transpose)
// and over features (P V). Up to kDecodeGroup query rows that see the same keys (GQA heads of one
// kv head; rows of one head when the pattern gives them the same keys) share each K / V load.
//
// Keys of a row (same pattern as the blocked kernel): its window band, then the landmark keys
// outside the band; a landmark query row sees every key. Padded keys score -inf.
//
// Work split, independent of the thread count (so any count gives the same bits): each row's key
// list is cut into C chunks; an item (row group, chunk) computes per row a partial softmax (max m,
// sum l, unnormalized o) by a two-pass softmax over its keys; the partials of a row are then
// merged in chunk order. C grows when there are few rows, so that threads share a long key range.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>

#include "common/pattern.h"
#include "cpu/simd/fp_env.h"
#include "cpu/forward/fwd_common.h"
#include "cpu/decode/fwd_decode_entry.h"
#include "cpu/simd/simd_common.h"

namespace hk {
namespace cpu {
namespace {

// W consecutive bf16 / fp16 values loaded as fp32.
template <class V>
struct DecodeLoad;

template <>
struct DecodeLoad<VecScalar> {
  static float bf16(const uint16_t* p) { return bf16_to_f32(*p); }
  static float f16(const uint16_t* p) { return f16_to_f32(*p); }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <>
struct DecodeLoad<VecAvx2> {
  static __m256 bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static __m256 f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};
#endif

#if defined(__AVX512F__)
template <>
struct DecodeLoad<VecAvx512> {
  static __m512 bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m512 f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};
#endif

// Software prefetch of the K / V rows this many keys ahead: with one query row the loop does little
// work per byte, and the hardware prefetcher alone leaves a DRAM-resident cache latency-bound.
// 48 keys (6 KiB of bf16 rows at D = 64) beat 16 by ~12% at Nk = 32768 and matched 96 (Zen 4).
constexpr int kDecodePrefetchKeys = 48;

// The n elements from p into L1. kAsm: as asm statements on x86, for the vdpbf16ps / VNNI loops
// (prefetch_keys): GCC's vectorizer deletes __builtin_prefetch from the loops it vectorizes (a
// loop over key rows computing idx[t] * stride is one), which left the K pass without prefetch,
// 1.8x slower from DRAM. The widening paths keep the builtin: fp32 from DRAM was ~9% slower with
// the asm one.
template <bool kAsm = false, class T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) {
#if defined(__x86_64__) || defined(__i386__)
    if constexpr (kAsm)
      asm volatile("prefetcht0 %0" : : "m"(c[b]));
    else
#endif
      __builtin_prefetch(c + b, 0, 3);
  }
}

// The rows of an item's keys t: row idx[t], or row run0 + t when the keys are one run of
// consecutive positions (kRun: the usual band-only item; addresses without the table lookup).
template <bool kRun>
inline int64_t key_row(const int32_t* idx, int64_t run0, int t) {
  return kRun ? run0 + t : int64_t(idx[t]);
}

// Prefetch of the rows of keys [t0, t0 + cnt) of an item of n keys (clipped to n), len elements
// each, stride elements apart: one span of lines when they are consecutive and dense.
template <bool kRun, class T>
inline void prefetch_keys(const T* base, const int32_t* idx, int64_t run0, int t0, int cnt, int n,
                          int64_t stride, int64_t len) {
  if (t0 >= n) return;
  cnt = std::min(cnt, n - t0);
  if (kRun && stride == len) {
    prefetch_row<true>(base + (run0 + t0) * stride, int64_t(cnt) * len);
    return;
  }
  for (int u = 0; u < cnt; ++u) prefetch_row<true>(base + key_row<kRun>(idx, run0, t0 + u) * stride, len);
}

// Score modifiers of one query row (AttnParams::softcap / bias), in the log2 units of the scores.
struct DecodeRowMods {
  float cap = 0.f;               // softcap * log2(e); 0: none
  const float* bias = nullptr;   // the row's bias by key: bias[j] * log2(e) is added; nullptr: none
};

// Keys seen by one aligned query row: band keys [lo, hi), then landmarks lm[0, ga) and lm[gb, gc).
struct DecodeRowKeys {
  int64_t lo = 0, hi = 0;
  int64_t ga = 0, gb = 0, gc = 0;
  int64_t count() const { return (hi - lo) + ga + (gc - gb); }
};

// Query rows that share one key list (same batch, kv head and visible keys) are processed together,
// up to kDecodeGroup of them, so K and V are read once per group.
constexpr int kDecodeGroup = 4;

// A buffer that only grows: kept (thread_local) across calls so a decode step allocates nothing.
template <class T>
struct GrowBuf {
  AlignedBuf<T> buf;
  int64_t cap = 0;
  T* ensure(int64_t n) {
    if (n > cap) {
      buf.reset(n);
      cap = n;
    }
    return buf.get();
  }
};

// Scratch per thread, reused across calls (sizes grow to the largest call seen).
struct DecodeScratch {
  void prepare(int64_t max_keys, int64_t W, const AttnParams& p) {
    SP = ceil_div(max_keys, W) * W + W;
    DP = ceil_div(p.D, W) * W;
    S_.ensure(kDecodeGroup * SP);
    idx_.ensure(SP);
    q_.ensure(kDecodeGroup * DP);
    tmp_.ensure(kDecodeGroup * W * W + W * W);
    o_.ensure(p.Dv + W);
    pp_.ensure(kDecodeGroup * (SP / 2 + W));
    kscale_.ensure(SP);
  }
  int64_t SP = 0, DP = 0;   // row lengths of S and q
  GrowBuf<float> S_;        // per row: scores, then probabilities, of the item's keys
  GrowBuf<int32_t> idx_;    // the item's key positions
  GrowBuf<float> q_;        // per row: the query as fp32, times scale * log2(e)
  GrowBuf<float> tmp_;      // W x W transpose buffers
  GrowBuf<float> o_;        // merged output row
  GrowBuf<uint32_t> pp_;    // per row (stride SP / 2): P as bf16 key pairs (the vdpbf16ps path)
  GrowBuf<float> kscale_;   // the int8 K cache: each key's block scale
  float* S() const { return S_.buf.get(); }
  int32_t* idx() const { return idx_.buf.get(); }
  float* q() const { return q_.buf.get(); }
  float* tmp() const { return tmp_.buf.get(); }
  float* o() const { return o_.buf.get(); }
  uint32_t* pp() const { return pp_.buf.get(); }
  float* kscale() const { return kscale_.buf.get(); }
};

// Per item of the int8 K cache path: the rows' factors q_scale * scale * log2(e), their score
// shifts (the smoothing shift in log2 units under a softcap, else 0) and the kv head's k_scale
// (one per k_block keys).
struct DecodeK8 {
  float row_factor[kDecodeGroup];
  float row_shift[kDecodeGroup];
  const float* k_scale;
  int64_t k_block;
};

// K8: the pre-quantized int8 K cache (AttnInt8Params with q8 / k8 given; avx512 only): K rows
// are int8, the query row holds q8 as fp32 (exact), so q8 . k8 accumulates exactly in fp32 for
// D <= 1024 (|sum| < 2^24), the same value as the int32 dot product; the scales multiply after.
// P and V are rounded to bf16 for P V (the int8 kernels' PV precision), l uses the unrounded P.
template <class V, DType DT, bool K8 = false>
struct DecodeKernel {
  using R = typename V::R;
  static constexpr int W = V::W;
  using T = typename std::conditional<DT == DType::F32, float, uint16_t>::type;
  using TK = typename std::conditional<K8, int8_t, T>::type;

  // W consecutive K values as fp32.
  static R ldk(const TK* p) {
    if constexpr (K8) {
#if defined(__AVX512F__)
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
    } else {
      return ld(p);
    }
  }
  static float ldk1(const TK* p) {
    if constexpr (K8) {
      return float(*p);
    } else {
      return ld1(p);
    }
  }
  // x rounded to the nearest bf16 value (ties to even), as fp32.
  static float round_bf16_1(float x) { return bf16_to_f32(f32_to_bf16(x)); }
  static R round_bf16(R x) {
#if defined(__AVX512F__)
    if constexpr (std::is_same<V, VecAvx512>::value) {
      const __m512i i = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_add_epi32(_mm512_add_epi32(i, _mm512_set1_epi32(0x7FFF)), lsb);
      return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
    }
#endif
    return x;
  }
  // A V vector: rounded to bf16 in K8 mode (exact already for bf16 V).
  static R ldv(const T* p) {
    if constexpr (K8 && DT != DType::BF16) {
      return round_bf16(ld(p));
    } else {
      return ld(p);
    }
  }
  static float ldv1(const T* p) {
    if constexpr (K8 && DT != DType::BF16) {
      return round_bf16_1(ld1(p));
    } else {
      return ld1(p);
    }
  }

  static R ld(const T* p) {
    if constexpr (DT == DType::F32) {
      return V::load(p);
    } else if constexpr (DT == DType::BF16) {
      return DecodeLoad<V>::bf16(p);
    } else {
      return DecodeLoad<V>::f16(p);
    }
  }
  static float ld1(const T* p) {
    if constexpr (DT == DType::F32) {
      return *p;
    } else if constexpr (DT == DType::BF16) {
      return bf16_to_f32(*p);
    } else {
      return f16_to_f32(*p);
    }
  }

#if defined(__AVX512F__)
  // Four vectors a, b, c, d -> one whose 128-bit lane L holds (sum of lane L of a, ... of d).
  static __m512 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // Four reduce4 results (keys 0-3, 4-7, 8-11, 12-15) -> the 16 full sums in key order.
  static __m512 reduce_lanes(__m512 r0, __m512 r1, __m512 r2, __m512 r3) {
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(r0, r1, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(r0, r1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(r2, r3, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(r2, r3, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
#endif

  // bf16 on avx512 with the feature dim a multiple of 32: K / V rows are widened as even / odd
  // feature pairs (see scores / pv_pairs); other cases widen 16 features at a time.
  static bool pairs(int64_t n) {
#if defined(__AVX512F__)
    if constexpr (DT == DType::BF16 && std::is_same<V, VecAvx512>::value) return n % 32 == 0;
#endif
    (void)n;
    return false;
  }

  // q (D fp32, D % 32 == 0) reordered per 32 features to [even 16, odd 16] for the pair path.
  static void permute_q(float* q, int64_t D, float* tmp) {
    for (int64_t d = 0; d < D; d += 32) {
      for (int i = 0; i < 16; ++i) {
        tmp[i] = q[d + 2 * i];
        tmp[16 + i] = q[d + 2 * i + 1];
      }
      std::memcpy(q + d, tmp, sizeof(float) * 32);
    }
  }

#if defined(__AVX512F__)
  // pv on bf16 pairs: NP blocks of 32 features, accumulated as even / odd halves, interleaved
  // back on the store.
  template <int NR, int NP>
  static void pv_pairs(const float* P, int64_t SP, int n, const T* v, int64_t vs, const int32_t* idx,
                       float* const* o, int64_t e0) {
    const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
    __m512 acc[NR][2 * NP];
    for (int r = 0; r < NR; ++r)
      for (int x = 0; x < 2 * NP; ++x) acc[r][x] = _mm512_setzero_ps();
    for (int t = 0; t < n; ++t) {
      const T* vp = v + int64_t(idx[t]) * vs;
      if (t + kDecodePrefetchKeys < n) prefetch_row(v + int64_t(idx[t + kDecodePrefetchKeys]) * vs, NP * 32);
      __m512 ve[NP], vo[NP];
      for (int x = 0; x < NP; ++x) {
        const __m512i w = _mm512_loadu_si512(vp + x * 32);
        ve[x] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
        vo[x] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
      }
      for (int r = 0; r < NR; ++r) {
        const __m512 pb = _mm512_set1_ps(P[r * SP + t]);
        for (int x = 0; x < NP; ++x) {
          acc[r][2 * x] = _mm512_fmadd_ps(pb, ve[x], acc[r][2 * x]);
          acc[r][2 * x + 1] = _mm512_fmadd_ps(pb, vo[x], acc[r][2 * x + 1]);
        }
      }
    }
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int r = 0; r < NR; ++r)
      for (int x = 0; x < NP; ++x) store_block(o[r] + e0 + x * 32, acc[r][2 * x], acc[r][2 * x + 1], lo_idx, hi_idx);
  }

  // dst[i] for i < 32 from the two accumulators a, b of a 32-feature block: features 0-15 by
  // permutation i0 of the two, 16-31 by i1. Vectors by value: passing the accumulator array by
  // reference made GCC keep a copy of it in memory, stored every step of the loop around (GQA
  // bf16 P V 2.4x slower once the helper was not inlined).
  static void store_block(float* dst, __m512 a, __m512 b, __m512i i0, __m512i i1) {
    _mm512_storeu_ps(dst, _mm512_permutex2var_ps(a, i0, b));
    _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(a, i1, b));
  }
#endif

  // bf16 on AVX-512 BF16, as in the bf16 forward core: both products on vdpbf16ps, q and K in bf16
  // pairs as given (D % 32 == 0), V key pairs interleaved on the fly and P rounded to bf16 for P V
  // (Dv % 32 == 0; the softmax sum l uses fp32 P). Half the instructions of widening to fp32. The
  // int8 K cache with bf16 V (whose P is rounded to bf16 anyway) takes the P V half.
  static constexpr bool kDot2 =
#if defined(__AVX512BF16__)
      DT == DType::BF16 && std::is_same<V, VecAvx512>::value;
#else
      false;
#endif
  static bool dot2_qk(const AttnParams& p) { return kDot2 && !K8 && p.D % 32 == 0 && p.Dv % 32 == 0; }
  static bool dot2_pv(const AttnParams& p) { return kDot2 && p.Dv % 32 == 0; }
  // The int8 K cache with D % 32 == 0 on AVX-512 VNNI: q8 . k8 by vpdpwssd on int16 pairs (k8
  // widened, 32 features per instruction), exact in int32, the same value as the fp32 sum.
  static constexpr bool kK8Dot =
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      K8 && std::is_same<V, VecAvx512>::value;
#else
      false;
#endif
  static bool k8_dot(const AttnParams& p) { return kK8Dot && p.D % 32 == 0; }

#if defined(__AVX512F__)
  // The two 32-feature dot products of the scores_dot tiling: bf16 pairs on vdpbf16ps (q and K
  // as given), and the int8 K cache's q8 . k8 on vpdpwssd (k8 widened to int16; exact int32).
#if defined(__AVX512BF16__)
  struct DotBf16 {
    using TK = uint16_t;
    using A = __m512;
    using Q = __m512bh;
    static A zero() { return _mm512_setzero_ps(); }
    static Q load_q(const float* q, int64_t d) {
      return (Q)_mm512_loadu_si512(reinterpret_cast<const uint16_t*>(q) + d);
    }
    static A dot(A acc, const TK* k, Q q) { return _mm512_dpbf16_ps(acc, q, (__m512bh)_mm512_loadu_si512(k)); }
    static __m512 to_float(A a) { return a; }
  };
#endif
  // fp32 K and q (q pre-scaled, as the widening path holds it): 32 features per step as two
  // FMAs into one accumulator, in the order of scores()'s loop (the same bits).
  struct DotF32 {
    using TK = float;
    using A = __m512;
    struct Q {
      __m512 lo, hi;
    };
    static A zero() { return _mm512_setzero_ps(); }
    static Q load_q(const float* q, int64_t d) { return {_mm512_loadu_ps(q + d), _mm512_loadu_ps(q + d + 16)}; }
    static A dot(A acc, const TK* k, Q q) {
      return _mm512_fmadd_ps(_mm512_loadu_ps(k + 16), q.hi, _mm512_fmadd_ps(_mm512_loadu_ps(k), q.lo, acc));
    }
    static __m512 to_float(A a) { return a; }
  };
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  struct DotInt8 {
    using TK = int8_t;
    using A = __m512i;
    using Q = __m512i;
    static A zero() { return _mm512_setzero_si512(); }
    static Q load_q(const float* q, int64_t d) {
      return _mm512_loadu_si512(reinterpret_cast<const int16_t*>(q) + d);
    }
    static A dot(A acc, const TK* k, Q q) {
      const __m512i kv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)));
      return _mm512_dpwssd_epi32(acc, kv, q);
    }
    static __m512 to_float(A a) { return _mm512_cvtepi32_ps(a); }
  };
#endif

  // S[r * SP + t] = c * (q_r . K[row t]) for t < n (D % 32 == 0; rows: key_row), with q_r in
  // Dot's layout at q + r * DP: one accumulator per (row, key) over 32 features at a time, reduced
  // by the shuffle tree 16 keys at once.
  template <class Dot, int NR>
  static void scores_dot(const float* q, int64_t DP, int64_t D, const typename Dot::TK* k, int64_t ks,
                         const int32_t* idx, int64_t run0, int n, float* S, int64_t SP, float* tmp,
                         float c) {
    int nf = 0;  // the int8 K cache keeps the table (see scores_dot_run)
    if constexpr (!std::is_same<typename Dot::TK, int8_t>::value)
      nf = scores_run_prefix<Dot, NR>(q, DP, D, k, ks, run0, n, S, SP, tmp, c);
    if (nf == n) return;
    if (run0 >= 0)
      scores_dot_rows<Dot, NR, true>(q, DP, D, k, ks, idx + nf, run0 + nf, n - nf, S + nf, SP, tmp, c);
    else
      scores_dot_rows<Dot, NR, false>(q, DP, D, k, ks, idx, run0, n, S, SP, tmp, c);
  }
  // scores_dot_run over the whole 16-key blocks of an item of band keys (run0 >= 0) whose K rows
  // lie back to back (a contiguous (..., Nk, D) cache, D 64 / 128 / 256); returns how many keys it
  // scored (0: not such an item), the rest is the caller's.
  template <class Dot, int NR>
  static int scores_run_prefix(const float* q, int64_t DP, int64_t D, const typename Dot::TK* k, int64_t ks,
                               int64_t run0, int n, float* S, int64_t SP, float* tmp, float c) {
    if (run0 < 0 || ks != D || (D != 64 && D != 128 && D != 256)) return 0;
    const int nf = n / 16 * 16;
    if (nf == 0) return 0;
    const typename Dot::TK* kr = k + run0 * ks;
    if (D == 64)
      scores_dot_run<Dot, NR, 64>(q, DP, kr, nf, n, S, SP, tmp, c);
    else if (D == 128)
      scores_dot_run<Dot, NR, 128>(q, DP, kr, nf, n, S, SP, tmp, c);
    else
      scores_dot_run<Dot, NR, 256>(q, DP, kr, nf, n, S, SP, tmp, c);
    return nf;
  }
  // scores_dot over the first nf keys (nf % 16 == 0) of an item whose keys are one run of rows of
  // KD = D elements, back to back from k: every K address is k plus a constant, no pointer table
  // (n: the item's keys, where the prefetch stops). Its shape is what measured best on Zen 4 (bf16,
  // time against the table path, K/V in cache / from DRAM): four keys per register tile (0.86 /
  // ~1.0; sixteen, a burst of 32 loads, 0.88 / 1.10); the row stride a constant (a runtime stride:
  // 0.89 / 0.93 with one query row, but 1.25 / 1.20 with four, GQA). fp32 (DotF32): 0.89 / 0.94-1.0.
  // The int8 K cache keeps the table: this form was 0.80 in cache but 1.04 from DRAM there.
  template <class Dot, int NR, int KD>
  static void scores_dot_run(const float* q, int64_t DP, const typename Dot::TK* k, int nf, int n,
                             float* S, int64_t SP, float* tmp, float c) {
    const __m512 cv = _mm512_set1_ps(c);
    for (int t = 0; t < nf; t += 16) {
      const typename Dot::TK* kt = k + int64_t(t) * KD;
      const int ta = t + kDecodePrefetchKeys;
      if (ta < n) prefetch_row<true>(kt + kDecodePrefetchKeys * KD, int64_t(std::min(16, n - ta)) * KD);
      scores_block<Dot, NR, 4>(q, DP, KD, [kt](int u) { return kt + u * KD; }, S + t, SP, tmp, cv);
    }
  }
  template <class Dot, int NR, bool kRun>
  static void scores_dot_rows(const float* q, int64_t DP, int64_t D, const typename Dot::TK* k,
                              int64_t ks, const int32_t* idx, int64_t run0, int n, float* S, int64_t SP,
                              float* tmp, float c) {
    const __m512 cv = _mm512_set1_ps(c);
    for (int t = 0; t < n; t += 16) {
      const int nk = std::min(16, n - t);
      const typename Dot::TK* kp[16];
      for (int u = 0; u < 16; ++u) kp[u] = k + int64_t(idx[t + std::min(u, nk - 1)]) * ks;
      prefetch_keys<kRun>(k, idx, run0, t + kDecodePrefetchKeys, 16, n, ks, D);
      scores_block<Dot, NR, NR == 1 ? 16 : NR == 2 ? 8 : 4>(q, DP, D, [&kp](int u) { return kp[u]; }, S + t,
                                                             SP, tmp, cv);
    }
  }
  // S[r * SP + u] = c * (q_r . row(u)) for the 16 keys u of one block of scores_dot (D % 32 == 0),
  // U keys per register tile. Inlined by force, so that a constant D and the rows' addresses
  // (scores_dot_run: k plus constants) reach the loops.
  template <class Dot, int NR, int U, class Row>
  __attribute__((always_inline)) static inline void scores_block(const float* q, int64_t DP, int64_t D,
                                                                 Row row, float* S, int64_t SP, float* tmp,
                                                                 __m512 cv) {
    for (int u0 = 0; u0 < 16; u0 += U) {
      typename Dot::A acc[NR][U];
      for (int r = 0; r < NR; ++r)
        for (int u = 0; u < U; ++u) acc[r][u] = Dot::zero();
      for (int64_t d = 0; d < D; d += 32) {
        typename Dot::Q qv[NR];
        for (int r = 0; r < NR; ++r) qv[r] = Dot::load_q(q + r * DP, d);
        for (int u = 0; u < U; ++u)
          for (int r = 0; r < NR; ++r) acc[r][u] = Dot::dot(acc[r][u], row(u0 + u) + d, qv[r]);
      }
      for (int r = 0; r < NR; ++r)
        for (int u = 0; u < U; u += 4)
          _mm512_storeu_ps(tmp + (r * 4 + (u0 + u) / 4) * 16,
                           reduce4(Dot::to_float(acc[r][u]), Dot::to_float(acc[r][u + 1]),
                                   Dot::to_float(acc[r][u + 2]), Dot::to_float(acc[r][u + 3])));
    }
    for (int r = 0; r < NR; ++r) {
      const float* qd = tmp + r * 4 * 16;
      const __m512 sv = reduce_lanes(_mm512_loadu_ps(qd), _mm512_loadu_ps(qd + 16),
                                     _mm512_loadu_ps(qd + 32), _mm512_loadu_ps(qd + 48));
      _mm512_storeu_ps(S + r * SP, _mm512_mul_ps(sv, cv));
    }
  }
#endif

#if defined(__AVX512BF16__)
  // Rows' probabilities P[r * SP + t] (t < n) as bf16 key pairs: Pp[r * PPS + t / 2], low half
  // the even key; keys from n up to the next multiple of 32 count as p = 0.
  template <int NR>
  static void pack_p_pairs(float* P, int64_t SP, int n, uint32_t* Pp, int64_t PPS) {
    const int n32 = (n + 31) / 32 * 32;
    for (int r = 0; r < NR; ++r) {
      float* Pr = P + r * SP;
      for (int t = n; t < n32; ++t) Pr[t] = 0.f;
      for (int t = 0; t < n32; t += 32)
        _mm512_storeu_si512(Pp + r * PPS + t / 2,
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(Pr + t + 16), _mm512_loadu_ps(Pr + t)));
    }
  }

  // o[r][e0 + e] = sum_t P_r[t] V[idx[t]][e0 + e] for NP blocks of 32 features: two keys' V rows
  // interleaved into bf16 pairs (unpacklo / unpackhi per 128-bit lane), reordered on the store.
  template <int NR, int NP>
  static void pv_dot2(const uint32_t* Pp, int64_t PPS, int n, const uint16_t* v, int64_t vs,
                      const int32_t* idx, int64_t run0, float* const* o, int64_t e0) {
    if (run0 >= 0)
      pv_dot2_rows<NR, NP, true>(Pp, PPS, n, v, vs, idx, run0, o, e0);
    else
      pv_dot2_rows<NR, NP, false>(Pp, PPS, n, v, vs, idx, run0, o, e0);
  }
  // One step of pv_dot2_rows: keys t (row va) and t + 1 (row vb; kPair false: none, a zero
  // partner). Inlined by force: the accumulators must stay the caller's registers.
  template <int NR, int NP, bool kPair>
  __attribute__((always_inline)) static inline void pv_dot2_step(__m512 (&acc)[NR][2 * NP],
                                                                 const uint32_t* Pp, int64_t PPS, int t,
                                                                 const uint16_t* va, const uint16_t* vb) {
    __m512bh lo[NP], hi[NP];
    for (int x = 0; x < NP; ++x) {
      const __m512i a = _mm512_loadu_si512(va + x * 32);
      const __m512i b = kPair ? _mm512_loadu_si512(vb + x * 32) : _mm512_setzero_si512();
      lo[x] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      hi[x] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int r = 0; r < NR; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(Pp[r * PPS + t / 2]));
      for (int x = 0; x < NP; ++x) {
        acc[r][2 * x] = _mm512_dpbf16_ps(acc[r][2 * x], lo[x], pb);
        acc[r][2 * x + 1] = _mm512_dpbf16_ps(acc[r][2 * x + 1], hi[x], pb);
      }
    }
  }
  template <int NR, int NP, bool kRun>
  static void pv_dot2_rows(const uint32_t* Pp, int64_t PPS, int n, const uint16_t* v, int64_t vs,
                           const int32_t* idx, int64_t run0, float* const* o, int64_t e0) {
    __m512 acc[NR][2 * NP];
    for (int r = 0; r < NR; ++r)
      for (int x = 0; x < 2 * NP; ++x) acc[r][x] = _mm512_setzero_ps();
    const int n2 = n & ~1;
    for (int t0 = 0; t0 < n2; t0 += 16) {
      prefetch_keys<kRun>(v, idx, run0, t0 + kDecodePrefetchKeys, 16, n, vs, NP * 32);
      const int t1 = std::min(t0 + 16, n2);
      for (int t = t0; t < t1; t += 2)
        pv_dot2_step<NR, NP, true>(acc, Pp, PPS, t, v + key_row<kRun>(idx, run0, t) * vs,
                                   v + key_row<kRun>(idx, run0, t + 1) * vs);
    }
    if (n2 < n) pv_dot2_step<NR, NP, false>(acc, Pp, PPS, n2, v + key_row<kRun>(idx, run0, n2) * vs, nullptr);
    // 32-bit lane 4L + i of lo holds feature 8L + i, of hi feature 8L + 4 + i (L: 128-bit lane).
    alignas(64) static const int32_t first[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
    alignas(64) static const int32_t second[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
    const __m512i i0 = _mm512_load_si512(first), i1 = _mm512_load_si512(second);
    for (int r = 0; r < NR; ++r)
      for (int x = 0; x < NP; ++x) store_block(o[r] + e0 + x * 32, acc[r][2 * x], acc[r][2 * x + 1], i0, i1);
  }
#endif

  // S[r * SP + t] = q_r . K[idx[t]] for t < n, rows r < NR (q_r at q + r * DP).
  template <int NR>
  static void scores(const float* q, int64_t DP, int64_t D, const TK* k, int64_t ks, const int32_t* idx,
                     int n, float* S, int64_t SP, float* tmp) {
    // Keys per register tile: NR * U accumulators, at most 16 (enough independent FMA chains).
    constexpr int U = NR == 1 ? W : NR == 2 ? (W < 8 ? W : 8) : (W < 4 ? W : 4);
    const int64_t DV = D / W * W;
    float* tt = tmp + NR * W * W;
    for (int t = 0; t < n; t += W) {
      const int nk = std::min(W, n - t);
      const TK* kp[W];
      for (int u = 0; u < W; ++u) kp[u] = k + int64_t(idx[t + std::min(u, nk - 1)]) * ks;
      for (int u = 0; u < W; ++u) {
        const int ta = t + kDecodePrefetchKeys + u;
        if (ta < n) prefetch_row(k + int64_t(idx[ta]) * ks, D);
      }
      for (int u0 = 0; u0 < W; u0 += U) {
        R acc[NR][U];
        for (int r = 0; r < NR; ++r)
          for (int u = 0; u < U; ++u) acc[r][u] = V::zero();
#if defined(__AVX512F__)
        if (!K8 && pairs(D)) {
          // bf16 pairs: one 64-byte load gives 16 even and 16 odd features of a key (2 ops to
          // widen); q was stored as [even 16, odd 16] per 32 features (permute_q).
          const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
          for (int64_t d = 0; d < D; d += 2 * W) {
            R qe[NR], qo[NR];
            for (int r = 0; r < NR; ++r) {
              qe[r] = V::load(q + r * DP + d);
              qo[r] = V::load(q + r * DP + d + W);
            }
            for (int u = 0; u < U; ++u) {
              const __m512i x = _mm512_loadu_si512(kp[u0 + u] + d);
              const __m512 ke = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
              const __m512 ko = _mm512_castsi512_ps(_mm512_and_si512(x, hi));
              for (int r = 0; r < NR; ++r) acc[r][u] = V::fma(ko, qo[r], V::fma(ke, qe[r], acc[r][u]));
            }
          }
        } else
#endif
        for (int64_t d = 0; d < DV; d += W) {
          R qv[NR];
          for (int r = 0; r < NR; ++r) qv[r] = V::load(q + r * DP + d);
          for (int u = 0; u < U; ++u) {
            const R kv = ldk(kp[u0 + u] + d);
            for (int r = 0; r < NR; ++r) acc[r][u] = V::fma(kv, qv[r], acc[r][u]);
          }
        }
#if defined(__AVX512F__)
        if constexpr (std::is_same<V, VecAvx512>::value) {
          // Horizontal sums by a shuffle tree: each group of 4 keys becomes one vector of
          // per-128-bit-lane partial sums (reduced across the lanes below).
          for (int r = 0; r < NR; ++r)
            for (int u = 0; u < U; u += 4)
              V::store(tmp + (r * 4 + (u0 + u) / 4) * W,
                       reduce4(acc[r][u], acc[r][u + 1], acc[r][u + 2], acc[r][u + 3]));
        } else
#endif
        {
          for (int r = 0; r < NR; ++r)
            for (int u = 0; u < U; ++u) V::store(tmp + (r * W + u0 + u) * W, acc[r][u]);
        }
      }
      for (int r = 0; r < NR; ++r) {
        R s;
#if defined(__AVX512F__)
        if constexpr (std::is_same<V, VecAvx512>::value) {
          const float* qd = tmp + r * 4 * W;
          s = reduce_lanes(V::load(qd), V::load(qd + W), V::load(qd + 2 * W), V::load(qd + 3 * W));
        } else
#endif
        {
          V::transpose(tmp + r * W * W, W, tt, W);
          s = V::load(tt);
          for (int lane = 1; lane < W; ++lane) s = V::add(s, V::load(tt + lane * W));
        }
        float* Sr = S + r * SP + t;
        V::store(Sr, s);
        if (DV < D) {
          for (int u = 0; u < nk; ++u) {
            float x = 0.f;
            for (int64_t d = DV; d < D; ++d) x += q[r * DP + d] * ldk1(kp[u] + d);
            Sr[u] += x;
          }
        }
      }
    }
  }

  template <int NR, int NE>
  static void pv_block(const float* P, int64_t SP, int n, const T* v, int64_t vs, const int32_t* idx,
                       float* const* o, int64_t e0) {
    R acc[NR][NE];
    for (int r = 0; r < NR; ++r)
      for (int x = 0; x < NE; ++x) acc[r][x] = V::zero();
    for (int t = 0; t < n; ++t) {
      const T* vp = v + int64_t(idx[t]) * vs;
      if (t + kDecodePrefetchKeys < n) prefetch_row(v + int64_t(idx[t + kDecodePrefetchKeys]) * vs, NE * W);
      R vv[NE];
      for (int x = 0; x < NE; ++x) vv[x] = ldv(vp + x * W);
      for (int r = 0; r < NR; ++r) {
        const R pb = V::set1(P[r * SP + t]);
        for (int x = 0; x < NE; ++x) acc[r][x] = V::fma(pb, vv[x], acc[r][x]);
      }
    }
    for (int r = 0; r < NR; ++r)
      for (int x = 0; x < NE; ++x) V::store(o[r] + e0 + x * W, acc[r][x]);
  }

  // o[r][e] = sum_t P_r[t] V[idx[t]][e].
  template <int NR>
  static void pv(const float* P, int64_t SP, int n, const T* v, int64_t vs, const int32_t* idx, int64_t Dv,
                 float* const* o) {
    int64_t e = 0;
#if defined(__AVX512F__)
    if (pairs(Dv)) {
      for (; e + 64 <= Dv; e += 64) pv_pairs<NR, 2>(P, SP, n, v + e, vs, idx, o, e);
      for (; e + 32 <= Dv; e += 32) pv_pairs<NR, 1>(P, SP, n, v + e, vs, idx, o, e);
      return;
    }
#endif
    if (NR == 1)
      for (; e + 8 * W <= Dv; e += 8 * W) pv_block<NR, 8>(P, SP, n, v + e, vs, idx, o, e);
    for (; e + 4 * W <= Dv; e += 4 * W) pv_block<NR, 4>(P, SP, n, v + e, vs, idx, o, e);
    for (; e + 2 * W <= Dv; e += 2 * W) pv_block<NR, 2>(P, SP, n, v + e, vs, idx, o, e);
    for (; e + W <= Dv; e += W) pv_block<NR, 1>(P, SP, n, v + e, vs, idx, o, e);
    for (; e < Dv; ++e)
      for (int r = 0; r < NR; ++r) {
        float x = 0.f;
        for (int t = 0; t < n; ++t) x += P[r * SP + t] * ldv1(v + int64_t(idx[t]) * vs + e);
        o[r][e] = x;
      }
  }

  // Softmax of one row's scores in place (S[0, n) -> p); returns {m, l} (m in log2 units).
  static void softmax(float* S, const uint8_t* pad, const int32_t* idx, int n, float* m_out, float* l_out) {
    if (pad)
      for (int t = 0; t < n; ++t)
        if (!pad[idx[t]]) S[t] = kNegInf;
    const int nv = n / W * W;
    R mv = V::set1(kNegInf);
    for (int t = 0; t < nv; t += W) mv = V::max(mv, V::load(S + t));
    alignas(64) float lanes[W];
    V::store(lanes, mv);
    // A NaN score may be skipped by max; its p (hence l and o) is NaN whatever m is.
    float m = kNegInf;
    for (int i = 0; i < W; ++i) m = std::max(m, lanes[i]);
    for (int t = nv; t < n; ++t) m = std::max(m, S[t]);
    const float m_use = m == kNegInf ? 0.f : m;
    const R mu = V::set1(m_use);
    R lv = V::zero();
    for (int t = 0; t < nv; t += W) {
      const R pt = V::exp2(V::sub(V::load(S + t), mu));
      V::store(S + t, pt);
      lv = V::add(lv, pt);
    }
    V::store(lanes, lv);
    float l = 0.f;
    for (int i = 0; i < W; ++i) l += lanes[i];
    for (int t = nv; t < n; ++t) {
      S[t] = std::exp2(S[t] - m_use);
      l += S[t];
    }
    *m_out = m;
    *l_out = l;
  }

  // Score modifiers on one row's scores S[0, n) (keys idx), before the padding mask.
  static void modify(const DecodeRowMods& rm, const int32_t* idx, int n, float* S) {
    if (rm.cap > 0.f) softcap_inplace<V>(S, n, rm.cap);
    if (rm.bias)
      for (int t = 0; t < n; ++t) S[t] += rm.bias[idx[t]] * kLog2e;
  }

  // Partial softmax of NR rows over keys idx[0, n): part[r] = {m, l, o[Dv]}; mods: per row, or
  // nullptr without score modifiers. run0 >= 0: the keys are run0, run0 + 1, ... (see key_row).
  template <int NR>
  static void item(const AttnParams& p, const TK* k, const T* v, const uint8_t* pad, const int32_t* idx,
                   int64_t run0, int n, DecodeScratch& s, float* const* part, const DecodeRowMods* mods,
                   const DecodeK8* k8 = nullptr) {
    float* S = s.S();
    if (n == 0) {
      for (int r = 0; r < NR; ++r) {
        float* pr = part[r];
        pr[0] = kNegInf;
        pr[1] = 0.f;
        std::memset(pr + 2, 0, sizeof(float) * p.Dv);
      }
      return;
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if constexpr (kK8Dot) {
      if (k8_dot(p))
        scores_dot<DotInt8, NR>(s.q(), s.DP, p.D, k, p.k_stride[2], idx, run0, n, S, s.SP, s.tmp(), 1.f);
      else
        scores<NR>(s.q(), s.DP, p.D, k, p.k_stride[2], idx, n, S, s.SP, s.tmp());
    } else
#endif
#if defined(__AVX512BF16__)
    if constexpr (kDot2 && !K8) {
      if (dot2_qk(p))
        scores_dot<DotBf16, NR>(s.q(), s.DP, p.D, k, p.k_stride[2], idx, run0, n, S, s.SP, s.tmp(),
                                p.scale * kLog2e);
      else
        scores<NR>(s.q(), s.DP, p.D, k, p.k_stride[2], idx, n, S, s.SP, s.tmp());
    } else
#endif
#if defined(__AVX512F__)
    if constexpr (DT == DType::F32 && !K8 && std::is_same<V, VecAvx512>::value) {
      // fp32: a band run of dense rows by scores_dot_run (q holds the scale: c = 1), the rest
      // (keys past the whole blocks, or every key) by the widening loop.
      const int nf = scores_run_prefix<DotF32, NR>(s.q(), s.DP, p.D, k, p.k_stride[2], run0, n, S, s.SP,
                                                   s.tmp(), 1.f);
      if (nf < n) scores<NR>(s.q(), s.DP, p.D, k, p.k_stride[2], idx + nf, n - nf, S + nf, s.SP, s.tmp());
    } else
#endif
    scores<NR>(s.q(), s.DP, p.D, k, p.k_stride[2], idx, n, S, s.SP, s.tmp());
    if constexpr (K8) {
      // S = (q8 . k8) * q_scale * k_scale * scale (log2 units) + the row's shift: per-key factor
      // k_scale[j / k_block], looked up once for all rows.
      float* ksc = s.kscale();
      const int64_t kb = k8->k_block;
      if ((kb & (kb - 1)) == 0) {
        const int sh = __builtin_ctzll(uint64_t(kb));
        for (int t = 0; t < n; ++t) ksc[t] = k8->k_scale[idx[t] >> sh];
      } else {
        for (int t = 0; t < n; ++t) ksc[t] = k8->k_scale[idx[t] / kb];
      }
      for (int r = 0; r < NR; ++r) {
        float* Sr = S + r * s.SP;
        const float rf = k8->row_factor[r], sh = k8->row_shift[r];
        if (sh != 0.f) {
          for (int t = 0; t < n; ++t) Sr[t] = Sr[t] * (rf * ksc[t]) + sh;
        } else {
          for (int t = 0; t < n; ++t) Sr[t] = Sr[t] * (rf * ksc[t]);
        }
      }
    }
    float* o[NR];
    for (int r = 0; r < NR; ++r) {
      if (mods) modify(mods[r], idx, n, S + r * s.SP);
      softmax(S + r * s.SP, pad, idx, n, part[r], part[r] + 1);
      o[r] = part[r] + 2;
    }
#if defined(__AVX512BF16__)
    if constexpr (kDot2) {
      if (dot2_pv(p)) {
        const int64_t PPS = s.SP / 2;
        pack_p_pairs<NR>(S, s.SP, n, s.pp(), PPS);  // P rounded to bf16 (l above is from fp32 P)
        int64_t e = 0;
        for (; e + 64 <= p.Dv; e += 64) pv_dot2<NR, 2>(s.pp(), PPS, n, v + e, p.v_stride[2], idx, run0, o, e);
        for (; e < p.Dv; e += 32) pv_dot2<NR, 1>(s.pp(), PPS, n, v + e, p.v_stride[2], idx, run0, o, e);
        return;
      }
    }
#endif
    if constexpr (K8) {
      for (int r = 0; r < NR; ++r) {
        float* Sr = S + r * s.SP;
        int t = 0;
        for (; t + W <= n; t += W) V::store(Sr + t, round_bf16(V::load(Sr + t)));
        for (; t < n; ++t) Sr[t] = round_bf16_1(Sr[t]);
      }
    }
    pv<NR>(S, s.SP, n, v, p.v_stride[2], idx, p.Dv, o);
  }
};

template <class V>
class DecodeForward {
  static constexpr int W = V::W;

 public:
  static void run(const AttnParams& p) {
    switch (p.dtype) {
      case DType::F32: run_typed<DType::F32, false>(p, nullptr); break;
      case DType::BF16: run_typed<DType::BF16, false>(p, nullptr); break;
      default: run_typed<DType::F16, false>(p, nullptr); break;
    }
  }

  // The pre-quantized int8 K cache (q8 / k8 / q_scale / k_scale given; see DecodeKernel's K8).
  // p8.fwd has its window normalized; K is read from k8 (contiguous (B, Hk, Nk, D)).
  static void run_int8(const AttnInt8Params& p8) {
    AttnParams p = p8.fwd;
    p.k = p8.k8;
    p.k_stride[0] = p.Hk * p.Nk * p.D;
    p.k_stride[1] = p.Nk * p.D;
    p.k_stride[2] = p.D;
    switch (p.dtype) {
      case DType::F32: run_typed<DType::F32, true>(p, &p8); break;
      case DType::BF16: run_typed<DType::BF16, true>(p, &p8); break;
      default: run_typed<DType::F16, true>(p, &p8); break;
    }
  }

 private:
  // Minimum keys per chunk, and the item count below which rows are split into chunks.
  static constexpr int64_t kMinChunk = 256;
  static constexpr int64_t kTargetItems = 64;

  static DecodeRowKeys row_keys(const AttnParams& p, int64_t b, int64_t i) {
    DecodeRowKeys rk;
    const int64_t r = i + p.Nk - p.Nq;
    const int64_t G = p.num_landmarks;
    const int32_t* lm = G > 0 ? p.landmarks + b * p.landmarks_batch_stride : nullptr;
    const uint8_t* flags = G > 0 ? p.landmark_flags + b * p.landmark_flags_batch_stride : nullptr;
    if (flags && r >= 0 && r < p.Nk && flags[r]) {
      const KeyRange all = landmark_row_range(r, p.Nk, p.causal);
      rk.lo = all.lo;
      rk.hi = std::max(all.lo, all.hi);
      return rk;
    }
    const KeyRange band = window_band(r, r + 1, p.Nk, p.window_left, p.window_right, p.causal);
    if (band.lo < band.hi) {
      rk.lo = band.lo;
      rk.hi = band.hi;
    }
    if (G > 0) {
      rk.ga = std::lower_bound(lm, lm + G, int32_t(std::min<int64_t>(rk.lo, p.Nk))) - lm;
      rk.gb = std::lower_bound(lm, lm + G, int32_t(std::min<int64_t>(rk.hi, p.Nk))) - lm;
      rk.gc = G;
      if (p.causal) {
        const int64_t last = r < 0 ? 0 : std::upper_bound(lm, lm + G, int32_t(std::min<int64_t>(r, p.Nk))) - lm;
        rk.gc = std::max(rk.gb, last);
      }
    }
    return rk;
  }

  // Key positions t in [t0, t1) of a row's key list.
  static void fill_keys(const DecodeRowKeys& rk, const int32_t* lm, int64_t t0, int64_t t1, int32_t* idx) {
    const int64_t nb = rk.hi - rk.lo;
    for (int64_t t = t0; t < t1; ++t) {
      int64_t j;
      if (t < nb) {
        j = rk.lo + t;
      } else if (t < nb + rk.ga) {
        j = lm[t - nb];
      } else {
        j = lm[rk.gb + (t - nb - rk.ga)];
      }
      *idx++ = int32_t(j);
    }
  }

  // Rows processed together: same batch and kv head, the same key list.
  struct Group {
    int64_t b, kvh, rk;  // rk: index of the rows' key list
    int nr;
    int64_t rows[kDecodeGroup];  // output rows (b * Hq + h) * Nq + i
  };

  // Below this much work (group-keys times D + Dv) a call runs on the calling thread without
  // entering an OpenMP region: the fork/join costs more than it saves (Nk = 16: ~16K).
  static constexpr int64_t kParallelWork = int64_t(1) << 18;

  template <DType DT, bool K8>
  static void run_typed(const AttnParams& p, const AttnInt8Params* p8) {
    using K = DecodeKernel<V, DT, K8>;
    using T = typename K::T;
    using TK = typename K::TK;
    const int64_t nrows = p.B * p.Hq * p.Nq, hg = p.Hq / p.Hk;
    // Per-call tables, kept by the calling thread across calls (no allocation once warm).
    static thread_local GrowBuf<DecodeRowKeys> rks_buf;
    static thread_local GrowBuf<Group> groups_buf;
    static thread_local GrowBuf<float> parts_buf;
    DecodeRowKeys* rks = rks_buf.ensure(p.B * p.Nq);
    int64_t max_keys = 0;
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t i = 0; i < p.Nq; ++i) {
        rks[b * p.Nq + i] = row_keys(p, b, i);
        max_keys = std::max(max_keys, rks[b * p.Nq + i].count());
      }
    Group* groups = groups_buf.ensure(nrows);
    int64_t ng = 0;
    for (int64_t b = 0; b < p.B; ++b)
      for (int64_t kvh = 0; kvh < p.Hk; ++kvh)
        for (int64_t i = 0; i < p.Nq; ++i)
          for (int64_t h = kvh * hg; h < (kvh + 1) * hg; ++h) {
            const int64_t rk = b * p.Nq + i, row = (b * p.Hq + h) * p.Nq + i;
            Group* g = ng > 0 ? &groups[ng - 1] : nullptr;
            if (!g || g->b != b || g->kvh != kvh || g->nr == kDecodeGroup || !same_keys(rks[g->rk], rks[rk])) {
              g = &groups[ng++];
              g->b = b;
              g->kvh = kvh;
              g->rk = rk;
              g->nr = 0;
            }
            g->rows[g->nr++] = row;
          }
    // The split (C chunks per row) depends on the shapes only, never on the thread count, and the
    // partials are merged in chunk order: any thread count gives the same bits.
    const int64_t C = std::max<int64_t>(1, std::min(ceil_div(kTargetItems, ng), max_keys / kMinChunk));
    const int64_t max_chunk = ceil_div(max_keys, C);
    const int64_t PS = p.Dv + 2;  // partial: m, l, o[Dv]
    float* parts = parts_buf.ensure(nrows * C * PS);

    const float c = p.scale * kLog2e;
    const float cap = p.softcap > 0.f ? p.softcap * kLog2e : 0.f;
    const int64_t items = ng * C;
    auto do_item = [&](int64_t it, DecodeScratch& s) {
      const Group& g = groups[it / C];
      const int64_t ci = it % C, b = g.b;
      const DecodeRowKeys& rk = rks[g.rk];
      const int64_t n = rk.count(), len = ceil_div(n, C);
      const int64_t t0 = std::min(n, ci * len), t1 = std::min(n, t0 + len);
      const int32_t* lm = p.num_landmarks > 0 ? p.landmarks + b * p.landmarks_batch_stride : nullptr;
      fill_keys(rk, lm, t0, t1, s.idx());
      const int64_t run0 = t1 <= rk.hi - rk.lo ? rk.lo + t0 : -1;  // band keys only: one run
      DecodeRowMods rm[kDecodeGroup];
      DecodeK8 k8info;
      for (int r = 0; r < g.nr; ++r) {
        const int64_t row = g.rows[r], i = row % p.Nq, h = (row / p.Nq) % p.Hq;
        float* q = s.q() + r * s.DP;
        if constexpr (K8) {
          const int8_t* qr = p8->q8 + ((b * p.Hq + h) * p.Nq + i) * p.D;
          if (K::k8_dot(p)) {
            int16_t* q16 = reinterpret_cast<int16_t*>(q);
            for (int64_t d = 0; d < p.D; ++d) q16[d] = qr[d];
          } else {
            for (int64_t d = 0; d < p.D; ++d) q[d] = float(qr[d]);
          }
          const int64_t nqb = ceil_div(p.Nq, p8->q_block);
          k8info.row_factor[r] = p8->q_scale[(b * p.Hq + h) * nqb + i / p8->q_block] * c;
          k8info.row_shift[r] = p8->score_shift ? p8->score_shift[(b * p.Hq + h) * p.Nq + i] * kLog2e : 0.f;
        } else if (K::dot2_qk(p)) {  // bf16 as given; the scale multiplies the scores
          const T* qr = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
          std::memcpy(q, qr, sizeof(T) * p.D);
        } else {
          const T* qr = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
          for (int64_t d = 0; d < p.D; ++d) q[d] = K::ld1(qr + d) * c;
          if (K::pairs(p.D)) K::permute_q(q, p.D, s.tmp());
        }
        rm[r].cap = cap;
        // bias[h, (j - r) + Nk - 1] with r = i + Nk - Nq: indexed by the key j.
        if (p.bias) rm[r].bias = p.bias + h * (p.Nq + p.Nk - 1) + (p.Nq - 1 - i);
      }
      const DecodeRowMods* mods = cap > 0.f || p.bias ? rm : nullptr;
      const TK* kb = t1 > t0 ? static_cast<const TK*>(p.k) + b * p.k_stride[0] + g.kvh * p.k_stride[1] : nullptr;
      if constexpr (K8) {
        k8info.k_block = p8->k_block;
        k8info.k_scale = p8->k_scale + (b * p.Hk + g.kvh) * ceil_div(p.Nk, p8->k_block);
      }
      const T* vb = t1 > t0 ? static_cast<const T*>(p.v) + b * p.v_stride[0] + g.kvh * p.v_stride[1] : nullptr;
      const uint8_t* pad = p.key_padding ? p.key_padding + b * p.Nk : nullptr;
      const int nk = int(t1 - t0);
      float* part[kDecodeGroup];
      for (int r = 0; r < g.nr; ++r) part[r] = parts + (g.rows[r] * C + ci) * PS;
      switch (g.nr) {
        case 1: K::template item<1>(p, kb, vb, pad, s.idx(), run0, nk, s, part, mods, &k8info); break;
        case 2: K::template item<2>(p, kb, vb, pad, s.idx(), run0, nk, s, part, mods, &k8info); break;
        case 3: K::template item<3>(p, kb, vb, pad, s.idx(), run0, nk, s, part, mods, &k8info); break;
        default: K::template item<4>(p, kb, vb, pad, s.idx(), run0, nk, s, part, mods, &k8info); break;
      }
    };

    const int nthreads = p.num_threads > 0 ? p.num_threads : omp_get_max_threads();
    const bool parallel = nthreads > 1 && items > 1 && ng * max_keys * (p.D + p.Dv) >= kParallelWork;
    if (!parallel) {
      const FlushDenormals ftz;
      static thread_local DecodeScratch s;
      s.prepare(max_chunk, W, p);
      for (int64_t it = 0; it < items; ++it) do_item(it, s);
      for (int64_t row = 0; row < nrows; ++row) finish_row(p, parts + row * C * PS, C, PS, row, s.o());
      return;
    }
#pragma omp parallel num_threads(int(std::min<int64_t>(nthreads, items)))
    {
      const FlushDenormals ftz;
      static thread_local DecodeScratch s;
      s.prepare(max_chunk, W, p);
#pragma omp for schedule(static)
      for (int64_t it = 0; it < items; ++it) do_item(it, s);
#pragma omp for schedule(static)
      for (int64_t row = 0; row < nrows; ++row) finish_row(p, parts + row * C * PS, C, PS, row, s.o());
    }
  }

  static bool same_keys(const DecodeRowKeys& a, const DecodeRowKeys& b) {
    return a.lo == b.lo && a.hi == b.hi && a.ga == b.ga && a.gb == b.gb && a.gc == b.gc;
  }

  // Merges the C partials of a row in order and writes its output and lse.
  static void finish_row(const AttnParams& p, const float* parts, int64_t C, int64_t PS, int64_t row, float* o) {
    const int64_t i = row % p.Nq, h = (row / p.Nq) % p.Hq, b = row / (p.Nq * p.Hq);
    const int64_t Dv = p.Dv;
    float M = kNegInf;
    for (int64_t c = 0; c < C; ++c) {
      const float mc = parts[c * PS];
      M = (std::isnan(M) || std::isnan(mc)) ? std::nanf("") : std::max(M, mc);
    }
    const float m_use = M == kNegInf ? 0.f : M;
    float L = 0.f;
    if (C == 1) {
      L = parts[1];
      std::memcpy(o, parts + 2, sizeof(float) * Dv);
    } else {
      std::memset(o, 0, sizeof(float) * Dv);
      for (int64_t c = 0; c < C; ++c) {
        const float* pc = parts + c * PS;
        const float a = std::exp2(pc[0] - m_use);
        L += a * pc[1];
        for (int64_t e = 0; e < Dv; ++e) o[e] += a * pc[2 + e];
      }
    }
    const bool empty = L == 0.f;  // NaN (from NaN/inf inputs) propagates, as in SDPA
    const float inv = empty ? 0.f : 1.f / L;
    p.lse[(b * p.Hq + h) * p.Nq + i] = empty ? kNegInf : (M + std::log2(L)) * kLn2;
    for (int64_t e = 0; e < Dv; ++e) o[e] *= inv;
    const int64_t off = b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
    if (p.dtype == DType::F32) {
      std::memcpy(static_cast<float*>(p.o) + off, o, sizeof(float) * Dv);
    } else if (p.dtype == DType::BF16) {
      V::f32_to_bf16_row(static_cast<uint16_t*>(p.o) + off, o, Dv);
    } else {
      V::f32_to_f16_row(static_cast<uint16_t*>(p.o) + off, o, Dv);
    }
  }
};

}  // namespace
}  // namespace cpu
}  // namespace hk
