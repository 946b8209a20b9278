"""Optional competitors, used when importable: flash-attn, xformers, SageAttention (GPU)."""
from __future__ import annotations

import importlib
from typing import List, Optional

import torch

from .cases import Case
from .providers import Provider

__all__ = ["third_party_providers", "FlashAttnProvider", "XformersProvider", "SageProvider"]


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
        return None
    except Exception as exc:
        return f"{module} not importable ({type(exc).__name__})"


def _bnhd(t):
    """(B, H, N, D) -> (B, N, H, D) contiguous, made before timing."""
    return t.transpose(1, 2).contiguous()


class _GpuThirdParty(Provider):
    module = ""
    dtypes = (torch.float16, torch.bfloat16)

    def unavailable_reason(self, device: str) -> Optional[str]:
        why = _import_error(self.module)
        if why:
            return why
        if not str(device).startswith("cuda"):
            return "CUDA only"
        return None

    def skip_reason(self, case: Case) -> Optional[str]:
        if case.dtype not in self.dtypes:
            return f"dtype {case.dtype_name} not supported"
        if case.pattern.num_landmarks:
            return "no landmark (global token) support"
        return None


class FlashAttnProvider(_GpuThirdParty):
    name = "flash-attn"
    module = "flash_attn"
    description = "flash_attn.flash_attn_func (window_size for sliding windows)"

    def build(self, case, q, k, v):
        from flash_attn import flash_attn_func
        q2, k2, v2 = _bnhd(q), _bnhd(k), _bnhd(v)
        window = case.window_lr
        causal = case.pattern.causal
        scale = case.head_dim ** -0.5
        return lambda: flash_attn_func(q2, k2, v2, softmax_scale=scale, causal=causal,
                                       window_size=window).transpose(1, 2)


class XformersProvider(_GpuThirdParty):
    name = "xformers"
    module = "xformers.ops"
    description = "xformers.ops.memory_efficient_attention"

    def skip_reason(self, case: Case) -> Optional[str]:
        why = super().skip_reason(case)
        if why:
            return why
        if case.pattern.window is not None and case.pattern.causal:
            return "window + causal not mapped to an xformers bias"
        if case.heads_q != case.heads_kv:
            return "GQA not mapped (needs the 5-D layout)"
        return None

    def build(self, case, q, k, v):
        import xformers.ops as xops
        from xformers.ops.fmha import attn_bias
        q2, k2, v2 = _bnhd(q), _bnhd(k), _bnhd(v)
        if case.pattern.window is not None:
            bias = attn_bias.LocalAttentionFromBottomRightMask(*case.window_lr)
        elif case.pattern.causal:
            bias = attn_bias.LowerTriangularFromBottomRightMask()
        else:
            bias = None
        scale = case.head_dim ** -0.5
        return lambda: xops.memory_efficient_attention(q2, k2, v2, attn_bias=bias,
                                                       scale=scale).transpose(1, 2)


class SageProvider(_GpuThirdParty):
    name = "sageattention"
    module = "sageattention"
    description = "sageattention.sageattn (INT8 QK^T)"

    def skip_reason(self, case: Case) -> Optional[str]:
        why = super().skip_reason(case)
        if why:
            return why
        if case.pattern.window is not None:
            return "no sliding-window support"
        if case.mode != "fwd":
            return "forward only"
        return None

    def build(self, case, q, k, v):
        from sageattention import sageattn
        causal = case.pattern.causal
        scale = case.head_dim ** -0.5
        return lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=causal, sm_scale=scale)


def third_party_providers() -> List[Provider]:
    return [FlashAttnProvider(), XformersProvider(), SageProvider()]
