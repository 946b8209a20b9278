"""The fast path of :func:`hybrid_kernels.attention`: a cache of call plans.

A plan is keyed by everything that decides a call: shapes, strides, dtypes and devices of q, k,
v; window, causal, scale, softcap (plain Python values of exact types, so True never stands for
1), the requested backend, return_lse, the environment variables the call reads and torch's
thread count. Calls with landmarks, quant, sinks or biases (tensors), autograd, or under
torch.compile never use it. The key leaves K/V's length and their strides over batch, heads and
keys open (a decode step against a growing KV cache has a new length every call, and nothing
the general path checks depends on it once k and v agree on it, it is not 0, and a key
padding mask is (B, Nk)); a mask is keyed by dtype, device and batch, its bytes read per call
(a contiguous one; others take the general path). A plan is either False (take the general
path) or a _CpuPlan: the CPU backend's params prefilled, so a call only allocates the output
and passes its pointers, K/V's length and strides. Entries are made after the general path's
validation and dispatch accepted the same key, so a hit never skips an error. A plan holds none
of its calls' tensors. register_backend() clears the cache.
"""
from __future__ import annotations

import os
from typing import Dict

import torch
from torch import Tensor

from . import dispatch as _dispatch
from .backend_base import Problem
from .backends.cpu import CpuBackend, load_module, num_threads
from .backends._alloc import poison_enabled, replay_allocator
from .backends._params import Keep, fill_params
from .dispatch import select_backend
from .validation import BACKENDS, plan

__all__ = ["eligible", "environment_key", "keyable_scalars", "run"]

_PLANS: Dict[tuple, object] = {}
_MAX_PLANS = 256
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)
_ENV_NAMES = ("HYBRID_KERNELS_BACKEND", "HYBRID_KERNELS_NUM_THREADS", "HYBRID_KERNELS_POISON",
              "HYBRID_KERNELS_CPU_CACHE_MB")
# os.environ keeps its entries in _data (bytes keys on POSIX); reading it directly costs a dict
# lookup instead of os.environ.get's encoding round trip. os.environ.get where that is not so.
_ENV_DATA = getattr(os.environ, "_data", None)
if os.name == "posix" and isinstance(_ENV_DATA, dict):
    _ENV_KEYS = tuple(os.environ.encodekey(n) for n in _ENV_NAMES)

    def _env_values() -> tuple:
        get = _ENV_DATA.get
        return (get(_ENV_KEYS[0]), get(_ENV_KEYS[1]), get(_ENV_KEYS[2]), get(_ENV_KEYS[3]))
else:  # pragma: no cover
    def _env_values() -> tuple:
        return tuple(os.environ.get(n) for n in _ENV_NAMES)


def environment_key() -> tuple:
    """What a call reads besides its arguments: the environment variables and torch's thread
    count (part of every plan key)."""
    return _env_values(), torch.get_num_threads()


def _modes_active() -> bool:
    return _dispatch_stack_len() > 0 or _function_mode_on()


def _plain_int(x) -> bool:
    return type(x) is int


def keyable_scalars(window, causal, scale, softcap, return_lse) -> bool:
    """True when the pattern's scalar arguments are plain values of exact types (so True never
    stands for 1) that a plan key can hold; otherwise the general path decides."""
    return ((window is None or type(window) is int
             or (type(window) is tuple and len(window) == 2 and type(window[0]) is int
                 and type(window[1]) is int))
            and (scale is None or type(scale) is float or type(scale) is int)
            and (softcap is None or type(softcap) is float or type(softcap) is int)
            and type(causal) is bool and type(return_lse) is bool)


def _plan_key(q, k, v, kpm, window, causal, scale, softcap, backend, return_lse):
    """The cache key of a call with K's and V's strides, ``(key, k_strides, v_strides)`` (the
    replay passes them on), or None when an argument is of a type the cache does not key."""
    if kpm is not None:
        if type(kpm) is not Tensor or kpm.dim() != 2:
            return None
        kpm = (kpm.shape[0], kpm.dtype, kpm.device)
    if not keyable_scalars(window, causal, scale, softcap, return_lse):
        return None
    if type(backend) is not str:
        return None
    try:
        qs, ks, vs = q.stride(), k.stride(), v.stride()
    except RuntimeError:  # sparse / nested layouts have no strides: the general path decides
        return None
    kshape, vshape = k.shape, v.shape
    if len(kshape) != 4 or len(vshape) != 4:
        return None
    # Any K/V length and strides over batch, heads and keys (see the module docstring); run()
    # checks the lengths.
    key = (q.shape, qs, (kshape[0], kshape[1], kshape[3], ks[3]),
           (vshape[0], vshape[1], vshape[3], vs[3]), q.dtype, k.dtype, v.dtype, q.device,
           k.device, v.device, kpm, window, causal, scale, softcap, backend, return_lse,
           environment_key())
    return key, ks, vs


class _CpuPlan:
    """A call on the native CPU backend with its params prefilled; only pointers, K/V's length
    and their strides change."""
    __slots__ = ("run", "params", "poison", "new_out", "new_lse")

    def __init__(self, mod, params, q: Tensor, out_shape, return_lse: bool):
        self.run = mod.attention_forward_ptrs_kv
        self.params = params
        self.poison = poison_enabled()  # outputs NaN-filled before the kernel runs
        self.new_out = replay_allocator(out_shape, q.dtype, q, self.poison)  # q -> out
        # q -> lse, or None: the call does not return it
        self.new_lse = (replay_allocator(out_shape[:3], torch.float32, q, self.poison)
                        if return_lse else None)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, kpm, nk: int, ks, vs):
        out = self.new_out(q)
        lse = None if self.new_lse is None else self.new_lse(q)
        self.run(self.params, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                 0 if lse is None else lse.data_ptr(), 0 if kpm is None else kpm.data_ptr(),
                 nk, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2])
        return out if lse is None else (out, lse)


def _fast_plan(q, k, v, kpm, window, causal, scale, softcap, backend, return_lse):
    """The plan of a call: validates it exactly as the general path does (raising the same
    errors), then returns a _CpuPlan when the native CPU backend runs it with nothing the plan
    cannot replay, else False."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        return False  # the general path raises
    pattern, _ = plan(q, k, v, window=window, causal=causal, key_padding_mask=kpm, scale=scale,
                      softcap=softcap)
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if B == 0 or Nq == 0 or Nk == 0 or Dv == 0 or q.device.type != "cpu":
        return False
    impl = select_backend(Problem.from_inputs(q, v, pattern, None, False), backend)
    if type(impl) is not CpuBackend or type(impl).forward is not _CPU_FORWARD:
        return False
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
        return False
    mod = load_module()
    if not hasattr(mod, "attention_forward_ptrs_kv"):
        return False
    out_shape = (B, Hq, Nq, Dv)
    out = torch.empty(out_shape, dtype=q.dtype)   # for the strides only
    lse = torch.empty(out_shape[:3], dtype=torch.float32)
    # Every pointer fill_params sets (q, k, v, out, lse, the mask) is replaced by each call's own,
    # so the plan keeps none of the tensors behind them.
    params = mod.AttnParams()
    fill_params(mod, params, q, k, v, out, lse, pattern, Keep())
    params.num_threads = num_threads()
    return _CpuPlan(mod, params, q, out_shape, return_lse)


def _clear_plans() -> None:
    _PLANS.clear()


_dispatch.on_register(_clear_plans)
_CPU_FORWARD = CpuBackend.forward




def eligible(q, k, v) -> bool:
    """Plain tensors, no autograd graph needed, not traced, no dispatch/function modes."""
    return (not _is_compiling() and type(q) is Tensor and type(k) is Tensor and type(v) is Tensor
            and not (_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not _modes_active())


def run(q, k, v, key_padding_mask, window, causal, scale, softcap, backend, return_lse):
    """The call's result through its cached plan (made on first sight, after the general path's
    validation and dispatch), or None when the general path must run it."""
    keyed = _plan_key(q, k, v, key_padding_mask, window, causal, scale, softcap, backend,
                      return_lse)
    if keyed is None:
        return None
    key, ks, vs = keyed
    # What a plan for any K/V length cannot replay (the kernel reads B rows of Nk mask bytes):
    # the general path decides.
    nk = k.shape[2]
    if nk != v.shape[2] or nk == 0 or (key_padding_mask is not None and (
            key_padding_mask.shape[1] != nk or not key_padding_mask.is_contiguous())):
        return None
    entry = _PLANS.get(key)
    if entry is None:
        entry = _fast_plan(q, k, v, key_padding_mask, window, causal, scale, softcap, backend,
                           return_lse)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = entry
    return None if entry is False else entry(q, k, v, key_padding_mask, nk, ks, vs)
