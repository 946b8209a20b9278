"""Rotary position embedding (RoPE) for the streaming path.

The streaming cache stores keys *before* rotation and rotates them at attention time by small,
re-based positions (see :mod:`.session`), so angles never grow with the stream length and fp32
rotations stay accurate for unbounded streams. Layout is the "rotate half" (GPT-NeoX / Llama /
Hugging Face) convention: the first and second halves of the head dim form the complex pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_inv_freq", "apply_rope"]


def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """Inverse frequencies (head_dim // 2,) float64: theta ** (-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim; got head_dim={head_dim}")
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def apply_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate ``x`` (..., N, D) by ``positions`` (N,) (int). Math in fp32, angles in fp64.

    The same positions always give bit-identical rotations, independent of the other rows.
    """
    D = x.shape[-1]
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] \
        * rope_inv_freq(D, theta, x.device)[None, :]
    cos = torch.cos(angles).to(torch.float32)
    sin = torch.sin(angles).to(torch.float32)
    xf = x.float()
    x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)
