"""Triton backend (GPU; CPU tensors only under TRITON_INTERPRET=1, for testing).

The kernels live in hybrid_kernels/triton_kernels/."""
from __future__ import annotations

from typing import Optional

from ..dispatch import Backend


class TritonBackend(Backend):
    name = "triton"
    device_types = frozenset({"cuda"})

    def unavailable_reason(self) -> Optional[str]:
        return "Triton kernels are not built into this version yet"
