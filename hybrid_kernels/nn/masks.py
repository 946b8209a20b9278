"""Reading attention masks: which ones the kernels can run (padding, causal) and which not.

Value checks read tensor data, so they run only in eager mode; while ``torch.compile`` traces,
anything not provable from shapes and strides alone goes to the exact dense path instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["can_inspect_values", "additive_to_allowed", "bottom_right_causal", "is_causal_mask"]


def can_inspect_values() -> bool:
    """True when reading mask values is allowed (eager mode, not tracing)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def additive_to_allowed(mask: Tensor) -> Optional[Tensor]:
    """A float additive mask made only of 0 and "masked" values -> bool (True = may attend).

    "Masked" is -inf or anything at or below half the dtype's lowest value (transformers fills
    masked positions with ``finfo.min``). Any other value is a real bias: returns None.
    """
    if mask.dtype == torch.bool:
        return mask
    if not can_inspect_values():
        return None
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool(((mask == 0) | masked).all()):
        return None
    return ~masked


def bottom_right_causal(nq: int, nk: int, device) -> Tensor:
    """bool (Nq, Nk): key j visible from query i iff j <= i + Nk - Nq."""
    rows = torch.arange(nq, device=device)[:, None] + (nk - nq)
    return torch.arange(nk, device=device)[None, :] <= rows


def is_causal_mask(allowed: Tensor) -> bool:
    """Whether a bool mask (..., Nq, Nk) is exactly the bottom-right causal mask (eager only)."""
    if not can_inspect_values():
        return False
    nq, nk = allowed.shape[-2:]
    return bool((allowed == bottom_right_causal(nq, nk, allowed.device)).all())
