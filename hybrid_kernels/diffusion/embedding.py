"""Conditional DDPM over embedding vectors: samples passage embeddings near a query embedding
(for retriever augmentation). An MLP predicts the noise from (x_t, condition, t); cosine noise
schedule; ancestral sampling."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EmbeddingDiffusion"]


def _cosine_alpha_bar(steps: int) -> Tensor:
    s = 0.008
    t = torch.linspace(0, 1, steps + 1)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f[1:] / f[0]).clamp(1e-5, 0.9999)


class EmbeddingDiffusion(nn.Module):
    """``dim``: embedding width; ``steps``: diffusion steps; ``hidden``: MLP width."""

    def __init__(self, dim: int, steps: int = 50, hidden: int = 512):
        super().__init__()
        if dim < 1 or steps < 1:
            raise ValueError(f"dim and steps must be >= 1; got {dim}, {steps}")
        self.dim, self.steps = dim, steps
        self.register_buffer("alpha_bar", _cosine_alpha_bar(steps))
        self.time = nn.Embedding(steps, hidden)
        self.inp = nn.Linear(2 * dim, hidden)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must be (B, {self.dim}); got {tuple(x.shape)}")

    def predict_noise(self, x_t: Tensor, condition: Tensor, t: Tensor) -> Tensor:
        return self.net(self.inp(torch.cat([x_t, condition], -1)) + self.time(t))

    def loss(self, target: Tensor, condition: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """target, condition: (B, dim) (passage and query embeddings)."""
        self._check(target, "target")
        self._check(condition, "condition")
        t = torch.randint(0, self.steps, (target.shape[0],), generator=generator)
        noise = torch.randn(target.shape, generator=generator)
        ab = self.alpha_bar[t].unsqueeze(-1)
        x_t = ab.sqrt() * target + (1 - ab).sqrt() * noise
        return F.mse_loss(self.predict_noise(x_t, condition, t), noise)

    @torch.no_grad()
    def sample(self, condition: Tensor, num_samples: int = 1,
               generator: Optional[torch.Generator] = None) -> Tensor:
        """(Q, dim) conditions -> (Q, num_samples, dim) samples."""
        self._check(condition, "condition")
        Q = condition.shape[0]
        cond = condition.repeat_interleave(num_samples, 0)
        x = torch.randn(cond.shape, generator=generator)
        ab = self.alpha_bar
        for t in reversed(range(self.steps)):
            ab_t = ab[t]
            ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0)
            beta = 1 - ab_t / ab_prev
            eps = self.predict_noise(x, cond, torch.full((len(x),), t, dtype=torch.long))
            x = (x - beta / (1 - ab_t).sqrt() * eps) / (1 - beta).sqrt()
            if t > 0:
                var = beta * (1 - ab_prev) / (1 - ab_t)
                x = x + var.sqrt() * torch.randn(x.shape, generator=generator)
        return x.view(Q, num_samples, self.dim)
