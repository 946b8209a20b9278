// Part of the CPU attention backward (see bwd_kernel_impl.h, which includes this file inside
// the per-ISA namespace): key tiles, their per-row visibility masks, packing and the flush of
// their dK / dV into the outputs.

// ------------------------------------------------------------------------- visibility masks
// Bits a..b (inclusive) of a 64-bit mask, clipped to [0, 63].
static inline uint64_t bit_range(int64_t a, int64_t b) {
  if (a < 0) a = 0;
  if (b > 63) b = 63;
  if (a > b) return 0;
  const uint64_t upto_b = b == 63 ? ~uint64_t(0) : ((uint64_t(1) << (b + 1)) - 1);
  return upto_b & ~((uint64_t(1) << a) - 1);
}

// A packed tile of up to 64 keys: either contiguous [j0, j0 + nt) or gathered (sorted) positions.
struct Tile {
  float* K;      // nt x Dp, row-major (rows of k in fp32, zero-padded columns)
  float* Kt;     // D x 64 (k transposed)
  float* Vt;     // Dv x 64 (v transposed)
  float* dK;     // 64 x Dp accumulated gradient, flushed into dk
  float* dV;     // 64 x Dvp
  int64_t* keys; // 64 key positions
  // bf16 pair operands (bwd_bf16_impl.h), only with Ctx::bf16
  // (K, Kt and Vt are not allocated then.)
  uint32_t* Ktp = nullptr;  // ceil(D/2) x 64: (k[j][2t], k[j][2t+1])
  uint32_t* Vtp = nullptr;  // ceil(Dv/2) x 64
  uint32_t* Kpk = nullptr;  // 32 x Dp: (k[2t][d], k[2t+1][d])
  int64_t tile = -1;   // ring tag: aligned tile index, -1 = empty
  int64_t nt = 0;
  bool gathered = false;
  bool fresh = true;       // dK / dV not written yet
  uint64_t lm_bits = 0;    // keys that are landmarks
  uint64_t real_bits = 0;  // keys that exist and are not padding
  uint64_t hidden = 0;     // gathered keys the current block reaches through its band instead
};

enum class RowMode { kRegular, kLandmark };

// The static description of one work item's problem, shared by the helpers below.
struct Ctx {
  const AttnBwdParams* p;
  int64_t b, hk, group, off, D, Dv, Dp, Dvp;
  const int32_t* lm;        // landmarks of batch b (G entries) or nullptr
  int64_t G;
  const uint8_t* lm_flags;  // (Nk) for batch b or nullptr
  const uint8_t* pad;       // (Nk) for batch b or nullptr
  float* dk;                // (Nk, D) gradient accumulator of this item (output or a partial)
  float* dv;                // (Nk, Dv)
  uint8_t* written;         // (Nk) key j: 0 never flushed, 1 in dk / dv (fp32), 2 final in dk_lp / dv_lp
  // Rounded gradients written at flush (see run_item): the item's dk_lp / dv_lp rows, nullptr: no.
  uint16_t* dk_lp = nullptr;
  uint16_t* dv_lp = nullptr;
  bool bf16 = false;        // bf16 inputs on an AVX-512 BF16 build: products on vdpbf16ps
  bool amx = false;         // bf16 on an AMX build, D and Dv multiples of 32: products on tiles
  // Score modifiers (softmax_ds_mods in bwd_kernel_impl.h); mods also when only dbias is asked.
  bool mods = false;
  float cap = 0.f;              // softcap, 0: none
  int64_t L = 0;                // Nq + Nk - 1: length of a bias / dbias row
  const float* bias = nullptr;  // bias rows of the heads processed (group), nullptr: none
  float* dbias = nullptr;       // their dbias accumulators (this work unit's), nullptr: none
};

static inline bool row_is_landmark(const Ctx& c, int64_t r) {
  return c.lm_flags != nullptr && r >= 0 && r < c.p->fwd.Nk && c.lm_flags[r] != 0;
}

// Visible keys of the tile for aligned query row r.
static inline uint64_t row_mask(const Ctx& c, const Tile& t, int64_t r, RowMode mode) {
  const AttnParams& f = c.p->fwd;
  uint64_t vis;
  if (mode == RowMode::kLandmark) {
    vis = ~uint64_t(0);
  } else if (t.gathered) {
    vis = t.lm_bits & ~t.hidden;  // gathered keys are landmarks outside the band: never in the window
  } else {
    const int64_t j0 = t.keys[0];
    const int64_t lo = f.window_left < 0 ? 0 : r - f.window_left - j0;
    const int64_t hi = f.window_right < 0 ? 63 : r + f.window_right - j0;
    vis = bit_range(lo, hi) | t.lm_bits;
  }
  if (f.causal) {
    if (t.gathered) {
      int64_t n = 0;  // keys are sorted: those <= r form a prefix
      while (n < t.nt && t.keys[n] <= r) ++n;
      vis &= bit_range(0, n - 1);
    } else {
      vis &= bit_range(0, r - t.keys[0]);
    }
  }
  return vis & t.real_bits;
}

// ------------------------------------------------------------------------- packing
static void pack_keys_bf16(const Ctx& c, Tile& t);  // bwd_bf16_impl.h (a no-op stub without it)

// K, Kt, Vt in fp32 for the fp32 GEMMs.
static void pack_keys_f32(const Ctx& c, Tile& t) {
  const AttnParams& f = c.p->fwd;
  const int64_t kb = c.b * f.k_stride[0] + c.hk * f.k_stride[1];
  const int64_t vb = c.b * f.v_stride[0] + c.hk * f.v_stride[1];
  float vrow[1024];  // bf16 / fp16 rows are converted here; fp32 rows are read in place
  for (int64_t jj = 0; jj < t.nt; ++jj) {
    const int64_t j = t.keys[jj];
    float* krow = t.K + jj * c.Dp;
    load_row(f.k, f.dtype, kb + j * f.k_stride[2], c.D, krow);
    for (int64_t d = 0; d < c.D; ++d) t.Kt[d * kKeys + jj] = krow[d];
    for (int64_t d0 = 0; d0 < c.Dv; d0 += 1024) {
      const int64_t n = imin(1024, c.Dv - d0);
      const int64_t off = vb + j * f.v_stride[2] + d0;
      const float* src = vrow;
      if (f.dtype == DType::F32) {
        src = static_cast<const float*>(f.v) + off;
      } else {
        load_row(f.v, f.dtype, off, n, vrow);
      }
      for (int64_t d = 0; d < n; ++d) t.Vt[(d0 + d) * kKeys + jj] = src[d];
    }
  }
  for (int64_t jj = t.nt; jj < kKeys; ++jj) {  // keep the unused columns finite
    for (int64_t d = 0; d < c.D; ++d) t.Kt[d * kKeys + jj] = 0.f;
    for (int64_t d = 0; d < c.Dv; ++d) t.Vt[d * kKeys + jj] = 0.f;
  }
}

static void pack_keys(const Ctx& c, Tile& t) {
  if (c.bf16) {
    pack_keys_bf16(c, t);
  } else {
    pack_keys_f32(c, t);
  }
  t.lm_bits = 0;
  t.real_bits = 0;
  for (int64_t jj = 0; jj < t.nt; ++jj) {
    const int64_t j = t.keys[jj];
    if (c.lm_flags != nullptr && c.lm_flags[j]) t.lm_bits |= uint64_t(1) << jj;
    if (c.pad == nullptr || c.pad[j]) t.real_bits |= uint64_t(1) << jj;
  }
  t.fresh = true;  // dK / dV hold garbage until the first product is stored (not added)
  t.hidden = 0;
}

static void pack_contiguous(const Ctx& c, Tile& t, int64_t tile_index) {
  const int64_t j0 = tile_index * kKeys;
  t.tile = tile_index;
  t.gathered = false;
  t.nt = imin(kKeys, c.p->fwd.Nk - j0);
  for (int64_t jj = 0; jj < t.nt; ++jj) t.keys[jj] = j0 + jj;
  pack_keys(c, t);
}

// Adds the tile's accumulated dK / dV into the (fp32, contiguous) outputs; a key's first flush
// stores (dk / dv are not zeroed beforehand: finish_keys clears the keys no flush reached).
static void flush(const Ctx& c, Tile& t) {
  if (t.fresh) {  // no visible pair touched the tile
    t.tile = -1;
    return;
  }
  for (int64_t jj = 0; jj < t.nt; ++jj) {
    const int64_t j = t.keys[jj];
    const float* sk = t.dK + jj * c.Dp;
    const float* sv = t.dV + jj * c.Dvp;
    if (c.dk_lp != nullptr && !t.gathered && !row_is_landmark(c, j)) {
      // A contiguous tile's keys that are not landmarks are final at its one flush.
      const AttnBwdParams& p = *c.p;
      store_row_lp(sk, p.grad_dtype, c.D, c.dk_lp + j * c.D, stream_grads(p));
      store_row_lp(sv, p.grad_dtype, c.Dv, c.dv_lp + j * c.Dv, stream_grads(p));
      c.written[j] = 2;
      continue;
    }
    float* ok = c.dk + j * c.D;
    float* ov = c.dv + j * c.Dv;
    if (c.written[j]) {
      for (int64_t d = 0; d < c.D; ++d) ok[d] += sk[d];
      for (int64_t d = 0; d < c.Dv; ++d) ov[d] += sv[d];
    } else {
      std::memcpy(ok, sk, sizeof(float) * c.D);
      std::memcpy(ov, sv, sizeof(float) * c.Dv);
      c.written[j] = 1;
    }
  }
  t.tile = -1;
}

// dK / dV rows of the keys no flush reached: zero (no visible query, padding). With dk_lp (the
// flushes wrote final keys rounded), also the rounded rows of the keys still in fp32 and zeros.
static void finish_keys(const Ctx& c, int64_t Nk) {
  const AttnBwdParams& p = *c.p;
  for (int64_t j = 0; j < Nk; ++j) {
    if (c.written[j] == 2) continue;
    if (c.dk_lp == nullptr) {
      if (c.written[j] == 0) {
        std::memset(c.dk + j * c.D, 0, sizeof(float) * c.D);
        std::memset(c.dv + j * c.Dv, 0, sizeof(float) * c.Dv);
      }
    } else if (c.written[j] == 0) {  // +0 in bf16 and fp16 alike
      std::memset(c.dk_lp + j * c.D, 0, sizeof(uint16_t) * c.D);
      std::memset(c.dv_lp + j * c.Dv, 0, sizeof(uint16_t) * c.Dv);
    } else {
      store_row_lp(c.dk + j * c.D, p.grad_dtype, c.D, c.dk_lp + j * c.D);
      store_row_lp(c.dv + j * c.Dv, p.grad_dtype, c.Dv, c.dv_lp + j * c.Dv);
    }
  }
}
