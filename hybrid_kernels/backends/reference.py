"""Pure-torch backend: the oracle as a fallback. Runs anywhere torch runs, with backward.

Small problems use the dense reference; anything larger uses the blocked path, so a windowed or
landmark pattern never materializes an Nq x Nk matrix.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ..backend_base import Backend
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


def int8_forward_emulated(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern) -> Tuple[Tensor, Tensor]:
    """The int8 path in pure torch (the one definition of hybrid_kernels/quant.py): smoothed,
    block-quantized Q/K dequantized and run through the exact reference (blocked for large
    inputs, so no N x N matrix). The int8 products are reproduced up to fp32 rounding; the lse is
    that of the exact (unsmoothed) scores. Under a softcap (not shift-invariant) the smoothing
    shift scale * q . mean is added back before the cap, as the kernels do: q and k get one more
    feature each (the shift and a 1), so the reference's scores are q8.k8 * scales + q . mean."""
    import torch

    from ..quant import smoothing_lse_offset
    from ..quant import QUANT_BLOCK, dequantize, quantize_qk
    q8, q_scale, k8, k_scale, k_mean = quantize_qk(
        q, k, q_block=QUANT_BLOCK, k_block=QUANT_BLOCK,
        key_padding_mask=pattern.key_padding_mask, return_k_mean=True)
    qd, kd = dequantize(q8, q_scale, QUANT_BLOCK), dequantize(k8, k_scale, QUANT_BLOCK)
    if pattern.softcap > 0:
        q_mean = smoothing_lse_offset(q, k_mean, 1.0)  # q . mean, (B, Hq, Nq)
        qd = torch.cat([qd, q_mean[..., None]], dim=-1)
        kd = torch.cat([kd, kd.new_ones(*kd.shape[:3], 1)], dim=-1)
        return reference_forward_fp32(qd, kd, v.float(), pattern)
    out, lse = reference_forward_fp32(qd, kd, v.float(), pattern)
    return out, lse + smoothing_lse_offset(q, k_mean, pattern.scale)


class ReferenceBackend(Backend):
    name = "reference"
    device_types = frozenset({"cpu", "cuda", "meta", "xpu", "mps"})
    quants = frozenset({None, "int8"})
    supports_backward = True
    score_mods = frozenset({"softcap", "bias"})
    int8_score_mods = frozenset({"softcap", "bias"})

    def forward(self, q, k, v, pattern: Pattern, quant: Optional[str]):
        if quant == "int8":
            out, lse = int8_forward_emulated(q, k, v, pattern)
        else:
            out, lse = reference_forward_fp32(q, k, v, pattern)
        return out.to(q.dtype), lse.float()

    def backward(self, dout, q, k, v, out, lse, pattern: Pattern, dlse: Optional[Tensor] = None,
                 bias_grad: bool = False):
        # ops.py hands over the lse of the exact forward (it recomputes an int8 one first), with
        # any sink folded in: P = exp(S - lse) is then the sink-normalized probability.
        dq, dk, dv, dbias = blocked_reference_backward(dout, q, k, v, lse, dlse=dlse,
                                                       bias_grad=True,
                                                       **pattern.reference_kwargs())
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dbias.float() if bias_grad and dbias is not None else None)
