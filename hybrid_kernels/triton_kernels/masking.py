"""The visibility pattern inside the kernels (mirror of csrc/common/pattern.h).

Window sides arrive already resolved: an unlimited side is passed as Nq + Nk, which covers every
pair, so no branch on "unlimited" is needed. r = i + Nk - Nq is the aligned query position.
"""
import triton
import triton.language as tl


@triton.jit
def window_band(r0, r1, Nk, left, right, CAUSAL: tl.constexpr):
    """Key range [lo, hi) of the window band of aligned rows [r0, r1) (hi <= lo: empty)."""
    lo = tl.maximum(r0 - left, 0)
    hi = tl.minimum(r1 + right, Nk)
    if CAUSAL:
        hi = tl.minimum(hi, r1)
    return lo, hi


@triton.jit
def query_band(n0, n1, off, Nq, left, right, CAUSAL: tl.constexpr):
    """Query range [lo, hi) whose window band can contain keys [n0, n1) (inverse of window_band)."""
    lo = n0 - right
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    lo = tl.maximum(lo - off, 0)
    hi = tl.minimum(n1 + left - off, Nq)
    return lo, hi


@triton.jit
def aligned_span(start, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """[a, c): the tiles start + k * BLOCK lying wholly inside [full_lo, full_hi), with
    start <= a <= c <= hi and a, c on the tile grid (or equal to hi)."""
    a = tl.minimum(start + tl.cdiv(tl.maximum(full_lo - start, 0), BLOCK) * BLOCK, hi)
    c = tl.maximum(start + tl.maximum(full_hi - start, 0) // BLOCK * BLOCK, a)
    return a, c


@triton.jit
def interior_tiles(r0, r1, lo, hi, start, left, right, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr):
    """Split the key tiles start, start + BLOCK_N, ... < hi of rows [r0, r1) at a <= c: the
    tiles in [a, c) lie wholly inside every row's window (and causal limit), so need no mask."""
    if HAS_PAD:
        a = hi
        c = hi
    else:
        full_hi = tl.minimum(r0 + right + 1, hi)
        if CAUSAL:
            full_hi = tl.minimum(full_hi, r0 + 1)
        a, c = aligned_span(start, tl.maximum(r1 - 1 - left, lo), full_hi, hi, BLOCK_N)
    return a, c


@triton.jit
def interior_query_tiles(n0, n1, off, i_lo, i_hi, start, left, right, BLOCK_M: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr):
    """The same for key tile [n0, n1) and the query tiles start, start + BLOCK_M, ... < i_hi:
    query tiles in [a, c) see every key of the tile through the window."""
    if HAS_PAD:
        a = i_hi
        c = i_hi
    else:
        first = n1 - 1 - right  # lowest aligned row whose window reaches key n1 - 1
        if CAUSAL:
            first = tl.maximum(first, n1 - 1)
        a, c = aligned_span(start, tl.maximum(first - off, i_lo),
                            tl.minimum(n0 + left + 1 - off, i_hi), i_hi, BLOCK_M)
    return a, c


@triton.jit
def visible(r, j, row_ok, col_ok, left, right, key_lm, row_lm, key_real,
            CAUSAL: tl.constexpr, HAS_LM: tl.constexpr, HAS_PAD: tl.constexpr):
    """(rows, cols) visibility: r (M,), j (N,), flags per row / per column."""
    rr = r[:, None]
    jj = j[None, :]
    vis = (jj >= rr - left) & (jj <= rr + right)
    if HAS_LM:
        vis = vis | (key_lm[None, :] != 0) | (row_lm[:, None] != 0)
    if CAUSAL:
        vis = vis & (jj <= rr)
    if HAS_PAD:
        vis = vis & (key_real[None, :] != 0)
    return vis & row_ok[:, None] & col_ok[None, :]


@triton.jit
def landmark_visible(r, j, row_ok, col_ok, key_real, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr):
    """Visibility when the row or the key is a landmark: only causality and padding remain."""
    vis = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        vis = vis & (j[None, :] <= r[:, None])
    if HAS_PAD:
        vis = vis & (key_real[None, :] != 0)
    return vis


@triton.jit
def query_rows(pid_m, b, LM, lm_sb, G, Nq, off, BLOCK_M: tl.constexpr, LM_MODE: tl.constexpr):
    """Query rows of one program: a contiguous tile, or (LM_MODE) a tile of landmark rows
    gathered from the landmark positions. Returns (i, row_ok)."""
    if LM_MODE:
        g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pos = tl.load(LM + b * lm_sb + g, mask=g < G, other=-1)
        i = (pos - off).to(tl.int32)
        row_ok = (g < G) & (i >= 0) & (i < Nq)
    else:
        i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = i < Nq
    return i, row_ok


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot. IEEE: 0 = native (fp16/bf16), 1 = fp32 with exact IEEE products instead of TF32,
    2 = upcast to fp32 first (the interpreter multiplies bf16 as raw uint16 bits)."""
    if IEEE == 2:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 1:
        res = tl.dot(a, b, input_precision="ieee")
    else:
        res = tl.dot(a, b)
    return res


@triton.jit
def to_dtype(x, dtype: tl.constexpr, IEEE: tl.constexpr):
    """x.to(dtype); with IEEE == 2 (interpreter, bf16) round to nearest even first, because the
    interpreter's fp32 -> bf16 cast truncates (the GPU rounds)."""
    if IEEE == 2:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
