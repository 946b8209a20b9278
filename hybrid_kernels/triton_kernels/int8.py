"""INT8 forward: quantize Q and smoothed K per block, then the fused forward kernel with
int8 QK^T (int32 accumulation), fp32 softmax and PV in V's dtype (fp16/bf16)."""
from __future__ import annotations

from .forward import last_dim_contiguous, launch_forward
from .quantize import quantize_qk


def attention_forward_int8(q, k, v, pattern, out, lse):
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    q8, q_scale, k8, k_scale, q_block, k_block, k_mean = quantize_qk(
        q, k, pattern.key_padding_mask)
    launch_forward(q, k, v, out, lse, pattern,
                   quantized=(q8, q_scale, k8, k_scale, q_block, k_block))
    # The kernel's scores are q.(k - mean): add scale * q.mean back so lse is that of q.k.
    groups = q.shape[1] // k.shape[1]
    mean_q = k_mean.repeat_interleave(groups, dim=1) if groups > 1 else k_mean
    lse.add_((q.float() * mean_q[:, :, None, :]).sum(-1) * pattern.scale)
    return out, lse
