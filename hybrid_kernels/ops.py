"""torch.library registration and autograd.

Two custom ops carry every backend so that ``torch.compile`` traces through ``hk.attention``
without graph breaks (the backend choice is a plain string argument made before tracing):

* ``hybrid_kernels::attention_fwd(q, k, v, landmarks?, key_padding_mask?, window_left,
  window_right, causal, scale, quant, backend) -> (out, lse)``
* ``hybrid_kernels::attention_bwd(dout, q, k, v, out, lse, landmarks?, key_padding_mask?,
  window_left, window_right, causal, scale, backend) -> (dq, dk, dv)``

Autograd: the backward is the exact-precision backward of the pattern. For ``quant="int8"`` it
first recomputes the exact forward (out, lse), so the int8 forward can be used while training
and its gradients are those of exact attention. A gradient flowing into ``lse`` (return_lse
used in the loss) is handled by the reference backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .dispatch import get_backend
from .pattern import Pattern

__all__ = ["attention_fwd", "attention_bwd"]


def _pattern(landmarks, key_padding_mask, window_left, window_right, causal, scale) -> Pattern:
    return Pattern(window_left=window_left, window_right=window_right, causal=causal,
                   landmarks=landmarks, key_padding_mask=key_padding_mask, scale=scale)


@torch.library.custom_op("hybrid_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, landmarks: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], window_left: int, window_right: int,
                  causal: bool, scale: float, quant: str, backend: str) -> Tuple[Tensor, Tensor]:
    pattern = _pattern(landmarks, key_padding_mask, window_left, window_right, causal, scale)
    out, lse = get_backend(backend).forward(q, k, v, pattern, quant or None)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, landmarks, key_padding_mask, window_left, window_right, causal,
                        scale, quant, backend):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty((B, Hq, Nq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hybrid_kernels::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  dlse: Optional[Tensor], landmarks: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], window_left: int, window_right: int,
                  causal: bool, scale: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    pattern = _pattern(landmarks, key_padding_mask, window_left, window_right, causal, scale)
    impl = get_backend("reference" if dlse is not None else backend)
    if dlse is not None:
        dq, dk, dv = impl.backward(dout, q, k, v, out, lse, pattern, dlse=dlse)
    else:
        dq, dk, dv = impl.backward(dout, q, k, v, out, lse, pattern)
    return dq, dk, dv


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, landmarks, key_padding_mask, window_left,
                        window_right, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, kpm, wl, wr, causal, scale, quant, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, landmarks, kpm)
    ctx.pattern_args = (wl, wr, causal, scale)
    ctx.quant = quant
    ctx.backend = backend
    # Unused outputs then arrive as None (not zeros), so the common case (only `out` used)
    # takes the backend's own backward instead of the reference one.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, landmarks, kpm = ctx.saved_tensors
    wl, wr, causal, scale = ctx.pattern_args
    if ctx.quant:
        # Exact-precision backward: gradients of exact attention at the same inputs.
        out, lse = torch.ops.hybrid_kernels.attention_fwd(
            q, k, v, landmarks, kpm, wl, wr, causal, scale, "", ctx.backend)
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.hybrid_kernels.attention_bwd(
        dout.contiguous(), q, k, v, out, lse, dlse, landmarks, kpm, wl, wr, causal, scale,
        ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
