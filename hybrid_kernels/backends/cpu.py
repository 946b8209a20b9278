"""C++ CPU kernels (csrc/cpu) through the torch-free pybind11 module ``hybrid_kernels._C_cpu``.

Tensors cross as raw pointers plus element strides; the last dim must be contiguous (made so
here when it is not). Outputs are allocated here; the kernels write every element.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ..dispatch import Backend
from ..pattern import Pattern
from ._alloc import new_output

_DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
MAX_HEAD_DIM = 512


_MODULE = None
_MODULE_ERROR: Optional[str] = None


def _import_module() -> None:
    global _MODULE, _MODULE_ERROR
    if _MODULE is None and _MODULE_ERROR is None:
        try:
            from .. import _C_cpu  # built by CMake; see README
            _MODULE = _C_cpu
        except ImportError as exc:  # not built, or built for another Python
            _MODULE_ERROR = f"native CPU module not importable ({exc})"


def load_module():
    """The compiled CPU module, or raise ImportError with the reason."""
    _import_module()
    if _MODULE is None:
        raise ImportError(_MODULE_ERROR)
    return _MODULE


def _module_error() -> Optional[str]:
    _import_module()
    return _MODULE_ERROR


def num_threads() -> int:
    """Threads for the kernels: HYBRID_KERNELS_NUM_THREADS, else torch's intra-op count."""
    env = os.environ.get("HYBRID_KERNELS_NUM_THREADS")
    return int(env) if env else torch.get_num_threads()


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides3(t: Tensor):
    return [t.stride(0), t.stride(1), t.stride(2)]


class _Keep:
    """Holds the temporaries whose pointers a params struct refers to."""
    def __init__(self):
        self.items = []

    def __call__(self, t: Tensor) -> int:
        self.items.append(t)
        return t.data_ptr()


def fill_params(mod, params, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                pattern: Pattern, keep: _Keep) -> None:
    """Fill an ``AttnParams`` from tensors (q/k/v/out last-dim contiguous)."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    params.B, params.Hq, params.Hk, params.Nq, params.Nk, params.D, params.Dv = B, Hq, Hk, Nq, Nk, D, Dv
    params.q_stride, params.k_stride = _strides3(q), _strides3(k)
    params.v_stride, params.o_stride = _strides3(v), _strides3(out)
    params.q, params.k, params.v = keep(q), keep(k), keep(v)
    params.o, params.lse = keep(out), keep(lse)
    params.dtype = getattr(mod.DType, _DTYPE_CODES[q.dtype])
    params.scale = pattern.scale
    params.window_left, params.window_right = pattern.window_left, pattern.window_right
    params.causal = pattern.causal
    lm = pattern.landmarks
    if lm is not None:
        shared = lm.shape[0] == 1 or lm.stride(0) == 0
        rows = lm[:1] if shared else lm
        positions = rows.to(torch.int32).contiguous()
        flags = torch.zeros(rows.shape[0], Nk, dtype=torch.uint8)
        flags.scatter_(1, rows, 1)
        params.landmarks, params.num_landmarks = keep(positions), lm.shape[1]
        params.landmarks_batch_stride = 0 if shared else positions.stride(0)
        params.landmark_flags = keep(flags)
        params.landmark_flags_batch_stride = 0 if shared else Nk
    if pattern.key_padding_mask is not None:
        params.key_padding = keep(pattern.key_padding_mask.to(torch.uint8).contiguous())
    params.num_threads = num_threads()


class CpuBackend(Backend):
    name = "cpu"
    device_types = frozenset({"cpu"})
    quants = frozenset({None, "int8"})
    supports_backward = True

    def unavailable_reason(self) -> Optional[str]:
        return _module_error()

    def head_dim_reason(self, head_dim, head_dim_v):
        if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= head_dim_v <= MAX_HEAD_DIM):
            return f"head dims (D={head_dim}, Dv={head_dim_v}) outside [1, {MAX_HEAD_DIM}]"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, quant: Optional[str]):
        mod = load_module()
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        B, Hq, Nq, _ = q.shape
        out = new_output((B, Hq, Nq, v.shape[3]), q.dtype, q.device)
        lse = new_output((B, Hq, Nq), torch.float32, q.device)
        keep = _Keep()
        if quant == "int8":
            from ..quant import quantize_qk
            params = mod.AttnInt8Params()
            q8, q_scale, k8, k_scale = quantize_qk(q, k, key_padding_mask=pattern.key_padding_mask)
            fwd = params.fwd
            fill_params(mod, fwd, q, k, v, out, lse, pattern, keep)
            params.fwd = fwd
            params.q8, params.k8 = keep(q8), keep(k8)
            params.q_scale, params.k_scale = keep(q_scale), keep(k_scale)
            params.q_block = -(-Nq // q_scale.shape[-1]) if q_scale.shape[-1] else 1
            params.k_block = -(-k.shape[2] // k_scale.shape[-1]) if k_scale.shape[-1] else 1
            mod.attention_forward_int8(params)
        else:
            params = mod.AttnParams()
            fill_params(mod, params, q, k, v, out, lse, pattern, keep)
            mod.attention_forward(params)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, pattern: Pattern, dlse: Optional[Tensor] = None):
        mod = load_module()
        q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
        keep = _Keep()
        params = mod.AttnBwdParams()
        fwd = params.fwd
        fill_params(mod, fwd, q, k, v, out, lse.contiguous(), pattern, keep)
        params.fwd = fwd
        params.dout, params.dout_stride = keep(dout), _strides3(dout)
        dq = new_output(q.shape, torch.float32, q.device)
        dk = new_output(k.shape, torch.float32, q.device)
        dv = new_output(v.shape, torch.float32, q.device)
        params.dq, params.dk, params.dv = keep(dq), keep(dk), keep(dv)
        mod.attention_backward(params)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
