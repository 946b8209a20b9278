"""CUDA C++ backend (csrc/cuda) through ``hybrid_kernels._C_cuda``, imported lazily so a
CPU-only install never touches CUDA.

Forward only (the Triton backend provides the backward, and ``auto`` routes training there):
* the fused window + landmark kernel, fp16/bf16, D = Dv in {64, 128};
* ``quant="int8"``: the split-K INT8 kernel (any Nq; built for decode), D % 4 == 0, Dv in
  {64, 128}. :class:`hybrid_kernels.int8_cache.Int8KVCache` feeds it a pre-quantized K cache.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend_base import Backend
from ..pattern import Pattern
from ._alloc import new_output
from ._params import Keep, fill_params, int8_forward_via

_MODULE = None
_MODULE_ERROR: Optional[str] = None


def load_module():
    """The compiled CUDA module; raises ImportError with the reason when it cannot load."""
    global _MODULE, _MODULE_ERROR
    if _MODULE is None and _MODULE_ERROR is None:
        try:
            from .. import _C_cuda
            _MODULE = _C_cuda
        except ImportError as exc:
            _MODULE_ERROR = (f"CUDA module not built or not loadable ({exc}); it is built when "
                             "CMake finds a CUDA toolkit")
    if _MODULE is None:
        raise ImportError(_MODULE_ERROR)
    return _MODULE


def _aligned(t: Tensor) -> Tensor:
    """16-byte aligned rows with strides that are multiples of 8 elements, as the kernels need."""
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
          and all(s % 8 == 0 for s in t.stride()[:3]))
    return t if ok else t.contiguous()


def int8_rows_per_cta(nq: int) -> int:
    """Query rows per CTA of the INT8 kernel (rows_for in csrc/cuda/attention_int8_split.cu)."""
    return 1 if nq <= 1 else 4 if nq <= 4 else 16


def num_splits_for(ctas: int, nk: int, sm_count: int) -> int:
    """Key splits for the INT8 kernel given ``ctas`` = B * Hq * ceil(Nq / rows) CTAs per split.

    Decode is bound by memory latency: aim for about 8 four-warp CTAs per SM (enough bytes in
    flight), with at least 256 keys per split so the LSE merge stays negligible.
    """
    want = max(1, (8 * sm_count + ctas - 1) // max(ctas, 1))
    return max(1, min(want, nk // 256, 256))


class CudaBackend(Backend):
    name = "cuda"
    device_types = frozenset({"cuda"})
    dtypes = frozenset({torch.float16, torch.bfloat16})
    quants = frozenset({None, "int8"})
    supports_backward = False

    def unavailable_reason(self) -> Optional[str]:
        if not torch.cuda.is_available():
            return "no CUDA device available to torch"
        try:
            load_module()
        except ImportError as exc:
            return str(exc)
        return None

    def head_dim_reason(self, head_dim, head_dim_v):
        if head_dim_v not in (64, 128):
            return f"head dims: Dv={head_dim_v} not in (64, 128)"
        return None

    def rejection_reasons(self, problem):
        reasons = super().rejection_reasons(problem)
        if not reasons and problem.quant is None and problem.head_dim != problem.head_dim_v:
            reasons.append(f"head dims: the fused kernel needs D == Dv (got {problem.head_dim}, "
                           f"{problem.head_dim_v})")
        if not reasons and problem.quant == "int8" and (problem.head_dim % 4 or problem.head_dim > 256):
            reasons.append(f"head dims: the int8 kernel needs D % 4 == 0 and D <= 256 (got {problem.head_dim})")
        return reasons

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, quant: Optional[str]):
        if quant == "int8":
            return int8_forward_via(self, q, k, v, pattern)
        mod = load_module()
        B, Hq, Nq, _ = q.shape
        out = new_output((B, Hq, Nq, v.shape[3]), q.dtype, q.device)
        lse = new_output((B, Hq, Nq), torch.float32, q.device)
        q, k, v = _aligned(q), _aligned(k), _aligned(v)
        keep = Keep()
        params = mod.AttnParams()
        fill_params(mod, params, q, k, v, out, lse, pattern, keep)
        with torch.cuda.device(q.device):  # kernels launch on the current device
            mod.attention_forward(params, torch.cuda.current_stream(q.device).cuda_stream)
        return out, lse

    def forward_int8_quantized(self, q8, q_scale, k8, k_scale, v, q_like, pattern: Pattern,
                               q_block: int, k_block: int):
        """The split-K INT8 kernel on pre-quantized Q/K (lse of the smoothed scores)."""
        mod = load_module()
        v = _aligned(v)
        B, Hq, Nq, _ = q8.shape
        Nk, Dv = v.shape[2], v.shape[3]
        out = new_output((B, Hq, Nq, Dv), q_like.dtype, q_like.device)
        lse = new_output((B, Hq, Nq), torch.float32, q_like.device)
        sms = torch.cuda.get_device_properties(v.device).multi_processor_count
        rows = int8_rows_per_cta(Nq)
        splits = num_splits_for(B * Hq * max(1, (Nq + rows - 1) // rows), Nk, sms)
        partial_o = torch.empty((splits, B * Hq, Nq, Dv), dtype=torch.float32, device=v.device)
        partial_ml = torch.empty((splits, B * Hq, Nq, 2), dtype=torch.float32, device=v.device)
        keep = Keep()
        sp = mod.Int8SplitParams()
        attn = sp.attn
        fwd = attn.fwd
        # Shapes and strides come from q_like and k8; the kernel reads q8/k8, never fwd.q/fwd.k.
        fill_params(mod, fwd, q_like, k8, v, out, lse, pattern, keep)
        attn.fwd = fwd
        attn.q8, attn.k8 = keep(q8.contiguous()), keep(k8.contiguous())
        attn.q_scale, attn.k_scale = keep(q_scale.contiguous()), keep(k_scale.contiguous())
        attn.q_block, attn.k_block = q_block, k_block
        sp.attn = attn
        sp.num_splits = splits
        sp.partial_o, sp.partial_ml = keep(partial_o), keep(partial_ml)
        with torch.cuda.device(v.device):  # kernels launch on the current device
            mod.attention_forward_int8(sp, torch.cuda.current_stream(v.device).cuda_stream)
        return out, lse
