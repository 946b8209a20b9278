// AMX tile configuration shared by the amx kernels (include from *_amx.cpp only).
#pragma once
#if !defined(__AMX_TILE__)
#error "amx_tiles.h needs -mamx-tile (include it from *_amx.cpp only)"
#endif
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace hk {
namespace cpu {

// Loads the one tile shape the kernels use, 8 tiles of 16 rows x 64 bytes (a 16 x 16 fp32/int32
// accumulator, a 16 x 32 bf16 / 16 x 64 int8 operand), into the calling thread.
inline void amx_configure_16x64() {
  struct alignas(64) {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

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
