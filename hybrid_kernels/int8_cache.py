"""A pre-quantized INT8 key cache (plus 16-bit values) for repeated decode steps.

Decode steps (FiD cross-attention, streaming) attend a few new queries to a long, fixed K/V.
Quantizing K once, at cache creation, means every step reads 1 byte per K element instead of 2
or 4 and never re-quantizes. K is smoothed (its mean over the real tokens subtracted) before
quantization, which changes no softmax row; the returned lse is corrected back to the exact
scores' lse.

    cache = Int8KVCache.from_kv(k, v)            # k (B, Hk, Nk, D), v (B, Hk, Nk, Dv)
    out = cache.attention(q, window=(256, 0), causal=True)   # q (B, Hq, Nq, D)

On CUDA the split-K INT8 kernel runs; on CPU the VNNI kernel; otherwise an exact torch
emulation of the same int8 arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor

from . import api
from .backends._params import QUANT_BLOCK
from .dispatch import Problem, get_backend, select_backend
from .fast_path import eligible, environment_key, keyable_scalars
from .ops import apply_sinks
from .quant import _quantize_blocks, dequantize, quantize_qk
from .quant import smoothing_lse_offset
from .score_mods import normalize_sinks

__all__ = ["Int8KVCache"]


@dataclass
class Int8KVCache:
    k8: Tensor                 # (B, Hk, Nk, D) int8, smoothed
    k_scale: Tensor            # (B, Hk, ceil(Nk / block)) float32
    k_mean: Tensor             # (B, Hk, 1, D) float32, subtracted before quantization
    v: Tensor                  # (B, Hk, Nk, Dv)
    key_padding_mask: Optional[Tensor] = None  # (B, Nk) bool, True = real
    block: int = QUANT_BLOCK
    # Call plans of repeated decode shapes (see _plan_key); made after a general call accepted
    # the same key, so a hit never skips an error.
    _plans: Dict[tuple, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_kv(cls, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                block: int = QUANT_BLOCK) -> "Int8KVCache":
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k (B, Hk, Nk, D) and v (B, Hk, Nk, Dv) must agree; got k "
                             f"{tuple(k.shape)}, v {tuple(v.shape)}")
        # quantize_qk quantizes a query too; a one-token dummy keeps that cost negligible.
        dummy_q = k.new_zeros((k.shape[0], 1, 1, k.shape[3]))
        _, _, k8, k_scale, k_mean = quantize_qk(dummy_q, k, q_block=block, k_block=block,
                                                key_padding_mask=key_padding_mask,
                                                return_k_mean=True)
        return cls(k8=k8, k_scale=k_scale, k_mean=k_mean, v=v.contiguous(),
                   key_padding_mask=key_padding_mask, block=block)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k8, self.k_scale, self.k_mean, self.v))

    def attention(self, q: Tensor, *, window=None, landmarks=None, causal: bool = False,
                  scale: Optional[float] = None, softcap: Optional[float] = None,
                  sinks: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                  position_bias: Optional[Tensor] = None, return_lse: bool = False):
        """hk.attention(q, K, V, quant="int8", ...) against the cached K/V (forward only); the
        score modifiers (softcap, sinks, alibi_slopes, position_bias) as in hk.attention."""
        biased = alibi_slopes is not None or position_bias is not None
        key = None if biased else self._plan_key(q, window, landmarks, causal, scale, softcap,
                                                 sinks, return_lse)
        if key is not None:
            plan = self._plans.get(key)
            if plan is not None:
                if sinks is None:
                    return plan(q)
                out, lse = apply_sinks(*plan(q), sinks)
                return (out, lse) if return_lse else out

        fake_k = q.new_empty((1,)).expand(*self.k8.shape)  # shapes only, for validation
        v = self.v if self.v.dtype == q.dtype else self.v.to(q.dtype)
        pattern, _ = api.plan(q, fake_k, v, window=window, landmarks=landmarks, causal=causal,
                              key_padding_mask=self.key_padding_mask, scale=scale, quant="int8",
                              softcap=softcap, alibi_slopes=alibi_slopes,
                              position_bias=position_bias)
        sinks = normalize_sinks(sinks, q.shape[1], q.device)
        problem = Problem.from_inputs(q, v, pattern, "int8", needs_grad=False)
        backend = select_backend(problem, "auto")
        out = lse = None
        if hasattr(backend, "forward_int8_cache"):  # q quantized in the kernel, exact lse
            res = backend.forward_int8_cache(q, self.k8, self.k_scale, self.k_mean.float(), v,
                                             pattern, self.block)
            if res is not None:
                if key is not None and v is self.v:
                    self._remember(key, backend.int8_cache_plan(
                        q, self.k8, self.k_scale, self.k_mean.float(), v, pattern, self.block,
                        return_lse or sinks is not None))
                out, lse = res
        if out is None:
            out, lse = self._attention_quantized(q, v, pattern, backend)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks)
        return (out, lse) if return_lse else out

    def _attention_quantized(self, q: Tensor, v: Tensor, pattern, backend):
        """(out, exact-score lse) with q quantized here (quantize_qk's bits): the backend's kernel
        on pre-quantized Q/K, or the torch emulation (under a softcap, which is not shift-invariant,
        with the smoothing shift in the scores)."""
        q8, q_scale = _quantize_blocks(q, self.block)
        if hasattr(backend, "forward_int8_quantized") and not pattern.softcap > 0:
            out, lse = backend.forward_int8_quantized(q8, q_scale, self.k8, self.k_scale, v, q,
                                                      pattern, self.block, self.block)
            return out, lse + smoothing_lse_offset(q, self.k_mean, pattern.scale)
        k_deq = dequantize(self.k8, self.k_scale, self.block)
        q_deq = dequantize(q8, q_scale, self.block)
        if pattern.softcap > 0:
            # The smoothing shift scale * q . mean(k), with q unquantized, joins the scores
            # before the cap (as in the kernels): one product over [q_deq, q] . [k_deq, mean].
            mean = self.k_mean.float().expand(*k_deq.shape[:3], -1)
            q_deq = torch.cat([q_deq, q.float()], dim=-1)
            k_deq = torch.cat([k_deq, mean], dim=-1)
        out, lse = get_backend("reference").forward(q_deq, k_deq, v.float(), pattern, None)
        if not pattern.softcap > 0:
            lse = lse + smoothing_lse_offset(q, self.k_mean, pattern.scale)
        return out.to(q.dtype), lse

    _MAX_PLANS = 16

    def _plan_key(self, q, window, landmarks, causal, scale, softcap, sinks,
                  return_lse) -> Optional[tuple]:
        """The plan key of a call, or None when the call is not one a plan replays (landmark
        tensors, autograd, tracing, modes, arguments of types the key does not cover). A softcap
        is part of the plan; sinks are applied to its (out, lse), so only what decides their
        validity (shape, dtype, device) is keyed."""
        if not (keyable_scalars(window, causal, scale, softcap, return_lse)
                and (landmarks is None or type(landmarks) is int) and eligible(q, q, q)
                and (sinks is None or (type(sinks) is torch.Tensor and not sinks.requires_grad))):
            return None
        sink_key = None if sinks is None else (sinks.shape, sinks.dtype, sinks.device)
        kpm = self.key_padding_mask
        cache = (self.k8.data_ptr(), self.k_scale.data_ptr(), self.k_mean.data_ptr(),
                 self.v.data_ptr(), None if kpm is None else kpm.data_ptr(), self.block)
        return (q.shape, q.stride(), q.dtype, q.device, window, landmarks, causal, scale,
                softcap, sink_key, return_lse, cache, environment_key())

    def _remember(self, key: tuple, plan) -> None:
        if plan is None:
            return
        if len(self._plans) >= self._MAX_PLANS:
            self._plans.clear()
        self._plans[key] = plan
