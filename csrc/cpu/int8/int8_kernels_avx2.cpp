// AVX2 tile kernels of the INT8 forward. QK^T uses AVX-VNNI vpdpbusd (u8 x s8) where the CPU has
// it, else sign-extends to int16 and uses vpmaddwd (vpmaddubsw would saturate on (q+128) * k).
// Everything here has internal linkage (see int8_kernels.h) and runs only after a cpuid check.
#include <immintrin.h>

#include <cstring>

#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_quantize_avx2.h"
#include "cpu/simd/exp2.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Lane i of the result is all-ones iff i < n.
inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}



inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void store_scores(__m256i acc, const float* key_scale, float rs, float* S) {
  const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(key_scale), _mm256_set1_ps(rs));
  _mm256_storeu_ps(S, _mm256_mul_ps(_mm256_cvtepi32_ps(acc), sc));
}

// ---- AVX-VNNI: 2 rows x 32 keys per block (8 accumulators).
template <int R, int NV>
__attribute__((target("avxvnni"))) inline void qk_vnni_block(
    const uint8_t* q, int64_t Dp, const int8_t* k, const int32_t* colcorr,
    const float* key_scale, const float* row_scale, float* S) {
  __m256i acc[R][NV];
  HK_INT8_UNROLL for (int v = 0; v < NV; ++v) {
    const __m256i init = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colcorr + 8 * v));
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) acc[r][v] = init;
  }
  const int64_t cstride = int64_t(kChunk) * Dp;
  for (int64_t g = 0; g < Dp / 4; ++g) {
    __m256i kv[NV];
    HK_INT8_UNROLL for (int v = 0; v < NV; ++v)
      kv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + (v / 2) * cstride + g * 64 + (v % 2) * 32));
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
      const __m256i qb = _mm256_set1_epi32(load_i32(q + r * Dp + 4 * g));
      HK_INT8_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_dpbusd_avx_epi32(acc[r][v], qb, kv[v]);
    }
  }
  HK_INT8_UNROLL for (int r = 0; r < R; ++r)
    HK_INT8_UNROLL for (int v = 0; v < NV; ++v)
      store_scores(acc[r][v], key_scale + 8 * v, row_scale[r], S + r * kTile + 8 * v);
}

__attribute__((target("avxvnni"))) void qk_avx2_vnni(
    const uint8_t* qu8, int64_t Dp, int rows, const int8_t* k, int nchunks,
    const int32_t* colcorr, const float* key_scale, const float* row_scale, float* S) {
  // Halves of 32 keys (2 chunks); an odd last chunk is done alone so no read leaves the tile.
  for (int h = 0; h < nchunks; h += 2) {
    const int8_t* kh = k + int64_t(h) * kChunk * Dp;
    const int32_t* cc = colcorr + h * kChunk;
    const float* ks = key_scale + h * kChunk;
    float* Sh = S + h * kChunk;
    const bool two = nchunks - h >= 2;
    int r = 0;
    for (; r + 2 <= rows; r += 2) {
      if (two) qk_vnni_block<2, 4>(qu8 + r * Dp, Dp, kh, cc, ks, row_scale + r, Sh + r * kTile);
      else qk_vnni_block<2, 2>(qu8 + r * Dp, Dp, kh, cc, ks, row_scale + r, Sh + r * kTile);
    }
    if (r < rows) {
      if (two) qk_vnni_block<1, 4>(qu8 + r * Dp, Dp, kh, cc, ks, row_scale + r, Sh + r * kTile);
      else qk_vnni_block<1, 2>(qu8 + r * Dp, Dp, kh, cc, ks, row_scale + r, Sh + r * kTile);
    }
  }
}

// ---- No VNNI: signed q (qu8 ^ 0x80) and k widened to int16, vpmaddwd; 8 keys per pass.
void qk_avx2_madd(const uint8_t* qu8, int64_t Dp, int rows, const int8_t* k, int nchunks,
                  const int32_t* colcorr, const float* key_scale, const float* row_scale,
                  float* S) {
  (void)colcorr;  // sum (q ^ 0x80) * k + colcorr == sum q * k, computed directly here
  const int64_t cstride = int64_t(kChunk) * Dp;
  const __m256i flip = _mm256_set1_epi8(char(0x80));
  for (int r = 0; r < rows; ++r) {
    const uint8_t* q = qu8 + r * Dp;
    for (int kv8 = 0; kv8 < nchunks * 2; ++kv8) {
      const int8_t* kb = k + (kv8 / 2) * cstride + (kv8 % 2) * 32;
      __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
      for (int64_t g = 0; g < Dp / 4; ++g) {
        // 4 signed q values as int16, repeated.
        const __m256i q8 = _mm256_xor_si256(_mm256_set1_epi32(load_i32(q + 4 * g)), flip);
        const __m256i qw = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q8));
        const __m256i kk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + g * 64));
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(kk)), qw));
        b = _mm256_add_epi32(b, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(kk, 1)), qw));
      }
      // a: keys 0-3 (two partial sums each), b: keys 4-7 -> 8 sums in key order.
      const __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0));
      store_scores(s, key_scale + 8 * kv8, row_scale[r], S + r * kTile + 8 * kv8);
    }
  }
}

// Clamped so that +-1 below cannot overflow (key indices are in [0, 2^31 - 64)).
inline int32_t clamp_i32(int64_t x) {
  return x < -1 ? -1 : (x > 0x7ffffffe ? 0x7ffffffe : int32_t(x));
}

void mask_avx2(float* S, int rows, int cols, const int32_t* kidx, const uint8_t* kflags,
               const int64_t* wlo, const int64_t* whi, const int64_t* clim, int32_t* first,
               int32_t* last) {
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  const int nvec = (cols + 7) / 8;
  __m256i j[8], real[8], lm[8];
  for (int v = 0; v < nvec; ++v) {
    const __m256i t = tail_mask(cols - 8 * v);
    j[v] = _mm256_maskload_epi32(kidx + 8 * v, t);
    int64_t fl8 = 0;
    std::memcpy(&fl8, kflags + 8 * v, size_t(cols - 8 * v >= 8 ? 8 : cols - 8 * v));
    const __m256i fl = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(fl8));
    real[v] = _mm256_and_si256(t, _mm256_cmpeq_epi32(_mm256_and_si256(fl, _mm256_set1_epi32(1)), _mm256_set1_epi32(1)));
    lm[v] = _mm256_cmpeq_epi32(_mm256_and_si256(fl, _mm256_set1_epi32(2)), _mm256_set1_epi32(2));
  }
  for (int r = 0; r < rows; ++r) {
    const __m256i lo1 = _mm256_set1_epi32(clamp_i32(wlo[r]) - 1);  // j > lo - 1
    const __m256i hi1 = _mm256_set1_epi32(clamp_i32(whi[r]) + 1);  // j < hi + 1
    const __m256i cl1 = _mm256_set1_epi32(clamp_i32(clim[r]) + 1);
    uint64_t bits = 0;
    for (int v = 0; v < nvec; ++v) {
      const __m256i in = _mm256_and_si256(_mm256_cmpgt_epi32(j[v], lo1), _mm256_cmpgt_epi32(hi1, j[v]));
      const __m256i lmok = _mm256_and_si256(lm[v], _mm256_cmpgt_epi32(cl1, j[v]));
      const __m256i vis = _mm256_and_si256(real[v], _mm256_or_si256(in, lmok));
      float* s = S + r * kTile + 8 * v;
      _mm256_storeu_ps(s, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s), _mm256_castsi256_ps(vis)));
      bits |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(vis)))) << (8 * v);
    }
    first[r] = bits ? __builtin_ctzll(bits) : cols;
    last[r] = bits ? 63 - __builtin_clzll(bits) : -1;
  }
}

void softmax_avx2(float* S, int rows, int cols, float* m, float* l, float* alpha) {
  const float ninf = -__builtin_inff();
  const int nvec = (cols + 7) / 8;
  for (int r = 0; r < rows; ++r) {
    float* s = S + r * kTile;
    __m256 mx = _mm256_set1_ps(m[r]);
    for (int v = 0; v < nvec; ++v) {
      const __m256 t = _mm256_castsi256_ps(tail_mask(cols - 8 * v));
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(ninf), _mm256_loadu_ps(s + 8 * v), t));
    }
    const float mr = hmax(mx);
    if (mr == ninf) {
      for (int v = 0; v < nvec; ++v) _mm256_storeu_ps(s + 8 * v, _mm256_setzero_ps());
      alpha[r] = 1.f;
      continue;
    }
    const __m256 mv = _mm256_set1_ps(mr);
    __m256 sum = _mm256_setzero_ps();
    for (int v = 0; v < nvec; ++v) {
      const __m256 t = _mm256_castsi256_ps(tail_mask(cols - 8 * v));
      const __m256 e = _mm256_and_ps(t, cpu::exp2<Exp2::kFull>(_mm256_sub_ps(_mm256_loadu_ps(s + 8 * v), mv)));
      _mm256_storeu_ps(s + 8 * v, e);
      sum = _mm256_add_ps(sum, e);
    }
    const float a = mr == m[r] ? 1.f : _mm256_cvtss_f32(cpu::exp2<Exp2::kFull>(_mm256_set1_ps(m[r] - mr)));
    alpha[r] = a;
    l[r] = l[r] * a + hsum(sum);
    m[r] = mr;
  }
}

// 2 rows x 32 output features per block.
template <int R, int C>
inline void pv_block(float* O, int64_t ldo, const float* P, int c0, int c1, const float* alpha,
                     const float* V, int64_t ldv, const __m256i* dm) {
  __m256 acc[R][C];
  HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
    const __m256 a = _mm256_set1_ps(alpha[r]);
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm256_mul_ps(_mm256_loadu_ps(O + r * ldo + 8 * c), a);
  }
  for (int j = c0; j < c1; ++j) {
    __m256 vv[C];
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) vv[c] = _mm256_maskload_ps(V + j * ldv + 8 * c, dm[c]);
    HK_INT8_UNROLL for (int r = 0; r < R; ++r) {
      const __m256 pb = _mm256_broadcast_ss(P + r * kTile + j);
      HK_INT8_UNROLL for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  HK_INT8_UNROLL for (int r = 0; r < R; ++r)
    HK_INT8_UNROLL for (int c = 0; c < C; ++c) _mm256_storeu_ps(O + r * ldo + 8 * c, acc[r][c]);
}

template <int C>
void pv_rows(float* O, int64_t ldo, const float* P, int rows, int cols, const int32_t* first,
             const int32_t* last, const float* alpha, const float* V, int64_t ldv,
             const __m256i* dm) {
  for (int r = 0; r < rows; r += 2) {
    const int n = rows - r < 2 ? 1 : 2;
    int c0, c1;
    group_cols(first, last, r, n, cols, &c0, &c1);
    if (n == 2)
      pv_block<2, C>(O + r * ldo, ldo, P + r * kTile, c0, c1, alpha + r, V, ldv, dm);
    else
      pv_block<1, C>(O + r * ldo, ldo, P + r * kTile, c0, c1, alpha + r, V, ldv, dm);
  }
}

// x rounded to the nearest bf16 value (ties to even); NaN lanes pass through unchanged.
inline __m256 bf16_round(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                     _mm256_set1_epi32(int(0xffff0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

void pv_avx2(float* O, int64_t ldo, const float* P_in, int rows, int cols, const int32_t* first,
             const int32_t* last, const float* alpha, const float* V, int64_t ldv, int64_t Dv) {
  alignas(32) float P[kTile * kTile];  // P rounded to bf16 values (the PV precision contract)
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; c += 8)
      _mm256_store_ps(P + r * kTile + c, bf16_round(_mm256_loadu_ps(P_in + r * kTile + c)));
  for (int64_t d0 = 0; d0 < Dv; d0 += 32) {
    const int nd = Dv - d0 < 32 ? int(Dv - d0) : 32;
    __m256i dm[4];
    for (int c = 0; c < 4; ++c) dm[c] = tail_mask(nd - 8 * c);
    switch ((nd + 7) / 8) {
      case 1: pv_rows<1>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
      case 2: pv_rows<2>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
      case 3: pv_rows<3>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
      default: pv_rows<4>(O + d0, ldo, P, rows, cols, first, last, alpha, V + d0, ldv, dm); break;
    }
  }
}

const Kernels kAvx2Vnni = {"avx2-vnni", qk_avx2_vnni, mask_avx2, softmax_avx2, pv_avx2, nullptr,
                             absmax_avx2, quantize_avx2, widen_avx2};
const Kernels kAvx2 = {"avx2", qk_avx2_madd, mask_avx2, softmax_avx2, pv_avx2, nullptr,
                             absmax_avx2, quantize_avx2, widen_avx2};

}  // namespace

const Kernels* kernels_avx2(bool avx_vnni) { return avx_vnni ? &kAvx2Vnni : &kAvx2; }

}  // namespace int8
}  // namespace cpu
}  // namespace hk
