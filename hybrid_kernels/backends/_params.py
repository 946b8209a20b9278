"""Filling the native parameter structs (csrc/common/attn_params.h) from tensors; shared by the
CPU and CUDA backends."""
from __future__ import annotations

import torch
from torch import Tensor

from ..pattern import Pattern
from ..quant import QUANT_BLOCK  # noqa: F401  (the int8 definition: hybrid_kernels/quant.py)

from ._native_cpu import DTYPE_CODES  # noqa: F401  (used here and by the backends)


def last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def strides3(t: Tensor):
    return [t.stride(0), t.stride(1), t.stride(2)]


class Keep:
    """Holds the temporaries whose pointers a params struct refers to."""
    def __init__(self):
        self.items = []

    def __call__(self, t: Tensor) -> int:
        self.items.append(t)
        return t.data_ptr()

    def drop(self, *tensors: Tensor) -> None:
        """Stops holding these (a plan replaces their pointers on every call, and must not keep
        its first call's inputs and outputs alive)."""
        self.items = [t for t in self.items if not any(t is d for d in tensors)]


def fill_params(mod, params, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                pattern: Pattern, keep: Keep) -> None:
    """Fill an ``AttnParams`` from tensors (q/k/v/out last-dim contiguous)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    params.B, params.Hq, params.Hk, params.Nq, params.Nk, params.D, params.Dv = B, Hq, Hk, Nq, Nk, D, Dv
    params.q_stride, params.k_stride = strides3(q), strides3(k)
    params.v_stride, params.o_stride = strides3(v), strides3(out)
    params.q, params.k, params.v = keep(q), keep(k), keep(v)
    params.o, params.lse = keep(out), keep(lse)
    params.dtype = getattr(mod.DType, DTYPE_CODES[q.dtype])
    params.scale = pattern.scale
    params.window_left, params.window_right = pattern.window_left, pattern.window_right
    params.causal = pattern.causal
    lm = pattern.landmarks
    if lm is not None:
        shared = lm.shape[0] == 1 or lm.stride(0) == 0
        rows = lm[:1] if shared else lm
        positions = rows.to(torch.int32).contiguous()
        flags = torch.zeros(rows.shape[0], Nk, dtype=torch.uint8, device=lm.device)
        flags.scatter_(1, rows, 1)
        params.landmarks, params.num_landmarks = keep(positions), lm.shape[1]
        params.landmarks_batch_stride = 0 if shared else positions.stride(0)
        params.landmark_flags = keep(flags)
        params.landmark_flags_batch_stride = 0 if shared else Nk
    if pattern.key_padding_mask is not None:
        params.key_padding = keep(pattern.key_padding_mask.to(torch.uint8).contiguous())
    # Score modifiers: only set when used, so a module built before they existed (whose backend
    # declares no score_mods and so never gets them) still takes these params.
    if pattern.softcap > 0:
        params.softcap = pattern.softcap
    if pattern.bias is not None:
        bias, want = pattern.bias, (Hq, max(Nq + Nk - 1, 0))
        if tuple(bias.shape) != want:  # the kernels read exactly this many floats
            raise ValueError(f"pattern.bias must have shape (Hq, Nq + Nk - 1) = {want}; "
                             f"got {tuple(bias.shape)}")
        params.bias = keep(bias.to(device=q.device, dtype=torch.float32).contiguous())


def int8_forward_via(backend, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern):
    """quant="int8" for a native backend: smooth and quantize Q/K per block (quant.quantize_qk,
    the one int8 definition), run the backend's ``forward_int8_quantized``, and give back the lse
    of the exact (unsmoothed) scores."""
    from ..quant import smoothing_lse_offset
    from ..quant import quantize_qk
    q8, q_scale, k8, k_scale, k_mean = quantize_qk(
        q, k, q_block=QUANT_BLOCK, k_block=QUANT_BLOCK,
        key_padding_mask=pattern.key_padding_mask, return_k_mean=True)
    out, lse = backend.forward_int8_quantized(q8, q_scale, k8, k_scale, v, q, pattern,
                                              QUANT_BLOCK, QUANT_BLOCK)
    return out, lse + smoothing_lse_offset(q, k_mean, pattern.scale)
