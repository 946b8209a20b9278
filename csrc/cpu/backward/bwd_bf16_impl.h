// Part of the CPU attention backward for AVX-512 BF16 builds (included by bwd_kernel_impl.h inside
// the per-ISA namespace, only when __AVX512BF16__ is defined). With bf16 inputs all five products
// of the tile step run on vdpbf16ps (two bf16 products per fp32 lane and instruction), as
// FlashAttention-2 does on GPUs:
//   S = Q K^T, dP = dO V^T                  operands are the bf16 inputs themselves (exact)
//   dV += P^T dO, dK += dS^T Q, dQ += dS K  P and dS rounded to bf16 (nearest even)
// Accumulation, the softmax and dS itself stay fp32.
//
// Operands are "pair" matrices: uint32 words holding two bf16 values that are adjacent along the
// reduction index (low half = even index). A missing partner (odd length) is stored as 0 on both
// sides of the product, so padding never meets stale data.

// ------------------------------------------------------------------------- conversion
// 16-bit words 0-15 (a) and 16-31 (b) -> 16 pair words (a[n], b[n]).
static inline __m512i interleave_halves(__m512i ab) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, ab);
}

// dst[n] = (bf16(r0[n]), bf16(r1[n])) for n < N (a multiple of 16); r1 == nullptr counts as 0.
static inline void pair_rows_bf16(const float* r0, const float* r1, int64_t N, uint32_t* dst) {
  for (int64_t n = 0; n < N; n += 16) {
    const __m512 p0 = _mm512_loadu_ps(r0 + n);
    const __m512 p1 = r1 != nullptr ? _mm512_loadu_ps(r1 + n) : _mm512_setzero_ps();
    _mm512_storeu_si512(dst + n, interleave_halves((__m512i)_mm512_cvtne2ps_pbh(p1, p0)));
  }
}

// N (a multiple of 16) floats to bf16, stored contiguously: N / 2 pair words.
static inline void row_bf16(const float* src, int64_t N, uint32_t* dst) {
  for (int64_t n = 0; n < N; n += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n / 2),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + n)));
}

// ------------------------------------------------------------------------- GEMM micro-kernels
// C (M x N, ldc) (+)= A B over T2 pairs: A word (r, t2) at A[r*ars + t2*ats], B pair row t2 at
// B + t2*ldb (N words, N a multiple of 16). Same register tiling as micro() in bwd_gemm_impl.h.
using MicroBf16Fn = void (*)(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*,
                             int64_t, int64_t);

template <bool ACC, int MR, int NV>
static void micro_bf16(const uint32_t* A, int64_t ars, int64_t ats, const uint32_t* B,
                       int64_t ldb, float* C, int64_t ldc, int64_t T2) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = ACC ? _mm512_loadu_ps(C + r * ldc + v * 16) : _mm512_setzero_ps();
  for (int64_t t = 0; t < T2; ++t) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B + t * ldb + v * 16);
    const uint32_t* a = A + t * ats;
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * ars]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + v * 16, acc[r][v]);
}

template <bool ACC, int MR, int NV>
static MicroBf16Fn pick_nv_bf16(int nv) {
  if constexpr (NV == 0) {
    return nullptr;
  } else {
    return nv == NV ? &micro_bf16<ACC, MR, NV> : pick_nv_bf16<ACC, MR, NV - 1>(nv);
  }
}

template <bool ACC, int MR>
static MicroBf16Fn pick_bf16(int mr, int nv) {
  if constexpr (MR == 0) {
    return nullptr;
  } else {
    return mr == MR ? pick_nv_bf16<ACC, MR, Vec::NVMAX>(nv) : pick_bf16<ACC, MR - 1>(mr, nv);
  }
}

template <bool ACC>
static void gemm_bf16(int64_t M, int64_t N, int64_t T2, const uint32_t* A, int64_t ars,
                      int64_t ats, const uint32_t* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int64_t CW = int64_t(Vec::NVMAX) * 16;
  for (int64_t c0 = 0; c0 < N; c0 += CW) {
    const int nv = static_cast<int>(imin(Vec::NVMAX, (N - c0) / 16));
    const MicroBf16Fn full = pick_bf16<ACC, Vec::MR>(Vec::MR, nv);
    for (int64_t r0 = 0; r0 < M; r0 += Vec::MR) {
      const int mr = static_cast<int>(imin(Vec::MR, M - r0));
      MicroBf16Fn fn = mr == Vec::MR ? full : pick_bf16<ACC, Vec::MR>(mr, nv);
      fn(A + r0 * ars, ars, ats, B + c0, ldb, C + r0 * ldc + c0, ldc, T2);
    }
  }
}

// ------------------------------------------------------------------------- 16 x 16 transposes
// dst[e * ld + a] = r[a][e] for 16 vectors of 16 32-bit words (pure shuffles: bit-exact).
static inline void transpose_16x16_store(__m512i r[16], uint32_t* dst, int64_t ld) {
  __m512 f[16];
  for (int a = 0; a < 16; ++a) f[a] = _mm512_castsi512_ps(r[a]);
  VecAvx512::transpose_regs(f, reinterpret_cast<float*>(dst), ld);
}

// ------------------------------------------------------------------------- operand packing
// n (a multiple of 16) zero words.
static inline void zero_u32(uint32_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_si512(dst + i, _mm512_setzero_si512());
}

static inline uint32_t load_u32(const uint16_t* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// pair_transpose_bf16 for D % 32 == 0: 16 keys x 16 pairs at a time through registers.
static void pair_transpose_bf16_x32(const uint16_t* base, int64_t stride, const int64_t* keys,
                                    int64_t nt, int64_t D, uint32_t* dst) {
  for (int64_t j0 = 0; j0 < nt; j0 += 16) {
    const int64_t n = imin(16, nt - j0);
    for (int64_t d = 0; d < D; d += 32) {
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i) {
        r[i] = i < n ? _mm512_loadu_si512(base + keys[j0 + i] * stride + d)
                     : _mm512_setzero_si512();
      }
      transpose_16x16_store(r, dst + d / 2 * kKeys + j0, kKeys);
    }
  }
}

// (D+1)/2 x 64 pair words: word (t, jj) = (row jj [2t], row jj [2t+1]) (0 past D, 0 past nt).
static void pair_transpose_bf16(const uint16_t* base, int64_t stride, const int64_t* keys,
                                int64_t nt, int64_t D, uint32_t* dst) {
  const int64_t D2 = (D + 1) / 2;
  if (D % 32 == 0) {
    pair_transpose_bf16_x32(base, stride, keys, nt, D, dst);
    for (int64_t jj = round_up(nt, 16); jj < kKeys; ++jj)
      for (int64_t t = 0; t < D2; ++t) dst[t * kKeys + jj] = 0;
    return;
  }
  for (int64_t jj = 0; jj < nt; ++jj) {
    const uint16_t* r = base + keys[jj] * stride;
    for (int64_t t = 0; t < D / 2; ++t) dst[t * kKeys + jj] = load_u32(r + 2 * t);
    if (D & 1) dst[(D2 - 1) * kKeys + jj] = r[D - 1];
  }
  for (int64_t jj = nt; jj < kKeys; ++jj)  // the products read up to round_up(nt, 32) keys
    for (int64_t t = 0; t < D2; ++t) dst[t * kKeys + jj] = 0;
}

// Tile operands straight from the bf16 inputs: Ktp / Vtp (pairs along d, 64 key columns) for S
// and dP; Kpk (pairs of keys, Dp columns, zero padded) for dQ. Keys past nt are zero up to 64:
// the AMX products (bwd_amx_impl.h) read whole 32-key chunks.
static void pack_keys_bf16(const Ctx& c, Tile& t) {
  const AttnParams& f = c.p->fwd;
  const uint16_t* kbase =
      static_cast<const uint16_t*>(f.k) + c.b * f.k_stride[0] + c.hk * f.k_stride[1];
  const uint16_t* vbase =
      static_cast<const uint16_t*>(f.v) + c.b * f.v_stride[0] + c.hk * f.v_stride[1];
  pair_transpose_bf16(kbase, f.k_stride[2], t.keys, t.nt, c.D, t.Ktp);
  pair_transpose_bf16(vbase, f.v_stride[2], t.keys, t.nt, c.Dv, t.Vtp);
  for (int64_t j2 = 0; 2 * j2 < t.nt; ++j2) {
    const uint16_t* r0 = kbase + t.keys[2 * j2] * f.k_stride[2];
    const uint16_t* r1 = 2 * j2 + 1 < t.nt ? kbase + t.keys[2 * j2 + 1] * f.k_stride[2] : nullptr;
    uint32_t* dst = t.Kpk + j2 * c.Dp;
    for (int64_t d = 0; d < c.Dp; d += 16) {
      const int64_t n = imax(0, imin(16, c.D - d));
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0 + d));
      const __m512i hi = r1 != nullptr
                             ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1 + d))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
  for (int64_t j2 = (t.nt + 1) / 2; j2 < kKeys / 2; ++j2) zero_u32(t.Kpk + j2 * c.Dp, c.Dp);
}

// Query block of one head: Qb / dOb (bf16 rows) for S and dP; Qp / dOp (pairs of rows) for dK, dV.
// Pairs past the block are zero up to 32: the AMX products reduce over whole 32-row chunks.
static void pack_head_bf16(const Ctx& c, const Rows& rows, HeadBlock& hb) {
  if (!hb.any) return;
  const int64_t n = rows.n;
  for (int64_t x = 0; x < n; ++x) {
    row_bf16(hb.Q + x * c.Dp, c.Dp, hb.Qb + x * (c.Dp / 2));
    row_bf16(hb.dO + x * c.Dvp, c.Dvp, hb.dOb + x * (c.Dvp / 2));
  }
  for (int64_t x2 = 0; 2 * x2 < n; ++x2) {
    const bool pair = 2 * x2 + 1 < n;
    pair_rows_bf16(hb.Q + 2 * x2 * c.Dp, pair ? hb.Q + (2 * x2 + 1) * c.Dp : nullptr, c.Dp,
                   hb.Qp + x2 * c.Dp);
    pair_rows_bf16(hb.dO + 2 * x2 * c.Dvp, pair ? hb.dO + (2 * x2 + 1) * c.Dvp : nullptr, c.Dvp,
                   hb.dOp + x2 * c.Dvp);
  }
  for (int64_t x2 = (n + 1) / 2; x2 < kRows / 2; ++x2) {
    zero_u32(hb.Qp + x2 * c.Dp, c.Dp);
    zero_u32(hb.dOp + x2 * c.Dvp, c.Dvp);
  }
}

// ------------------------------------------------------------------------- the tile step


// P = exp(scale*S - lse) and dS = scale*P*(dP - Delta) of query rows x0, x1 (x1 == x0: a lone
// last row, its partner zero) over keys [j, j + 16), on the visible pairs (zero elsewhere), as
// bf16: words 0-15 row x0, 16-31 row x1 (pp: P, dd: dS). It copies the pointers it reads, so the
// operand stores in between do not make the compiler reload them.
struct SoftmaxPair {
  SoftmaxPair(float scale, const HeadBlock& hb, const Scratch& s)
      : vscale(_mm512_set1_ps(scale)), vscale2(_mm512_set1_ps(scale * kLog2eF)), S(s.S), dP(s.dP), mask(s.mask),
        lse(hb.lse), delta(hb.delta), dSb(reinterpret_cast<uint16_t*>(s.dSb)) {}
  void operator()(int64_t x0, int64_t x1, int64_t j, __m512i* pp, __m512i* dd) const {
    const __mmask16 b0 = static_cast<__mmask16>(mask[x0] >> j);
    const __mmask16 b1 = x1 != x0 ? static_cast<__mmask16>(mask[x1] >> j) : __mmask16(0);
    const __m512 p0 = _mm512_maskz_mov_ps(
        b0, cpu::exp2_ftz<Exp2::kCoarse>(
                _mm512_fmadd_ps(_mm512_loadu_ps(S + x0 * kKeys + j), vscale2, _mm512_set1_ps(-lse[x0] * kLog2eF))));
    const __m512 p1 = _mm512_maskz_mov_ps(
        b1, cpu::exp2_ftz<Exp2::kCoarse>(
                _mm512_fmadd_ps(_mm512_loadu_ps(S + x1 * kKeys + j), vscale2, _mm512_set1_ps(-lse[x1] * kLog2eF))));
    const __m512 ds0 = _mm512_maskz_mul_ps(
        b0, _mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(dP + x0 * kKeys + j), _mm512_set1_ps(delta[x0]))),
        vscale);
    const __m512 ds1 = _mm512_maskz_mul_ps(
        b1, _mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(dP + x1 * kKeys + j), _mm512_set1_ps(delta[x1]))),
        vscale);
    *pp = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);
    *dd = (__m512i)_mm512_cvtne2ps_pbh(ds1, ds0);
  }
  // Row x's 16 dS values of dd (half `hi`) into dSb (rows of dS) at key j.
  void store_ds_row(int64_t x, int64_t j, __m512i dd, int hi) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dSb + x * kKeys + j),
                        hi ? _mm512_extracti64x4_epi64(dd, 1) : _mm512_castsi512_si256(dd));
  }
  static constexpr float kLog2eF = 1.44269504088896341f;
  __m512 vscale, vscale2;
  const float *S, *dP;
  const uint64_t* mask;
  const float *lse, *delta;
  uint16_t* dSb;  // kKeys bf16 per row
};

// SoftmaxPair over rows [0, mq) and keys [0, ncols), written straight into the bf16 operands:
// Pt / dSt (pairs of rows) and dSb (rows of dS).
static void softmax_pack_bf16(int64_t mq, int64_t ncols, float scale, const HeadBlock& hb,
                              Scratch& s) {
  const SoftmaxPair pair(scale, hb, s);
  uint32_t* const pt = s.Pt;
  uint32_t* const dst = s.dSt;
  for (int64_t x0 = 0; x0 < mq; x0 += 2) {
    const int64_t x1 = x0 + 1 < mq ? x0 + 1 : x0;  // odd tail: row x0 again, masked to zero
    for (int64_t j = 0; j < ncols; j += 16) {
      __m512i pp, dd;
      pair(x0, x1, j, &pp, &dd);
      _mm512_storeu_si512(pt + x0 / 2 * kKeys + j, interleave_halves(pp));
      _mm512_storeu_si512(dst + x0 / 2 * kKeys + j, interleave_halves(dd));
      pair.store_ds_row(x0, j, dd, 0);
      if (x1 != x0) pair.store_ds_row(x1, j, dd, 1);
    }
  }
}

// P and dS already in fp32 (S and dP, zero on hidden pairs, see softmax_ds) into the bf16
// operands, as softmax_pack_bf16 stores them.
static void pack_p_ds_bf16(int64_t mq, int64_t ncols, Scratch& s) {
  for (int64_t x0 = 0; x0 < mq; x0 += 2) {
    const bool two = x0 + 1 < mq;
    const float *S0 = s.S + x0 * kKeys, *dP0 = s.dP + x0 * kKeys;
    uint32_t* pt = s.Pt + x0 / 2 * kKeys;
    uint32_t* dst = s.dSt + x0 / 2 * kKeys;
    uint16_t* dsb0 = reinterpret_cast<uint16_t*>(s.dSb + x0 * (kKeys / 2));
    uint16_t* dsb1 = reinterpret_cast<uint16_t*>(s.dSb + (x0 + 1) * (kKeys / 2));
    for (int64_t j = 0; j < ncols; j += 16) {
      const __m512 p0 = _mm512_loadu_ps(S0 + j), ds0 = _mm512_loadu_ps(dP0 + j);
      const __m512 p1 = two ? _mm512_loadu_ps(S0 + kKeys + j) : _mm512_setzero_ps();
      const __m512 ds1 = two ? _mm512_loadu_ps(dP0 + kKeys + j) : _mm512_setzero_ps();
      const __m512i pp = (__m512i)_mm512_cvtne2ps_pbh(p1, p0);  // words 0-15: row x0, 16-31: x0+1
      const __m512i dd = (__m512i)_mm512_cvtne2ps_pbh(ds1, ds0);
      _mm512_storeu_si512(pt + j, interleave_halves(pp));
      _mm512_storeu_si512(dst + j, interleave_halves(dd));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsb0 + j), _mm512_castsi512_si256(dd));
      if (two)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dsb1 + j), _mm512_extracti64x4_epi64(dd, 1));
    }
  }
}

// One q head's products for one tile (process_tile in bwd_kernel_impl.h computed the masks);
// g: the head's index in the chunk, for the score modifiers.
static void tile_step_bf16(const Ctx& c, Tile& t, const Rows& rows, int64_t g, int64_t mq,
                           int64_t ncols, HeadBlock& hb, Scratch& s) {
  gemm_bf16<false>(mq, ncols, (c.D + 1) / 2, hb.Qb, c.Dp / 2, 1, t.Ktp, kKeys, s.S, kKeys);
  gemm_bf16<false>(mq, ncols, (c.Dv + 1) / 2, hb.dOb, c.Dvp / 2, 1, t.Vtp, kKeys, s.dP, kKeys);
  if (c.mods) {
    softmax_ds(c, t, rows, mq, ncols, g, hb, s);
    pack_p_ds_bf16(mq, ncols, s);
  } else {
    softmax_pack_bf16(mq, ncols, c.p->fwd.scale, hb, s);
  }
  const int64_t m2 = (mq + 1) / 2, n2 = (t.nt + 1) / 2;
  if (t.fresh) {  // first product into this tile: store instead of zero-fill + add
    gemm_bf16<false>(t.nt, c.Dvp, m2, s.Pt, 1, kKeys, hb.dOp, c.Dvp, t.dV, c.Dvp);  // P^T dO
    gemm_bf16<false>(t.nt, c.Dp, m2, s.dSt, 1, kKeys, hb.Qp, c.Dp, t.dK, c.Dp);     // dS^T Q
    t.fresh = false;
  } else {
    gemm_bf16<true>(t.nt, c.Dvp, m2, s.Pt, 1, kKeys, hb.dOp, c.Dvp, t.dV, c.Dvp);
    gemm_bf16<true>(t.nt, c.Dp, m2, s.dSt, 1, kKeys, hb.Qp, c.Dp, t.dK, c.Dp);
  }
  gemm_bf16<true>(mq, c.Dp, n2, s.dSb, kKeys / 2, 1, t.Kpk, c.Dp, hb.dQ, c.Dp);  // dQ += dS K
}
