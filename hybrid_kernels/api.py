"""The public entry point: :func:`attention`."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers the custom ops)
from . import dispatch as _dispatch
from .dispatch import NoBackendError, Problem, _ensure_registered, select_backend
from .dispatch import explain as _explain_problem
from .pattern import (Pattern, normalize_key_padding_mask, normalize_landmarks, normalize_scale,
                      normalize_window)
from .score_mods import combine_bias, normalize_sinks, normalize_softcap

__all__ = ["attention", "plan", "explain", "Explanation"]

_ensure_registered()

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D); got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    (B, Hq, _, D), (Bk, Hk, Nk, Dk), (Bv, Hv, Nv, _) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hk != Hv or Nk != Nv:
        raise ValueError(f"k (B, Hk, Nk, D) and v (B, Hk, Nk, Dv) must agree on Hk and Nk; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if D != Dk:
        raise ValueError(f"q and k must have the same head dim D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"the number of query heads Hq={Hq} must be a positive multiple of the "
                         f"number of key/value heads Hk={Hk} (MHA/GQA/MQA)")


def plan(q: Tensor, k: Tensor, v: Tensor, *, window=None, landmarks=None, causal: bool = False,
         key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
         quant: Optional[str] = None, softcap: Optional[float] = None,
         alibi_slopes: Optional[Tensor] = None,
         position_bias: Optional[Tensor] = None) -> Tuple[Pattern, Optional[str]]:
    """Validate the arguments of :func:`attention` and return (Pattern, quant)."""
    _check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    if quant not in (None, "int8"):
        raise ValueError(f"quant must be None or 'int8'; got {quant!r}")
    B, Nk = q.shape[0], k.shape[2]
    left, right = normalize_window(window)
    return Pattern(
        window_left=left, window_right=right, causal=causal,
        landmarks=normalize_landmarks(landmarks, B, Nk, q.device),
        key_padding_mask=normalize_key_padding_mask(key_padding_mask, B, Nk, q.device),
        scale=normalize_scale(scale, q.shape[-1]),
        softcap=normalize_softcap(softcap),
        bias=combine_bias(alibi_slopes, position_bias, q.shape[1], q.shape[2], Nk, q.device),
    ), quant


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: Union[None, int, Tuple[int, int]] = None,
    landmarks: Union[None, int, Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    quant: Optional[str] = None,
    softcap: Optional[float] = None,
    sinks: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    position_bias: Optional[Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Sliding-window + landmark sparse attention (optionally INT8), forward and backward.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hk, Nk, D); v: (B, Hk, Nk, Dv); Hq % Hk == 0 (MHA/GQA/MQA).
            float32, bfloat16 or float16, one device. Any strides (expanded inputs work).
        window: None (unlimited), an int w (= (w, w)), or (left, right) with -1 = unlimited.
        landmarks: None, an int stride s (key positions 0, s, 2s, ...), or a LongTensor (G,) or
            (B, G) of sorted unique key positions. Landmarks see every key and every query
            sees them.
        causal: mask keys j > r, where r = i + Nk - Nq (bottom-right alignment).
        key_padding_mask: bool (B, Nk), True = real token.
        scale: softmax scale, default 1/sqrt(D).
        quant: None or "int8" (INT8 QK^T with int32 accumulation; backward is exact).
        softcap: None or a float c > 0: scores s become c * tanh(s / c) (Gemma 2).
        sinks: None or (Hq,) float logits that join each row's softmax denominator without a
            value (attention sinks, GPT-OSS ``s_aux``); differentiable.
        alibi_slopes: None or (Hq,) float: adds -slope * |j - r| to the score of key j from
            query i (r = i + Nk - Nq), as FlashAttention's ``alibi_slopes``.
        position_bias: None or (Hq, Nq + Nk - 1) float: adds position_bias[h, (j - r) + Nk - 1],
            a bias that depends only on the query-key offset (T5's bucketed relative bias);
            differentiable. Softcap applies before the biases.
        return_lse: also return the log-sum-exp (B, Hq, Nq) float32 (-inf for empty rows; with
            sinks, the sink is part of it).
        backend: "auto" | "cpu" | "triton" | "cuda" | "reference".

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, and lse if ``return_lse``. A query that sees no key
        gets zeros (and zero gradient).
    """
    # The fast path: a call that matches a cached plan (same shapes, strides, dtypes, devices,
    # pattern scalars, environment) skips validation and dispatch, which that plan's first call
    # did; see _fast_plan. Not while torch.compile traces (the custom op is what it must see),
    # nor when autograd needs a graph, nor with tensor subclasses or dispatch / function modes.
    if (not _is_compiling() and landmarks is None and key_padding_mask is None and quant is None
            and sinks is None and alibi_slopes is None and position_bias is None
            and type(q) is Tensor and type(k) is Tensor and type(v) is Tensor
            and not (_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and not _modes_active()):
        key = _plan_key(q, k, v, window, causal, scale, softcap, backend, return_lse)
        if key is not None:
            entry = _PLANS.get(key)
            if entry is None:
                entry = _fast_plan(q, k, v, window, causal, scale, softcap, backend, return_lse)
                if len(_PLANS) >= _MAX_PLANS:
                    _PLANS.clear()
                _PLANS[key] = entry
            if entry is not False:
                return entry(q, k, v)
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool; got {type(return_lse).__name__}")
    pattern, quant = plan(q, k, v, window=window, landmarks=landmarks, causal=causal,
                          key_padding_mask=key_padding_mask, scale=scale, quant=quant,
                          softcap=softcap, alibi_slopes=alibi_slopes, position_bias=position_bias)
    sinks = normalize_sinks(sinks, q.shape[1], q.device)
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if B == 0 or Nq == 0 or Nk == 0 or Dv == 0:
        return _empty_result(q, k, v, return_lse, sinks)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, pattern.bias, sinks))
    impl = select_backend(Problem.from_inputs(q, v, pattern, quant, needs_grad), backend)
    out, lse = torch.ops.hybrid_kernels.attention_fwd(
        q, k, v, pattern.landmarks, pattern.key_padding_mask, pattern.window_left,
        pattern.window_right, pattern.causal, pattern.scale, pattern.softcap, pattern.bias,
        sinks, quant or "", impl.name)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# Plan cache of the fast path.
#
# A plan is keyed by everything that decides a call: shapes, strides, dtypes and devices of q, k,
# v; window, causal, scale, softcap (plain Python values of exact types, so True never stands for
# 1), the requested backend, return_lse, the environment variables the call reads and torch's
# thread count. Calls with landmarks, padding, quant, sinks or biases (tensors), autograd, or under
# torch.compile never use it. A plan is either False (take the general path) or a _CpuPlan: the
# CPU backend's params prefilled, so a call only allocates the output and passes five pointers.
# Entries are made after the general path's validation and dispatch accepted the same key, so a
# hit never skips an error. register_backend() clears the cache.

_PLANS: Dict[tuple, object] = {}
_CPU = torch.device("cpu")
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


def _modes_active() -> bool:
    return _dispatch_stack_len() > 0 or _function_mode_on()


def _plain_int(x) -> bool:
    return type(x) is int


def _plan_key(q, k, v, window, causal, scale, softcap, backend, return_lse):
    """The cache key of a call, or None when an argument is of a type the cache does not key."""
    if not (window is None or type(window) is int
            or (type(window) is tuple and len(window) == 2 and type(window[0]) is int
                and type(window[1]) is int)):
        return None
    if not (scale is None or type(scale) is float or type(scale) is int):
        return None
    if not (softcap is None or type(softcap) is float or type(softcap) is int):
        return None
    if type(causal) is not bool or type(return_lse) is not bool or type(backend) is not str:
        return None
    try:
        strides = (q.stride(), k.stride(), v.stride())
    except RuntimeError:  # sparse / nested layouts have no strides: the general path decides
        return None
    return (q.shape, k.shape, v.shape, strides, q.dtype, k.dtype, v.dtype, q.device, k.device,
            v.device, window, causal, scale, softcap, backend, return_lse, _env_values(),
            torch.get_num_threads())


class _CpuPlan:
    """A call on the native CPU backend with its params prefilled; only pointers change."""
    __slots__ = ("run", "params", "out_shape", "dtype", "lse_shape", "return_lse", "poison",
                 "cached_alloc")

    def __init__(self, mod, params, out_shape, dtype, return_lse, poison, cached_alloc):
        self.run = mod.attention_forward_ptrs
        self.params = params
        self.out_shape = out_shape
        self.dtype = dtype
        self.lse_shape = out_shape[:3]
        self.return_lse = return_lse
        self.poison = poison
        self.cached_alloc = cached_alloc

    def __call__(self, q: Tensor, k: Tensor, v: Tensor):
        if self.cached_alloc:
            from .backends._alloc import new_output
            out = new_output(self.out_shape, self.dtype, q.device)
        else:
            out = torch.empty(self.out_shape, dtype=self.dtype, device=_CPU)
            if self.poison:
                out.fill_(float("nan"))
        if not self.return_lse:
            self.run(self.params, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 0)
            return out
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=_CPU)
        if self.poison:
            lse.fill_(float("nan"))
        self.run(self.params, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                 lse.data_ptr())
        return out, lse


def _fast_plan(q, k, v, window, causal, scale, softcap, backend, return_lse):
    """The plan of a call: validates it exactly as the general path does (raising the same
    errors), then returns a _CpuPlan when the native CPU backend runs it with nothing the plan
    cannot replay, else False."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        return False  # the general path raises
    pattern, _ = plan(q, k, v, window=window, causal=causal, scale=scale, softcap=softcap)
    B, Hq, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if B == 0 or Nq == 0 or Nk == 0 or Dv == 0 or q.device.type != "cpu":
        return False
    impl = select_backend(Problem.from_inputs(q, v, pattern, None, False), backend)
    from .backends.cpu import CpuBackend, load_module, num_threads
    from .backends._alloc import poison_enabled
    from .backends._params import Keep, fill_params
    if type(impl) is not CpuBackend or type(impl).forward is not _CPU_FORWARD:
        return False
    if any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (q, k, v)):
        return False
    mod = load_module()
    if not hasattr(mod, "attention_forward_ptrs"):
        return False
    out_shape = (B, Hq, Nq, Dv)
    out = torch.empty(out_shape, dtype=q.dtype)   # for the strides only
    lse = torch.empty(out_shape[:3], dtype=torch.float32)
    params = mod.AttnParams()
    fill_params(mod, params, q, k, v, out, lse, pattern, Keep())
    params.num_threads = num_threads()
    nbytes = out.numel() * out.element_size()
    return _CpuPlan(mod, params, out_shape, q.dtype, return_lse, poison_enabled(),
                    cached_alloc=nbytes >= mod.SCRATCH_MIN_CACHED_BYTES)


def _clear_plans() -> None:
    _PLANS.clear()


_dispatch.on_register(_clear_plans)
from .backends.cpu import CpuBackend as _CpuBackend  # noqa: E402
_CPU_FORWARD = _CpuBackend.forward


def _empty_result(q: Tensor, k: Tensor, v: Tensor, return_lse: bool, sinks: Optional[Tensor]):
    """No keys (or no queries): zeros and lse = -inf (the sink's logit with sinks), still
    connected to the autograd graph."""
    B, Hq, Nq, _ = q.shape
    out = q.new_zeros((B, Hq, Nq, v.shape[3]))
    if q.requires_grad or k.requires_grad or v.requires_grad:
        out = out + 0 * (q.sum() + k.sum() + v.sum())
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    if sinks is not None:
        lse = sinks.float()[None, :, None].expand(B, Hq, Nq)
    return (out, lse) if return_lse else out


class Explanation(dict):
    """backend name -> reasons it rejects the call (empty list = it accepts), in the order
    ``backend="auto"`` tries them; ``selected`` is the backend the call would run on (None when
    none can)."""

    def __init__(self, reasons: Dict[str, List[str]], selected: Optional[str], problem: Problem):
        super().__init__(reasons)
        self.selected = selected
        self.problem = problem

    def __str__(self) -> str:
        lines = [f"selected: {self.selected}"]
        for name, why in self.items():
            lines.append(f"  {name}: " + ("accepted" if not why else "; ".join(why)))
        return "\n".join(lines)


def explain(q, k: Optional[Tensor] = None, v: Optional[Tensor] = None, *, backend: str = "auto",
            **kwargs):
    """Which backend :func:`attention` would run ``(q, k, v, **kwargs)`` on, and why each other
    one would not: an :class:`Explanation`. ``explain(problem)`` with a
    :class:`~hybrid_kernels.dispatch.Problem` returns the plain reasons dict."""
    if isinstance(q, Problem):
        return _explain_problem(q)
    kwargs.pop("return_lse", None)
    sinks = kwargs.pop("sinks", None)
    pattern, quant = plan(q, k, v, **kwargs)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, pattern.bias, sinks))
    problem = Problem.from_inputs(q, v, pattern, quant, needs_grad)
    try:
        selected = select_backend(problem, backend).name
    except NoBackendError:
        selected = None
    return Explanation(_explain_problem(problem), selected, problem)
