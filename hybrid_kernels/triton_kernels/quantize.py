"""Per-block INT8 quantization of Q and smoothed K, and the INT8 score product.

The one INT8 definition of hybrid_kernels/quant.py (its module docstring), bit for bit with
quant.quantize_qk: blocks of ``quant.QUANT_BLOCK`` tokens for Q and K, one fp32 scale per block
= absmax / QUANT_QMAX (IEEE division; 1 for an all-zero block), x8 = round-half-to-even of
(x - mean) * (1 / scale) in fp32. K is smoothed first by quant.smoothing_mean (its per-(b, h)
mean over the real keys), which shifts every score of a query row by the same constant (softmax
unchanged) while shrinking the range the int8 grid must cover; the forward adds that constant
back into the lse. Padding keys are zeroed after smoothing so they cannot inflate a block's scale.

Rounding: on a GPU libdevice ``rint`` (cvt.rni: ties to even; a separate instruction, so no
multiply-add contraction can skip the product's rounding). libdevice does not exist under the
interpreter, which rounds with exact floor arithmetic instead (numpy fuses nothing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import QUANT_QMAX, smoothing_mean
from .configs import interpreting, padded_head_dim, quantize_block_sizes

try:  # the backend-dispatching libdevice (triton >= 3.0)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layout
    from triton.language.math import libdevice  # type: ignore


@triton.jit
def int8_scores(q8, k8, qs, ks):
    """(q8 k8^T) with int32 accumulation, dequantized by the row and column scales."""
    s = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32)
    return s.to(tl.float32) * qs[:, None] * ks[None, :]


@triton.jit
def round_half_even(y, RINT: tl.constexpr):
    """fp32 y rounded to the nearest integer, ties to even (as an fp32 value). RINT: libdevice
    rint (GPU); else exact floor arithmetic for the interpreter: y - floor(y) is exact in fp32,
    and so is the parity test on the integer-valued r."""
    if RINT:
        return libdevice.rint(y)
    else:
        r = tl.floor(y)
        frac = y - r
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        up = (frac > 0.5) | ((frac == 0.5) & odd)
        return tl.where(up, r + 1.0, r)


@triton.jit
def _quantize_kernel(X, X8, SCALE, MEAN, PAD, sx_b, sx_h, sx_n, H, N, D, n_blocks, pad_sb,
                     QMAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_MEAN: tl.constexpr, HAS_PAD: tl.constexpr, RINT: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n = blk * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    ok = (n[:, None] < N) & (d[None, :] < D)
    x = tl.load(X + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h + n[:, None].to(tl.int64) * sx_n
                + d[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(MEAN + bh.to(tl.int64) * D + d, mask=d < D, other=0.0)
        x = x - mean[None, :]
    if HAS_PAD:
        real = tl.load(PAD + b * pad_sb + n, mask=n < N, other=0)
        x = tl.where(real[:, None] != 0, x, 0.0)
    x = tl.where(ok, x, 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    # IEEE divisions (fp32 `/` may be approximate on a GPU): scale = fl(amax / QMAX), then
    # x * fl(1 / scale), exactly as quant.quantize_qk.
    scale = tl.where(amax > 0.0, tl.div_rn(amax, QMAX * 1.0), 1.0)
    inv = tl.div_rn(1.0, scale)
    x8 = round_half_even(x * inv, RINT)
    tl.store(X8 + bh.to(tl.int64) * N * D + n[:, None].to(tl.int64) * D + d[None, :],
             x8.to(tl.int8), mask=ok)
    tl.store(SCALE + bh.to(tl.int64) * n_blocks + blk, scale)


def quantize_rows(x: torch.Tensor, rows: int, mean=None, padding=None):
    """x (B, H, N, D) -> (x8 int8 (B, H, N, D) contiguous, scale fp32 (B, H, ceil(N / rows)))."""
    B, H, N, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_blocks = triton.cdiv(N, rows)
    x8 = torch.empty((B, H, N, D), dtype=torch.int8, device=x.device)
    scale = torch.empty((B, H, n_blocks), dtype=torch.float32, device=x.device)
    dummy = scale
    _quantize_kernel[(n_blocks, B * H)](
        x, x8, scale, mean if mean is not None else dummy,
        padding if padding is not None else dummy, x.stride(0), x.stride(1), x.stride(2),
        H, N, D, n_blocks, N if padding is not None else 0, QMAX=QUANT_QMAX,
        ROWS=rows, BLOCK_D=padded_head_dim(D), HAS_MEAN=mean is not None,
        HAS_PAD=padding is not None, RINT=not interpreting())
    return x8, scale


def key_mean(k: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """Per-(b, h) mean of k over the real keys, fp32 (B, H, D) contiguous: quant.smoothing_mean
    (the same tensor, so the same bits)."""
    B, H, _, D = k.shape
    return smoothing_mean(k, key_padding_mask).reshape(B, H, D).contiguous()


def quantize_qk(q: torch.Tensor, k: torch.Tensor, key_padding_mask=None):
    """-> (q8, q_scale, k8, k_scale, q_block, k_block, k_mean): bit-equal to
    quant.quantize_qk(q, k, key_padding_mask=...) (k_mean (B, Hk, D))."""
    q_block, k_block = quantize_block_sizes()
    mean = key_mean(k, key_padding_mask)
    padding = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    q8, q_scale = quantize_rows(q, q_block)
    k8, k_scale = quantize_rows(k, k_block, mean=mean, padding=padding)
    return q8, q_scale, k8, k_scale, q_block, k_block, mean
