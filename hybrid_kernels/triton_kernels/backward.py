"""Backward (dQ, dK, dV, and dbias when asked) by recomputation from the saved LSE. dQ, dK, dV are
deterministic (no atomics); dbias is summed with atomic adds in the dQ pass, so its low bits may
vary from run to run.

* dQ: query-tile-major, the same key sets as the forward (window band + gathered landmark keys;
  landmark query rows in a second LM_MODE launch over every key, overwriting those rows).
* dK/dV: key-tile-major. A regular key tile walks the query tiles whose window band reaches it
  (the inverse band) and then the landmark query rows outside that range, gathered; GQA sums the
  query heads of a group inside the program, in a fixed order. Landmark keys are seen by every
  query, so a second LM_MODE launch over tiles of gathered landmark keys walks all query rows
  and overwrites those keys' rows.
delta = rowsum(dO * O) is precomputed in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (PATTERN_KEYS, PRUNE, backward_configs, dot_precision, landmark_key_splits,
                      padded_head_dim)
from .forward import LOG2E, last_dim_contiguous
from .masking import (dot, interior_query_tiles, interior_tiles, landmark_visible, query_band,
                      query_rows, to_dtype, visible, window_band)
from .modifiers import add_bias_grad, modify_scores
from .pattern_args import pattern_args
from .splits import scatter_split_sums


@triton.jit
def load_query_side(q_base, do_base, LSE, DELTA, row_base, i, row_ok, d, dv, sq_n, sdo_n, D, DV):
    """q, dO, lse (base 2, 0 for empty rows) and delta of query rows i."""
    i64 = i[:, None].to(tl.int64)
    q = tl.load(q_base + i64 * sq_n + d[None, :], mask=row_ok[:, None] & (d[None, :] < D),
                other=0.0)
    do = tl.load(do_base + i64 * sdo_n + dv[None, :], mask=row_ok[:, None] & (dv[None, :] < DV),
                 other=0.0)
    lse = tl.load(LSE + row_base + i, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(DELTA + row_base + i, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def probabilities(q, k, lse2, vis, scale_log2, r, j, bias_h, Nk, n_off, softcap2,
                  IEEE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """P of the modified scores, and d(capped)/d(raw score) (1 without softcap)."""
    s = dot(q, tl.trans(k), IEEE) * scale_log2
    s, dcap = modify_scores(s, r, j, bias_h, Nk, n_off, softcap2, SOFTCAP, HAS_BIAS)
    return tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0), dcap


@triton.jit
def dq_step(dq, q, do, lse2, delta, k, v, vis, scale_log2, r, j, bias_h, dbias_h, bias_rows, Nk,
            n_off, softcap2, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
            BIAS_GRAD: tl.constexpr):
    """dQ of one key block; BIAS_GRAD: also dS into dbias, for the rows of bias_rows."""
    p, dcap = probabilities(q, k, lse2, vis, scale_log2, r, j, bias_h, Nk, n_off, softcap2,
                            IEEE, SOFTCAP, HAS_BIAS)
    dp = dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    if BIAS_GRAD:
        add_bias_grad(dbias_h, ds, r, j, Nk, n_off, vis & bias_rows[:, None])
    if SOFTCAP:
        ds = ds * dcap
    return dq + dot(to_dtype(ds, k.dtype, IEEE), k, IEEE)


@triton.jit
def dkdv_step(dk, dv, q, do, lse2, delta, k, v, vis, scale_log2, r, j, bias_h, Nk, n_off,
              softcap2, IEEE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
    p, dcap = probabilities(q, k, lse2, vis, scale_log2, r, j, bias_h, Nk, n_off, softcap2,
                            IEEE, SOFTCAP, HAS_BIAS)
    dv = dv + dot(tl.trans(to_dtype(p, do.dtype, IEEE)), do, IEEE)
    dp = dot(do, tl.trans(v), IEEE)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * dcap
    dk = dk + dot(tl.trans(to_dtype(ds, q.dtype, IEEE)), q, IEEE)
    return dk, dv


@triton.jit
def dq_key_tiles(dq, q, do, lse2, delta, r, row_ok, n_from, n_to, lo, hi, b, k_base, v_base,
                 sk_n, sv_n, FLAGS, fl_sb, PAD, pad_sb, left, right, D, DV, scale_log2,
                 bias_h, dbias_h, bias_rows, Nk, n_off, softcap2,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, HAS_LM: tl.constexpr,
                 HAS_PAD: tl.constexpr, LM_MODE: tl.constexpr, MASKED: tl.constexpr,
                 IEEE: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BIAS_GRAD: tl.constexpr):
    """dQ over the key tiles n_from, n_from + BLOCK_N, ... < n_to (keys clipped to [lo, hi));
    MASKED=False: every pair is visible."""
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
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
            kv_ok = (col_ok & (real != 0)) if HAS_PAD else col_ok
        else:
            kv_ok = j < hi  # always true here
            vis = row_ok[:, None] & kv_ok[None, :]
        k = tl.load(k_base + j[:, None].to(tl.int64) * sk_n + d[None, :],
                    mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
        v = tl.load(v_base + j[:, None].to(tl.int64) * sv_n + dvr[None, :],
                    mask=kv_ok[:, None] & (dvr[None, :] < DV), other=0.0)
        dq = dq_step(dq, q, do, lse2, delta, k, v, vis, scale_log2, r, j, bias_h, dbias_h,
                     bias_rows, Nk, n_off, softcap2, IEEE, SOFTCAP, HAS_BIAS, BIAS_GRAD)
    return dq


@triton.jit
def dkdv_query_tiles(dk, dv, k, v, j, col_ok, real, key_lm, q_base, do_base, LSE, DELTA,
                     row_base, m_from, m_to, i_lo, i_hi, off, Nk, FLAGS, fl_sb, b, sq_n, sdo_n,
                     left, right, D, DV, scale_log2, bias_h, n_off, softcap2,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_LM: tl.constexpr, HAS_PAD: tl.constexpr,
                     LM_MODE: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
                     SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dK, dV of one key tile over the query tiles m_from, m_from + BLOCK_M, ... < m_to (rows
    clipped to [i_lo, i_hi)); MASKED=False: every pair is visible."""
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    for m0 in range(m_from, m_to, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        row_ok = (i >= i_lo) & (i < i_hi)
        r = i + off
        if MASKED:
            if LM_MODE:
                vis = landmark_visible(r, j, row_ok, col_ok, real, CAUSAL, HAS_PAD)
            else:
                if HAS_LM:
                    row_lm = tl.load(FLAGS + b * fl_sb + r, mask=row_ok & (r >= 0) & (r < Nk),
                                     other=0)
                else:
                    row_lm = tl.zeros([BLOCK_M], dtype=tl.int8)
                vis = visible(r, j, row_ok, col_ok, left, right, key_lm, row_lm, real,
                              CAUSAL, HAS_LM, HAS_PAD)
        else:
            vis = row_ok[:, None] & col_ok[None, :]
        q, do, lse2, delta = load_query_side(q_base, do_base, LSE, DELTA, row_base, i,
                                             row_ok, d, dvr, sq_n, sdo_n, D, DV)
        dk, dv = dkdv_step(dk, dv, q, do, lse2, delta, k, v, vis, scale_log2, r, j, bias_h, Nk,
                           n_off, softcap2, IEEE, SOFTCAP, HAS_BIAS)
    return dk, dv


# restore_value: the autotuner's benchmark runs must not add into dbias (the atomic adds of the
# chosen config's run accumulate onto what the previous launches left there).
@triton.autotune(configs=backward_configs(), key=PATTERN_KEYS + ["SPLIT", "BIAS_GRAD"],
                 restore_value=["DBIAS"], prune_configs_by=PRUNE)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, LM, FLAGS, PAD, BIAS, DBIAS,
                   sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                   sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n,
                   lm_sb, fl_sb, pad_sb, bias_sh, softcap2,
                   Hq, Nq, Nk, D, DV, G, left, right, scale, scale_log2, WS, split_len, n_splits,
                   GROUPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_LM: tl.constexpr, HAS_PAD: tl.constexpr,
                   LM_MODE: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
                   SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
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
    dvr = tl.arange(0, BLOCK_DV)
    k_base = K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    q, do, lse2, delta = load_query_side(
        Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h,
        DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h,
        LSE, DELTA, bh.to(tl.int64) * Nq, i, row_ok, d, dvr, sq_n, sdo_n, D, DV)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bias_h = BIAS + h.to(tl.int64) * bias_sh
    dbias_h = DBIAS + h.to(tl.int64) * bias_sh
    n_off = Nq + Nk - 1
    # dbias takes each visible pair once: landmark query rows only from the LM_MODE launch
    # (the regular launch computes them too, for dQ rows that LM_MODE then overwrites).
    bias_rows = row_ok
    if BIAS_GRAD and HAS_LM and not LM_MODE:
        row_lm = tl.load(FLAGS + b * fl_sb + r, mask=row_ok & (r >= 0) & (r < Nk), other=0)
        bias_rows = row_ok & (row_lm == 0)

    if LM_MODE:
        lo = split * split_len
        hi = tl.minimum(lo + split_len, Nk)
        if CAUSAL:
            hi = tl.minimum(tl.max(tl.where(row_ok, r, -1), 0) + 1, hi)
        dq = dq_key_tiles(dq, q, do, lse2, delta, r, row_ok, lo, hi, lo, hi, b, k_base, v_base,
                          sk_n, sv_n, FLAGS, fl_sb, PAD, pad_sb, left, right, D, DV, scale_log2,
                          bias_h, dbias_h, bias_rows, Nk, n_off, softcap2,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM, HAS_PAD,
                          True, True, IEEE, SOFTCAP, HAS_BIAS, BIAS_GRAD)
    else:
        r0 = pid_m * BLOCK_M + off
        r1 = tl.minimum(r0 + BLOCK_M, Nq + off)
        lo, hi = window_band(r0, r1, Nk, left, right, CAUSAL)
        start = (lo // BLOCK_N) * BLOCK_N
        a, c = interior_tiles(r0, r1, lo, hi, start, left, right, BLOCK_N, CAUSAL, HAS_PAD)
        dq = dq_key_tiles(dq, q, do, lse2, delta, r, row_ok, start, a, lo, hi, b, k_base, v_base,
                          sk_n, sv_n, FLAGS, fl_sb, PAD, pad_sb, left, right, D, DV, scale_log2,
                          bias_h, dbias_h, bias_rows, Nk, n_off, softcap2,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM, HAS_PAD,
                          False, True, IEEE, SOFTCAP, HAS_BIAS, BIAS_GRAD)
        dq = dq_key_tiles(dq, q, do, lse2, delta, r, row_ok, a, c, lo, hi, b, k_base, v_base,
                          sk_n, sv_n, FLAGS, fl_sb, PAD, pad_sb, left, right, D, DV, scale_log2,
                          bias_h, dbias_h, bias_rows, Nk, n_off, softcap2,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM, HAS_PAD,
                          False, False, IEEE, SOFTCAP, HAS_BIAS, BIAS_GRAD)
        dq = dq_key_tiles(dq, q, do, lse2, delta, r, row_ok, c, hi, lo, hi, b, k_base, v_base,
                          sk_n, sv_n, FLAGS, fl_sb, PAD, pad_sb, left, right, D, DV, scale_log2,
                          bias_h, dbias_h, bias_rows, Nk, n_off, softcap2,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, CAUSAL, HAS_LM, HAS_PAD,
                          False, True, IEEE, SOFTCAP, HAS_BIAS, BIAS_GRAD)

    if HAS_LM and not LM_MODE:
        for g0 in range(0, G, BLOCK_N):
            g = g0 + tl.arange(0, BLOCK_N)
            j = tl.load(LM + b * lm_sb + g, mask=g < G, other=0)
            col_ok = (g < G) & ((j < lo) | (j >= hi))
            real = tl.load(PAD + b * pad_sb + j, mask=col_ok, other=0) if HAS_PAD else col_ok
            vis = landmark_visible(r, j, row_ok, col_ok, real, CAUSAL, HAS_PAD)
            kv_ok = (col_ok & (real != 0)) if HAS_PAD else col_ok
            k = tl.load(k_base + j[:, None] * sk_n + d[None, :],
                        mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
            v = tl.load(v_base + j[:, None] * sv_n + dvr[None, :],
                        mask=kv_ok[:, None] & (dvr[None, :] < DV), other=0.0)
            dq = dq_step(dq, q, do, lse2, delta, k, v, vis, scale_log2, r, j, bias_h, dbias_h,
                         bias_rows, Nk, n_off, softcap2, IEEE, SOFTCAP, HAS_BIAS, BIAS_GRAD)

    if SPLIT:  # partial sum of this key split; summed in order by splits.py
        g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ws_row = (bh.to(tl.int64) * n_splits + split) * G + g
        tl.store(WS + ws_row[:, None] * BLOCK_D + d[None, :], dq * scale, mask=(g < G)[:, None])
        return
    dq_base = DQ + b.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h
    tl.store(dq_base + i[:, None].to(tl.int64) * sdq_n + d[None, :],
             to_dtype(dq * scale, DQ.dtype.element_ty, IEEE),
             mask=row_ok[:, None] & (d[None, :] < D))


@triton.autotune(configs=backward_configs(), key=PATTERN_KEYS + ["SPLIT"],
                 prune_configs_by=PRUNE)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DVG, LM, FLAGS, PAD, BIAS,
                     sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                     sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                     lm_sb, fl_sb, pad_sb, bias_sh, softcap2,
                     Hk, Nq, Nk, D, DV, G, left, right, scale, scale_log2, WS, WS_V, split_len,
                     n_splits,
                     GROUPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_LM: tl.constexpr, HAS_PAD: tl.constexpr,
                     LM_MODE: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
                     SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    split = 0
    if SPLIT:  # LM_MODE only: program = (landmark key tile, query split)
        split = pid_n % n_splits
        pid_n = pid_n // n_splits
    bh = tl.program_id(1)
    b = bh // Hk
    hk = bh % Hk
    off = Nk - Nq
    Hq = Hk * GROUPS
    if LM_MODE:
        g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.load(LM + b * lm_sb + g, mask=g < G, other=0)
        col_ok = g < G
        i_lo = split * split_len
        if CAUSAL:  # rows r >= the first (smallest) landmark of the tile
            i_lo = tl.maximum(tl.min(tl.where(col_ok, j, Nk), 0) - off, i_lo).to(tl.int32)
        i_hi = tl.minimum(split * split_len + split_len, Nq)
    else:
        j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = j < Nk
        n0 = pid_n * BLOCK_N
        n1 = tl.minimum(n0 + BLOCK_N, Nk)
        i_lo, i_hi = query_band(n0, n1, off, Nq, left, right, CAUSAL)
        # Query tiles [a, c) see the whole key tile through the window: no mask there.
        a, c = interior_query_tiles(n0, n1, off, i_lo, i_hi, (i_lo // BLOCK_M) * BLOCK_M,
                                    left, right, BLOCK_M, CAUSAL, HAS_PAD)
    real = tl.load(PAD + b * pad_sb + j, mask=col_ok, other=0) if HAS_PAD else col_ok
    key_lm = tl.load(FLAGS + b * fl_sb + j, mask=col_ok, other=0) if HAS_LM else col_ok
    d = tl.arange(0, BLOCK_D)
    dvr = tl.arange(0, BLOCK_DV)
    j64 = j[:, None].to(tl.int64)
    kv_ok = (col_ok & (real != 0)) if HAS_PAD else col_ok  # padding K/V are never read
    k = tl.load(K + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h + j64 * sk_n + d[None, :],
                mask=kv_ok[:, None] & (d[None, :] < D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h + j64 * sv_n + dvr[None, :],
                mask=kv_ok[:, None] & (dvr[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for hg in range(GROUPS):
        h = hk * GROUPS + hg
        q_base = Q + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        do_base = DO + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h
        row_base = (b * Hq + h).to(tl.int64) * Nq
        bias_h = BIAS + h.to(tl.int64) * bias_sh
        m_start = (i_lo // BLOCK_M) * BLOCK_M
        if LM_MODE:
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, j, col_ok, real, key_lm, q_base, do_base, LSE, DELTA, row_base,
                m_start, i_hi, i_lo, i_hi, off, Nk, FLAGS, fl_sb, b, sq_n, sdo_n, left, right,
                D, DV, scale_log2, bias_h, Nq + Nk - 1, softcap2, BLOCK_M, BLOCK_D, BLOCK_DV,
                CAUSAL, HAS_LM, HAS_PAD, True, True, IEEE, SOFTCAP, HAS_BIAS)
        else:
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, j, col_ok, real, key_lm, q_base, do_base, LSE, DELTA, row_base,
                m_start, a, i_lo, i_hi, off, Nk, FLAGS, fl_sb, b, sq_n, sdo_n, left, right,
                D, DV, scale_log2, bias_h, Nq + Nk - 1, softcap2, BLOCK_M, BLOCK_D, BLOCK_DV,
                CAUSAL, HAS_LM, HAS_PAD, False, True, IEEE, SOFTCAP, HAS_BIAS)
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, j, col_ok, real, key_lm, q_base, do_base, LSE, DELTA, row_base,
                a, c, i_lo, i_hi, off, Nk, FLAGS, fl_sb, b, sq_n, sdo_n, left, right,
                D, DV, scale_log2, bias_h, Nq + Nk - 1, softcap2, BLOCK_M, BLOCK_D, BLOCK_DV,
                CAUSAL, HAS_LM, HAS_PAD, False, False, IEEE, SOFTCAP, HAS_BIAS)
            dk, dv = dkdv_query_tiles(
                dk, dv, k, v, j, col_ok, real, key_lm, q_base, do_base, LSE, DELTA, row_base,
                c, i_hi, i_lo, i_hi, off, Nk, FLAGS, fl_sb, b, sq_n, sdo_n, left, right,
                D, DV, scale_log2, bias_h, Nq + Nk - 1, softcap2, BLOCK_M, BLOCK_D, BLOCK_DV,
                CAUSAL, HAS_LM, HAS_PAD, False, True, IEEE, SOFTCAP, HAS_BIAS)
        if HAS_LM and not LM_MODE:
            # Landmark query rows outside the inverse band see these keys too.
            for g0 in range(0, G, BLOCK_M):
                g = g0 + tl.arange(0, BLOCK_M)
                pos = tl.load(LM + b * lm_sb + g, mask=g < G, other=0)
                i = (pos - off).to(tl.int32)
                row_ok = (g < G) & (i >= 0) & (i < Nq) & ((i < i_lo) | (i >= i_hi))
                vis = landmark_visible(pos, j, row_ok, col_ok, real, CAUSAL, HAS_PAD)
                q, do, lse2, delta = load_query_side(q_base, do_base, LSE, DELTA, row_base, i,
                                                     row_ok, d, dvr, sq_n, sdo_n, D, DV)
                dk, dv = dkdv_step(dk, dv, q, do, lse2, delta, k, v, vis, scale_log2, pos, j,
                                   bias_h, Nk, Nq + Nk - 1, softcap2, IEEE, SOFTCAP, HAS_BIAS)

    if SPLIT:  # partial sums of this query split; summed in order by splits.py
        ws_row = (bh.to(tl.int64) * n_splits + split) * G + g
        tl.store(WS + ws_row[:, None] * BLOCK_D + d[None, :], dk * scale, mask=col_ok[:, None])
        tl.store(WS_V + ws_row[:, None] * BLOCK_DV + dvr[None, :], dv, mask=col_ok[:, None])
        return
    tl.store(DK + b.to(tl.int64) * sdk_b + hk.to(tl.int64) * sdk_h + j64 * sdk_n + d[None, :],
             to_dtype(dk * scale, DK.dtype.element_ty, IEEE),
             mask=col_ok[:, None] & (d[None, :] < D))
    tl.store(DVG + b.to(tl.int64) * sdv_b + hk.to(tl.int64) * sdv_h + j64 * sdv_n + dvr[None, :],
             to_dtype(dv, DVG.dtype.element_ty, IEEE), mask=col_ok[:, None] & (dvr[None, :] < DV))


def _s3(t):
    return t.stride(0), t.stride(1), t.stride(2)


def attention_backward(dout, q, k, v, out, lse, pattern, dq, dk, dv, dbias=None):
    """Fill dq, dk, dv (same shapes and dtypes as q, k, v; last dim contiguous) and, when given,
    dbias (Hq, Nq + Nk - 1) fp32 contiguous zeros, with the gradient of pattern.bias (sum of dS
    over the batch and the visible pairs of each offset; atomic adds, so not bit-deterministic)."""
    q, k, v, dout = (last_dim_contiguous(t) for t in (q, k, v, dout))
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    lse = lse.float().contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    pa = pattern_args(pattern, Nq, Nk, q.device)
    meta = dict(GROUPS=Hq // Hk, BLOCK_D=padded_head_dim(D), BLOCK_DV=padded_head_dim(Dv),
                CAUSAL=pa.causal, HAS_LM=pa.has_landmarks, HAS_PAD=pa.has_padding,
                IEEE=dot_precision(q.dtype), SOFTCAP=pa.has_softcap, HAS_BIAS=pa.has_bias)
    bias_grad = dbias is not None and pa.has_bias
    tail = (pa.lm_sb, pa.flags_sb, pa.padding_sb, pa.bias_sh, pa.softcap2)
    common = (Nq, Nk, D, Dv, pa.num_landmarks, pa.left, pa.right, pa.scale, pa.scale * LOG2E)
    G = pa.num_landmarks
    dq_args = (q, k, v, dout, lse, delta, dq, pa.landmarks, pa.flags, pa.padding, pa.bias,
               dbias if bias_grad else pa.bias,
               *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(dq), *tail, Hq, *common)
    kv_args = (q, k, v, dout, lse, delta, dk, dv, pa.landmarks, pa.flags, pa.padding, pa.bias,
               *_s3(q), *_s3(k), *_s3(v), *_s3(dout), *_s3(dk), *_s3(dv), *tail, Hk, *common)
    _bwd_dq_kernel[lambda m: (triton.cdiv(Nq, m["BLOCK_M"]), B * Hq)](
        *dq_args, lse, Nk, 1, LM_MODE=False, SPLIT=False, BIAS_GRAD=bias_grad, **meta)
    _bwd_dkdv_kernel[lambda m: (triton.cdiv(Nk, m["BLOCK_N"]), B * Hk)](
        *kv_args, lse, lse, Nq, 1, LM_MODE=False, SPLIT=False, **meta)
    if G == 0:
        return dq, dk, dv
    # Landmark query rows (dQ) walk every key and landmark keys (dK, dV) every query row:
    # split those walks over programs, then sum the partial results in a fixed order.
    split_len, n_splits = landmark_key_splits(Nk, B * Hq)
    if n_splits == 1:
        _bwd_dq_kernel[lambda m: (triton.cdiv(G, m["BLOCK_M"]), B * Hq)](
            *dq_args, lse, split_len, 1, LM_MODE=True, SPLIT=False, BIAS_GRAD=bias_grad, **meta)
    else:
        ws = torch.empty((B * Hq, n_splits, G, meta["BLOCK_D"]), dtype=torch.float32,
                         device=q.device)
        _bwd_dq_kernel[lambda m: (triton.cdiv(G, m["BLOCK_M"]) * n_splits, B * Hq)](
            *dq_args, ws, split_len, n_splits, LM_MODE=True, SPLIT=True, BIAS_GRAD=bias_grad,
            **meta)
        scatter_split_sums(ws, dq, pa.landmarks, Nk - Nq)
    split_len, n_splits = landmark_key_splits(Nq, B * Hk)
    if n_splits == 1:
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(G, m["BLOCK_N"]), B * Hk)](
            *kv_args, lse, lse, split_len, 1, LM_MODE=True, SPLIT=False, **meta)
    else:
        ws_k = torch.empty((B * Hk, n_splits, G, meta["BLOCK_D"]), dtype=torch.float32,
                           device=q.device)
        ws_v = torch.empty((B * Hk, n_splits, G, meta["BLOCK_DV"]), dtype=torch.float32,
                           device=q.device)
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(G, m["BLOCK_N"]) * n_splits, B * Hk)](
            *kv_args, ws_k, ws_v, split_len, n_splits, LM_MODE=True, SPLIT=True, **meta)
        scatter_split_sums(ws_k, dk, pa.landmarks, 0)
        scatter_split_sums(ws_v, dv, pa.landmarks, 0)
    return dq, dk, dv
