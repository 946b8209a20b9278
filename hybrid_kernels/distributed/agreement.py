"""Ranks check that they are making the same call before any of them sends a tensor.

Every rank contributes its call signature, or the error its own validation raised, to one
all_gather_object. Then every rank raises the same ValueError when any rank failed or when the
signatures differ, so a bad call never leaves some ranks waiting in a collective for others that
gave up. A rank that died makes the collective fail on the others (gloo/nccl report the closed
connection, or the process group's timeout expires); that error is re-raised naming the call.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch.distributed as dist

__all__ = ["RankDisagreement", "agree"]


class RankDisagreement(ValueError):
    """The ranks of a collective call were not making the same call (raised on every rank)."""


def agree(signature: Dict[str, Any], error: Optional[str], *, group=None,
          per_rank: Sequence[str] = (), what: str = "call") -> List[Dict[str, Any]]:
    """Every rank's ``signature`` (rank order), after checking that they agree.

    ``per_rank``: keys that may differ between ranks (e.g. the local shard length).
    ``error``: this rank's validation error message, or None.
    """
    mine = {"signature": signature, "error": error}
    everyone: List[Optional[dict]] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(everyone, mine, group=group)
    except RuntimeError as exc:  # a peer died or timed out
        raise RuntimeError(f"{what}: a rank of the process group did not answer "
                           f"(died or timed out): {exc}") from exc
    failed = [(r, e["error"]) for r, e in enumerate(everyone) if e["error"] is not None]
    if failed:
        raise RankDisagreement(f"{what} failed on rank(s) " + "; ".join(
            f"{r}: {msg}" for r, msg in failed))
    sigs = [e["signature"] for e in everyone]
    shared = [{k: v for k, v in s.items() if k not in per_rank} for s in sigs]
    diffs = sorted({k for s in shared[1:] for k in set(s) | set(shared[0])
                    if s.get(k) != shared[0].get(k)})
    if diffs:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={s.get(k)!r}" for r, s in enumerate(shared))
                           for k in diffs)
        raise RankDisagreement(f"{what}: the ranks disagree on {', '.join(diffs)} ({detail})")
    return sigs
