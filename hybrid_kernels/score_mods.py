"""Validation of the score modifiers of :func:`hybrid_kernels.attention` and their normal form.

* ``softcap``: a float c > 0 (scores become c * tanh(s / c)); normalized to 0.0 when absent.
* ``sinks``: (Hq,) float logits, one per query head.
* ``alibi_slopes`` (Hq,) and ``position_bias`` (Hq, Nq + Nk - 1): both are biases that depend
  only on the query-key offset d = j - r (r = i + Nk - Nq), so they are folded into one table
  ``bias[h, d + Nk - 1]`` of O(Hq * (Nq + Nk)) floats, never an Nq x Nk tensor. ALiBi adds
  -slope * |d|.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

__all__ = ["normalize_softcap", "normalize_sinks", "combine_bias", "alibi_bias"]


def normalize_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, (Tensor, bool)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a Python float or None; got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite float > 0 (or None); got {softcap}")
    return float(softcap)


def _per_head(name: str, t, heads: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a float tensor of shape (Hq,) = ({heads},); "
                        f"got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if tuple(t.shape) != (heads,):
        raise ValueError(f"{name} must have shape (Hq,) = ({heads},); got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def normalize_sinks(sinks, heads: int, device: torch.device) -> Optional[Tensor]:
    return None if sinks is None else _per_head("sinks", sinks, heads, device)


def alibi_bias(slopes: Tensor, nq: int, nk: int) -> Tensor:
    """The offset table (Hq, Nq + Nk - 1) fp32 of ALiBi: -slope * |j - r|."""
    offsets = torch.arange(-(nk - 1), nq, device=slopes.device, dtype=torch.float32)
    return -slopes.float()[:, None] * offsets.abs()[None, :]


def combine_bias(alibi_slopes, position_bias, heads: int, nq: int, nk: int,
                 device: torch.device) -> Optional[Tensor]:
    """One fp32 offset table (Hq, Nq + Nk - 1) for both biases, or None. Differentiable in
    ``position_bias``."""
    table = None
    if alibi_slopes is not None:
        table = alibi_bias(_per_head("alibi_slopes", alibi_slopes, heads, device), nq, nk)
    if position_bias is not None:
        if not isinstance(position_bias, Tensor):
            raise TypeError("position_bias must be a float tensor of shape (Hq, Nq + Nk - 1); "
                            f"got {type(position_bias).__name__}")
        if not position_bias.dtype.is_floating_point:
            raise TypeError(f"position_bias must be a floating-point tensor; got dtype "
                            f"{position_bias.dtype}")
        want = (heads, max(nq + nk - 1, 0))
        if tuple(position_bias.shape) != want:
            raise ValueError(f"position_bias must have shape (Hq, Nq + Nk - 1) = {want} (one value "
                             f"per head and query-key offset j - r, from -(Nk - 1) to Nq - 1); "
                             f"got {tuple(position_bias.shape)}")
        if position_bias.device != device:
            raise ValueError(f"position_bias is on {position_bias.device} but q is on {device}")
        pb = position_bias.float()
        table = pb if table is None else table + pb
    return None if table is None else table.contiguous()
