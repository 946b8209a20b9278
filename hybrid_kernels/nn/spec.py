"""The user-facing attention pattern of the drop-in modules: window, landmarks, quant, backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..pattern import normalize_window

__all__ = ["PatternSpec"]


@dataclass(frozen=True)
class PatternSpec:
    """What :func:`hybrid_kernels.attention` is asked to compute, minus the per-call masks.

    ``landmarks`` is an int stride or a 1-D LongTensor of key positions (as in ``hk.attention``).
    """
    window: Optional[Tuple[int, int]] = None
    landmarks: Union[None, int, Tensor] = None
    quant: Optional[str] = None
    backend: str = "auto"

    @staticmethod
    def make(window=None, landmarks=None, quant=None, backend="auto") -> "PatternSpec":
        left, right = normalize_window(window)
        if quant not in (None, "int8"):
            raise ValueError(f"quant must be None or 'int8'; got {quant!r}")
        if isinstance(landmarks, bool) or not (landmarks is None or isinstance(landmarks, (int, Tensor))):
            raise TypeError(f"landmarks must be None, an int stride or a LongTensor; got {landmarks!r}")
        if isinstance(landmarks, int) and landmarks < 1:
            raise ValueError(f"landmarks as a stride must be an int >= 1; got {landmarks}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str; got {type(backend).__name__}")
        window = None if (left < 0 and right < 0) else (left, right)
        return PatternSpec(window=window, landmarks=landmarks, quant=quant, backend=backend)

    @property
    def window_left(self) -> int:
        return -1 if self.window is None else self.window[0]

    @property
    def window_right(self) -> int:
        return -1 if self.window is None else self.window[1]

    @property
    def restricts(self) -> bool:
        """True when some (real, causally allowed) pair is invisible: a window is set.

        Landmarks alone never hide a pair (they only add visibility), so without a window the
        pattern is full attention whatever the landmarks.
        """
        return self.window is not None

    def landmark_positions(self, batch: int, nk: int, device: torch.device,
                           offset: int = 0, extra_leading: int = 0) -> Optional[Tensor]:
        """(B, G) int64 key positions: ``extra_leading`` positions 0.. (learned landmark tokens)
        followed by this spec's landmarks shifted by ``offset``; None if there are none."""
        parts = []
        if extra_leading:
            parts.append(torch.arange(extra_leading, device=device, dtype=torch.int64).expand(batch, -1))
        n_real = nk - offset
        if isinstance(self.landmarks, int):
            parts.append((torch.arange(0, max(n_real, 0), self.landmarks, device=device,
                                       dtype=torch.int64) + offset).expand(batch, -1))
        elif isinstance(self.landmarks, Tensor):
            pos = self.landmarks.to(device=device, dtype=torch.int64)
            if pos.dim() == 1:
                pos = pos.expand(batch, -1)
            parts.append(pos + offset)
        parts = [p for p in parts if p.shape[-1] > 0]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
