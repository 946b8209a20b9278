"""Output allocation shared by the backends.

With ``HYBRID_KERNELS_POISON=1`` (set by the test-suite) outputs are NaN-filled before a kernel
runs, so any element a kernel forgets to write shows up as NaN instead of stale memory.

Large CPU outputs come from the native module's scratch cache (see csrc/cpu/scratch_cache.h):
glibc maps every block above 32 MiB afresh and unmaps it on free, so a (1, 8, 16384, 64) fp32
output otherwise costs a page fault and the OS zeroing of each page on every call (about 10% of
an fp32 forward, 20% of an int8 one). The tensor views a buffer that returns to the cache when
the tensor dies; it behaves like any CPU tensor except that its storage cannot be resized.
``HYBRID_KERNELS_CPU_CACHE_MB=0`` turns this off (plain ``torch.empty``).
"""
import functools
import math
import os
from typing import Optional

import torch


def poison_enabled() -> bool:
    return os.environ.get("HYBRID_KERNELS_POISON", "0") == "1"


@functools.cache
def _scratch_module():
    """(the native CPU module, the smallest output it caches), or (None, 0) when not built;
    looked up once (an import statement per output cost ~1 us)."""
    try:
        from .. import _C_cpu as mod
    except ImportError:
        return None, 0
    return mod, mod.SCRATCH_MIN_CACHED_BYTES


def _scratch_for(nbytes: int):
    """The native module when a CPU output of nbytes should come from its scratch cache, else
    None (small or empty, cache disabled, native module not built)."""
    mod, min_bytes = _scratch_module()
    if mod is None or nbytes < min_bytes or nbytes > mod.scratch_cache_limit():
        return None
    return mod


def _cached_cpu_empty(shape, dtype) -> Optional[torch.Tensor]:
    """An uninitialized CPU tensor over scratch-cache memory, or None where that does not pay."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    mod = _scratch_for(nbytes)
    if mod is None:
        return None
    return torch.frombuffer(mod.CachedBuffer(nbytes), dtype=dtype, count=numel).view(shape)


def new_output(shape, dtype, device) -> torch.Tensor:
    out = None
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) == "cpu":
        out = _cached_cpu_empty(tuple(shape), dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(float("nan"))
    return out


def replay_allocator(shape, dtype, q: torch.Tensor, poison: bool):
    """new_output for a plan that replays calls shaped like q (same shapes, strides, dtype,
    device, environment), decided once: a function q -> an uninitialized output of ``shape``
    and ``dtype``. The scratch cache where it pays; ``torch.empty_like(q)`` when q is
    contiguous with that shape and dtype (~1 us less than torch.empty with a shape, of a ~7 us
    one-token call; its strides can differ from the contiguous ones only over dims of size 1,
    which no kernel steps along); else ``torch.empty``. NaN-filled when ``poison``
    (poison_enabled() when the plan was made: HYBRID_KERNELS_POISON is part of every plan key)."""
    shape = tuple(shape)
    device = q.device
    if device.type == "cpu" and _scratch_for(math.prod(shape) * dtype.itemsize) is not None:
        return lambda q: new_output(shape, dtype, device)  # poisons by itself
    if tuple(q.shape) == shape and q.dtype == dtype and q.is_contiguous():
        make = torch.empty_like
    else:
        def make(q):
            return torch.empty(shape, dtype=dtype, device=device)
    if not poison:
        return make

    def poisoned(q):
        return make(q).fill_(float("nan"))
    return poisoned

