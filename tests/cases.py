"""Shapes and patterns every backend is checked on (DEVELOPERS.md: odd sizes, GQA, padding,
causal, windows wider and narrower than N, Nq != Nk)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Case:
    id: str
    B: int = 1
    Hq: int = 2
    Hk: int = 2
    Nq: int = 97
    Nk: int = 97
    D: int = 32
    Dv: Optional[int] = None
    window: Optional[Tuple[int, int]] = None
    landmarks: object = None          # None | int stride | "per_batch" | "shared"
    G: int = 5
    causal: bool = False
    padding: bool = False
    empty_rows: bool = False          # a batch row whose keys are all padding

    def make(self, dtype: torch.dtype, device="cpu", requires_grad=False):
        # crc32, not hash(): str hashes change from process to process, so a failing draw could
        # not be reproduced.
        g = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))
        Dv = self.Dv or self.D
        q = torch.randn(self.B, self.Hq, self.Nq, self.D, generator=g).to(dtype)
        k = torch.randn(self.B, self.Hk, self.Nk, self.D, generator=g).to(dtype)
        v = torch.randn(self.B, self.Hk, self.Nk, Dv, generator=g).to(dtype)
        if requires_grad:
            q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        if self.landmarks == "per_batch":
            lm = torch.stack([torch.randperm(self.Nk, generator=g)[: self.G].sort().values
                              for _ in range(self.B)])
        elif self.landmarks == "shared":
            lm = torch.randperm(self.Nk, generator=g)[: self.G].sort().values
        else:
            lm = self.landmarks
        kpm = None
        if self.padding or self.empty_rows:
            kpm = torch.rand(self.B, self.Nk, generator=g) > 0.25
            if self.empty_rows:
                kpm[-1] = False
        return q, k, v, dict(window=self.window, landmarks=lm, causal=self.causal,
                             key_padding_mask=kpm)


CASES = [
    Case("odd_D59_gqa_window_lm_pad", B=2, Hq=4, Hk=2, D=59, window=(8, 5), landmarks="per_batch", padding=True),
    Case("causal_window_stride", window=(16, 0), landmarks=10, causal=True),
    Case("decode_like_nq_lt_nk", Nq=50, Nk=97, window=(10, -1), landmarks="shared", causal=True),
    Case("nq_gt_nk_negative_rows", B=2, Nq=97, Nk=40, window=(3, 3), landmarks="per_batch", padding=True),
    Case("n1025_d64_causal_pad", Hq=2, Hk=1, Nq=1025, Nk=1025, D=64, window=(64, 64), landmarks=128, causal=True, padding=True),
    Case("window_wider_than_n", window=(2000, 2000), landmarks="shared"),
    Case("full_mqa_d128", Hq=4, Hk=1, Nq=65, Nk=65, D=128),
    Case("left_only_unlimited_right", window=(-1, 4), landmarks=None, Dv=48),
    Case("single_query", Nq=1, Nk=97, window=(20, 0), landmarks=16, causal=True),
    Case("empty_rows", B=2, window=(0, 0), landmarks=None, empty_rows=True),
]

# A lighter subset for the slower precisions and for backward.
FAST_CASES = [c for c in CASES if c.id in {
    "odd_D59_gqa_window_lm_pad", "decode_like_nq_lt_nk", "nq_gt_nk_negative_rows",
    "window_wider_than_n", "empty_rows", "causal_window_stride"}]


def ref_kwargs(pattern: dict, q: torch.Tensor, k: torch.Tensor) -> dict:
    """Turn hk.attention's pattern keywords into dense_reference keywords, on q's device (the
    oracle runs where q is; the kernel under test may have had the pattern's tensors elsewhere)."""
    from hybrid_kernels.api import plan
    pattern = {name: (x.to(q.device) if isinstance(x, torch.Tensor) else x)
               for name, x in pattern.items()}
    p, _ = plan(q, k, k, **pattern)
    return p.reference_kwargs()


def one_key_far_above(jump: float, dtype=torch.bfloat16, B: int = 1, H: int = 2, N: int = 257, D: int = 64):
    """q, k, v (B, H, N, D) where key 200 scores about `jump` (natural units) above the rest for
    every query, the others near 0: with 64-key tiles it lies in a later tile than a row's first,
    so the running max has to rise to it."""
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(D)
    u[3] = 1.0
    q = (torch.randn(B, H, N, D, generator=g) * 0.3 + 3.0 * u).to(dtype)
    k = (torch.randn(B, H, N, D, generator=g) * 0.3).to(dtype)
    k[:, :, 200] = (jump * D ** 0.5 / 3.0 * u).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    return q, k, v
