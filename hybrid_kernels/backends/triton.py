"""Triton backend (GPU; CPU tensors only under TRITON_INTERPRET=1, for testing).

The kernels live in hybrid_kernels/triton_kernels/ and are imported on first use.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from ..backend_base import Backend
from ..pattern import Pattern
from ._alloc import new_output

MAX_HEAD_DIM = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_IMPORT_ERROR: Optional[str] = None
_IMPORT_CHECKED = False


def _triton_import_error() -> Optional[str]:
    global _IMPORT_ERROR, _IMPORT_CHECKED
    if not _IMPORT_CHECKED:
        _IMPORT_CHECKED = True
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _IMPORT_ERROR = f"triton is not importable ({exc})"
    return _IMPORT_ERROR


def _kernels():
    from .. import triton_kernels
    return triton_kernels.load()


class TritonBackend(Backend):
    name = "triton"
    device_types = frozenset({"cuda"})
    quants = frozenset({None, "int8"})
    supports_backward = True
    score_mods = frozenset({"softcap", "bias"})
    int8_score_mods = frozenset({"softcap", "bias"})

    def device_types_now(self) -> frozenset:
        return self.device_types | ({"cpu"} if _interpreting() else set())

    def auto_device_types(self) -> frozenset:
        # The interpreter is for testing: on CPU tensors `auto` keeps the C++ kernels.
        return self.device_types

    def unavailable_reason(self) -> Optional[str]:
        why = _triton_import_error()
        if why:
            return why
        if not _interpreting() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        return None

    def head_dim_reason(self, head_dim: int, head_dim_v: int) -> Optional[str]:
        if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= head_dim_v <= MAX_HEAD_DIM):
            return (f"head dims (D={head_dim}, Dv={head_dim_v}) outside [1, {MAX_HEAD_DIM}] "
                    f"(other sizes are padded up to a power of two)")
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, quant: Optional[str]):
        kern = _kernels()
        B, Hq, Nq, _ = q.shape
        out = new_output((B, Hq, Nq, v.shape[3]), q.dtype, q.device)
        lse = new_output((B, Hq, Nq), torch.float32, q.device)
        with _on_device(q):
            if quant == "int8":
                kern.int8.attention_forward_int8(q, k, v, pattern, out, lse)
            else:
                kern.forward.attention_forward(q, k, v, pattern, out, lse)
        return out, lse

    def backward(self, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 pattern: Pattern, dlse: Optional[Tensor] = None, bias_grad: bool = False):
        if dlse is not None:
            raise ValueError("the triton backward does not take a gradient for lse "
                             "(ops.py routes that case to the reference backend)")
        kern = _kernels()
        dq = new_output(q.shape, q.dtype, q.device)
        dk = new_output(k.shape, k.dtype, q.device)
        dv = new_output(v.shape, v.dtype, q.device)
        dbias = None
        if bias_grad and pattern.bias is not None:
            Nq, Nk = q.shape[2], k.shape[2]
            dbias = torch.zeros((q.shape[1], Nq + Nk - 1), dtype=torch.float32, device=q.device)
        with _on_device(q):
            kern.backward.attention_backward(dout, q, k, v, out, lse, pattern, dq, dk, dv,
                                             dbias=dbias)
        return dq, dk, dv, dbias


def _on_device(t: Tensor):
    """Launch on the tensor's GPU (Triton uses the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
