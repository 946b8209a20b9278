"""CPU emulation of the CUDA kernels' index and softmax math (csrc/cuda/*.cu), against the oracle.

No GPU is needed: these functions mirror, formula for formula, what each CTA / warp / lane of
the kernels computes (tile enumeration, gathered landmark keys, split ranges, visibility per
element, the online softmax with its -inf guards, the warp and split LSE merges), in float64.
They check that every visible (query, key) pair is visited exactly once, no invisible pair is
counted, every global row index stays in bounds, and the results equal dense_reference. Keep
the mirrors in step with the .cu files.
"""
import math

import numpy as np
import pytest
import torch

from hybrid_kernels.reference import dense_reference, visibility_mask

LOG2E = 1.4426950408889634
BM = BN = 64          # attention_fwd.cu
WARPS = 4             # both kernels


# ----------------------------------------------------------------- csrc/common/pattern.h
def window_band(r0, r1, nk, left, right, causal):
    lo = 0 if left < 0 else r0 - left
    hi = nk if right < 0 else r1 - 1 + right + 1
    if causal and hi > r1:
        hi = r1
    return max(lo, 0), min(hi, nk)


def landmark_row_range(r, nk, causal):
    hi = r + 1 if causal else nk
    return 0, max(0, min(hi, nk))


def visible(r, j, left, right, causal, key_lm, row_lm, key_real):
    """Vectorized pattern.h visible() over numpy arrays r (rows, 1) and j (1, cols)."""
    shape = np.broadcast_shapes(np.shape(r), np.shape(j), np.shape(key_lm), np.shape(row_lm),
                                np.shape(key_real))
    ok = np.broadcast_to(key_real, shape).copy()
    if causal:
        ok &= j <= r
    in_left = np.ones(shape, dtype=bool) if left < 0 else (j >= r - left)
    in_right = np.ones(shape, dtype=bool) if right < 0 else (j <= r + right)
    return ok & (key_lm | row_lm | (in_left & in_right))


class Pat:
    """PatternView of one batch row."""
    def __init__(self, nk, flags, padding):
        self.nk, self.flags, self.padding = nk, flags, padding

    def is_landmark(self, pos):
        pos = np.asarray(pos)
        inside = (pos >= 0) & (pos < self.nk)
        out = np.zeros(pos.shape, dtype=bool)
        if self.flags is not None:
            out[inside] = self.flags[pos[inside]]
        return out

    def key_real(self, j):
        j = np.asarray(j)
        return np.ones(j.shape, dtype=bool) if self.padding is None else self.padding[j]


class OnlineRow:
    """The kernels' online softmax state for a set of rows (base-2 scores, -inf guards)."""
    def __init__(self, rows, dv):
        self.m = np.full(rows, -np.inf)
        self.l = np.zeros(rows)
        self.o = np.zeros((rows, dv))

    def step(self, x, vis, v):
        """x (rows, keys) base-2 scores, vis bool (rows, keys), v (keys, dv)."""
        x = np.where(vis, x, -np.inf)
        m_new = np.maximum(self.m, x.max(axis=1, initial=-np.inf))
        m_use = np.where(m_new == -np.inf, 0.0, m_new)
        with np.errstate(invalid="ignore"):
            p = np.where(vis, np.exp2(x - m_use[:, None]), 0.0)
        alpha = np.exp2(self.m - m_use)
        self.l = self.l * alpha + p.sum(axis=1)
        self.o = self.o * alpha[:, None] + p @ v
        self.m = m_new


def merge_states(ms, ls, os_):
    """The warp merge (fused landmark rows, int8) and merge_splits_kernel: -inf parts weigh 0."""
    ms, ls, os_ = np.stack(ms), np.stack(ls), np.stack(os_)
    M = ms.max(axis=0)
    with np.errstate(invalid="ignore"):
        w = np.where(ms == -np.inf, 0.0, np.exp2(ms - M[None]))
    L = (ls * w).sum(axis=0)
    O = (os_ * w[..., None]).sum(axis=0)
    return M, L, O


def finish(M, L, O):
    inv = np.where(L > 0, 1.0 / np.where(L > 0, L, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(L > 0, (M + np.log2(np.where(L > 0, L, 1.0))) / LOG2E, -np.inf)
    return O * inv[:, None], lse


# ----------------------------------------------------------------- attention_fwd.cu
def emulate_fused(q, k, v, left, right, causal, lms, flags, padding, scale, count):
    """fused_fwd_kernel + landmark_rows_kernel. Returns out, lse; adds visits into count."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    out = np.full((B, Hq, Nq, v.shape[3]), np.nan)
    lse = np.full((B, Hq, Nq), np.nan)
    offset = Nk - Nq
    for b in range(B):
        pat = Pat(Nk, None if flags is None else flags[b], None if padding is None else padding[b])
        lm = None if lms is None else lms[b]
        for h in range(Hq):
            hk = h // (Hq // Hk)
            for tile in range((Nq + BM - 1) // BM):          # blockIdx.x
                i0 = tile * BM
                r0, r1 = i0 + offset, min(i0 + BM, Nq) + offset
                rows = i0 + np.arange(BM)
                r = rows + offset
                row_ok = (rows < Nq) & ~pat.is_landmark(r)
                q_rows = np.where(rows < Nq, rows, -1)
                qt = np.where((q_rows >= 0)[:, None], q[b, h, np.clip(q_rows, 0, Nq - 1)], 0.0)
                lo, hi = window_band(r0, r1, Nk, left, right, causal)
                n_band = (hi - lo + BN - 1) // BN if hi > lo else 0
                n_lm = (len(lm) + BN - 1) // BN if lm is not None else 0
                st = OnlineRow(BM, v.shape[3])
                for t in range(n_band + n_lm):
                    tid = np.arange(BN)
                    if t < n_band:
                        j = lo + t * BN + tid
                        j = np.where(j >= hi, -1, j)
                    else:
                        g = (t - n_band) * BN + tid
                        j = np.full(BN, -1)
                        ok = g < len(lm)
                        pos = lm[np.where(ok, g, 0)]
                        in_band = (pos >= lo) & (pos < hi)
                        take = ok & ~in_band & ~(causal & (pos >= r1))
                        j = np.where(take, pos, -1)
                    assert ((j == -1) | ((j >= 0) & (j < Nk))).all()
                    jj = np.clip(j, 0, Nk - 1)
                    kt = np.where((j >= 0)[:, None], k[b, hk, jj], 0.0)
                    vt = np.where((j >= 0)[:, None], v[b, hk, jj], 0.0)
                    vis = (row_ok[:, None] & (j >= 0)[None, :]
                           & visible(r[:, None], j[None, :], left, right, causal,
                                     pat.is_landmark(jj)[None, :], False,
                                     pat.key_real(jj)[None, :]))
                    np.add.at(count[b], (np.clip(rows, 0, Nq - 1)[:, None].repeat(BN, 1)[vis],
                                         jj[None, :].repeat(BM, 0)[vis]), 1)
                    st.step(qt @ kt.T * scale * LOG2E, vis, vt)
                o, l = finish(st.m, st.l, st.o)
                n = min(BM, Nq - i0)
                out[b, h, i0:i0 + n], lse[b, h, i0:i0 + n] = o[:n], l[:n]
            if lm is None:
                continue
            for g in range(len(lm)):                          # landmark_rows_kernel
                r_ = int(lm[g])
                i = r_ - offset
                if i < 0 or i >= Nq:
                    continue
                lo, hi = landmark_row_range(r_, Nk, causal)
                states = []
                for warp in range(WARPS):
                    st = OnlineRow(1, v.shape[3])
                    for base in range(lo + warp * 32, hi, WARPS * 32):
                        j = base + np.arange(32)
                        jj = np.clip(j, 0, Nk - 1)
                        ok = (j < hi) & pat.key_real(jj)
                        n = min(32, hi - base)
                        assert base + n <= Nk
                        vt = np.zeros((32, v.shape[3]))
                        vt[:n] = v[b, hk, base:base + n]   # V rows base..base+n-1 only
                        np.add.at(count[b], (np.full(ok.sum(), i), j[ok]), 1)
                        st.step((q[b, h, i] @ k[b, hk, jj].T * scale * LOG2E)[None], ok[None], vt)
                    states.append(st)
                M, L, O = merge_states([s.m[0] for s in states], [s.l[0] for s in states],
                                       [s.o[0] for s in states])
                o, l = finish(np.array([M]), np.array([L]), O[None])
                out[b, h, i], lse[b, h, i] = o[0], l[0]
    return out, lse


# ----------------------------------------------------------------- attention_int8_split.cu
def rows_for(nq):
    return 1 if nq <= 1 else 4 if nq <= 4 else 16


def emulate_int8_split(q, k, v, left, right, causal, flags, padding, scale, num_splits, count):
    """int8_split_kernel + merge_splits_kernel, on exact float scores (the int8 dot products
    and their scales are elementwise and not what this checks)."""
    B, Hq, Nq, _ = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    ROWS = rows_for(Nq)
    offset = Nk - Nq
    chunk = ((Nk + num_splits - 1) // num_splits + 31) // 32 * 32
    out = np.full((B, Hq, Nq, Dv), np.nan)
    lse = np.full((B, Hq, Nq), np.nan)
    for b in range(B):
        pat = Pat(Nk, None if flags is None else flags[b], None if padding is None else padding[b])
        for h in range(Hq):
            hk = h // (Hq // Hk)
            parts = {i: [] for i in range(Nq)}
            for split in range(num_splits):
                k_lo, k_hi = split * chunk, min(split * chunk + chunk, Nk)
                for z in range((Nq + ROWS - 1) // ROWS):
                    i0 = z * ROWS
                    nrows = min(ROWS, Nq - i0)
                    rr = np.arange(ROWS)
                    row_pos = i0 + rr + offset
                    qz = np.zeros((ROWS, q.shape[3]))
                    qz[:nrows] = q[b, h, i0:i0 + nrows]
                    states = []
                    for warp in range(WARPS):
                        st = OnlineRow(ROWS, Dv)
                        for base in range(k_lo + warp * 32, k_hi, WARPS * 32):
                            j = base + np.arange(32)
                            jj = np.clip(j, 0, Nk - 1)
                            vis = ((rr < nrows)[:, None] & (j < k_hi)[None, :]
                                   & visible(row_pos[:, None], j[None, :], left, right, causal,
                                             pat.is_landmark(jj)[None, :],
                                             pat.is_landmark(row_pos)[:, None],
                                             pat.key_real(jj)[None, :]))
                            if not vis.any():
                                continue
                            n = min(32, k_hi - base)
                            assert base + n <= Nk
                            vt = np.zeros((32, Dv))
                            vt[:n] = v[b, hk, base:base + n]
                            ri, ci = np.nonzero(vis)
                            np.add.at(count[b], (i0 + ri, j[ci]), 1)
                            st.step(qz @ k[b, hk, jj].T * scale * LOG2E, vis, vt)
                        states.append(st)
                    for r in range(nrows):
                        parts[i0 + r].append(merge_states([s.m[r] for s in states],
                                                          [s.l[r] for s in states],
                                                          [s.o[r] for s in states]))
            for i in range(Nq):
                M, L, O = merge_states(*zip(*parts[i]))
                o, l = finish(np.array([M]), np.array([L]), O[None])
                out[b, h, i], lse[b, h, i] = o[0], l[0]
    return out, lse


# ----------------------------------------------------------------- cases
CASES = [
    # B, Hq, Hk, Nq, Nk, D, window, causal, landmarks, padding
    (2, 2, 1, 97, 97, 8, (16, 16), False, "per_batch", True),
    (1, 2, 2, 130, 130, 8, (5, 0), True, "shared", False),
    (1, 1, 1, 50, 300, 8, (32, -1), True, "shared", True),
    (1, 1, 1, 150, 70, 8, (8, 8), True, "per_batch", False),    # Nq > Nk: negative r
    (2, 1, 1, 70, 70, 8, (0, 0), False, None, "empty"),         # empty rows
    (1, 2, 1, 65, 129, 8, (-1, 3), False, "per_batch", True),
    (1, 1, 1, 1, 1000, 8, (100, 0), True, "shared", True),      # decode
    (1, 1, 1, 3, 700, 8, (-1, -1), False, None, False),
]


def make_case(B, Hq, Hk, Nq, Nk, D, window, causal, landmarks, padding, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, Nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, Nk, D + 3, generator=g, dtype=torch.float64)
    lms = None
    if landmarks is not None:
        G = min(9, Nk)
        rows = 1 if landmarks == "shared" else B
        lms = torch.stack([torch.randperm(Nk, generator=g)[:G].sort().values for _ in range(rows)])
        lms = lms.expand(B, G)
    kpm = None
    if padding is True:
        kpm = torch.rand(B, Nk, generator=g) > 0.2
    elif padding == "empty":
        kpm = torch.ones(B, Nk, dtype=torch.bool)
        kpm[:, 10:30] = False
    return q, k, v, lms, kpm


def _np_pattern(lms, kpm, B, Nk):
    flags = None
    if lms is not None:
        flags = np.zeros((B, Nk), dtype=bool)
        for b in range(B):
            flags[b, lms[b].numpy()] = True
    return (None if lms is None else lms.numpy()), flags, (None if kpm is None else kpm.numpy())


def _check(out, lse, count, q, k, v, left, right, causal, lms, kpm, scale):
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    mask = visibility_mask(B, Nq, Nk, window_left=left, window_right=right, causal=causal,
                           landmarks=lms, key_padding_mask=kpm)[:, 0].numpy()
    heads = q.shape[1]
    assert (count == mask * heads).all(), "some visible pair missed / double-counted / invisible"
    ref_o, ref_l = dense_reference(q, k, v, window_left=left, window_right=right, causal=causal,
                                   landmarks=lms, key_padding_mask=kpm, scale=scale,
                                   compute_dtype=torch.float64)
    assert not np.isnan(out).any() and not np.isnan(lse).any(), "a row was never written"
    np.testing.assert_allclose(out, ref_o.numpy(), rtol=1e-9, atol=1e-9)
    empty = ~mask.any(axis=-1)
    assert (np.isneginf(lse) == empty[:, None, :]).all()
    assert (out[np.broadcast_to(empty[:, None, :], lse.shape)] == 0).all()
    fin = ~np.isneginf(lse)
    np.testing.assert_allclose(lse[fin], ref_l.numpy()[fin], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("idx", range(len(CASES)))
def test_fused_tiling_matches_oracle(idx):
    B, Hq, Hk, Nq, Nk, D, (left, right), causal, lm, pad = CASES[idx]
    q, k, v, lms, kpm = make_case(B, Hq, Hk, Nq, Nk, D, (left, right), causal, lm, pad, idx)
    lms_np, flags, pad_np = _np_pattern(lms, kpm, B, Nk)
    scale = D ** -0.5
    count = np.zeros((B, Nq, Nk), dtype=np.int64)
    out, lse = emulate_fused(q.numpy(), k.numpy(), v.numpy(), left, right, causal, lms_np, flags,
                             pad_np, scale, count)
    _check(out, lse, count, q, k, v, left, right, causal, lms, kpm, scale)


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("idx", [0, 2, 3, 4, 6, 7])
def test_int8_split_tiling_matches_oracle(idx, splits):
    B, Hq, Hk, Nq, Nk, D, (left, right), causal, lm, pad = CASES[idx]
    q, k, v, lms, kpm = make_case(B, Hq, Hk, Nq, Nk, D, (left, right), causal, lm, pad, idx)
    _, flags, pad_np = _np_pattern(lms, kpm, B, Nk)
    scale = D ** -0.5
    count = np.zeros((B, Nq, Nk), dtype=np.int64)
    out, lse = emulate_int8_split(q.numpy(), k.numpy(), v.numpy(), left, right, causal, flags,
                                  pad_np, scale, splits, count)
    _check(out, lse, count, q, k, v, left, right, causal, lms, kpm, scale)


def test_num_splits_and_rows_per_cta():
    from hybrid_kernels.backends.cuda import int8_rows_per_cta, num_splits_for
    assert [int8_rows_per_cta(n) for n in (1, 2, 4, 5, 16, 33)] == [1, 4, 4, 16, 16, 16]
    for bh in (1, 8, 64, 512, 4096):
        for nk in (1, 100, 4096, 65536):
            s = num_splits_for(bh, nk, 132)
            assert 1 <= s <= 256
            assert s == 1 or math.ceil(nk / s) >= 256, (bh, nk, s)
            assert bh * s <= max(bh, 16 * 132), (bh, nk, s)


def test_mirrored_constants_match_the_sources():
    """The emulation's tile sizes and row rule are those of the .cu files."""
    import pathlib
    import re
    src = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    fwd = (src / "attention_fwd.cu").read_text()
    int8 = (src / "attention_int8_split.cu").read_text()
    assert re.search(r"constexpr int BM = (\d+);", fwd).group(1) == str(BM)
    assert re.search(r"constexpr int BN = (\d+);", fwd).group(1) == str(BN)
    for text in (fwd, int8):
        assert re.search(r"constexpr int WARPS = (\d+);", text).group(1) == str(WARPS)
    assert "return nq <= 1 ? 1 : nq <= 4 ? 4 : 16;" in int8
    assert "((p.Nk + sp.num_splits - 1) / sp.num_splits + 31) / 32 * 32" in int8
