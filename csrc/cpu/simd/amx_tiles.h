// AMX tile configuration and the tile GEMM (bf16 or int8) shared by the amx kernels (include from
// *_amx.cpp only).
#pragma once
#if !defined(__AMX_TILE__)
#error "amx_tiles.h needs -mamx-tile (include it from *_amx.cpp only)"
#endif
#include <immintrin.h>

#include <cstdint>

namespace hk {
namespace cpu {

// The one tile shape the kernels use: 8 tiles of 16 rows x 64 bytes (a 16 x 16 fp32/int32
// accumulator, a 16 x 32 bf16 or 16 x 64 int8 operand).
struct alignas(64) AmxTileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// A constant in memory: GCC 12 does not see ldtilecfg read its operand and may drop the stores
// that would build the configuration on the stack.
inline constexpr AmxTileConfig kAmxTiles16x64 = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// Loads kAmxTiles16x64 into the calling thread.
inline void amx_configure_16x64() { _tile_loadconfig(&kAmxTiles16x64); }

// Tile configuration is per thread: hold one of these for the body of each parallel region
// (configures on entry when `use`, releases the tile state on exit).
class AmxThreadScope {
 public:
  explicit AmxThreadScope(bool use = true) : on_(use) {
    if (on_) amx_configure_16x64();
  }
  ~AmxThreadScope() {
    if (on_) _tile_release();
  }
  AmxThreadScope(const AmxThreadScope&) = delete;
  AmxThreadScope& operator=(const AmxThreadScope&) = delete;

 private:
  bool on_;
};

#if defined(__AMX_BF16__) && defined(__AMX_INT8__)
// The tile dot product of amx_gemm: bf16 pairs -> fp32 (tdpbf16ps), or signed int8 quads ->
// int32 (tdpbssd).
enum class AmxDot { kBf16, kS8 };

// The tile intrinsics take literal register numbers (they are pasted into the asm).
#define HK_AMX_DOT(OP, C, A, B)   \
  do {                            \
    if constexpr (OP == AmxDot::kBf16) \
      _tile_dpbf16ps(C, A, B);    \
    else                          \
      _tile_dpbssd(C, A, B);      \
  } while (0)

// C rows [0, 16 G) x columns [0, 16 H) (+)= A B over K4 32-bit words (G, H = 1 or 2, see
// amx_gemm). Tiles 0-3: C (16-row group x 16-column half; up to four independent dot chains hide
// the latency), 4-5: A, 6-7: B.
template <AmxDot OP, bool ACC, int G, int H = 2>
inline void amx_block(int64_t K4, const char* a, int64_t sa, const uint32_t* b, int64_t ldb,
                      uint32_t* c, int64_t ldc) {
  const int64_t sb = ldb * 4, sc = ldc * 4;
  if (ACC) {
    _tile_loadd(0, c, sc);
    if constexpr (H == 2) _tile_loadd(1, c + 16, sc);
    if constexpr (G == 2) {
      _tile_loadd(2, c + 16 * ldc, sc);
      if constexpr (H == 2) _tile_loadd(3, c + 16 * ldc + 16, sc);
    }
  } else {
    _tile_zero(0);
    if constexpr (H == 2) _tile_zero(1);
    if constexpr (G == 2) {
      _tile_zero(2);
      if constexpr (H == 2) _tile_zero(3);
    }
  }
  for (int64_t t = 0; t < K4; t += 16) {
    _tile_loadd(4, a + t * 4, sa);
    _tile_loadd(6, b + t * ldb, sb);
    if constexpr (H == 2) _tile_loadd(7, b + t * ldb + 16, sb);
    HK_AMX_DOT(OP, 0, 4, 6);
    if constexpr (H == 2) HK_AMX_DOT(OP, 1, 4, 7);
    if constexpr (G == 2) {
      _tile_loadd(5, a + 16 * sa + t * 4, sa);
      HK_AMX_DOT(OP, 2, 5, 6);
      if constexpr (H == 2) HK_AMX_DOT(OP, 3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if constexpr (H == 2) _tile_stored(1, c + 16, sc);
  if constexpr (G == 2) {
    _tile_stored(2, c + 16 * ldc, sc);
    if constexpr (H == 2) _tile_stored(3, c + 16 * ldc + 16, sc);
  }
}

// C (M x N 32-bit accumulators, row stride ldc) (+)= A B over K4 32-bit words (ACC: add to C,
// else overwrite it): bf16 pairs (the even element in the low half) with fp32 C, or 4 signed
// int8 (the lowest-index one in the low byte) with int32 C. A: M rows of K4 words, row r at
// A + r * a_row_bytes; B: K4 word rows (VNNI layout) of N words, row t at B + t * ldb. M and N
// multiples of 16, K4 of 16. Each C tile accumulates over t in order, so results do not depend
// on M or N.
template <AmxDot OP, bool ACC>
inline void amx_gemm(int64_t M, int64_t N, int64_t K4, const void* A, int64_t a_row_bytes,
                     const uint32_t* B, int64_t ldb, void* C, int64_t ldc) {
  const char* a = static_cast<const char*>(A);
  uint32_t* cw = static_cast<uint32_t*>(C);
  for (int64_t r0 = 0; r0 < M; r0 += 32) {
    const char* ar = a + r0 * a_row_bytes;
    for (int64_t c0 = 0; c0 < N; c0 += 32) {
      uint32_t* c = cw + r0 * ldc + c0;
      const bool rows2 = M - r0 >= 32, cols2 = N - c0 >= 32;
      if (rows2 && cols2)
        amx_block<OP, ACC, 2, 2>(K4, ar, a_row_bytes, B + c0, ldb, c, ldc);
      else if (cols2)
        amx_block<OP, ACC, 1, 2>(K4, ar, a_row_bytes, B + c0, ldb, c, ldc);
      else if (rows2)
        amx_block<OP, ACC, 2, 1>(K4, ar, a_row_bytes, B + c0, ldb, c, ldc);
      else
        amx_block<OP, ACC, 1, 1>(K4, ar, a_row_bytes, B + c0, ldb, c, ldc);
    }
  }
}

#undef HK_AMX_DOT

// amx_gemm on bf16 pairs (K2 pair words) into fp32 C.
template <bool ACC>
inline void amx_gemm_bf16(int64_t M, int64_t N, int64_t K2, const void* A, int64_t a_row_bytes,
                          const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  amx_gemm<AmxDot::kBf16, ACC>(M, N, K2, A, a_row_bytes, B, ldb, C, ldc);
}
#endif

}  // namespace cpu
}  // namespace hk
