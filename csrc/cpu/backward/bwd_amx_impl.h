// Part of the CPU attention backward for AMX builds (included by bwd_kernel_impl.h inside the
// per-ISA namespace, after bwd_bf16_impl.h, only when __AMX_BF16__ / __AMX_TILE__ are defined).
// With bf16 inputs and D % 32 == 0, Dv % 32 == 0 the five products of the tile step run on AMX
// tiles (tdpbf16ps, fp32 accumulation); the numerics are those of tile_step_bf16: operands are
// the bf16 inputs, P and dS rounded to bf16 (nearest even), the softmax and dS in fp32.
//
// AMX operand layouts (every tile is 16 rows x 64 bytes, see amx_tiles.h):
//   A: 16 rows, each 16 pair words along the reduction (32 bf16, even index in the low half)
//   B: 16 pair rows (VNNI) x 16 columns, i.e. exactly the "pair" matrices of bwd_bf16_impl.h
// Products of one tile step (mq query rows, nt keys; M, N rounded up to 32, reductions too):
//   S  = Q K^T     A = Qb   [x][d2]   B = Ktp  [d2][j]   C = S   [x][j]
//   dP = dO V^T    A = dOb  [x][e2]   B = Vtp  [e2][j]   C = dP  [x][j]
//   dV += P^T dO   A = PtA  [j][x2]   B = dOp  [x2][e]   C = dV  [j][e]
//   dK += dS^T Q   A = dStA [j][x2]   B = Qp   [x2][d]   C = dK  [j][d]
//   dQ += dS K     A = dSb  [x][j2]   B = Kpk  [j2][d]   C = dQ  [x][d]
// PtA / dStA are the only operands not produced by the bf16 path: the softmax step writes them
// (transposes of its Pt / dSt words) instead of Pt / dSt.
// Rounding up is safe because every padded operand is zero on both sides of its reduction
// (pack_keys_bf16 / pack_head_bf16 zero them, masked P and dS are exact zeros); the padded rows
// and columns of S, dP, dQ, dK and dV are never read back.

constexpr bool kAmx = true;

using ::hk::cpu::AmxThreadScope;  // cpu/amx_tiles.h, included by bwd_amx.cpp
using ::hk::cpu::amx_gemm_bf16;   // A row strides in bytes: 4 per pair word

// ------------------------------------------------------------------------- the softmax step
// softmax_pack_bf16 for the tile products: P^T and dS^T straight into their A layouts PtA / dStA
// ([j][x2], kRows / 2 pair words a row; 16 row pairs x 16 keys of SoftmaxPair's words transposed
// in registers), dS into dSb. m, n: multiples of 32 (rows from mq on are masked to zero).
static void softmax_pack_amx(int64_t m, int64_t n, float scale, const HeadBlock& hb, Scratch& s) {
  const SoftmaxPair pair(scale, hb, s);
  uint32_t* const pta = s.PtA;
  uint32_t* const dsta = s.dStA;
  for (int64_t x2 = 0; x2 < m / 2; x2 += 16)
    for (int64_t j = 0; j < n; j += 16) {
      __m512i pr[16], dr[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t x0 = 2 * (x2 + i);
        __m512i pp, dd;
        pair(x0, x0 + 1, j, &pp, &dd);
        pr[i] = interleave_halves(pp);
        dr[i] = interleave_halves(dd);
        pair.store_ds_row(x0, j, dd, 0);
        pair.store_ds_row(x0 + 1, j, dd, 1);
      }
      transpose_16x16_store(pr, pta + j * (kRows / 2) + x2, kRows / 2);
      transpose_16x16_store(dr, dsta + j * (kRows / 2) + x2, kRows / 2);
    }
}

// ------------------------------------------------------------------------- the tile step
// One q head's products for one tile on AMX (process_tile computed the masks of rows < mq).
// The reductions run over whole 32-row / 32-key chunks (m, n); the outputs only over the 16-row
// / 16-key groups that hold rows and keys (m16, n16): a block of 16 landmark rows, or a tile of
// 16 landmark keys, computes half of S, dP, dQ (rows) or of S, dP, dV, dK (keys). The softmax
// reads the rest of S and dP uncomputed, under masks that are zero there.
static void tile_step_amx(const Ctx& c, Tile& t, int64_t mq, HeadBlock& hb, Scratch& s) {
  const int64_t m = round_up(mq, 32), n = round_up(t.nt, 32);
  const int64_t m16 = round_up(mq, 16), n16 = round_up(t.nt, 16);
  for (int64_t x = mq; x < m; ++x) s.mask[x] = 0;  // padded rows: P = dS = 0
  amx_gemm_bf16<false>(m16, n16, c.D / 2, hb.Qb, c.Dp * 2, t.Ktp, kKeys, s.S, kKeys);
  amx_gemm_bf16<false>(m16, n16, c.Dv / 2, hb.dOb, c.Dvp * 2, t.Vtp, kKeys, s.dP, kKeys);
  softmax_pack_amx(m, n, c.p->fwd.scale, hb, s);
  if (t.fresh) {  // first product into this tile: store instead of zero-fill + add
    amx_gemm_bf16<false>(n16, c.Dvp, m / 2, s.PtA, kRows * 2, hb.dOp, c.Dvp, t.dV, c.Dvp);  // P^T dO
    amx_gemm_bf16<false>(n16, c.Dp, m / 2, s.dStA, kRows * 2, hb.Qp, c.Dp, t.dK, c.Dp);     // dS^T Q
    t.fresh = false;
  } else {
    amx_gemm_bf16<true>(n16, c.Dvp, m / 2, s.PtA, kRows * 2, hb.dOp, c.Dvp, t.dV, c.Dvp);
    amx_gemm_bf16<true>(n16, c.Dp, m / 2, s.dStA, kRows * 2, hb.Qp, c.Dp, t.dK, c.Dp);
  }
  amx_gemm_bf16<true>(m16, c.Dp, n / 2, s.dSb, kKeys * 2, t.Kpk, c.Dp, hb.dQ, c.Dp);  // dQ += dS K
}
