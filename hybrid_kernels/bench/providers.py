"""Providers: the implementations a benchmark compares, each turning a case and its inputs into a
callable that returns the attention output (B, Hq, Nq, Dv).

A provider says why it cannot run at all on a device (:meth:`Provider.unavailable_reason`) or
why it skips one case (:meth:`Provider.skip_reason`); the harness reports both instead of
failing. Register extra providers with :func:`register_provider`.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cases import Case

__all__ = ["Provider", "HkProvider", "SdpaProvider", "ReferenceProvider", "register_provider",
           "unregister_provider", "get_providers", "available_memory"]

Fn = Callable[[], Tensor]


class Provider:
    name: str = ""
    description: str = ""

    def unavailable_reason(self, device: str) -> Optional[str]:
        """None when this provider can run on ``device`` at all, else why not."""
        return None

    def skip_reason(self, case: Case) -> Optional[str]:
        """None when this provider runs ``case``, else why it skips it."""
        return None

    def build(self, case: Case, q: Tensor, k: Tensor, v: Tensor) -> Fn:
        """Set-up work (masks, layouts) goes here, untimed; the returned callable is timed."""
        raise NotImplementedError


def available_memory(device: str) -> int:
    """Bytes free on ``device`` (MemAvailable on CPU)."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class HkProvider(Provider):
    """``hk.attention`` pinned to one backend (cpu, triton, cuda)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"hk-{backend}"
        self.description = f"hybrid_kernels.attention(backend={backend!r})"

    def _backend(self):
        from ..dispatch import get_backend
        return get_backend(self.backend)

    def unavailable_reason(self, device: str) -> Optional[str]:
        b = self._backend()
        why = b.unavailable_reason()
        if why:
            return why
        dev_type = torch.device(device).type
        if self.backend == "triton" and dev_type == "cpu":
            return "Triton on CPU tensors (TRITON_INTERPRET=1) is for testing, not timing"
        if dev_type not in b.device_types_now():
            return f"runs on {sorted(b.device_types_now())}, not {dev_type}"
        return None

    def skip_reason(self, case: Case) -> Optional[str]:
        from ..dispatch import Problem
        problem = Problem(device_type=torch.device(case.device).type, dtype=case.dtype,
                          head_dim=case.head_dim, head_dim_v=case.head_dim,
                          quant=case.pattern.quant, needs_grad=case.mode == "bwd",
                          causal=case.pattern.causal, num_landmarks=case.pattern.num_landmarks)
        reasons = self._backend().rejection_reasons(problem)
        return "; ".join(reasons) if reasons else None

    def build(self, case, q, k, v):
        from ..api import attention
        kwargs = case.hk_kwargs()
        backend = self.backend
        return lambda: attention(q, k, v, backend=backend, **kwargs)


class SdpaProvider(Provider):
    """torch SDPA: no mask for full attention, is_causal for causal, else an explicit bool mask
    (B, 1, Nq, Nk) built before timing, only where it fits in memory."""
    name = "sdpa"
    description = "torch.nn.functional.scaled_dot_product_attention"
    # Bytes per mask element: the bool mask plus the float copy SDPA makes of it.
    MASK_BYTES_PER_ELEMENT = 5
    MEMORY_FRACTION = 0.4

    def __init__(self, max_mask_bytes: Optional[int] = None):
        self.max_mask_bytes = max_mask_bytes

    def _needs_mask(self, case: Case) -> bool:
        p = case.pattern
        return not (p.is_dense and (not p.causal or case.n_q == case.n))

    def skip_reason(self, case: Case) -> Optional[str]:
        if not self._needs_mask(case):
            return None
        need = case.batch * case.n_q * case.n * self.MASK_BYTES_PER_ELEMENT
        limit = (self.max_mask_bytes if self.max_mask_bytes is not None
                 else int(available_memory(case.device) * self.MEMORY_FRACTION))
        if need > limit:
            return (f"explicit mask needs ~{need / 2**30:.1f} GiB, over the "
                    f"{limit / 2**30:.1f} GiB allowed")
        return None

    def build(self, case, q, k, v):
        kw = dict(scale=case.head_dim ** -0.5)
        if case.heads_q != case.heads_kv:
            kw["enable_gqa"] = True
        if not self._needs_mask(case):
            causal = case.pattern.causal
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)
        from ..reference import visibility_mask
        ref = case.reference_kwargs()
        ref.pop("scale")
        mask = visibility_mask(case.batch, case.n_q, case.n, device=q.device, **ref)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


class ReferenceProvider(Provider):
    """The memory-lean blocked pure-torch reference (fp32 math), run directly."""
    name = "reference"
    description = "hybrid_kernels.reference.blocked_reference (fp32 math)"

    def skip_reason(self, case: Case) -> Optional[str]:
        if case.pattern.is_dense:
            return "dense pattern: SDPA is the pure-torch baseline"
        return None

    def build(self, case, q, k, v):
        from ..reference import blocked_reference
        kwargs = case.reference_kwargs()
        return lambda: blocked_reference(q, k, v, **kwargs)[0]


_REGISTRY: Dict[str, Provider] = {}
_DEFAULTS_LOADED = False


def register_provider(provider: Provider) -> Provider:
    """Add (or replace, by name) a provider; later runs include it."""
    _register_defaults()
    _REGISTRY[provider.name] = provider
    return provider


def unregister_provider(name: str) -> None:
    _REGISTRY.pop(name, None)


def _register_defaults() -> None:
    global _DEFAULTS_LOADED
    if _DEFAULTS_LOADED:
        return
    _DEFAULTS_LOADED = True
    from .flex import FlexProvider
    from .thirdparty import third_party_providers
    for backend in ("cpu", "triton", "cuda"):
        register_provider(HkProvider(backend))
    register_provider(SdpaProvider())
    register_provider(FlexProvider())
    register_provider(ReferenceProvider())
    for p in third_party_providers():
        register_provider(p)


def get_providers(names: Optional[List[str]] = None) -> List[Provider]:
    """Registered providers, in registration order, optionally restricted to ``names``."""
    _register_defaults()
    if names is None:
        return list(_REGISTRY.values())
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; known: {list(_REGISTRY)}")
    return [_REGISTRY[n] for n in names]
