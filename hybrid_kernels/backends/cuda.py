"""CUDA C++ backend (csrc/cuda through the lazily imported module hybrid_kernels._C_cuda)."""
from __future__ import annotations

from typing import Optional

from ..dispatch import Backend


class CudaBackend(Backend):
    name = "cuda"
    device_types = frozenset({"cuda"})

    def unavailable_reason(self) -> Optional[str]:
        return "CUDA kernels are not built into this version yet"
