// The CPU attention backward (FlashAttention-2 style recomputation), written once and compiled
// per instruction set. Include this file INSIDE a per-ISA namespace (hk::cpu::bwd_<isa>) after
// defining `struct Vec` there, and after including <cstdint>, <cstring>, <cstdlib>, <cmath>,
// <new>, <omp.h> (if _OPENMP), "common/attn_params.h" and "common/pattern.h". Keeping every
// helper in that namespace stops the linker from merging code built for different ISAs.
// Parts: bwd_gemm_impl.h (helpers, conversion, GEMM micro-kernels), bwd_tile_impl.h (key
// tiles: masks, packing, flush), this file (query blocks, the tile step, the drivers); with bf16
// inputs the tile step is bwd_bf16_impl.h (vdpbf16ps) or, in AMX builds, bwd_amx_impl.h (tiles).
//
// Vec provides: W (lanes), MR / NVMAX (register tile: MR rows x NVMAX vectors), type R and
//   zero, load, store, set1, fma(a, b, c) = a*b + c, sub, mul, exp, maskz(lane_bits, v).
//
// Algorithm, per work item (b, kv head), run by one thread so dK/dV need no locks:
//   for each block of 64 query rows (landmark query rows are masked out here):
//     for each 64-key tile of the window band (tiles aligned to multiples of 64, packed into a
//     ring buffer that slides with the band, see kRingBytes) and each gathered tile of landmark
//     keys outside the band, for each q head of the GQA group:
//       S = Q K^T, dP = dO V^T, P = exp(scale*S - lse) on visible pairs, dS = scale*P*(dP - Delta)
//       dV_tile += P^T dO, dK_tile += dS^T Q, dQ_block += dS K
//   then landmark query rows (which see every key) in batches of up to 64 rows over all tiles.
// Score modifiers (softcap, offset bias) and dbias: in the softmax step (softmax_ds), for the
// fp32 and the bf16 products alike (never the AMX tile step); dbias partials live per
// work unit and are summed in unit order at the end.
// With fewer items than threads, an item's query blocks are split into ranges with private
// dK/dV partials summed in a fixed order. Every summation order depends only on the shapes and
// the thread count, so two runs are bit-identical.
// Visibility inside a tile is exact: one 64-bit key mask per query row built from pattern.h's
// rules, so every visible (query, key) pair is visited exactly once.

#include "cpu/backward/bwd_gemm_impl.h"
#include "cpu/backward/bwd_tile_impl.h"

// ------------------------------------------------------------------------- query side
// Per q head of the group: the current block's rows in fp32 plus their dQ accumulator.
struct HeadBlock {
  float* Q;      // 64 x Dp
  float* dO;     // 64 x Dvp
  float* dQ;     // 64 x Dp
  float* lse;    // 64
  float* delta;  // 64, rowsum(dO * O)
  uint8_t* valid;  // 64: row takes part (finite lse; regular mode: not a landmark row)
  bool any;
  // bf16 pair operands (bwd_bf16_impl.h), only with Ctx::bf16
  uint32_t* Qb = nullptr;   // 64 x Dp/2: rows of Q as bf16
  uint32_t* dOb = nullptr;  // 64 x Dvp/2
  uint32_t* Qp = nullptr;   // 32 x Dp: pairs of rows
  uint32_t* dOp = nullptr;  // 32 x Dvp
};

struct Rows {
  int64_t n = 0;
  int64_t i[kRows];  // query indices
  int64_t r[kRows];  // aligned positions i + Nk - Nq
};

// sum_d a[d] * b[d] in Vec::W lanes, then the lanes added pairwise (a fixed order; one fp32 chain
// would serialize on the add latency).
static inline float dot_f32(const float* a, const float* b, int64_t n) {
  typename Vec::R acc = Vec::zero();
  int64_t d = 0;
  for (; d + Vec::W <= n; d += Vec::W) acc = Vec::fma(Vec::load(a + d), Vec::load(b + d), acc);
  float lanes[Vec::W];
  Vec::store(lanes, acc);
  for (; d < n; ++d) lanes[0] += a[d] * b[d];
  for (int w = Vec::W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  return lanes[0];
}

static void load_head_block(const Ctx& c, int64_t h, const Rows& rows, RowMode mode,
                            HeadBlock& hb, float* scratch /* Dvp floats */) {
  const AttnBwdParams& p = *c.p;
  const AttnParams& f = p.fwd;
  const int64_t qb = c.b * f.q_stride[0] + h * f.q_stride[1];
  const int64_t ob = c.b * f.o_stride[0] + h * f.o_stride[1];
  const int64_t gb = c.b * p.dout_stride[0] + h * p.dout_stride[1];
  const float* lse = f.lse + (c.b * f.Hq + h) * f.Nq;
  hb.any = false;
  for (int64_t x = 0; x < rows.n; ++x) {
    const int64_t i = rows.i[x];
    float* dO = hb.dO + x * c.Dvp;
    load_row(f.q, f.dtype, qb + i * f.q_stride[2], c.D, hb.Q + x * c.Dp);
    load_row(p.dout, f.dtype, gb + i * p.dout_stride[2], c.Dv, dO);
    load_row(f.o, f.dtype, ob + i * f.o_stride[2], c.Dv, scratch);
    hb.delta[x] = dot_f32(dO, scratch, c.Dv);
    hb.lse[x] = lse[i];
    bool ok = lse[i] > -INFINITY && lse[i] < INFINITY;  // false for -inf (row saw nothing), NaN
    if (mode == RowMode::kRegular && row_is_landmark(c, rows.r[x])) ok = false;
    hb.valid[x] = ok;
    hb.any |= ok;
  }
  zero_f32(hb.dQ, kRows * c.Dp);
}

// Landmark query rows are written by the landmark pass only (it may run on another thread).
static void store_head_block(const Ctx& c, int64_t h, const Rows& rows, RowMode mode,
                             const HeadBlock& hb) {
  const AttnBwdParams& p = *c.p;
  const int64_t head = (c.b * p.fwd.Hq + h) * p.fwd.Nq * c.D;
  for (int64_t x = 0; x < rows.n; ++x) {
    if (mode != RowMode::kLandmark && row_is_landmark(c, rows.r[x])) continue;
    if (p.grad_dtype != DType::F32)
      store_row_lp(hb.dQ + x * c.Dp, p.grad_dtype, c.D, p.dq_lp + head + rows.i[x] * c.D,
                   stream_grads(p));
    else
      copy_f32(p.dq + head + rows.i[x] * c.D, hb.dQ + x * c.Dp, c.D);
  }
}

// ------------------------------------------------------------------------- the tile step
struct Scratch {
  float* S;        // 64 x 64: scores, then P
  float* dP;       // 64 x 64: dO V^T, then dS (scale folded in)
  uint64_t* mask;  // 64 row masks
  // bf16 operands (bwd_bf16_impl.h), only with Ctx::bf16
  uint32_t* Pt = nullptr;   // 32 x 64: P^T as pairs of rows
  uint32_t* dSt = nullptr;  // 32 x 64: dS^T as pairs of rows
  uint32_t* dSb = nullptr;  // 64 x 32: rows of dS as bf16
  // AMX A operands (bwd_amx_impl.h), only with Ctx::amx
  uint32_t* PtA = nullptr;   // 64 x 32: rows of P^T (keys), pairs of query rows
  uint32_t* dStA = nullptr;  // 64 x 32: rows of dS^T
  // Score modifiers (softmax_ds), only with Ctx::mods
  float* brow = nullptr;  // 64: bias of one row's keys
  float* dsr = nullptr;   // 64: one row's dS before the scale and the softcap factor
};

// The softmax step of a tile, with or without score modifiers, shared by the fp32 and the bf16
// tile steps.
// In: S = Q K^T (unscaled) and dP = dO V^T on mq rows x ncols keys of tile t, for head g of the
// chunk (Ctx::bias / dbias rows). With s = scale * S, the modified score
//   s' = cap * tanh(s / cap) (cap > 0) + bias[g, (key - r) + Nk - 1],
// P = exp(s' - lse) and dS = P * (dP - Delta) on the visible pairs:
// Out: S = P, dP = dS * scale * (1 - tanh^2) (the gradient to s), both zero on hidden pairs, and
// dS added to the head's dbias by offset (row by row in key order: deterministic).
static void softmax_ds(const Ctx& c, const Tile& t, const Rows& rows, int64_t mq,
                       int64_t ncols, int64_t g, const HeadBlock& hb, Scratch& s) {
  using R = typename Vec::R;
  using Simd = typename Vec::Simd;
  const int64_t lanes = Vec::W, nk1 = c.p->fwd.Nk - 1;
  const uint64_t lane_all = lanes == 64 ? ~uint64_t(0) : ((uint64_t(1) << lanes) - 1);
  const float scale = c.p->fwd.scale;
  const bool capped = c.cap > 0.f;
  const R vscale = Vec::set1(scale), one = Vec::set1(1.f);
  const R vcap = Vec::set1(c.cap), vicap = Vec::set1(capped ? 1.f / c.cap : 0.f);
  const float* bias = c.bias != nullptr ? c.bias + g * c.L : nullptr;
  float* dbias = c.dbias != nullptr ? c.dbias + g * c.L : nullptr;
  for (int64_t x = 0; x < mq; ++x) {
    float* Srow = s.S + x * kKeys;
    float* dProw = s.dP + x * kKeys;
    const uint64_t m = s.mask[x];
    if (m == 0) {
      zero_f32(Srow, ncols);
      zero_f32(dProw, ncols);
      continue;
    }
    const int64_t o0 = nk1 - rows.r[x];  // offset index of key j: j + o0
    // A whole contiguous tile reads its biases (and adds its dbias) in place: offsets
    // t.keys[0] + o0 + jj; otherwise one key at a time through brow / dsr.
    const bool direct = !t.gathered && t.nt == ncols;
    const float* brow = direct && bias != nullptr ? bias + t.keys[0] + o0 : s.brow;
    if (bias != nullptr && !direct) {
      for (int64_t jj = 0; jj < t.nt; ++jj) s.brow[jj] = bias[t.keys[jj] + o0];
      for (int64_t jj = t.nt; jj < ncols; ++jj) s.brow[jj] = 0.f;
    }
    const R neg_lse = Vec::set1(-hb.lse[x]);
    const R delta = Vec::set1(hb.delta[x]);
    for (int64_t j = 0; j < ncols; j += lanes) {
      const unsigned bits = static_cast<unsigned>((m >> j) & lane_all);
      R x_, fac = vscale;
      if (!capped && bias == nullptr) {
        x_ = Vec::fma(Vec::load(Srow + j), vscale, neg_lse);
      } else {
        R sv = Vec::mul(Vec::load(Srow + j), vscale);
        if (capped) {
          const R th = Simd::tanh(Vec::mul(sv, vicap));
          sv = Vec::mul(vcap, th);
          fac = Vec::mul(vscale, Vec::sub(one, Vec::mul(th, th)));
        }
        if (bias != nullptr) sv = Simd::add(sv, Vec::load(brow + j));
        x_ = Simd::add(sv, neg_lse);
      }
      const R pv = Vec::maskz(bits, Vec::exp(x_));
      const R ds = Vec::maskz(bits, Vec::mul(pv, Vec::sub(Vec::load(dProw + j), delta)));
      Vec::store(Srow + j, pv);
      if (dbias != nullptr && direct) {  // hidden pairs add +0
        float* db = dbias + t.keys[0] + o0 + j;
        Vec::store(db, Simd::add(Vec::load(db), ds));
      } else if (dbias != nullptr) {
        Vec::store(s.dsr + j, ds);
      }
      Vec::store(dProw + j, Vec::maskz(bits, Vec::mul(ds, fac)));
    }
    if (dbias != nullptr && !direct)
      for (int64_t jj = 0; jj < t.nt; ++jj)
        if ((m >> jj) & 1) dbias[t.keys[jj] + o0] += s.dsr[jj];
  }
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#include "cpu/backward/bwd_bf16_impl.h"
#else
constexpr bool kBf16Dot = false;
static void pack_keys_bf16(const Ctx&, Tile&) {}
static void pack_head_bf16(const Ctx&, const Rows&, HeadBlock&) {}
static void tile_step_bf16(const Ctx&, Tile&, const Rows&, int64_t, int64_t, int64_t, HeadBlock&,
                           Scratch&) {}
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#include "cpu/backward/bwd_amx_impl.h"
#else
constexpr bool kAmx = false;
struct AmxThreadScope {
  explicit AmxThreadScope(bool) {}
};
static void tile_step_amx(const Ctx&, Tile&, int64_t, HeadBlock&, Scratch&) {}
#endif

static void process_tile(const Ctx& c, Tile& t, const Rows& rows, RowMode mode, HeadBlock* heads,
                         Scratch& s) {
  const int64_t mq = rows.n, nt = t.nt, ncols = round_up(nt, Vec::W);
  for (int64_t g = 0; g < c.group; ++g) {
    HeadBlock& hb = heads[g];
    if (!hb.any) continue;
    uint64_t any = 0;
    for (int64_t x = 0; x < mq; ++x) {
      s.mask[x] = hb.valid[x] ? row_mask(c, t, rows.r[x], mode) : 0;
      any |= s.mask[x];
    }
    if (any == 0) continue;
    if (c.amx) {
      tile_step_amx(c, t, mq, hb, s);
      continue;
    }
    if (c.bf16) {
      tile_step_bf16(c, t, rows, g, mq, ncols, hb, s);
      continue;
    }
    gemm<false>(mq, ncols, c.D, hb.Q, c.Dp, 1, t.Kt, kKeys, s.S, kKeys);
    gemm<false>(mq, ncols, c.Dv, hb.dO, c.Dvp, 1, t.Vt, kKeys, s.dP, kKeys);
    softmax_ds(c, t, rows, mq, ncols, g, hb, s);
    if (t.fresh) {  // first product into this tile: store instead of zero-fill + add
      gemm<false>(nt, c.Dvp, mq, s.S, 1, kKeys, hb.dO, c.Dvp, t.dV, c.Dvp);  // dV = P^T dO
      gemm<false>(nt, c.Dp, mq, s.dP, 1, kKeys, hb.Q, c.Dp, t.dK, c.Dp);     // dK = dS^T Q
      t.fresh = false;
    } else {
      gemm<true>(nt, c.Dvp, mq, s.S, 1, kKeys, hb.dO, c.Dvp, t.dV, c.Dvp);   // dV += P^T dO
      gemm<true>(nt, c.Dp, mq, s.dP, 1, kKeys, hb.Q, c.Dp, t.dK, c.Dp);      // dK += dS^T Q
    }
    gemm<true>(mq, c.Dp, nt, s.dP, kKeys, 1, t.K, c.Dp, hb.dQ, c.Dp);      // dQ += dS K
  }
}

// ------------------------------------------------------------------------- workspace
struct Layout {
  int64_t ring = 0;  // ring slots
  int64_t tile_floats = 0, head_floats = 0, floats = 0, bytes = 0;
};

static int64_t ring_slots(const AttnParams& f) {
  int64_t ring = 1;
  const int64_t off = f.Nk - f.Nq;
  for (int64_t i0 = 0; i0 < f.Nq; i0 += kRows) {
    const int64_t r0 = i0 + off, r1 = imin(i0 + kRows, f.Nq) + off;
    const KeyRange band = window_band(r0, r1, f.Nk, f.window_left, f.window_right, f.causal);
    if (band.hi > band.lo) ring = imax(ring, (band.hi - 1) / kKeys + 1 - band.lo / kKeys);
  }
  return ring;
}

// A ring smaller than the band stays correct (an evicted tile is flushed and, if needed again,
// repacked with fresh accumulators); it only costs repacking. Wide / unlimited windows are capped
// at this many bytes per thread instead of holding every key.
constexpr int64_t kRingBytes = int64_t(16) << 20;

static bool use_bf16_dot(const AttnParams& f) { return kBf16Dot && f.dtype == DType::BF16; }

// The AMX tiles reduce over whole 32-element chunks of d and e (no padding of the inputs).
static bool use_amx(const AttnParams& f) {
  return kAmx && use_bf16_dot(f) && f.D % 32 == 0 && f.Dv % 32 == 0;
}

static Layout make_layout(const AttnParams& f, int64_t Dp, int64_t Dvp) {
  Layout L;
  const int64_t a = 16;  // keep every array 64-byte aligned
  const bool bf16 = use_bf16_dot(f);
  L.tile_floats = round_up(kKeys * Dp, a) + round_up(kKeys * Dvp, a) + 2 * kKeys /* keys */;
  if (bf16) {
    L.tile_floats += Dp / 2 * kKeys + Dvp / 2 * kKeys + kKeys / 2 * Dp;
  } else {
    L.tile_floats += round_up(kKeys * Dp, a) + round_up(f.D * kKeys, a) + round_up(f.Dv * kKeys, a);
  }
  L.ring = imin(ring_slots(f), imax(2, kRingBytes / (L.tile_floats * 4)));
  L.head_floats = round_up(kRows * Dp, a) * 2 + round_up(kRows * Dvp, a) + 3 * kRows;
  if (bf16) L.head_floats += 2 * (kRows / 2 * Dp + kRows / 2 * Dvp);
  const int64_t heads = imin(f.Hq / f.Hk, 64);  // run_item handles the group 64 heads at a time
  // With landmarks, a second set of head blocks holds the landmark query rows.
  const int64_t head_sets = f.num_landmarks > 0 ? 2 : 1;
  // The ring, a tile for gathered or one-off keys, and with landmarks the item's landmark keys.
  const int64_t tiles = L.ring + (f.num_landmarks > 0 ? 2 : 1);
  L.floats = tiles * L.tile_floats + head_sets * heads * L.head_floats + 2 * kRows * kKeys +
             2 * kRows /* masks */ + 2 * kKeys /* brow, dsr */ + round_up(Dvp, a) +
             (bf16 ? 3 * kRows * kKeys / 2 : 0) +
             (use_amx(f) ? 2 * kRows * kKeys / 2 : 0) + round_up(f.Nk, 64) / 4 /* written */ +
             round_up((f.Nk + kKeys - 1) / kKeys, 64) / 4 /* tile_done */;
  L.bytes = round_up(L.floats * 4, 64);
  return L;
}

struct Arena {
  float* cur;
  float* take(int64_t n) {
    float* r = cur;
    cur += round_up(n, 16);
    return r;
  }
};

static uint32_t* take_u32(Arena& a, int64_t n) { return reinterpret_cast<uint32_t*>(a.take(n)); }

static Tile carve_tile(Arena& a, int64_t D, int64_t Dv, int64_t Dp, int64_t Dvp, bool bf16) {
  Tile t;
  t.dK = a.take(kKeys * Dp);
  t.dV = a.take(kKeys * Dvp);
  t.keys = reinterpret_cast<int64_t*>(a.take(2 * kKeys));
  if (bf16) {  // the bf16 products read only the pair operands
    t.K = t.Kt = t.Vt = nullptr;
    t.Ktp = take_u32(a, Dp / 2 * kKeys);
    t.Vtp = take_u32(a, Dvp / 2 * kKeys);
    t.Kpk = take_u32(a, kKeys / 2 * Dp);
  } else {
    t.K = a.take(kKeys * Dp);
    t.Kt = a.take(D * kKeys);
    t.Vt = a.take(Dv * kKeys);
  }
  return t;
}

// Whether batch c.b's landmark query rows (the landmarks in [0, Nq) as rows) fit one block of
// kRows (then run_item runs them along the band pass); true without landmarks.
static bool landmark_rows_in_one_block(const Ctx& c) {
  int64_t n = 0;
  for (int64_t x = 0; x < c.G; ++x) {
    const int64_t i = c.lm[x] - c.off;
    n += i >= 0 && i < c.p->fwd.Nq;
  }
  return n <= kRows;
}

// A head block's arrays from the arena (see make_layout's head_floats).
static void carve_head(Arena& a, const Ctx& c, HeadBlock& hb) {
  hb.Q = a.take(kRows * c.Dp);
  hb.dQ = a.take(kRows * c.Dp);
  hb.dO = a.take(kRows * c.Dvp);
  hb.lse = a.take(kRows);
  hb.delta = a.take(kRows);
  hb.valid = reinterpret_cast<uint8_t*>(a.take(kRows));
  if (c.bf16) {
    hb.Qb = take_u32(a, kRows / 2 * c.Dp);
    hb.dOb = take_u32(a, kRows / 2 * c.Dvp);
    hb.Qp = take_u32(a, kRows / 2 * c.Dp);
    hb.dOp = take_u32(a, kRows / 2 * c.Dvp);
  }
}

static bool any_head(const HeadBlock* heads, int64_t ng) {
  for (int64_t g = 0; g < ng; ++g)
    if (heads[g].any) return true;
  return false;
}

// The landmark query rows of landmarks [x, ...) that lie in [0, Nq), up to kRows of them, into
// rows and (for heads h0 .. h0 + ng) hbs; returns the index of the first landmark not taken.
static int64_t load_landmark_rows(const Ctx& c, int64_t h0, int64_t ng, int64_t x, Rows& rows,
                                  HeadBlock* hbs, float* orow) {
  const AttnParams& f = c.p->fwd;
  rows.n = 0;
  for (; x < c.G && rows.n < kRows; ++x) {
    const int64_t i = c.lm[x] - c.off;
    if (i < 0 || i >= f.Nq) continue;
    rows.i[rows.n] = i;
    rows.r[rows.n] = c.lm[x];
    ++rows.n;
  }
  for (int64_t g = 0; g < ng; ++g) {
    load_head_block(c, h0 + g, rows, RowMode::kLandmark, hbs[g], orow);
    if (c.bf16) pack_head_bf16(c, rows, hbs[g]);
  }
  return x;
}

// ------------------------------------------------------------------------- one work item
// One unit of work: query blocks [blk0, blk1) of item (b, kv head hk), plus the landmark query
// rows if `landmark_rows`; dK / dV go to dk / dv ((Nk, D) / (Nk, Dv), every row written here).
// With score modifiers, dbias ((Hq / Hk) rows of Nq + Nk - 1, zeroed here, or nullptr) gets this
// unit's share of the dbias of the item's q heads.
// With `final_lp` (bf16 / fp16 gradients, one unit per item, the whole group at once and a ring
// that holds every block's band) a contiguous tile's flush is the last word on its keys that are
// not landmarks, once the landmark rows ride along the band pass: those keys are rounded into
// dk_lp / dv_lp right there, and only the rest go through the fp32 accumulators. Returns whether
// the item's rounded dK / dV are written.
static bool run_item(const AttnBwdParams& p, int64_t b, int64_t hk, int64_t blk0, int64_t blk1,
                     bool landmark_rows, float* dk, float* dv, float* dbias, const Layout& L,
                     float* mem, Tile* ring, bool final_lp) {
  const AttnParams& f = p.fwd;
  Ctx c;
  c.p = &p;
  c.b = b;
  c.hk = hk;
  c.group = f.Hq / f.Hk;
  c.off = f.Nk - f.Nq;
  c.D = f.D;
  c.Dv = f.Dv;
  c.Dp = round_up(f.D, 16);
  c.Dvp = round_up(f.Dv, 16);
  c.G = f.landmarks != nullptr ? f.num_landmarks : 0;
  c.lm = c.G > 0 ? f.landmarks + b * f.landmarks_batch_stride : nullptr;
  c.lm_flags = c.G > 0 ? f.landmark_flags + b * f.landmark_flags_batch_stride : nullptr;
  c.pad = f.key_padding != nullptr ? f.key_padding + b * f.Nk : nullptr;
  c.dk = dk;
  c.dv = dv;
  c.bf16 = use_bf16_dot(f);
  c.mods = has_score_mods(p);
  c.amx = use_amx(f) && !c.mods;
  c.cap = f.softcap > 0.f ? f.softcap : 0.f;
  c.L = f.Nq + f.Nk - 1;
  c.bias = f.bias != nullptr ? f.bias + hk * c.group * c.L : nullptr;
  c.dbias = dbias;
  if (dbias != nullptr && c.L > 0) std::memset(dbias, 0, sizeof(float) * c.group * c.L);

  Arena a{mem};
  for (int64_t s = 0; s < L.ring; ++s) {
    new (&ring[s]) Tile(carve_tile(a, c.D, c.Dv, c.Dp, c.Dvp, c.bf16));
  }
  Tile gather = carve_tile(a, c.D, c.Dv, c.Dp, c.Dvp, c.bf16);
  // The item's landmark keys (at most kKeys of them, not padding), packed once: every block takes
  // those its band does not reach from this one tile (Tile::hidden leaves out the others), and
  // their dK / dV gather here over the whole item, flushed once at its end. More landmarks are
  // gathered per block, kKeys at a time.
  Tile lm_keys;
  bool lm_keys_packed = false;
  if (c.G > 0) {
    lm_keys = carve_tile(a, c.D, c.Dv, c.Dp, c.Dvp, c.bf16);
    lm_keys.gathered = true;
    int64_t real = 0;  // landmark keys that are not padding
    for (int64_t x = 0; x < c.G; ++x)
      if (c.pad == nullptr || c.pad[c.lm[x]]) {
        if (real < kKeys) lm_keys.keys[real] = c.lm[x];
        ++real;
      }
    lm_keys_packed = real > 0 && real <= kKeys;
    if (lm_keys_packed) {
      lm_keys.nt = real;
      pack_keys(c, lm_keys);
    }
  }
  HeadBlock heads[64];     // the group is processed 64 heads at a time
  HeadBlock lm_heads[64];  // their landmark query rows (run_item's inline landmark pass)
  Scratch sc;
  sc.S = a.take(kRows * kKeys);
  sc.dP = a.take(kRows * kKeys);
  sc.mask = reinterpret_cast<uint64_t*>(a.take(2 * kRows));
  sc.brow = a.take(kKeys);
  sc.dsr = a.take(kKeys);
  if (c.bf16) {
    sc.Pt = take_u32(a, kRows / 2 * kKeys);
    sc.dSt = take_u32(a, kRows / 2 * kKeys);
    sc.dSb = take_u32(a, kRows * kKeys / 2);
  }
  if (c.amx) {
    sc.PtA = take_u32(a, kRows * kKeys / 2);
    sc.dStA = take_u32(a, kRows * kKeys / 2);
  }
  float* orow = a.take(c.Dvp);
  c.written = reinterpret_cast<uint8_t*>(a.take(round_up(f.Nk, 64) / 4));
  std::memset(c.written, 0, static_cast<size_t>(f.Nk));
  const int64_t ntiles = (f.Nk + kKeys - 1) / kKeys;
  uint8_t* tile_done = reinterpret_cast<uint8_t*>(a.take(round_up(ntiles, 64) / 4));
  float* head_mem = a.cur;
  if (final_lp && c.group <= 64 && landmark_rows_in_one_block(c)) {
    const int64_t item = (b * f.Hk + hk) * f.Nk;
    c.dk_lp = p.dk_lp + item * f.D;
    c.dv_lp = p.dv_lp + item * f.Dv;
  }

  // Heads of the group are processed in chunks of up to 64 so `heads` stays a fixed array.
  for (int64_t g0 = 0; g0 < c.group; g0 += 64) {
    const int64_t ng = imin(64, c.group - g0);
    Ctx cg = c;
    cg.group = ng;
    if (cg.bias != nullptr) cg.bias += g0 * c.L;
    if (cg.dbias != nullptr) cg.dbias += g0 * c.L;
    Arena ha{head_mem};
    for (int64_t g = 0; g < ng; ++g) carve_head(ha, c, heads[g]);
    if (c.G > 0)
      for (int64_t g = 0; g < ng; ++g) carve_head(ha, c, lm_heads[g]);
    const int64_t h0 = hk * c.group + g0;

    // Landmark query rows see every key. When they fit one block they are loaded here and run
    // over each contiguous tile right after the band pass packs it (the tile is in cache, and its
    // dK / dV take both contributions before one flush); the tiles no band reached follow it.
    // More rows take a pass of their own, 64 rows at a time over all tiles.
    Rows lm_rows;
    const bool lm_inline = landmark_rows && c.G > 0 && landmark_rows_in_one_block(c);
    if (lm_inline) load_landmark_rows(cg, h0, ng, 0, lm_rows, lm_heads, orow);
    const bool lm_any = lm_inline && any_head(lm_heads, ng);
    if (lm_inline) std::memset(tile_done, 0, static_cast<size_t>(ntiles));

    // Regular rows, block by block; the window band slides through the ring.
    Rows rows;
    for (int64_t i0 = blk0 * kRows; i0 < imin(blk1 * kRows, f.Nq); i0 += kRows) {
      rows.n = imin(kRows, f.Nq - i0);
      for (int64_t x = 0; x < rows.n; ++x) {
        rows.i[x] = i0 + x;
        rows.r[x] = i0 + x + c.off;
      }
      bool any = false;
      for (int64_t g = 0; g < ng; ++g) {
        load_head_block(cg, h0 + g, rows, RowMode::kRegular, heads[g], orow);
        if (cg.bf16) pack_head_bf16(cg, rows, heads[g]);
        any |= heads[g].any;
      }
      if (any) {
        const int64_t r0 = rows.r[0], r1 = rows.r[rows.n - 1] + 1;
        const KeyRange band = window_band(r0, r1, f.Nk, f.window_left, f.window_right, f.causal);
        int64_t a_lo = 0, a_hi = 0;  // the band widened to whole tiles
        if (band.hi > band.lo) {
          const int64_t t_lo = band.lo / kKeys, t_hi = (band.hi - 1) / kKeys + 1;
          a_lo = t_lo * kKeys;
          a_hi = imin(t_hi * kKeys, f.Nk);
          for (int64_t t = t_lo; t < t_hi; ++t) {
            Tile& slot = ring[t % L.ring];
            if (slot.tile != t) {
              if (slot.tile >= 0) flush(cg, slot);
              pack_contiguous(cg, slot, t);
              if (lm_any && !tile_done[t]) {
                process_tile(cg, slot, lm_rows, RowMode::kLandmark, lm_heads, sc);
                tile_done[t] = 1;
              }
            }
            process_tile(cg, slot, rows, RowMode::kRegular, heads, sc);
          }
        }
        if (lm_keys_packed) {
          lm_keys.hidden = 0;
          for (int64_t jj = 0; jj < lm_keys.nt; ++jj)
            if (lm_keys.keys[jj] >= a_lo && lm_keys.keys[jj] < a_hi) lm_keys.hidden |= uint64_t(1) << jj;
          process_tile(cg, lm_keys, rows, RowMode::kRegular, heads, sc);
        } else {
          // Landmark keys outside the widened band, gathered 64 at a time.
          gather.gathered = true;
          gather.nt = 0;
          for (int64_t x = 0; x < c.G; ++x) {
            const int64_t j = c.lm[x];
            if (f.causal && j >= r1) break;  // sorted: the rest are in every row's future
            if (j >= a_lo && j < a_hi) continue;
            if (c.pad != nullptr && !c.pad[j]) continue;
            gather.keys[gather.nt++] = j;
            if (gather.nt == kKeys) {
              pack_keys(cg, gather);
              process_tile(cg, gather, rows, RowMode::kRegular, heads, sc);
              flush(cg, gather);
              gather.nt = 0;
            }
          }
          if (gather.nt > 0) {
            pack_keys(cg, gather);
            process_tile(cg, gather, rows, RowMode::kRegular, heads, sc);
            flush(cg, gather);
          }
        }
      }
      for (int64_t g = 0; g < ng; ++g)
        store_head_block(cg, h0 + g, rows, RowMode::kRegular, heads[g]);
    }
    for (int64_t s = 0; s < L.ring; ++s)
      if (ring[s].tile >= 0) flush(cg, ring[s]);

    if (lm_inline) {
      if (lm_any)
        for (int64_t t = 0; t < ntiles; ++t) {
          if (tile_done[t]) continue;
          pack_contiguous(cg, gather, t);
          process_tile(cg, gather, lm_rows, RowMode::kLandmark, lm_heads, sc);
          flush(cg, gather);
        }
      for (int64_t g = 0; g < ng; ++g)
        store_head_block(cg, h0 + g, lm_rows, RowMode::kLandmark, lm_heads[g]);
    }

    // Landmark query rows see every key (up to r if causal): batches of 64 rows, all tiles.
    int64_t x = landmark_rows && !lm_inline ? 0 : c.G;
    while (x < c.G) {
      x = load_landmark_rows(cg, h0, ng, x, rows, heads, orow);
      if (rows.n == 0) continue;
      int64_t hi = 0;  // the keys the rows see end here
      for (int64_t k = 0; k < rows.n; ++k) hi = imax(hi, landmark_row_range(rows.r[k], f.Nk, f.causal).hi);
      if (any_head(heads, ng)) {
        for (int64_t t = 0; t * kKeys < hi; ++t) {
          pack_contiguous(cg, gather, t);
          process_tile(cg, gather, rows, RowMode::kLandmark, heads, sc);
          flush(cg, gather);
        }
      }
      for (int64_t g = 0; g < ng; ++g)
        store_head_block(cg, h0 + g, rows, RowMode::kLandmark, heads[g]);
    }
  }
  if (lm_keys_packed) flush(c, lm_keys);
  finish_keys(c, f.Nk);
  return c.dk_lp != nullptr;
}

// ------------------------------------------------------------------------- entry
// dK / dV rows [j0, j1) of item `it` (b * Hk + kv head), final in fp32 in dk / dv (the item's
// (Nk, D) / (Nk, Dv) accumulators), rounded into dk_lp / dv_lp (when grad_dtype asks for them)
// while still in cache.
static void round_kv_grads(const AttnBwdParams& p, int64_t it, int64_t j0, int64_t j1,
                           const float* dk, const float* dv) {
  if (p.grad_dtype == DType::F32) return;
  const AttnParams& f = p.fwd;
  const int64_t k0 = (it * f.Nk + j0) * f.D, v0 = (it * f.Nk + j0) * f.Dv;
  store_row_lp(dk + j0 * f.D, p.grad_dtype, (j1 - j0) * f.D, p.dk_lp + k0, stream_grads(p));
  store_row_lp(dv + j0 * f.Dv, p.grad_dtype, (j1 - j0) * f.Dv, p.dv_lp + v0, stream_grads(p));
}

static void run(const AttnBwdParams& p, int num_threads) {
  const AttnParams& f = p.fwd;
  const int64_t items = f.B * f.Hk;
  const int64_t nbias = f.Nq + f.Nk - 1, group = f.Hq / f.Hk;  // dbias: Hq rows of nbias
  if (items == 0) {
    if (p.dbias != nullptr && nbias > 0) std::memset(p.dbias, 0, sizeof(float) * f.Hq * nbias);
    return;
  }
  const int64_t Dp = round_up(f.D, 16), Dvp = round_up(f.Dv, 16);
  const Layout L = make_layout(f, Dp, Dvp);
  // Fewer (batch, kv head) items than threads: split each item's query blocks into `parts`
  // ranges with private dK / dV partials, summed afterwards in a fixed order.
  const int64_t blocks = (f.Nq + kRows - 1) / kRows;
  const int64_t parts =
      items >= num_threads ? 1 : imax(1, imin((num_threads + items - 1) / items, blocks));
  const int64_t units = items * parts;
  const int nth = static_cast<int>(imax(1, imin(num_threads, units)));
  const int64_t ring_bytes = round_up(L.ring * int64_t(sizeof(Tile)), 64);
  const int64_t kv_floats = f.Nk * (f.D + f.Dv);  // one item's dK and dV
  // Rounded gradients without fp32 outputs (dk == nullptr): each thread accumulates its items'
  // dK / dV in its own scratch, which stays in cache between items.
  const bool own_kv = p.dk == nullptr;
  const int64_t own_kv_bytes = own_kv && parts == 1 ? round_up(kv_floats * int64_t(sizeof(float)), 64) : 0;
  const int64_t per_thread = L.bytes + ring_bytes + own_kv_bytes;
  // Keys rounded at their tile's flush (run_item): one unit per item and a ring that never
  // evicts a tile its block still needs (each contiguous tile is flushed once).
  const bool final_lp = own_kv && parts == 1 && L.ring >= ring_slots(f);
  const int64_t partial_bytes = parts > 1 ? units * kv_floats * int64_t(sizeof(float)) : 0;
  // dbias partials: one per work unit (units run in any order on any thread), summed in unit
  // order at the end, so dbias depends only on the shapes and the thread count.
  const bool want_dbias = p.dbias != nullptr && nbias > 0;
  const int64_t dbias_unit = group * nbias;
  const int64_t dbias_bytes = want_dbias ? units * dbias_unit * int64_t(sizeof(float)) : 0;
  const int64_t total = per_thread * nth + round_up(partial_bytes, 64) + round_up(dbias_bytes, 64);
  // cpu/scratch_cache.h (included by the translation unit): reused across calls.
  void* mem = ::hk::cpu::scratch_alloc(static_cast<size_t>(total));
  char* base = static_cast<char*>(mem);
  for (int t = 0; t < nth; ++t)  // the workspaces and rings (not the dK / dV accumulators)
    std::memset(base + t * per_thread, 0, static_cast<size_t>(L.bytes + ring_bytes));
  float* partial = reinterpret_cast<float*>(base + per_thread * nth);
  float* dbias_parts = want_dbias
      ? reinterpret_cast<float*>(base + per_thread * nth + round_up(partial_bytes, 64)) : nullptr;
#if defined(_OPENMP)
#pragma omp parallel num_threads(nth)
#endif
  {
    const ::hk::cpu::FlushDenormals ftz;  // cpu/fp_env.h, included by the translation unit
    const AmxThreadScope amx(use_amx(f) && !has_score_mods(p));
#if defined(_OPENMP)
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    float* ws = reinterpret_cast<float*>(base + tid * per_thread);
    Tile* ring = reinterpret_cast<Tile*>(base + tid * per_thread + L.bytes);
    float* kv_acc = reinterpret_cast<float*>(base + tid * per_thread + L.bytes + ring_bytes);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t u = 0; u < units; ++u) {
      const int64_t it = u / parts, part = u % parts;
      float* dk = parts > 1 ? partial + u * kv_floats : own_kv ? kv_acc : p.dk + it * f.Nk * f.D;
      float* dv = parts > 1 || own_kv ? dk + f.Nk * f.D : p.dv + it * f.Nk * f.Dv;
      const bool rounded = run_item(p, it / f.Hk, it % f.Hk, part * blocks / parts, (part + 1) * blocks / parts,
                                    part == 0, dk, dv, want_dbias ? dbias_parts + u * dbias_unit : nullptr, L,
                                    ws, ring, final_lp);
      if (parts == 1 && !rounded) round_kv_grads(p, it, 0, f.Nk, dk, dv);
    }
    if (parts > 1) {
      // dk[it] = sum over parts in part order (deterministic), split over rows of keys.
      const int64_t chunk = 256;
      const int64_t row_chunks = (f.Nk + chunk - 1) / chunk;
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int64_t w = 0; w < items * row_chunks; ++w) {
        const int64_t it = w / row_chunks, j0 = (w % row_chunks) * chunk;
        const int64_t j1 = imin(j0 + chunk, f.Nk);
        // Into the fp32 outputs, or without them into part 0's partial (read only here).
        float* dk = own_kv ? partial + it * parts * kv_floats : p.dk + it * f.Nk * f.D;
        float* dv = own_kv ? dk + f.Nk * f.D : p.dv + it * f.Nk * f.Dv;
        for (int64_t part = own_kv ? 1 : 0; part < parts; ++part) {
          const float* sk = partial + (it * parts + part) * kv_floats;
          const float* sv = sk + f.Nk * f.D;
          for (int64_t e = j0 * f.D; e < j1 * f.D; ++e) dk[e] = part == 0 ? sk[e] : dk[e] + sk[e];
          for (int64_t e = j0 * f.Dv; e < j1 * f.Dv; ++e) dv[e] = part == 0 ? sv[e] : dv[e] + sv[e];
        }
        round_kv_grads(p, it, j0, j1, dk, dv);
      }
    }
    if (want_dbias) {
      // dbias[h] = sum over batches, then parts, of the units' partials (fixed order).
      const int64_t chunk = 1024;
      const int64_t ochunks = (nbias + chunk - 1) / chunk;
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (int64_t w = 0; w < f.Hq * ochunks; ++w) {
        const int64_t h = w / ochunks, o0 = (w % ochunks) * chunk, o1 = imin(o0 + chunk, nbias);
        const int64_t hk = h / group, g = h % group;
        float* dst = p.dbias + h * nbias;
        for (int64_t b = 0; b < f.B; ++b)
          for (int64_t part = 0; part < parts; ++part) {
            const float* src = dbias_parts + ((b * f.Hk + hk) * parts + part) * dbias_unit + g * nbias;
            const bool first = b == 0 && part == 0;
            for (int64_t o = o0; o < o1; ++o) dst[o] = first ? src[o] : dst[o] + src[o];
          }
      }
    }
    _mm_sfence();  // the streamed gradient stores (store_row_lp) are visible after the region
  }
  ::hk::cpu::scratch_free(mem, static_cast<size_t>(total));
}
