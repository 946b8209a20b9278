"""torch.library registration and autograd.

Two custom ops carry every backend so that ``torch.compile`` traces through ``hk.attention``
without graph breaks (the backend choice is a plain string argument made before tracing):

* ``hybrid_kernels::attention_fwd(q, k, v, landmarks?, key_padding_mask?, window_left,
  window_right, causal, scale, softcap, bias?, sinks?, quant, backend) -> (out, lse)``
* ``hybrid_kernels::attention_bwd(dout, q, k, v, out, lse, dlse?, landmarks?,
  key_padding_mask?, window_left, window_right, causal, scale, softcap, bias?, bias_grad,
  backend) -> (dq, dk, dv, dbias)`` (dbias is empty unless ``bias_grad``)

Attention sinks (per-head logits (Hq,) that join every row's softmax denominator without a
value, GPT-OSS's ``s_aux``) are applied here, on top of any backend: a finished row with
log-sum-exp ``lse`` becomes ``out * sigmoid(lse - sink)`` with ``lse' = logaddexp(lse, sink)``.
The backward needs nothing new from the kernels: called with the final ``out`` and ``lse'``,
their P = exp(S - lse') already is the sink-normalized probability, and
d sink = sum_i exp(sink - lse'_i) * (dlse_i - rowsum(dO * O)_i).

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


def _pattern(landmarks, key_padding_mask, window_left, window_right, causal, scale, softcap,
             bias) -> Pattern:
    return Pattern(window_left=window_left, window_right=window_right, causal=causal,
                   landmarks=landmarks, key_padding_mask=key_padding_mask, scale=scale,
                   softcap=softcap, bias=bias)


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tuple[Tensor, Tensor]:
    """Rows (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)) renormalized with sink logits (Hq,)."""
    sink = sinks.to(device=lse.device, dtype=torch.float32)[None, :, None]
    new_lse = torch.logaddexp(lse, sink)
    weight = torch.exp(lse - new_lse)  # exactly 0 for rows that saw no key
    return (out.float() * weight[..., None]).to(out.dtype), new_lse


@torch.library.custom_op("hybrid_kernels::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, landmarks: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], window_left: int, window_right: int,
                  causal: bool, scale: float, softcap: float, bias: Optional[Tensor],
                  sinks: Optional[Tensor], quant: str, backend: str) -> Tuple[Tensor, Tensor]:
    pattern = _pattern(landmarks, key_padding_mask, window_left, window_right, causal, scale,
                       softcap, bias)
    out, lse = get_backend(backend).forward(q, k, v, pattern, quant or None)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, landmarks, key_padding_mask, window_left, window_right, causal,
                        scale, softcap, bias, sinks, quant, backend):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty((B, Hq, Nq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Nq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hybrid_kernels::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  dlse: Optional[Tensor], landmarks: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], window_left: int, window_right: int,
                  causal: bool, scale: float, softcap: float, bias: Optional[Tensor],
                  bias_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    pattern = _pattern(landmarks, key_padding_mask, window_left, window_right, causal, scale,
                       softcap, bias)
    impl = get_backend("reference" if dlse is not None else backend)
    extra = {"dlse": dlse} if dlse is not None else {}
    dq, dk, dv, dbias = impl.backward(dout, q, k, v, out, lse, pattern,
                                      bias_grad=bias_grad and bias is not None, **extra)
    return dq, dk, dv, (dbias if dbias is not None else q.new_empty(0, dtype=torch.float32))


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, dlse, landmarks, key_padding_mask, window_left,
                        window_right, causal, scale, softcap, bias, bias_grad, backend):
    dbias = (torch.empty_like(bias, dtype=torch.float32) if bias_grad and bias is not None
             else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, landmarks, kpm, wl, wr, causal, scale, softcap, bias, sinks, quant, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, landmarks, kpm, bias, sinks)
    ctx.pattern_args = (wl, wr, causal, scale, softcap)
    ctx.quant = quant
    ctx.backend = backend
    # Unused outputs then arrive as None (not zeros), so the common case (only `out` used)
    # takes the backend's own backward instead of the reference one.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, landmarks, kpm, bias, sinks = ctx.saved_tensors
    wl, wr, causal, scale, softcap = ctx.pattern_args
    if ctx.quant:
        # Exact-precision backward: gradients of exact attention at the same inputs.
        out, lse = torch.ops.hybrid_kernels.attention_fwd(
            q, k, v, landmarks, kpm, wl, wr, causal, scale, softcap, bias, sinks, "",
            ctx.backend)
    if dout is None:
        dout = torch.zeros_like(out)
    bias_grad = bias is not None and ctx.needs_input_grad[10]
    dq, dk, dv, dbias = torch.ops.hybrid_kernels.attention_bwd(
        dout.contiguous(), q, k, v, out, lse, dlse, landmarks, kpm, wl, wr, causal, scale,
        softcap, bias, bias_grad, ctx.backend)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[11]:
        p_sink = torch.exp(sinks.float()[None, :, None] - lse)            # (B, Hq, Nq)
        delta = (dout.float() * out.float()).sum(-1)
        if dlse is not None:
            delta = delta - dlse.float()
        dsinks = (-(p_sink * delta)).sum(dim=(0, 2)).to(sinks.dtype)
    return (dq, dk, dv, None, None, None, None, None, None, None,
            dbias.to(bias.dtype) if bias_grad else None, dsinks, None, None)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
