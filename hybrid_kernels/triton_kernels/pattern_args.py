"""The pattern as kernel arguments: landmark positions and flags, padding, resolved window."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..pattern import Pattern


@dataclass
class PatternArgs:
    left: int           # window sides, unlimited resolved to Nq + Nk
    right: int
    causal: bool
    scale: float
    landmarks: Tensor   # (1 or B, G) int64 contiguous; dummy when none
    lm_sb: int          # batch stride (0 = shared)
    num_landmarks: int
    flags: Tensor       # (1 or B, Nk) int8, 1 at landmark key positions; dummy when none
    flags_sb: int
    padding: Tensor     # (B, Nk) int8, 1 = real key; dummy when none
    padding_sb: int

    @property
    def has_landmarks(self) -> bool:
        return self.num_landmarks > 0

    @property
    def has_padding(self) -> bool:
        return self.padding_sb > 0


def pattern_args(pattern: Pattern, nq: int, nk: int, device: torch.device) -> PatternArgs:
    big = nq + nk
    left = big if pattern.window_left < 0 else pattern.window_left
    right = big if pattern.window_right < 0 else pattern.window_right
    dummy8 = torch.zeros(1, dtype=torch.int8, device=device)
    lm = pattern.landmarks
    if lm is not None and lm.shape[-1] > 0:
        shared = lm.shape[0] == 1 or lm.stride(0) == 0
        rows = (lm[:1] if shared else lm).to(device=device, dtype=torch.int64).contiguous()
        flags = torch.zeros(rows.shape[0], nk, dtype=torch.int8, device=device)
        flags.scatter_(1, rows, 1)
        lm_args = dict(landmarks=rows, lm_sb=0 if shared else rows.stride(0),
                       num_landmarks=rows.shape[1], flags=flags, flags_sb=0 if shared else nk)
    else:
        lm_args = dict(landmarks=torch.zeros(1, dtype=torch.int64, device=device), lm_sb=0,
                       num_landmarks=0, flags=dummy8, flags_sb=0)
    kpm = pattern.key_padding_mask
    if kpm is not None:
        pad = kpm.to(device=device, dtype=torch.int8).contiguous()
        pad_args = dict(padding=pad, padding_sb=nk)
    else:
        pad_args = dict(padding=dummy8, padding_sb=0)
    return PatternArgs(left=left, right=right, causal=bool(pattern.causal),
                       scale=float(pattern.scale), **lm_args, **pad_args)
