"""The attention pattern in its normalized form, and its validation.

Every backend receives a :class:`Pattern`: plain ints for the window, int64 landmark positions
(B, G) (possibly an expanded view of a shared (G,) tensor), a bool key padding mask (B, Nk) and
the softmax scale. Visibility, with r = i + Nk - Nq::

    query i sees key j  iff  key j is real, and
                             (r - left <= j <= r + right  or  j is a landmark  or  r is a landmark),
                             and, if causal, j <= r.

Score modifiers, applied to each visible score in this order (FlexAttention's ``score_mod``
in closed form, so no Nq x Nk tensor exists)::

    s = scale * q_i . k_j
    s = softcap * tanh(s / softcap)          if softcap > 0   (Gemma 2, Grok)
    s = s + bias[h, (j - r) + Nk - 1]        if bias is given (ALiBi, T5 buckets: offset-only)

``bias`` is (Hq, Nq + Nk - 1) float32: one value per head and query-key offset j - r, which runs
from -(Nk - 1) to Nq - 1. Attention sinks are not part of the pattern: they only rescale a
finished row (see :mod:`hybrid_kernels.ops`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Pattern", "normalize_window", "normalize_landmarks", "normalize_key_padding_mask"]


@dataclass(frozen=True)
class Pattern:
    window_left: int = -1          # < 0: unlimited
    window_right: int = -1         # < 0: unlimited
    causal: bool = False
    landmarks: Optional[Tensor] = None         # (B, G) int64, sorted unique key positions
    key_padding_mask: Optional[Tensor] = None  # (B, Nk) bool, True = real token
    scale: float = 1.0
    softcap: float = 0.0                       # > 0: s -> softcap * tanh(s / softcap)
    bias: Optional[Tensor] = None              # (Hq, Nq + Nk - 1) float32, by offset j - r

    @property
    def has_score_mods(self) -> bool:
        return self.softcap > 0 or self.bias is not None

    @property
    def num_landmarks(self) -> int:
        return 0 if self.landmarks is None else int(self.landmarks.shape[-1])

    @property
    def is_full(self) -> bool:
        """True when every (unpadded) pair is visible except for causality."""
        return self.window_left < 0 and self.window_right < 0

    def reference_kwargs(self) -> dict:
        """Keyword arguments for hybrid_kernels.reference functions."""
        return dict(window_left=self.window_left, window_right=self.window_right,
                    causal=self.causal, landmarks=self.landmarks,
                    key_padding_mask=self.key_padding_mask, scale=self.scale,
                    softcap=self.softcap, bias=self.bias)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def normalize_window(window) -> Tuple[int, int]:
    """None -> (-1, -1); int w -> (w, w); (left, right) with ints >= -1 (-1 = unlimited)."""
    if window is None:
        return -1, -1
    if _is_int(window):
        window = (window, window)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(_is_int(w) for w in window)):
        raise ValueError(f"window must be None, an int, or a (left, right) pair of ints; got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window values must be >= 0, or -1 for unlimited; got window={window!r}")
    return left, right


def normalize_landmarks(landmarks, batch: int, nk: int, device: torch.device,
                        check_values: bool = True) -> Optional[Tensor]:
    """None | int stride s | LongTensor (G,) or (B, G) -> int64 (B, G) on ``device`` or None."""
    if landmarks is None:
        return None
    if _is_int(landmarks):
        if landmarks < 1:
            raise ValueError(f"landmarks as a stride must be an int >= 1; got {landmarks}")
        positions = torch.arange(0, nk, int(landmarks), device=device, dtype=torch.int64)
        return positions.expand(batch, -1) if positions.numel() else None
    if not isinstance(landmarks, Tensor):
        raise TypeError(f"landmarks must be None, an int stride or an integer tensor; got {type(landmarks).__name__}")
    if landmarks.dtype.is_floating_point or landmarks.dtype.is_complex or landmarks.dtype == torch.bool:
        raise TypeError(f"landmarks must be an integer tensor; got dtype {landmarks.dtype}")
    if landmarks.dim() == 1:
        landmarks = landmarks.unsqueeze(0).expand(batch, -1)
    elif landmarks.dim() != 2 or landmarks.shape[0] != batch:
        raise ValueError(f"landmarks tensor must have shape (G,) or (B, G) with B={batch}; "
                         f"got shape {tuple(landmarks.shape)}")
    if landmarks.shape[1] == 0:
        return None
    landmarks = landmarks.to(device=device, dtype=torch.int64)
    if check_values and not torch.compiler.is_compiling():
        if bool(((landmarks < 0) | (landmarks >= nk)).any()):
            raise ValueError(f"landmark positions must lie in [0, Nk={nk}); got min "
                             f"{int(landmarks.min())}, max {int(landmarks.max())}")
        if landmarks.shape[1] > 1 and not bool((landmarks[:, 1:] > landmarks[:, :-1]).all()):
            raise ValueError("landmark positions must be sorted in increasing order without "
                             "duplicates (per batch row)")
    return landmarks


def normalize_key_padding_mask(mask, batch: int, nk: int, device: torch.device) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (B, Nk); got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real token); got {mask.dtype}")
    if tuple(mask.shape) != (batch, nk):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({batch}, {nk}); got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")
    return mask


def normalize_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, Tensor) or not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float or None; got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    return float(scale)
