"""INT8 forward: quantize Q and smoothed K per block, then the fused forward kernel with
int8 QK^T (int32 accumulation), fp32 softmax and PV in V's dtype (fp16/bf16)."""
from __future__ import annotations

from .forward import LOG2E, last_dim_contiguous, launch_forward
from .quantize import quantize_qk


def attention_forward_int8(q, k, v, pattern, out, lse):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    q8, q_scale, k8, k_scale, q_block, k_block, k_mean = quantize_qk(
        q, k, pattern.key_padding_mask)
    # The int8 scores are q.(k - mean): shift = scale * q.mean per query row. A constant per row,
    # so without a softcap it only moves lse (added back below); a softcap is not shift-invariant,
    # so then the kernel adds the shift (base 2) to every score before capping.
    groups = q.shape[1] // k.shape[1]
    mean_q = k_mean.repeat_interleave(groups, dim=1) if groups > 1 else k_mean
    shift = (q.float() * mean_q[:, :, None, :]).sum(-1) * pattern.scale
    capped = pattern.softcap > 0
    q_shift = (shift * LOG2E).contiguous() if capped else q_scale  # unused without softcap
    launch_forward(q, k, v, out, lse, pattern,
                   quantized=(q8, q_scale, k8, k_scale, q_block, k_block, q_shift))
    if not capped:
        lse.add_(shift)
    return out, lse
