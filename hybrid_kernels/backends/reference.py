"""Pure-torch backend: the oracle as a fallback. Runs anywhere torch runs, with backward.

Small problems use the dense reference; anything larger uses the blocked path, so a windowed or
landmark pattern never materializes an Nq x Nk matrix.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import Backend
from ..pattern import Pattern
from ..reference import blocked_reference, blocked_reference_backward, dense_reference

# Above this many score elements per (batch, head) the blocked path is used.
DENSE_LIMIT = 1 << 18


def reference_forward_fp32(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern) -> Tuple[Tensor, Tensor]:
    """fp32 (out, lse) by the cheapest exact pure-torch path for this size."""
    kwargs = pattern.reference_kwargs()
    if q.shape[2] * k.shape[2] <= DENSE_LIMIT:
        return dense_reference(q, k, v, **kwargs)
    return blocked_reference(q, k, v, **kwargs)


class ReferenceBackend(Backend):
    name = "reference"
    device_types = frozenset({"cpu", "cuda", "meta", "xpu", "mps"})
    quants = frozenset({None, "int8"})
    supports_backward = True

    def forward(self, q, k, v, pattern: Pattern, quant: Optional[str]):
        if quant == "int8":
            from ..quant import int8_reference
            out, lse = int8_reference(q, k, v, **pattern.reference_kwargs())
        else:
            out, lse = reference_forward_fp32(q, k, v, pattern)
        return out.to(q.dtype), lse.float()

    def backward(self, dout, q, k, v, out, lse, pattern: Pattern, dlse: Optional[Tensor] = None):
        # The lse saved by an int8 forward is not the exact one: recompute it (cheap next to
        # the backward itself) so the gradients are exactly those of the pattern.
        _, lse = reference_forward_fp32(q, k, v, pattern)
        dq, dk, dv = blocked_reference_backward(dout, q, k, v, lse, dlse=dlse,
                                                **pattern.reference_kwargs())
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
