"""The pattern as kernel arguments: landmark positions and flags, padding, resolved window, and
the score modifiers in the kernels' base-2 units (softcap and bias multiplied by log2(e))."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..pattern import Pattern

LOG2E = 1.4426950408889634


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
    softcap2: float     # softcap * log2(e); 0.0 = off
    bias: Tensor        # (Hq, Nq + Nk - 1) fp32 contiguous, bias * log2(e); dummy when none
    bias_sh: int        # head stride of bias (0 = none)

    @property
    def has_softcap(self) -> bool:
        return self.softcap2 > 0

    @property
    def has_bias(self) -> bool:
        return self.bias_sh > 0

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
    if pattern.bias is not None:
        bias = (pattern.bias.to(device=device, dtype=torch.float32) * LOG2E).contiguous()
        bias_args = dict(bias=bias, bias_sh=max(nq + nk - 1, 1))
    else:
        bias_args = dict(bias=torch.zeros(1, dtype=torch.float32, device=device), bias_sh=0)
    softcap = float(pattern.softcap)
    return PatternArgs(left=left, right=right, causal=bool(pattern.causal),
                       scale=float(pattern.scale), **lm_args, **pad_args,
                       softcap2=softcap * LOG2E if softcap > 0 else 0.0, **bias_args)
