// AVX-512 online softmax of the INT8 forward (Kernels::softmax), included by
// int8_kernels_avx512.cpp and int8_kernels_amx.cpp: internal linkage, one copy per TU.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/int8/int8_kernels.h"
#include "cpu/simd/exp2.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

inline __mmask16 sm_tail_mask(int n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// 2^x at kCoarse accuracy (cpu/simd/exp2.h): P is rounded to bf16 for PV anyway, and the same
// P feeds the softmax sum. Lanes outside `lanes` are 0.
inline __m512 exp2_ps(__m512 x, __mmask16 lanes = 0xffff) { return cpu::exp2<Exp2::kCoarse>(x, lanes); }

// Lane i of the result: the max (kMax) or sum of the 16 lanes of v[i]; a shuffle tree instead
// of 16 horizontal reductions.
template <bool kMax>
inline __m512 reduce16(const __m512* v) {
  auto op = [](__m512 a, __m512 b) { return kMax ? _mm512_max_ps(a, b) : _mm512_add_ps(a, b); };
  __m512 y[8], z[4], u[2];
  // y[i]: 128-bit lanes 0-1 reduce row i, lanes 2-3 row i + 8.
  HK_INT8_UNROLL for (int i = 0; i < 8; ++i)
    y[i] = op(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xee));
  // z[i]: lane 0 row i, lane 1 row i + 8, lane 2 row i + 4, lane 3 row i + 12.
  HK_INT8_UNROLL for (int i = 0; i < 4; ++i)
    z[i] = op(_mm512_shuffle_f32x4(y[i], y[i + 4], 0x88), _mm512_shuffle_f32x4(y[i], y[i + 4], 0xdd));
  // u[i]: per lane, elements 0-1 the row of z[i], 2-3 the row of z[i + 2].
  HK_INT8_UNROLL for (int i = 0; i < 2; ++i)
    u[i] = op(_mm512_shuffle_ps(z[i], z[i + 2], 0x44), _mm512_shuffle_ps(z[i], z[i + 2], 0xee));
  // Lane p of w holds row g(p), g = 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15 (its own inverse).
  const __m512 w = op(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xdd));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), w);
}

constexpr float kMaxSlack = 8.f;

// Up to 16 rows of up to 64 scores (NV vectors each): mnew[i] = ceil(max(m[i], max_c S[i][c]))
// unless that max is at most m[i] + kMaxSlack (then m[i]),
// P = exp2(S - mnew) stored back (0 past cols; fp32, or bf16 pairs with kBf16) and its fp32 sum
// into sum[i]. P = 0 where the max is -inf.
template <bool kBf16, int NV>
inline void softmax_group(float* S, int n, int cols, const float* m, float* mnew, float* sum) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  __m512 part[16];
  HK_INT8_UNROLL for (int i = 0; i < 16; ++i) {
    part[i] = ninf;
    if (i >= n) continue;
    __m512 mx = _mm512_set1_ps(m[i]);
    HK_INT8_UNROLL for (int v = 0; v < NV; ++v)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, sm_tail_mask(cols - 16 * v), S + i * kTile + 16 * v));
    part[i] = mx;
  }
  // The max in use only moves when a row's max exceeds it by more than kMaxSlack (P <= 2^8):
  // most tiles then keep alpha = 1, which the amx PV turns into plain accumulation. It moves to
  // the max rounded up to an integer: P then differs from exp2(S - ceil(final max)) by a power
  // of 2 only, which bf16 rounding commutes with (quant.int8_reference emulates exactly that).
  const __m512 mo = _mm512_loadu_ps(m), mx = reduce16<true>(part);
  const __mmask16 keep = _mm512_cmp_ps_mask(mx, _mm512_add_ps(mo, _mm512_set1_ps(kMaxSlack)), _CMP_LE_OQ);
  const __m512 up = _mm512_roundscale_ps(mx, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
  _mm512_store_ps(mnew, _mm512_mask_blend_ps(keep, up, mo));
  HK_INT8_UNROLL for (int i = 0; i < 16; ++i) {
    part[i] = _mm512_setzero_ps();
    if (i >= n) continue;
    float* s = S + i * kTile;
    if (mnew[i] == -__builtin_inff()) {
      constexpr int nz = kBf16 ? 2 : NV;  // bf16: the 32 pairs of the first half
      HK_INT8_UNROLL for (int v = 0; v < nz; ++v) _mm512_storeu_ps(s + 16 * v, _mm512_setzero_ps());
      continue;
    }
    const __m512 mv = _mm512_set1_ps(mnew[i]);
    __m512 e[NV];
    HK_INT8_UNROLL for (int v = 0; v < NV; ++v) {
      const __mmask16 t = sm_tail_mask(cols - 16 * v);  // P = 0 past cols
      e[v] = exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(t, s + 16 * v), mv), t);
      part[i] = _mm512_add_ps(part[i], e[v]);
    }
    if (kBf16) {
      // bf16 pairs, 32 keys per 64 bytes, in the first half of the row; the rest of the first
      // 64 keys (up to 32 pairs) zero.
      uint32_t* pb = reinterpret_cast<uint32_t*>(s);
      HK_INT8_UNROLL for (int v = 0; v < 4; v += 2) {
        const __m512 lo = v < NV ? e[v] : _mm512_setzero_ps();
        const __m512 hi = v + 1 < NV ? e[v + 1] : _mm512_setzero_ps();
        _mm512_storeu_si512(pb + 8 * v, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    } else {
      HK_INT8_UNROLL for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + 16 * v, e[v]);
    }
  }
  _mm512_store_ps(sum, reduce16<false>(part));
}

template <bool kBf16, int NV>
void softmax_rows(float* S, int rows, int cols, const float* m, float* mnew, float* sum) {
  for (int r = 0; r < rows; r += 16)
    softmax_group<kBf16, NV>(S + r * kTile, rows - r < 16 ? rows - r : 16, cols, m + r, mnew + r,
                             sum + r);
}

// Kernels::softmax. kBf16: P is left as bf16 key pairs (round to nearest even) in the first
// kTile / 2 uint32 of each S row, zero past cols (the operand layout of the amx pv_bf16); a row
// with nothing visible reads as zeros in both layouts.
template <bool kBf16>
void softmax_tile(float* S, int rows, int cols, float* m, float* l, float* alpha) {
  alignas(64) float mnew[kTile], sum[kTile];
  switch ((cols + 15) / 16) {
    case 1: softmax_rows<kBf16, 1>(S, rows, cols, m, mnew, sum); break;
    case 2: softmax_rows<kBf16, 2>(S, rows, cols, m, mnew, sum); break;
    case 3: softmax_rows<kBf16, 3>(S, rows, cols, m, mnew, sum); break;
    default: softmax_rows<kBf16, 4>(S, rows, cols, m, mnew, sum); break;
  }
  // alpha = exp2(m_old - m_new), 1 where the max does not move (incl. rows still at -inf).
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  for (int r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 t = sm_tail_mask(rows - r0);
    const __m512 mo = _mm512_maskz_loadu_ps(t, m + r0), mn = _mm512_maskz_loadu_ps(t, mnew + r0);
    const __mmask16 same = _mm512_cmp_ps_mask(mo, mn, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ);
    const __m512 a = _mm512_mask_blend_ps(same, exp2_ps(_mm512_sub_ps(mo, mn)), _mm512_set1_ps(1.f));
    const __m512 lo = _mm512_maskz_loadu_ps(t, l + r0);
    _mm512_mask_storeu_ps(alpha + r0, t, a);
    _mm512_mask_storeu_ps(l + r0, t, _mm512_add_ps(_mm512_mul_ps(lo, a), _mm512_maskz_loadu_ps(t, sum + r0)));
    _mm512_mask_storeu_ps(m + r0, t, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ), mn, mo));
  }
}

}  // namespace
}  // namespace int8
}  // namespace cpu
}  // namespace hk
