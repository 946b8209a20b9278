"""Learnable landmark embeddings: L trained tokens prepended to the keys/values as landmarks."""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LearnedLandmarks"]


class LearnedLandmarks(nn.Module):
    """``num`` learned tokens of width ``dim``, used as global landmark keys/values.

    :class:`~hybrid_kernels.nn.HybridAttention` prepends them to the key and value inputs (before
    the projections), so they occupy key positions 0..num-1 and every query sees them. Queries
    are only the real tokens (aligned bottom-right with the keys), so nothing needs stripping
    from the output and no work is spent on the landmark rows.
    """

    def __init__(self, num: int, dim: int, device=None, dtype=None):
        super().__init__()
        if not isinstance(num, int) or isinstance(num, bool) or num < 1:
            raise ValueError(f"num_learned_landmarks must be an int >= 1; got {num!r}")
        self.num = num
        self.tokens = nn.Parameter(torch.empty(num, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.tokens, std=0.02)

    def prepend(self, x: Tensor) -> Tensor:
        """x (B, N, dim) -> (B, num + N, dim)."""
        tokens = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([tokens, x], dim=1)

    def extra_repr(self) -> str:
        return f"num={self.num}, dim={self.tokens.shape[1]}"
