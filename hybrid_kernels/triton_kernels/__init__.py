"""Triton kernels for the attention contract (forward, backward, INT8).

``triton.jit`` decides between compiling and interpreting when a kernel is defined, from
``TRITON_INTERPRET``. :func:`load` returns the kernel modules built for the current setting,
re-executing them when the setting changed since they were imported (tests flip it).
"""
from __future__ import annotations

import importlib
import sys

from .configs import interpreting

_SUBMODULES = ("configs", "masking", "modifiers", "pattern_args", "splits", "quantize", "forward",
               "backward", "int8")
_built_for = None


def load():
    """The package, with kernels built for the current TRITON_INTERPRET setting."""
    global _built_for
    mode = interpreting()
    if _built_for is not None and _built_for != mode:
        for name in _SUBMODULES:
            mod = sys.modules.get(f"{__name__}.{name}")
            if mod is not None:
                importlib.reload(mod)
    _built_for = mode
    for name in _SUBMODULES:
        importlib.import_module(f"{__name__}.{name}")
    return sys.modules[__name__]
