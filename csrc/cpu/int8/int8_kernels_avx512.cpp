// AVX-512 (F/BW/VL + VNNI) tile kernels of the INT8 forward: QK^T with vpdpbusd (u8 x s8 ->
// int32), masking with compare masks, base-2 online softmax, PV with fp32 FMAs.
// Everything here has internal linkage (see int8_kernels.h) and runs only after a cpuid check.
// GCC 12 flags its own _mm512_undefined_* idiom (`__m512 __Y = __Y;`) under -Wall at -O3.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_quantize_avx2.h"
#include "cpu/int8/int8_softmax_avx512.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline __mmask16 tail_mask(int n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

template <int R, int C>
inline void qk_block(const uint8_t* q, int64_t Dp, const int8_t* k, const int32_t* colcorr,
                     const float* key_scale, const float* row_scale, float* S) {
  __m512i acc[R][C];
  HK_INT8_UNROLL for (int c = 0; c < C; ++c) {
    const __m512i init = _mm512_loadu_si512(colcorr + 16 * c);
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) acc[r][c] = init;
  }
  const int64_t cstride = int64_t(kChunk) * Dp;
  for (int64_t g = 0; g < Dp / 4; ++g) {
    __m512i kv[C];
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_si512(k + c * cstride + g * 64);
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
      const __m512i qb = _mm512_set1_epi32(load_i32(q + r * Dp + 4 * g));
      HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], qb, kv[c]);
    }
  }
  HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
    const __m512 rs = _mm512_set1_ps(row_scale[r]);
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) {
      const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(key_scale + 16 * c), rs);
      _mm512_storeu_ps(S + r * kTile + 16 * c, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][c]), sc));
    }
  }
}

template <int C>
void qk_rows(const uint8_t* q, int64_t Dp, int rows, const int8_t* k, const int32_t* colcorr,
             const float* key_scale, const float* row_scale, float* S) {
  int r = 0;
  for (; r + 4 <= rows; r += 4)
    qk_block<4, C>(q + r * Dp, Dp, k, colcorr, key_scale, row_scale + r, S + r * kTile);
  switch (rows - r) {
    case 3: qk_block<3, C>(q + r * Dp, Dp, k, colcorr, key_scale, row_scale + r, S + r * kTile); break;
    case 2: qk_block<2, C>(q + r * Dp, Dp, k, colcorr, key_scale, row_scale + r, S + r * kTile); break;
    case 1: qk_block<1, C>(q + r * Dp, Dp, k, colcorr, key_scale, row_scale + r, S + r * kTile); break;
    default: break;
  }
}

void qk_avx512(const uint8_t* qu8, int64_t Dp, int rows, const int8_t* k, int nchunks,
               const int32_t* colcorr, const float* key_scale, const float* row_scale,
               float* S) {
  switch (nchunks) {
    case 1: qk_rows<1>(qu8, Dp, rows, k, colcorr, key_scale, row_scale, S); break;
    case 2: qk_rows<2>(qu8, Dp, rows, k, colcorr, key_scale, row_scale, S); break;
    case 3: qk_rows<3>(qu8, Dp, rows, k, colcorr, key_scale, row_scale, S); break;
    default: qk_rows<4>(qu8, Dp, rows, k, colcorr, key_scale, row_scale, S); break;
  }
}

inline int32_t clamp_i32(int64_t x) {
  return x < -1 ? -1 : (x > 0x7fffffff ? 0x7fffffff : int32_t(x));
}

void mask_avx512(float* S, int rows, int cols, const int32_t* kidx, const uint8_t* kflags,
                 const int64_t* wlo, const int64_t* whi, const int64_t* clim, int32_t* first,
                 int32_t* last) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  const int nvec = (cols + 15) / 16;
  __m512i j[4];
  __mmask16 real[4], lm[4];
  for (int v = 0; v < nvec; ++v) {
    const __mmask16 t = tail_mask(cols - 16 * v);
    j[v] = _mm512_maskz_loadu_epi32(t, kidx + 16 * v);
    const __m512i fl = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(t, kflags + 16 * v));
    real[v] = _mm512_mask_test_epi32_mask(t, fl, _mm512_set1_epi32(1));
    lm[v] = _mm512_mask_test_epi32_mask(t, fl, _mm512_set1_epi32(2));
  }
  for (int r = 0; r < rows; ++r) {
    const __m512i lo = _mm512_set1_epi32(clamp_i32(wlo[r]));
    const __m512i hi = _mm512_set1_epi32(clamp_i32(whi[r]));
    const __m512i cl = _mm512_set1_epi32(clamp_i32(clim[r]));
    uint64_t bits = 0;
    for (int v = 0; v < nvec; ++v) {
      const __mmask16 in = _mm512_mask_cmple_epi32_mask(_mm512_cmpge_epi32_mask(j[v], lo), j[v], hi);
      const __mmask16 lmok = _mm512_mask_cmple_epi32_mask(lm[v], j[v], cl);
      const __mmask16 vis = real[v] & (in | lmok);
      float* s = S + r * kTile + 16 * v;
      _mm512_storeu_ps(s, _mm512_mask_blend_ps(vis, ninf, _mm512_loadu_ps(s)));
      bits |= uint64_t(vis) << (16 * v);
    }
    first[r] = bits ? __builtin_ctzll(bits) : cols;
    last[r] = bits ? 63 - __builtin_clzll(bits) : -1;
  }
}

void softmax_avx512(float* S, int rows, int cols, float* m, float* l, float* alpha) {
  softmax_tile<false>(S, rows, cols, m, l, alpha);
}

template <int R, int C>
inline void pv_block(float* O, int64_t ldo, const float* P, int c0, int c1, const float* alpha,
                     const float* V, int64_t ldv, const __mmask16* dm) {
  __m512 acc[R][C];
  HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(O + r * ldo + 16 * c), a);
  }
  for (int j = c0; j < c1; ++j) {
    __m512 vv[C];
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) vv[c] = _mm512_maskz_loadu_ps(dm[c], V + j * ldv + 16 * c);
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
      const __m512 pb = _mm512_set1_ps(P[r * kTile + j]);
      HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  HK_INT8_UNROLL for (int r = 0; r < R; ++r)
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) _mm512_storeu_ps(O + r * ldo + 16 * c, acc[r][c]);
}

template <int C>
void pv_rows(float* O, int64_t ldo, const float* P, int rows, int cols, const int32_t* first,
             const int32_t* last, const float* alpha, const float* V, int64_t ldv,
             const __mmask16* dm) {
  constexpr int R = 6;
  for (int r = 0; r < rows; r += R) {
    const int n = rows - r < R ? rows - r : R;
    int c0, c1;
    group_cols(first, last, r, n, cols, &c0, &c1);
    float* o = O + r * ldo;
    const float* p = P + r * kTile;
    switch (n) {
      case 6: pv_block<6, C>(o, ldo, p, c0, c1, alpha + r, V, ldv, dm); break;
      case 5: pv_block<5, C>(o, ldo, p, c0, c1, alpha + r, V, ldv, dm); break;
      case 4: pv_block<4, C>(o, ldo, p, c0, c1, alpha + r, V, ldv, dm); break;
      case 3: pv_block<3, C>(o, ldo, p, c0, c1, alpha + r, V, ldv, dm); break;
      case 2: pv_block<2, C>(o, ldo, p, c0, c1, alpha + r, V, ldv, dm); break;
      default: pv_block<1, C>(o, ldo, p, c0, c1, alpha + r, V, ldv, dm); break;
    }
  }
}

void pv_avx512(float* O, int64_t ldo, const float* P, int rows, int cols, const int32_t* first,
               const int32_t* last, const float* alpha, const float* V, int64_t ldv,
               int64_t Dv) {
  for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
    const int nd = Dv - d0 < 64 ? int(Dv - d0) : 64;
    __mmask16 dm[4];
    for (int c = 0; c < 4; ++c) dm[c] = tail_mask(nd - 16 * c > 0 ? nd - 16 * c : 0);
    switch ((nd + 15) / 16) {
      case 1: pv_rows<1>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
      case 2: pv_rows<2>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
      case 3: pv_rows<3>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
      default: pv_rows<4>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
    }
  }
}

// ---- PV with bf16 V: key pairs through vdpbf16ps (2 multiply-adds per fp32 lane).
constexpr __mmask32 kAllKeys = 0xffffffffu;
constexpr __mmask32 kEvenKeys = 0x55555555u;  // bf16 lanes of the even key of each pair
constexpr __mmask32 kOddKeys = 0xaaaaaaaau;

// Pairs [p0, p1); the V halves outside the key range are zeroed by vm0 (pair p0) and vm1 (pair
// p1 - 1), so a non-finite V there never meets a zero P.
template <int R, int C>
inline void pv_bf16_block(float* O, int64_t ldo, const uint32_t* Pb, int p0, int p1,
                          __mmask32 vm0, __mmask32 vm1, const float* alpha, const uint16_t* Vp,
                          int64_t ldvp) {
  __m512 acc[R][C];
  HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(O + r * ldo + 16 * c), a);
  }
  for (int jp = p0; jp < p1; ++jp) {
    const __mmask32 vm = (jp == p0 ? vm0 : kAllKeys) & (jp == p1 - 1 ? vm1 : kAllKeys);
    __m512bh vv[C];
    HK_INT8_UNROLL for (int c = 0; c < C; ++c)
      vv[c] = (__m512bh)_mm512_maskz_loadu_epi16(vm, Vp + jp * ldvp + 32 * c);
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
      const __m512bh pb = (__m512bh)_mm512_set1_epi32(int(Pb[r * (kTile / 2) + jp]));
      HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pb, vv[c]);
    }
  }
  HK_INT8_UNROLL for (int r = 0; r < R; ++r)
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) _mm512_storeu_ps(O + r * ldo + 16 * c, acc[r][c]);
}

template <int C>
void pv_bf16_rows(float* O, int64_t ldo, const uint32_t* Pb, int rows, int cols,
                  const int32_t* first, const int32_t* last, const float* alpha,
                  const uint16_t* Vp, int64_t ldvp) {
  constexpr int R = 6;
  for (int r = 0; r < rows; r += R) {
    const int n = rows - r < R ? rows - r : R;
    int c0, c1;
    group_cols(first, last, r, n, cols, &c0, &c1);
    const int p0 = c0 / 2, p1 = (c1 + 1) / 2;
    const __mmask32 vm0 = c0 % 2 ? kOddKeys : kAllKeys, vm1 = c1 % 2 ? kEvenKeys : kAllKeys;
    float* o = O + r * ldo;
    const uint32_t* pb = Pb + r * (kTile / 2);
    switch (n) {
      case 6: pv_bf16_block<6, C>(o, ldo, pb, p0, p1, vm0, vm1, alpha + r, Vp, ldvp); break;
      case 5: pv_bf16_block<5, C>(o, ldo, pb, p0, p1, vm0, vm1, alpha + r, Vp, ldvp); break;
      case 4: pv_bf16_block<4, C>(o, ldo, pb, p0, p1, vm0, vm1, alpha + r, Vp, ldvp); break;
      case 3: pv_bf16_block<3, C>(o, ldo, pb, p0, p1, vm0, vm1, alpha + r, Vp, ldvp); break;
      case 2: pv_bf16_block<2, C>(o, ldo, pb, p0, p1, vm0, vm1, alpha + r, Vp, ldvp); break;
      default: pv_bf16_block<1, C>(o, ldo, pb, p0, p1, vm0, vm1, alpha + r, Vp, ldvp); break;
    }
  }
}

void pv_bf16_avx512(float* O, int64_t ldo, const float* P, int rows, int cols,
                    const int32_t* first, const int32_t* last, const float* alpha,
                    const uint16_t* Vp, int64_t ldvp, int64_t Dv) {
  // P rows -> bf16 key pairs (round to nearest even); an odd last column pairs with 0.
  alignas(64) uint32_t Pb[kTile * (kTile / 2)];
  const int npairs = (cols + 1) / 2;
  for (int r = 0; r < rows; ++r) {
    const float* p = P + r * kTile;
    for (int v = 0; v < (cols + 31) / 32; ++v) {
      const int n = cols - 32 * v;
      const __m512 lo = _mm512_maskz_loadu_ps(tail_mask(n), p + 32 * v);
      const __m512 hi = _mm512_maskz_loadu_ps(tail_mask(n > 16 ? n - 16 : 0), p + 32 * v + 16);
      const __m512i pk = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in the low half
      _mm512_mask_storeu_epi32(Pb + r * (kTile / 2) + 16 * v, tail_mask(npairs - 16 * v), pk);
    }
  }
  for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
    const int nd = Dv - d0 < 64 ? int(Dv - d0) : 64;
    const uint16_t* vp = Vp + 2 * d0;
    switch ((nd + 15) / 16) {
      case 1: pv_bf16_rows<1>(O + d0, ldo, Pb, rows, cols, first, last, alpha, vp, ldvp); break;
      case 2: pv_bf16_rows<2>(O + d0, ldo, Pb, rows, cols, first, last, alpha, vp, ldvp); break;
      case 3: pv_bf16_rows<3>(O + d0, ldo, Pb, rows, cols, first, last, alpha, vp, ldvp); break;
      default: pv_bf16_rows<4>(O + d0, ldo, Pb, rows, cols, first, last, alpha, vp, ldvp); break;
    }
  }
}

void pack_pair_bf16_avx512(const float* a, const float* b, int64_t n, uint16_t* dst) {
  // cvtne2ps_pbh(b, a) holds a[0..15] then b[0..15]; the permute interleaves them.
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t d = 0; d < n; d += 16) {
    const int m = int(n - d < 16 ? n - d : 16);
    const __mmask16 t = tail_mask(m);
    const __m512 va = _mm512_maskz_loadu_ps(t, a + d);
    const __m512 vb = b ? _mm512_maskz_loadu_ps(t, b + d) : _mm512_setzero_ps();
    const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(vb, va);
    const __mmask32 t2 = m >= 16 ? __mmask32(0xffffffffu) : __mmask32((1u << (2 * m)) - 1);
    _mm512_mask_storeu_epi16(dst + 2 * d, t2, _mm512_permutexvar_epi16(idx, ab));
  }
}

const Kernels kAvx512 = {"avx512", qk_avx512, mask_avx512, softmax_avx512, pv_avx512, pv_bf16_avx512,
                          absmax_avx2, quantize_avx2, widen_avx2, pack_pair_bf16_avx512};

}  // namespace

const Kernels* kernels_avx512() { return &kAvx512; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
