"""Split-key partial results of the landmark-row pass: workspace and combination."""
from __future__ import annotations

import math

import torch


def split_workspace(bh: int, n_splits: int, g: int, block_dv: int, device):
    """(acc fp32 (bh, n_splits, G, BLOCK_DV), (max, sum) fp32 (bh, n_splits, G, 2))."""
    return (torch.empty((bh, n_splits, g, block_dv), dtype=torch.float32, device=device),
            torch.empty((bh, n_splits, g, 2), dtype=torch.float32, device=device))


def combine_splits(ws: torch.Tensor, ws_ml: torch.Tensor, landmarks: torch.Tensor, nq: int,
                   nk: int, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the per-split online-softmax states (base-2 max m, sum l, unnormalized acc) of the
    landmark query rows and write their rows of ``out`` and ``lse``."""
    B, Hq, _, Dv = out.shape
    G = ws.shape[2]
    m, l = ws_ml[..., 0], ws_ml[..., 1]                        # (BH, S, G)
    m_max = m.amax(dim=1, keepdim=True)
    m_safe = torch.where(m_max == float("-inf"), torch.zeros_like(m_max), m_max)
    w = torch.exp2(m - m_safe)                                  # 0 for empty splits
    total = (w * l).sum(dim=1)                                  # (BH, G)
    acc = (w[..., None] * ws[..., :Dv]).sum(dim=1)              # (BH, G, Dv)
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    rows_out = torch.where(empty[..., None], torch.zeros_like(acc), acc / safe[..., None])
    rows_lse = torch.where(empty, torch.full_like(total, float("-inf")),
                           (m_safe.squeeze(1) + torch.log2(safe)) * math.log(2.0))
    rows_out = rows_out.view(B, Hq, G, Dv)
    rows_lse = rows_lse.view(B, Hq, G)
    positions = landmarks.expand(B, G) - (nk - nq)              # query index of each landmark
    valid = (positions >= 0) & (positions < nq)
    b_idx = torch.arange(B, device=out.device)[:, None].expand(B, G)[valid]
    i_idx = positions[valid]
    out.permute(0, 2, 1, 3)[b_idx, i_idx] = rows_out.permute(0, 2, 1, 3)[valid].to(out.dtype)
    lse.permute(0, 2, 1)[b_idx, i_idx] = rows_lse.permute(0, 2, 1)[valid]


def scatter_split_sums(ws: torch.Tensor, grad: torch.Tensor, landmarks: torch.Tensor,
                       offset: int) -> None:
    """Sum the per-split partial gradients ws (B*H, S, G, >= D) in split order and write them to
    rows ``landmarks - offset`` of ``grad`` (B, H, N, D) (rows outside [0, N) are dropped)."""
    B, H, N, D = grad.shape
    G = ws.shape[2]
    rows = ws.sum(dim=1)[..., :D].view(B, H, G, D)
    positions = landmarks.expand(B, G) - offset
    valid = (positions >= 0) & (positions < N)
    b_idx = torch.arange(B, device=grad.device)[:, None].expand(B, G)[valid]
    rows = rows.permute(0, 2, 1, 3)[valid].to(grad.dtype)
    grad.permute(0, 2, 1, 3)[b_idx, positions[valid]] = rows
