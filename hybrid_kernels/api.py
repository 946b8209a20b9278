"""The public entry point: :func:`attention`."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import fast_path
from . import ops  # noqa: F401  (registers the custom ops)
from .dispatch import NoBackendError, Problem, _ensure_registered, select_backend
from .dispatch import explain as _explain_problem
from .score_mods import normalize_sinks
from .validation import BACKENDS as _BACKENDS
from .validation import plan

__all__ = ["attention", "plan", "explain", "Explanation"]

_ensure_registered()



def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: Union[None, int, Tuple[int, int]] = None,
    landmarks: Union[None, int, Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    quant: Optional[str] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    position_bias: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Sliding-window + landmark sparse attention (optionally INT8), forward and backward.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv); Hq % Hk == 0 (MHA/GQA/MQA).
            float32, bfloat16 or float16, one device. Any strides (expanded inputs work).
        window: None (unlimited), an int w (= (w, w)), or (left, right) with -1 = unlimited.
        landmarks: None, an int stride s (key positions 0, s, 2s, ...), or a LongTensor (G,) or
            (B, G) of sorted unique key positions. Landmarks see every key and every query
            sees them.
        causal: mask keys j > r, where r = i + Nk - Nq (bottom-right alignment).
        key_padding_mask: bool (B, Nk), True = real token.
        scale: softmax scale, default 1/sqrt(D).
        quant: None or "int8" (INT8 QK^T with int32 accumulation; backward is exact).
        softcap: None or a float c > 0: scores s become c * tanh(s / c) (Gemma 2).
        sinks: None or (Hq,) float logits that join each row's softmax denominator without a
            value (attention sinks, GPT-OSS ``s_aux``); differentiable.
        alibi_slopes: None or (Hq,) float: adds -slope * |j - r| to the score of key j from
            query i (r = i + Nk - Nq), as FlashAttention's ``alibi_slopes``.
        position_bias: None or (Hq, Nq + Nk - 1) float: adds position_bias[h, (j - r) + Nk - 1],
            a bias that depends only on the query-key offset (T5's bucketed relative bias);
            differentiable. Softcap applies before the biases.
        return_lse: also return the log-sum-exp (B, Hq, Nq) float32 (-inf for empty rows; with
            sinks, the sink is part of it).
        backend: "auto" | "cpu" | "triton" | "cuda" | "reference".

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, and lse if ``return_lse``. A query that sees no key
        gets zeros (and zero gradient).
    """
    # The fast path: a call that matches a cached plan (same shapes, strides, dtypes, devices,
    # pattern scalars, environment) skips validation and dispatch, which that plan's first call
    # did (see fast_path.py). Not while torch.compile traces (the custom op is what it must see),
    # nor when autograd needs a graph, nor with tensor subclasses or dispatch / function modes.
    if (landmarks is None and quant is None and sinks is None and alibi_slopes is None
            and position_bias is None and fast_path.eligible(q, k, v)):
        result = fast_path.run(q, k, v, key_padding_mask, window, causal, scale, softcap, backend,
                               return_lse)
        if result is not None:
            return result
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {type(return_lse).__name__}")
    pattern, quant = plan(q, k, v, window=window, landmarks=landmarks, causal=causal,
                          key_padding_mask=key_padding_mask, scale=scale, quant=quant,
                          softcap=softcap, alibi_slopes=alibi_slopes, position_bias=position_bias)
    sinks = normalize_sinks(sinks, q.shape[1], q.device)
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if B == 0 or Nq == 0 or Nk == 0 or Dv == 0:
        return _empty_result(q, k, v, return_lse, sinks)
    impl = select_backend(_problem(q, k, v, pattern, quant, sinks), backend)
    out, lse = torch.ops.hybrid_kernels.attention_fwd(
        q, k, v, pattern.landmarks, pattern.key_padding_mask, pattern.window_left,
        pattern.window_right, pattern.causal, pattern.scale, pattern.softcap, pattern.bias,
        sinks, quant or "", impl.name)
    return (out, lse) if return_lse else out


def _problem(q: Tensor, k: Tensor, v: Tensor, pattern, quant: Optional[str],
             sinks: Optional[Tensor]) -> Problem:
    """What dispatch needs to know of a validated call (grad needed by any differentiable input)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, pattern.bias, sinks))
    return Problem.from_inputs(q, v, pattern, quant, needs_grad)


def _empty_result(q: Tensor, k: Tensor, v: Tensor, return_lse: bool, sinks: Optional[Tensor]):
    """No keys (or no queries): zeros and lse = -inf (the sink's logit with sinks), still
    connected to the autograd graph."""
    B, Hq, Nq, _ = q.shape
    out = q.new_zeros((B, Hq, Nq, v.shape[3]))
    if q.requires_grad or k.requires_grad or v.requires_grad:
        out = out + 0 * (q.sum() + k.sum() + v.sum())
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    if sinks is not None:
        lse = sinks.float()[None, :, None].expand(B, Hq, Nq)
    return (out, lse) if return_lse else out


class Explanation(dict):
    """backend name -> reasons it rejects the call (empty list = it accepts), in the order
    ``backend="auto"`` tries them; ``selected`` is the backend the call would run on (None when
    none can)."""

    def __init__(self, reasons: Dict[str, List[str]], selected: Optional[str], problem: Problem):
        super().__init__(reasons)
        self.selected = selected
        self.problem = problem

    def __str__(self) -> str:
        lines = [f"selected: {self.selected}"]
        for name, why in self.items():
            lines.append(f"  {name}: " + ("accepted" if not why else "; ".join(why)))
        return "\n".join(lines)


def explain(q, k: Optional[Tensor] = None, v: Optional[Tensor] = None, *, backend: str = "auto",
            **kwargs):
    """Which backend :func:`attention` would run ``(q, k, v, **kwargs)`` on, and why each other
    one would not: an :class:`Explanation`. ``explain(problem)`` with a
    :class:`~hybrid_kernels.dispatch.Problem` returns the plain reasons dict."""
    if isinstance(q, Problem):
        return _explain_problem(q)
    kwargs.pop("return_lse", None)
    sinks = kwargs.pop("sinks", None)
    pattern, quant = plan(q, k, v, **kwargs)
    problem = _problem(q, k, v, pattern, quant, sinks)
    try:
        selected = select_backend(problem, backend).name
    except NoBackendError:
        selected = None
    return Explanation(_explain_problem(problem), selected, problem)
