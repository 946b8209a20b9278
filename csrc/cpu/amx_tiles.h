// AMX tile configuration shared by the amx kernels (include from *_amx.cpp only).
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

}  // namespace cpu
}  // namespace hk
