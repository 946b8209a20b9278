"""The compiled CPU module (csrc, pybind11) and what calling it needs, with no dependency on the
rest of the package (quant.smoothing_mean calls it too)."""
from __future__ import annotations

import os
from typing import Optional

import torch

# torch dtype -> the csrc DType enum's name (csrc/common/attn_params.h), for both native modules.
DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

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
