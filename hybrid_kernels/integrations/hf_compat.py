"""The one transformers 5.x spelling that changed under us: the KV cache keyword.

Later 5.x releases renamed ``past_key_values=`` to ``cache=`` (the old name warns, and goes
away for model forwards in 5.40); earlier 5.x releases only know ``past_key_values=``.
"""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _accepts_cache(fn) -> bool:
    try:
        return "cache" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``: the keyword this
    transformers takes (``generate`` hides it in ``**kwargs``; the model's forward names it)."""
    return {"cache" if _accepts_cache(type(model).forward) else "past_key_values": cache}


def output_cache(outputs):
    """The cache a model's forward returned, under either name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else outputs.past_key_values
