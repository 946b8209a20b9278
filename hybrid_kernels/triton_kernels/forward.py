"""Fused forward: one online softmax per query tile over the window band plus gathered landmarks.

Two launches of one kernel:
* regular mode: a contiguous query tile walks the key tiles of its window band and then the
  landmark keys outside the band (gathered by index, never scanned);
* LM_MODE: tiles of landmark query rows (gathered) walk every key (up to the causal limit).
  It runs second and overwrites those rows, whatever the first launch wrote there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (PATTERN_KEYS, PRUNE, dot_precision, forward_configs, landmark_key_splits,
                      padded_head_dim)
from .masking import (dot, interior_tiles, landmark_visible, query_rows, to_dtype, visible,
                      window_band)
from .modifiers import modify_scores
from .pattern_args import pattern_args
from .quantize import int8_scores
from .splits import combine_splits, split_workspace

LOG2E = 1.4426950408889634


@triton.jit
def scores(q, k, qs, qshift, KS, ks_base, r, j, col_ok, k_block, scale_log2, bias_h, Nk, n_off,
           softcap2, IEEE: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr,
           HAS_BIAS: tl.constexpr):
    """The modified scores in base 2 for rows r and one key block j: scale * q.k, then the
    score modifiers; QUANT: int8 q, k with per-block scales (k smoothed: q.(k - mean); under a
    softcap the per-row shift qshift = scale * log2(e) * q.mean is added back before the cap)."""
    if QUANT:
        ks = tl.load(KS + ks_base + j // k_block, mask=col_ok, other=0.0)
        s = int8_scores(q, k, qs, ks) * scale_log2
        if SOFTCAP:
            s = s + qshift[:, None]
    else:
        s = dot(q, tl.trans(k), IEEE) * scale_log2
    s, _ = modify_scores(s, r, j, bias_h, Nk, n_off, softcap2, SOFTCAP, HAS_BIAS)
    return s


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, vis, IEEE: tl.constexpr, MASKED: tl.constexpr = True):
    """Fold one key block (base-2 scores s) into the running (acc, max, sum)."""
    if MASKED:
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(to_dtype(p, v.dtype, IEEE), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def key_tiles(acc, m_i, l_i, q, qs, qshift, r, row_ok, n_from, n_to, lo, hi, b, k_base, v_base,
              sk_n, sv_n, FLAGS, fl_sb, PAD, pad_sb, KS, ks_base, k_block, left, right, D, DV,
              scale_log2, bias_h, Nk, n_off, softcap2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_LM: tl.constexpr,
              HAS_PAD: tl.constexpr, LM_MODE: tl.constexpr, MASKED: tl.constexpr,
              IEEE: tl.constexpr, QUANT: tl.constexpr, SOFTCAP: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """Fold the key tiles starting at n_from, n_from + BLOCK_N, ... < n_to (keys clipped to
    [lo, hi)). MASKED=False: every pair of these tiles is visible (interior of the band)."""
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    no_row_lm = tl.zeros([BLOCK_M], dtype=tl.int8)
    for n0 in range(n_from, n_to, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            col_ok = (j >= lo) & (j < hi)
            real = tl.load(PAD + b * pad_sb + j, mask=col_ok, other=0) if HAS_PAD else col_ok
            if LM_MODE:
                vis = landmark_visible(r, j, row_ok, col_ok, real, CAUSAL, HAS_PAD)
            else:
                key_lm = tl.load(FLAGS + b * fl_sb + j, mask=col_ok, other=0) if HAS_LM else col_ok
                vis = visible(r, j, row_ok, col_ok, left, right, key_lm, no_row_lm, real,
                              CAUSAL, HAS_LM, HAS_PAD)
            kv_ok = (col_ok & (real != 0)) if HAS_PAD else col_ok  # padding K/V are never read
        else:
            kv_ok = j < hi  # always true here; keeps one code path for the loads
            vis = kv_ok[None, :]
        k = tl.load(k_base + j[:, None].to(tl.int64) * sk_n + d[None, :],
                    mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(v_base + j[:, None].to(tl.int64) * sv_n + dv[None, :],
                    mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
        s = scores(q, k, qs, qshift, KS, ks_base, r, j, kv_ok, k_block, scale_log2, bias_h, Nk,
                   n_off, softcap2, IEEE, QUANT, SOFTCAP, HAS_BIAS)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, vis, IEEE, MASKED)
    return acc, m_i, l_i


@triton.autotune(configs=forward_configs(), key=PATTERN_KEYS + ["QUANT", "SPLIT"],
                 prune_configs_by=PRUNE)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, LM, FLAGS, PAD, BIAS,
                sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                lm_sb, fl_sb, pad_sb, bias_sh, softcap2,
                Hq, Nq, Nk, D, DV, G, left, right, scale_log2,
                QS, KS, QSHIFT, q_block, k_block, n_qblocks, n_kblocks, WS, WS_ML, split_len,
                n_splits,
                GROUPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_LM: tl.constexpr, HAS_PAD: tl.constexpr,
                LM_MODE: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
                SPLIT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    split = 0
    if SPLIT:  # LM_MODE only: program = (landmark row tile, key split)
        split = pid_m % n_splits
        pid_m = pid_m // n_splits
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUPS
    off = Nk - Nq
    i, row_ok = query_rows(pid_m, b, LM, lm_sb, G, Nq, off, BLOCK_M, LM_MODE)
    r = i + off
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    q = tl.load(q_base + i[:, None].to(tl.int64) * sq_n + d[None, :],
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    qs = tl.load(QS + bh.to(tl.int64) * n_qblocks + i // q_block, mask=row_ok,
                 other=0.0) if QUANT else 0.0
    qshift = 0.0
    if QUANT:
        if SOFTCAP:
            qshift = tl.load(QSHIFT + bh.to(tl.int64) * Nq + i, mask=row_ok, other=0.0)
    ks_base = (b * (Hq // GROUPS) + hk).to(tl.int64) * n_kblocks
    bias_h = BIAS + h.to(tl.int64) * bias_sh
    n_off = Nq + Nk - 1
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    if LM_MODE:
        lo = split * split_len
        hi = tl.minimum(lo + split_len, Nk)
        if CAUSAL:
            hi = tl.minimum(tl.max(tl.where(row_ok, r, -1), 0) + 1, hi)
        acc, m_i, l_i = key_tiles(
            acc, m_i, l_i, q, qs, qshift, r, row_ok, lo, hi, lo, hi, b, k_base, v_base, sk_n, sv_n,
            FLAGS, fl_sb, PAD, pad_sb, KS, ks_base, k_block, left, right, D, DV, scale_log2,
            bias_h, Nk, n_off, softcap2, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM,
            HAS_PAD, True, True, IEEE, QUANT, SOFTCAP, HAS_BIAS)
    else:
        r0 = pid_m * BLOCK_M + off
        r1 = tl.minimum(r0 + BLOCK_M, Nq + off)
        lo, hi = window_band(r0, r1, Nk, left, right, CAUSAL)
        start = (lo // BLOCK_N) * BLOCK_N
        # Tiles [a, c) are visible to every row of the tile: no mask (none with padding).
        a, c = interior_tiles(r0, r1, lo, hi, start, left, right, BLOCK_N, CAUSAL, HAS_PAD)
        acc, m_i, l_i = key_tiles(
            acc, m_i, l_i, q, qs, qshift, r, row_ok, start, a, lo, hi, b, k_base, v_base, sk_n,
            sv_n,
            FLAGS, fl_sb, PAD, pad_sb, KS, ks_base, k_block, left, right, D, DV, scale_log2,
            bias_h, Nk, n_off, softcap2, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM,
            HAS_PAD, False, True, IEEE, QUANT, SOFTCAP, HAS_BIAS)
        acc, m_i, l_i = key_tiles(
            acc, m_i, l_i, q, qs, qshift, r, row_ok, a, c, lo, hi, b, k_base, v_base, sk_n, sv_n,
            FLAGS, fl_sb, PAD, pad_sb, KS, ks_base, k_block, left, right, D, DV, scale_log2,
            bias_h, Nk, n_off, softcap2, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM,
            HAS_PAD, False, False, IEEE, QUANT, SOFTCAP, HAS_BIAS)
        acc, m_i, l_i = key_tiles(
            acc, m_i, l_i, q, qs, qshift, r, row_ok, c, hi, lo, hi, b, k_base, v_base, sk_n, sv_n,
            FLAGS, fl_sb, PAD, pad_sb, KS, ks_base, k_block, left, right, D, DV, scale_log2,
            bias_h, Nk, n_off, softcap2, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM,
            HAS_PAD, False, True, IEEE, QUANT, SOFTCAP, HAS_BIAS)

    if HAS_LM and not LM_MODE:
        # Landmark keys outside the band, gathered by position.
        for g0 in range(0, G, BLOCK_N):
            g = g0 + tl.arange(0, BLOCK_N)
            j = tl.load(LM + b * lm_sb + g, mask=g < G, other=0)
            col_ok = (g < G) & ((j < lo) | (j >= hi))
            real = tl.load(PAD + b * pad_sb + j, mask=col_ok, other=0) if HAS_PAD else col_ok
            vis = landmark_visible(r, j, row_ok, col_ok, real, CAUSAL, HAS_PAD)
            kv_ok = (col_ok & (real != 0)) if HAS_PAD else col_ok
            k = tl.load(k_base + j[:, None] * sk_n + d[None, :],
                        mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
            v = tl.load(v_base + j[:, None] * sv_n + dv[None, :],
                        mask=kv_ok[:, None] & (dv[None, :] < DV), other=0.0)
            s = scores(q, k, qs, qshift, KS, ks_base, r, j, col_ok, k_block, scale_log2, bias_h,
                       Nk, n_off, softcap2, IEEE, QUANT, SOFTCAP, HAS_BIAS)
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, vis, IEEE)

    if SPLIT:
        # Unnormalized partial state of this key split; splits.py combines them.
        g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ws_row = (bh.to(tl.int64) * n_splits + split) * G + g
        tl.store(WS + ws_row[:, None] * BLOCK_DV + dv[None, :], acc, mask=(g < G)[:, None])
        tl.store(WS_ML + ws_row * 2, m_i, mask=g < G)
        tl.store(WS_ML + ws_row * 2 + 1, l_i, mask=g < G)
        return
    empty = l_i == 0.0  # (a NaN input gives l = NaN, not empty: it propagates like SDPA)
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    o_base = O + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h
    tl.store(o_base + i[:, None].to(tl.int64) * so_n + dv[None, :],
             to_dtype(out, O.dtype.element_ty, IEEE),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * Nq + i, lse, mask=row_ok)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def launch_forward(q, k, v, out, lse, pattern, quantized=None):
    """Launch the forward (regular mode, then LM_MODE when there are landmarks).

    ``quantized``: None, or (q8, q_scale, k8, k_scale, q_block, k_block, q_shift) from
    quantize.py and int8.py, in which case q and k are only used for shapes and v stays in its
    dtype; q_shift (B, Hq, Nq) fp32 (base 2) is read under a softcap only."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    pa = pattern_args(pattern, Nq, Nk, q.device)
    if quantized is not None:
        q8, q_scale, k8, k_scale, q_block, k_block, q_shift = quantized
        quant_args = (q_scale, k_scale, q_shift, q_block, k_block, q_scale.shape[-1],
                      k_scale.shape[-1])
        q, k = q8, k8
    else:
        quant_args = (lse, lse, lse, 1, 1, 0, 0)  # unused
    args = (q, k, v, out, lse, pa.landmarks, pa.flags, pa.padding, pa.bias,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            pa.lm_sb, pa.flags_sb, pa.padding_sb, pa.bias_sh, pa.softcap2,
            Hq, Nq, Nk, D, Dv, pa.num_landmarks, pa.left, pa.right, pa.scale * LOG2E,
            *quant_args)
    meta = dict(GROUPS=Hq // Hk, BLOCK_D=padded_head_dim(D), BLOCK_DV=padded_head_dim(Dv),
                CAUSAL=pa.causal, HAS_LM=pa.has_landmarks, HAS_PAD=pa.has_padding,
                IEEE=dot_precision(v.dtype), QUANT=quantized is not None,
                SOFTCAP=pa.has_softcap, HAS_BIAS=pa.has_bias)
    no_split = (lse, lse, Nk, 1)  # unused workspace arguments
    _fwd_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * Hq)](
        *args, *no_split, LM_MODE=False, SPLIT=False, **meta)
    if not pa.has_landmarks:
        return
    # Landmark query rows see every key: split the keys over programs (flash-decoding style)
    # when a few rows per head would otherwise walk all of Nk alone.
    G = pa.num_landmarks
    split_len, n_splits = landmark_key_splits(Nk, B * Hq)
    if n_splits == 1:
        _fwd_kernel[lambda m: (triton.cdiv(G, m["BLOCK_M"]), B * Hq)](
            *args, *no_split, LM_MODE=True, SPLIT=False, **meta)
        return
    ws, ws_ml = split_workspace(B * Hq, n_splits, G, meta["BLOCK_DV"], q.device)
    _fwd_kernel[lambda m: (triton.cdiv(G, m["BLOCK_M"]) * n_splits, B * Hq)](
        *args, ws, ws_ml, split_len, n_splits, LM_MODE=True, SPLIT=True, **meta)
    combine_splits(ws, ws_ml, pa.landmarks, Nq, Nk, out, lse)


def attention_forward(q, k, v, pattern, out, lse):
    """Fill ``out`` (B, Hq, Nq, Dv) and ``lse`` (B, Hq, Nq) fp32 contiguous."""
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    launch_forward(q, k, v, out, lse, pattern)
    return out, lse
