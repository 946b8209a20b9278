"""C++ CPU kernels (csrc/cpu) through the torch-free pybind11 module ``hybrid_kernels._C_cpu``.

Tensors cross as raw pointers plus element strides; the last dim must be contiguous (made so
here when it is not). Outputs are allocated here; the kernels write every element.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend_base import Backend
from ..pattern import Pattern
from ._alloc import new_output, poison_enabled, replay_allocator
from ..quant import smoothing_mean
from ._native_cpu import _module_error, load_module, num_threads  # noqa: F401  (re-exported)
from ._params import QUANT_BLOCK, Keep, fill_params, last_dim_contiguous, strides3

MAX_HEAD_DIM = 512


def _int8_params(mod, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, keep: Keep):
    """An ``AttnInt8Params`` with its fwd part filled, and the outputs it writes."""
    B, Hq, Nq, _ = q.shape
    out = new_output((B, Hq, Nq, v.shape[3]), q.dtype, q.device)
    lse = new_output((B, Hq, Nq), torch.float32, q.device)
    params = mod.AttnInt8Params()
    fwd = params.fwd
    fill_params(mod, fwd, q, k, v, out, lse, pattern, keep)
    fwd.num_threads = num_threads()
    params.fwd = fwd
    return params, out, lse


def _int8_cache_params(mod, q: Tensor, k8: Tensor, k_scale: Tensor, k_mean: Tensor, v: Tensor,
                       pattern: Pattern, block: int, keep: Keep):
    """``_int8_params`` against a pre-quantized K cache (q quantized in the kernel)."""
    params, out, lse = _int8_params(mod, q, k8, last_dim_contiguous(v), pattern, keep)
    params.k8, params.k_scale = keep(k8.contiguous()), keep(k_scale.contiguous())
    params.k_mean = keep(k_mean.contiguous())
    params.q_block, params.k_block = block, block
    return params, out, lse


class CpuBackend(Backend):
    name = "cpu"
    device_types = frozenset({"cpu"})
    quants = frozenset({None, "int8"})
    supports_backward = True
    score_mods = frozenset({"softcap", "bias"})
    int8_score_mods = frozenset({"softcap", "bias"})

    def unavailable_reason(self) -> Optional[str]:
        return _module_error()

    def head_dim_reason(self, head_dim, head_dim_v):
        if not (1 <= head_dim <= MAX_HEAD_DIM and 1 <= head_dim_v <= MAX_HEAD_DIM):
            return f"head dims (D={head_dim}, Dv={head_dim_v}) outside [1, {MAX_HEAD_DIM}]"
        return None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, quant: Optional[str]):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        if quant == "int8":
            return self._forward_int8(q, k, v, pattern)
        mod = load_module()
        B, Hq, Nq, _ = q.shape
        out = new_output((B, Hq, Nq, v.shape[3]), q.dtype, q.device)
        lse = new_output((B, Hq, Nq), torch.float32, q.device)
        keep = Keep()
        params = mod.AttnParams()
        fill_params(mod, params, q, k, v, out, lse, pattern, keep)
        params.num_threads = num_threads()
        mod.attention_forward(params)
        return out, lse

    def _forward_int8(self, q, k, v, pattern: Pattern):
        """quant="int8" with the quantization fused into the kernel (same bits as
        quant.quantize_qk); returns the lse of the exact (unsmoothed) scores."""
        mod = load_module()
        keep = Keep()
        params, out, lse = _int8_params(mod, q, k, v, pattern, keep)
        params.q_block, params.k_block = QUANT_BLOCK, QUANT_BLOCK
        if k.shape[2] > 0:
            params.k_mean = keep(smoothing_mean(k, pattern.key_padding_mask).contiguous())
        mod.attention_forward_int8(params)  # q8 == k8 == 0: the kernel quantizes q and k
        return out, lse

    def forward_int8_quantized(self, q8, q_scale, k8, k_scale, v, q_like, pattern: Pattern,
                               q_block: int, k_block: int):
        """The INT8 kernel on pre-quantized Q/K (lse of the smoothed scores)."""
        mod = load_module()
        keep = Keep()
        # Shapes and strides come from q_like and k8; the kernel reads q8/k8, never fwd.q/fwd.k.
        params, out, lse = _int8_params(mod, q_like, k8, last_dim_contiguous(v), pattern, keep)
        params.q8, params.k8 = keep(q8.contiguous()), keep(k8.contiguous())
        params.q_scale, params.k_scale = keep(q_scale.contiguous()), keep(k_scale.contiguous())
        params.q_block, params.k_block = q_block, k_block
        mod.attention_forward_int8(params)
        return out, lse

    def forward_int8_cache(self, q, k8, k_scale, k_mean, v, pattern: Pattern, block: int):
        """The INT8 kernel against a pre-quantized K cache, Q quantized inside the kernel (same
        bits as quant.quantize_qk) and the lse that of the exact scores; None when this build
        of the module cannot (then quantize q and call forward_int8_quantized)."""
        mod = load_module()
        if not getattr(mod, "INT8_QUANTIZES_Q", False):
            return None
        keep = Keep()  # holds what params points at until the kernel has run
        params, out, lse = _int8_cache_params(mod, last_dim_contiguous(q), k8, k_scale, k_mean,
                                              v, pattern, block, keep)
        mod.attention_forward_int8(params)
        return out, lse

    def int8_cache_plan(self, q, k8, k_scale, k_mean, v, pattern: Pattern, block: int,
                        return_lse: bool) -> Optional["Int8CachePlan"]:
        """forward_int8_cache with everything but q prefilled, for repeated decode calls of one
        shape against one cache; None when this build of the module cannot."""
        mod = load_module()
        if not hasattr(mod, "attention_forward_int8_ptrs") or q.stride(-1) != 1:
            return None
        keep = Keep()
        params, out, lse = _int8_cache_params(mod, q, k8, k_scale, k_mean, v, pattern, block, keep)
        keep.drop(q, out, lse)  # every call passes its own
        poison = poison_enabled()
        return Int8CachePlan(mod, params, keep, replay_allocator(out.shape, q.dtype, q, poison),
                             replay_allocator(lse.shape, torch.float32, q, poison) if return_lse
                             else None)

    def backward(self, dout, q, k, v, out, lse, pattern: Pattern, bias_grad: bool = False):
        mod = load_module()
        q, k, v, out, dout = (last_dim_contiguous(t) for t in (q, k, v, out, dout))
        keep = Keep()
        params = mod.AttnBwdParams()
        fwd = params.fwd
        fill_params(mod, fwd, q, k, v, out, lse.contiguous(), pattern, keep)
        fwd.num_threads = num_threads()
        params.fwd = fwd
        params.dout, params.dout_stride = keep(dout), strides3(dout)
        # fp32 inputs: fp32 gradients. bf16 / fp16 inputs: the kernel writes the three gradients
        # rounded to that dtype, accumulating dK / dV in its own fp32 scratch (no fp32 outputs,
        # no separate conversion pass).
        dbias = None
        if bias_grad and pattern.bias is not None:
            dbias = new_output((q.shape[1], q.shape[2] + k.shape[2] - 1), torch.float32, q.device)
            params.dbias = keep(dbias)
        if q.dtype == torch.float32:
            dq, dk, dv = (new_output(t.shape, torch.float32, q.device) for t in (q, k, v))
            params.dq, params.dk, params.dv = keep(dq), keep(dk), keep(dv)
            mod.attention_backward(params)
            return dq, dk, dv, dbias
        grads = [new_output(t.shape, q.dtype, q.device) for t in (q, k, v)]
        params.grad_dtype = fwd.dtype
        params.dq_lp, params.dk_lp, params.dv_lp = (keep(g) for g in grads)
        mod.attention_backward(params)
        return (*grads, dbias)


class Int8CachePlan:
    """A decode call against one Int8KVCache, its native params prefilled (the cache's tensors
    held by ``keep``): a call allocates out (and lse when it returns it) and passes three
    pointers."""
    __slots__ = ("run", "params", "keep", "new_out", "new_lse")

    def __init__(self, mod, params, keep: Keep, new_out, new_lse):
        self.run = mod.attention_forward_int8_ptrs
        self.params, self.keep = params, keep
        # q -> out / lse (replay_allocator); new_lse None: the call returns out alone
        self.new_out, self.new_lse = new_out, new_lse

    def __call__(self, q: Tensor):
        out = self.new_out(q)
        if self.new_lse is None:
            self.run(self.params, q.data_ptr(), out.data_ptr(), 0)
            return out
        lse = self.new_lse(q)
        self.run(self.params, q.data_ptr(), out.data_ptr(), lse.data_ptr())
        return out, lse
