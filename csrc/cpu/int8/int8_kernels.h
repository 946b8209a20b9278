// Tile kernels of the CPU INT8 forward (SageAttention-style), one set per instruction set.
//
// The driver (attention_int8.cpp, baseline flags) owns the pattern logic and calls these through
// function pointers, so no ISA-specific code is ever reached without a cpuid check and no inline
// function is shared between translation units built with different flags.
//
// Packed K layout (all ISAs): keys in chunks of kChunk = 16; a chunk holds
// [Dp / 4][16 keys][4 bytes] int8, Dp = D rounded up to Kernels::dp_align (4 unless set), padded
// dims (and padded keys) zero. This is exactly the operand of vpdpbusd for 16 keys (AVX-512) or
// 2 x 8 keys (AVX2), and per 64 dims the B operand of AMX tdpbusd (16 rows of 16 keys x 4 bytes).
// Q rows are packed as u8 (q + 128, i.e. q ^ 0x80), row stride Dp, padded dims 128 (q = 0); the
// +128 bias is removed by starting each accumulator at colcorr[j] = -128 * sum_d k[j][d].
//
// PV precision (all ISAs, SageAttention's contract): P and V are rounded to bf16 (nearest even)
// and their products accumulated in fp32; the softmax sum l uses the unrounded fp32 P. Sets with
// pv_bf16 get V packed as bf16 key pairs; the others (pv) get V rows already rounded to
// bf16-representable fp32 values and round P themselves, which equals the bf16 dot product up to
// summation order (a product of two bf16 values is exact in fp32).
#pragma once
#include <cstdint>

#include "common/attn_params.h"

// Fully unroll the fixed-size register-tile loops early: GCC 12 at -O3 otherwise keeps the
// accumulator arrays in memory and stores them on every iteration of the key loop.
#define HK_INT8_UNROLL _Pragma("GCC unroll 16")

namespace hk {
namespace cpu {
namespace int8 {

constexpr int kChunk = 16;  // keys per packed chunk
constexpr int kTile = 64;   // keys per tile (4 chunks) and query rows per block; S/P row stride

struct Kernels {
  const char* name;
  // S[r][c] = float(colcorr[c] + sum_d qu8[r][d] * k[c][d]) * key_scale[c] * row_scale[r],
  // r < rows, c < 16 * nchunks (nchunks in 1..4; chunks contiguous at k). S has row stride kTile.
  void (*qk)(const uint8_t* qu8, int64_t Dp, int rows, const int8_t* k, int nchunks,
             const int32_t* colcorr, const float* key_scale, const float* row_scale, float* S);
  // Per-element visibility on an edge tile: column c is key kidx[c] with flags kflags[c]
  // (bit 0: real, bit 1: landmark). Row r sees it iff real && ((wlo[r] <= j <= whi[r]) ||
  // (landmark && j <= clim[r])). Invisible entries become -inf. first[r] / last[r] receive the
  // first / last visible column (first > last when none).
  void (*mask)(float* S, int rows, int cols, const int32_t* kidx, const uint8_t* kflags,
               const int64_t* wlo, const int64_t* whi, const int64_t* clim, int32_t* first,
               int32_t* last);
  // Online softmax step in base 2: per row, m_new = max(m, max_c S), S <- exp2(S - m_new),
  // l <- l * alpha + sum, alpha = exp2(m - m_new) (1 when nothing changes; rows whose m_new is
  // -inf get P = 0 and alpha = 1). The AVX-512 softmax keeps m_new = m while max_c S <= m + 8
  // (P <= 2^8, alpha stays 1) and else moves m to the max rounded up to an integer.
  // A set may leave P in S in its own format for its pv_bf16 (the amx set: bf16 pairs in the
  // first half of each row, and pv nullptr); the driver only hands S from one to the other.
  void (*softmax)(float* S, int rows, int cols, float* m, float* l, float* alpha);
  // O[r][:Dv] = O[r][:Dv] * alpha[r] + sum_{c in [first, last]} bf16(P[r][c]) * V[c][:Dv] with
  // the union range over each group of rows (first/last nullptr: all cols). O row stride ldo.
  // V values are bf16-representable (see PV precision above).
  void (*pv)(float* O, int64_t ldo, const float* P, int rows, int cols, const int32_t* first,
             const int32_t* last, const float* alpha, const float* V, int64_t ldv, int64_t Dv);
  // Same as pv for bf16 V (nullptr where the ISA has no bf16 dot product): P is rounded to bf16
  // and multiplied in bf16 pairs, accumulating in fp32. Vp holds V in key pairs:
  // Vp[(c / 2) * ldvp + 2 * d + (c % 2)] = V[c][d], ldvp >= 2 * round_up(Dv, 16), zero padding.
  // Only keys c < cols are read into products (V of the partner of an odd last key may be
  // anything, e.g. the next tile's key).
  void (*pv_bf16)(float* O, int64_t ldo, const float* P, int rows, int cols,
                  const int32_t* first, const int32_t* last, const float* alpha,
                  const uint16_t* Vp, int64_t ldvp, int64_t Dv);
  // Fused quantization (bit-exact with quant.quantize_qk): max_i |x[i] - shift[i]|, and
  // out[i] = round_half_even((x[i] - shift[i]) * inv) saturated to int8; shift nullptr: 0.
  float (*absmax)(const float* x, const float* shift, int64_t n);
  void (*quantize)(const float* x, const float* shift, float inv, int64_t n, int8_t* out);
  // n bf16 (bf16 true) or fp16 values -> fp32 (exact).
  void (*widen)(const uint16_t* src, bool bf16, int64_t n, float* dst);
  // Two fp32 rows -> one bf16 key pair row (round to nearest even): dst[2 d] = a[d],
  // dst[2 d + 1] = b[d] (0 when b is nullptr), d < n. nullptr where pv_bf16 is nullptr.
  void (*pack_pair_bf16)(const float* a, const float* b, int64_t n, uint16_t* dst);
  // Per-thread setup / teardown around a run of tile kernel calls (AMX tile configuration),
  // called by every thread of each parallel region; nullptr: nothing to do.
  void (*begin_thread)();
  void (*end_thread)();
  int dp_align;  // Dp alignment the qk kernel needs (0: 4)
};

namespace {  // internal linkage: each ISA translation unit keeps its own copy

// [c0, c1): the union of the visible column ranges [first[i], last[i]] of rows [r0, r0 + n)
// (first nullptr: all `cols` columns). Empty (c0 >= c1) when no row sees anything.
inline void group_cols(const int32_t* first, const int32_t* last, int r0, int n, int cols, int* c0,
                       int* c1) {
  *c0 = 0;
  *c1 = cols;
  if (!first) return;
  *c0 = cols;
  *c1 = 0;
  for (int i = r0; i < r0 + n; ++i) {
    *c0 = first[i] < *c0 ? first[i] : *c0;
    *c1 = last[i] + 1 > *c1 ? last[i] + 1 : *c1;
  }
}

}  // namespace

const Kernels* kernels_scalar();
const Kernels* kernels_avx2(bool avx_vnni);  // vpdpbusd (VEX) when avx_vnni, else vpmaddwd
const Kernels* kernels_avx512();             // AVX-512 F/BW/VL + VNNI
const Kernels* kernels_amx();                // avx512 plus AMX tiles for QK (int8) and PV (bf16)

// The fused-quantization forward (p.q8 == nullptr) on the forward driver of fwd_driver.h with
// AMX tiles (fwd_int8_amx.cpp): same contract, for Nk > 0 and Dv % 16 == 0; kern is the amx set
// (its quantization rows). attention_forward_int8 takes it when the amx set is selected.
void attention_forward_int8_amx(const AttnInt8Params& p, const Kernels& kern);

}  // namespace int8
}  // namespace cpu
}  // namespace hk
