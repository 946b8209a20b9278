// AMX tile kernels of the INT8 forward: QK^T with tdpbusd (u8 Q x s8 K -> int32, bit-identical
// to the avx512 vpdpbusd kernel) and PV with tdpbf16ps (bf16 P x bf16 V -> fp32). The softmax
// is the avx512 one writing P straight as bf16 pairs (the A operand of the PV); masking and the
// quantization rows are the avx512 set's. The tile configuration is loaded once
// per thread and parallel region (Kernels::begin_thread) and released at its end.
// Everything here has internal linkage (see int8_kernels.h) and runs only after a cpuid check
// (and the Linux AMX permission request, see cpu_features.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cstring>

#include "cpu/simd/amx_tiles.h"
#include "cpu/int8/int8_kernels.h"
#include "cpu/int8/int8_softmax_avx512.h"

namespace hk {
namespace cpu {
namespace int8 {
namespace {

// Every tile register is 16 rows x 64 bytes. QK: C 0-3 (2 row groups x 2 key chunks, int32),
// A 4-5 (Q rows), B 6-7 (K chunks). PV: C 0-3 (16 rows x 64 outputs, fp32), A 4 (P, 32 keys),
// B 5-7 (V key pairs).
constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;

void begin_thread_amx() { amx_configure_16x64(); }

void end_thread_amx() { _tile_release(); }


// ---- QK^T. Dp is a multiple of 64 (dp_align): each 64-byte step of Q rows is one A tile and the
// matching 16 dim groups of a packed K chunk ([Dp / 4][16 keys][4 bytes]) one B tile.

// C tiles 2 * i + j = colcorr + Q rows [16 i, 16 i + 16) x keys of chunk j, i < TR, j < TC,
// summed over all of Dp, stored as int32 into S (row stride kTile) at row 16 i, column 16 j.
// The accumulators start at colcorr (its 16 values loaded into every row: stride 0).
template <int TR, int TC>
inline void qk_tiles(const uint8_t* q, int64_t Dp, const int8_t* k, const int32_t* colcorr,
                     int32_t* S) {
  const int64_t cstride = int64_t(kChunk) * Dp;
  constexpr int ld = kTile * 4;
  _tile_loadd(0, colcorr, 0);
  if (TC > 1) _tile_loadd(1, colcorr + kChunk, 0);
  if (TR > 1) _tile_loadd(2, colcorr, 0);
  if (TR > 1 && TC > 1) _tile_loadd(3, colcorr + kChunk, 0);
  for (int64_t s = 0; s < Dp; s += kTileBytes) {
    _tile_loadd(4, q + s, Dp);
    if (TR > 1) _tile_loadd(5, q + kTileRows * Dp + s, Dp);
    _tile_loadd(6, k + s * kChunk, kTileBytes);  // dim groups s / 4 .. s / 4 + 15
    if (TC > 1) _tile_loadd(7, k + cstride + s * kChunk, kTileBytes);
    _tile_dpbusd(0, 4, 6);
    if (TC > 1) _tile_dpbusd(1, 4, 7);
    if (TR > 1) _tile_dpbusd(2, 5, 6);
    if (TR > 1 && TC > 1) _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, S, ld);
  if (TC > 1) _tile_stored(1, S + kChunk, ld);
  if (TR > 1) _tile_stored(2, S + kTileRows * kTile, ld);
  if (TR > 1 && TC > 1) _tile_stored(3, S + kTileRows * kTile + kChunk, ld);
}

// S[r][c] = float(Si[r][c]) * (key_scale[c] * row_scale[r]) in place, r < rows, c < 16 nchunks:
// the avx512 kernel's arithmetic.
void scale_scores(float* S, int rows, int nchunks, const float* key_scale, const float* row_scale) {
  for (int c = 0; c < nchunks; ++c) {
    const __m512 ks = _mm512_loadu_ps(key_scale + 16 * c);
    for (int r = 0; r < rows; ++r) {
      float* s = S + r * kTile + 16 * c;
      const __m512 sc = _mm512_mul_ps(ks, _mm512_set1_ps(row_scale[r]));
      _mm512_storeu_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(s)), sc));
    }
  }
}

// Q rows beyond `rows` (up to the next multiple of 16, inside the kTile-row scratch) are loaded
// into A tiles too; their scores land in S rows the caller never reads (S has kTile rows).
// All tiles are stored before any is read back, so the stores retire off the critical path.
void qk_amx(const uint8_t* qu8, int64_t Dp, int rows, const int8_t* k, int nchunks,
            const int32_t* colcorr, const float* key_scale, const float* row_scale, float* S) {
  int32_t* Si = reinterpret_cast<int32_t*>(S);
  for (int r0 = 0; r0 < rows; r0 += 2 * kTileRows) {
    const bool two_r = rows - r0 > kTileRows;
    const uint8_t* q = qu8 + r0 * Dp;
    for (int c0 = 0; c0 < nchunks; c0 += 2) {
      const bool two_c = nchunks - c0 > 1;
      const int8_t* kc = k + int64_t(c0) * kChunk * Dp;
      int32_t* s = Si + r0 * kTile + c0 * kChunk;
      const int32_t* cc = colcorr + c0 * kChunk;
      if (two_r && two_c) qk_tiles<2, 2>(q, Dp, kc, cc, s);
      else if (two_r) qk_tiles<2, 1>(q, Dp, kc, cc, s);
      else if (two_c) qk_tiles<1, 2>(q, Dp, kc, cc, s);
      else qk_tiles<1, 1>(q, Dp, kc, cc, s);
    }
  }
  scale_scores(S, rows, nchunks, key_scale, row_scale);
}

// ---- PV. P comes from this set's softmax as bf16 key pairs in the first half of each S row
// (row stride kTile uint32): directly the A operand, 32 keys per 64-byte tile row.
constexpr int kPbStride = kTile;  // uint32 per S row
constexpr __mmask32 kEvenKeys = 0x55555555u;  // bf16 lanes of the even key of each pair
constexpr __mmask32 kOddKeys = 0xaaaaaaaau;

// The B operand for pairs [b0, b0 + 16) and outputs [16 v0, 16 v0 + 16 nc): Vp itself when
// every pair lies wholly in the key range [c0, c1), else a copy in buf (row stride 64 uint32)
// with the pairs / halves outside the range zeroed, so a non-finite V there never meets a zero
// P. Returns the operand; *ld_bytes receives its row stride.
const void* v_operand(const uint16_t* Vp, int64_t ldvp, int b0, int c0, int c1, int v0, int nc,
                      uint32_t* buf, int64_t* ld_bytes) {
  const uint16_t* src = Vp + int64_t(b0) * ldvp + 32 * v0;
  if (2 * b0 >= c0 && 2 * (b0 + kTileRows) <= c1) {
    *ld_bytes = ldvp * 2;
    return src;
  }
  for (int p = 0; p < kTileRows; ++p) {
    const int k0 = 2 * (b0 + p);  // keys k0, k0 + 1
    const __mmask32 m = (k0 >= c0 ? kEvenKeys : 0u) & (k0 < c1 ? kEvenKeys : 0u);
    const __mmask32 vm = m | ((k0 + 1 >= c0 && k0 + 1 < c1) ? kOddKeys : 0u);
    for (int c = 0; c < 4; ++c) {
      const __m512i x = c < nc && vm ? _mm512_maskz_loadu_epi16(vm, src + p * ldvp + 32 * c)
                                     : _mm512_setzero_si512();
      _mm512_store_si512(buf + p * 64 + 16 * c, x);
    }
  }
  *ld_bytes = 64 * 4;
  return buf;
}

// D[:16][16 j + e] (+)= sum over the key range [c0, c1) (within pairs [0, 32)) of P x V, j < NC,
// row stride ldd bytes; kAcc: accumulate onto D, else overwrite it. Per block of 16 pairs one A
// tile of P and NC B tiles of V.
template <int NC, bool kAcc>
inline void pv_tiles(float* D, int64_t ldd, const uint32_t* Pb, const uint16_t* Vp, int64_t ldvp,
                     int c0, int c1, int v0) {
  alignas(64) uint32_t buf[kTileRows * 64];
  if (kAcc) {
    _tile_loadd(0, D, ldd);
    if (NC > 1) _tile_loadd(1, D + 16, ldd);
    if (NC > 2) _tile_loadd(2, D + 32, ldd);
    if (NC > 3) _tile_loadd(3, D + 48, ldd);
  } else {
    _tile_zero(0);
    if (NC > 1) _tile_zero(1);
    if (NC > 2) _tile_zero(2);
    if (NC > 3) _tile_zero(3);
  }
  for (int b0 = 0; b0 < kTile / 2; b0 += kTileRows) {
    if (2 * b0 >= c1 || 2 * (b0 + kTileRows) <= c0) continue;
    int64_t ldb;
    const char* v = static_cast<const char*>(v_operand(Vp, ldvp, b0, c0, c1, v0, NC, buf, &ldb));
    _tile_loadd(4, Pb + b0, kPbStride * 4);  // P columns 2 b0 .. 2 b0 + 31
    _tile_loadd(5, v, ldb);
    _tile_dpbf16ps(0, 4, 5);
    if (NC > 1) {
      _tile_loadd(6, v + 64, ldb);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (NC > 2) {
      _tile_loadd(7, v + 128, ldb);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (NC > 3) {
      _tile_loadd(5, v + 192, ldb);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, D, ldd);
  if (NC > 1) _tile_stored(1, D + 16, ldd);
  if (NC > 2) _tile_stored(2, D + 32, ldd);
  if (NC > 3) _tile_stored(3, D + 48, ldd);
}

template <bool kAcc>
void pv_group(float* D, int64_t ldd, const uint32_t* Pb, const uint16_t* Vp, int64_t ldvp, int c0,
              int c1, int v0, int nc) {
  switch (nc) {
    case 1: pv_tiles<1, kAcc>(D, ldd, Pb, Vp, ldvp, c0, c1, v0); break;
    case 2: pv_tiles<2, kAcc>(D, ldd, Pb, Vp, ldvp, c0, c1, v0); break;
    case 3: pv_tiles<3, kAcc>(D, ldd, Pb, Vp, ldvp, c0, c1, v0); break;
    default: pv_tiles<4, kAcc>(D, ldd, Pb, Vp, ldvp, c0, c1, v0); break;
  }
}

// O[r][16 v0 + e] = O[r][16 v0 + e] * alpha[r] + T[r][e], r < n, e < 16 nc.
void combine(float* O, int64_t ldo, const float* T, int n, const float* alpha, int v0, int nc) {
  for (int r = 0; r < n; ++r) {
    float* o = O + r * ldo + 16 * v0;
    const __m512 a = _mm512_set1_ps(alpha[r]);
    for (int c = 0; c < nc; ++c)
      _mm512_storeu_ps(o + 16 * c, _mm512_fmadd_ps(_mm512_loadu_ps(o + 16 * c), a,
                                                    _mm512_load_ps(T + r * 64 + 16 * c)));
  }
}

bool all_one(const float* alpha, int n) {
  for (int r = 0; r < n; ++r)
    if (alpha[r] != 1.f) return false;
  return true;
}

// Per group of 16 rows with key range [c0, c1) (the union of its rows'), per 64 outputs: where
// every alpha is 1 (the softmax keeps its max unless it grows by kMaxSlack) the tiles accumulate
// straight onto O; else P x V goes to T and O = O * alpha + T. S and O rows past `rows` (up to
// the next multiple of 16) hold stale values: they only reach O / T rows that are never read.
void pv_bf16_amx(float* O, int64_t ldo, const float* P, int rows, int cols, const int32_t* first,
                 const int32_t* last, const float* alpha, const uint16_t* Vp, int64_t ldvp,
                 int64_t Dv) {
  const uint32_t* Pb = reinterpret_cast<const uint32_t*>(P);
  alignas(64) float T[kTileRows * 64];
  const int nv = int((Dv + 15) / 16);
  for (int r0 = 0; r0 < rows; r0 += kTileRows) {
    const int n = rows - r0 < kTileRows ? rows - r0 : kTileRows;
    int c0, c1;
    group_cols(first, last, r0, n, cols, &c0, &c1);
    const uint32_t* pb = Pb + r0 * kPbStride;
    float* o = O + r0 * ldo;
    const bool unit = all_one(alpha + r0, n);
    for (int v0 = 0; v0 < nv; v0 += 4) {
      const int nc = nv - v0 < 4 ? nv - v0 : 4;
      if (unit) {
        if (c0 < c1) pv_group<true>(o + 16 * v0, ldo * 4, pb, Vp, ldvp, c0, c1, v0, nc);
      } else {
        pv_group<false>(T, 64 * 4, pb, Vp, ldvp, c0, c1, v0, nc);
        combine(o, ldo, T, n, alpha + r0, v0, nc);
      }
    }
  }
}

Kernels make_amx() {
  Kernels k = *kernels_avx512();
  k.name = "amx";
  k.qk = qk_amx;
  k.softmax = softmax_tile<true>;  // P as bf16 pairs for pv_bf16_amx
  k.pv = nullptr;                  // P is not fp32: only pv_bf16 may follow this softmax
  k.pv_bf16 = pv_bf16_amx;
  k.begin_thread = begin_thread_amx;
  k.end_thread = end_thread_amx;
  k.dp_align = kTileBytes;
  return k;
}

}  // namespace

const Kernels* kernels_amx() {
  static const Kernels k = make_amx();
  return &k;
}

}  // namespace int8
}  // namespace cpu
}  // namespace hk
