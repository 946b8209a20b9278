"""Attention-pattern figure of a FiD reader: cross-attention mass per retrieved passage for a few
questions, gold passages marked."""
from __future__ import annotations

from typing import Sequence

__all__ = ["plot_passage_attention"]


def plot_passage_attention(mass, gold, labels: Sequence[str], path: str) -> str:
    """Heatmap of ``mass`` (Q, P) (rows: questions, columns: retrieval rank) with a box on every
    ``gold`` (Q, P) bool cell; written as PNG to ``path``. Returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    mass, gold = np.asarray(mass, dtype=float), np.asarray(gold, dtype=bool)
    if mass.shape != gold.shape or mass.ndim != 2:
        raise ValueError(f"mass and gold must both be (Q, P); got {mass.shape} and {gold.shape}")
    Q, P = mass.shape
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * P + 3), 0.5 * Q + 1.5))
    im = ax.imshow(mass, aspect="auto", cmap="viridis")
    for q, p in zip(*np.nonzero(gold)):
        ax.add_patch(plt.Rectangle((p - 0.5, q - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_yticks(range(Q))
    ax.set_yticklabels([s if len(s) <= 60 else s[:57] + "..." for s in labels], fontsize=7)
    ax.set_xticks(range(P))
    ax.set_xticklabels([str(p + 1) for p in range(P)], fontsize=7)
    ax.set_xlabel("retrieved passage (rank); red box = gold")
    ax.set_title("FiD decoder cross-attention mass per passage")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
