"""Output allocation shared by the backends.

With ``HYBRID_KERNELS_POISON=1`` (set by the test-suite) outputs are NaN-filled before a kernel
runs, so any element a kernel forgets to write shows up as NaN instead of stale memory.
"""
import math
import os
import threading
from typing import List, Sequence

import torch


def poison_enabled() -> bool:
    return os.environ.get("HYBRID_KERNELS_POISON", "0") == "1"


def new_output(shape, dtype, device) -> torch.Tensor:
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_WORKSPACE = threading.local()


def float32_workspace(shapes: Sequence[Sequence[int]], device,
                      keep_limit_bytes: int) -> List[torch.Tensor]:
    """fp32 tensors of these shapes for results the backend converts before returning them (the
    fp32 gradients of bf16/fp16 inputs). They are views of one buffer kept per thread while it
    fits under ``keep_limit_bytes``: freshly allocated memory costs a page fault and the OS
    zeroing each page, a few percent of a backward call."""
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < total or buf.device != torch.device(device):
        buf = torch.empty(total, dtype=torch.float32, device=device)
        _WORKSPACE.buf = buf if total * 4 <= keep_limit_bytes else None
    if poison_enabled():
        buf[:total].fill_(float("nan"))
    return [t.view(shape) for t, shape in zip(buf[:total].split(sizes), shapes)]
