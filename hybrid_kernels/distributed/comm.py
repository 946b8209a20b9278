"""Differentiable communication for sequence parallelism on torch.distributed (any backend with
point-to-point and all_reduce: gloo, nccl).

* :class:`RowExchange` -- every rank asks for rows of a sequence-sharded tensor by global
  position; the owners send them point-to-point, and the backward sends the gradients back to the
  owners. What each rank asks for is a pure function of metadata every rank holds
  (:class:`Shards`, the pattern), so no request is ever sent.
* :func:`all_gather` -- every rank's tensor, stacked.
* :class:`CommStats` -- bytes this rank sent, per kind, for the benchmark.

Gradients are not taken through autograd here: the caller runs the backward's communication
itself, in one fixed order on every rank (see sequence_parallel.py), so no two ranks can wait on
different exchanges.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Shards", "CommStats", "RowExchange", "all_gather"]


@dataclass(frozen=True)
class Shards:
    """Contiguous shards of a length-N sequence in rank order: rank r holds [starts[r], ends[r])."""
    starts: tuple
    ends: tuple

    @classmethod
    def from_lengths(cls, lengths: Sequence[int]) -> "Shards":
        starts, pos = [], 0
        for n in lengths:
            starts.append(pos)
            pos += int(n)
        return cls(tuple(starts), tuple(s + int(n) for s, n in zip(starts, lengths)))

    @property
    def total(self) -> int:
        return self.ends[-1] if self.ends else 0

    def owners(self, positions: Tensor) -> Tensor:
        """Rank owning each global position (1-D int64)."""
        ends = torch.tensor(self.ends, dtype=torch.int64)
        return torch.searchsorted(ends, positions, right=True)


@dataclass
class CommStats:
    """Bytes this rank sent, by kind ("halo", "landmarks", "landmark_rows", "grad")."""
    sent: Dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def _global(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _p2p(sends: Dict[int, Tensor], recvs: Dict[int, Tensor], group, tag: int) -> None:
    """Post every send and receive, then wait for all (no ordering deadlock)."""
    works = [dist.irecv(buf, src=_global(peer, group), group=group, tag=tag)
             for peer, buf in recvs.items()]
    works += [dist.isend(buf, dst=_global(peer, group), group=group, tag=tag)
              for peer, buf in sends.items()]
    for w in works:
        w.wait()


class RowExchange:
    """Rows of a sequence-sharded tensor (B, H, n_local, D) fetched by global position.

    ``requests`` holds every rank's request (1-D int64 global positions, the same list on every
    rank: each rank computes all of them from shared metadata, so no request is sent). The
    owners send the rows point-to-point; :meth:`backward` sends gradients back to the owners.
    ``tag`` must be the same on every rank for one exchange; the backward uses ``tag + 1``.
    """

    def __init__(self, shards: Shards, requests: List[Tensor], *, group=None, tag: int = 0):
        self.group, self.tag = group, tag
        rank = dist.get_rank(group)
        mine = requests[rank]
        owners = shards.owners(mine)
        self.recv: Dict[int, Tensor] = {}   # peer -> result slots filled from that peer
        for peer in range(len(requests)):
            slots = torch.nonzero(owners == peer).flatten()
            if peer != rank and slots.numel():
                self.recv[peer] = slots
        self.local_slots = torch.nonzero(owners == rank).flatten()
        self.local_rows = mine[self.local_slots] - shards.starts[rank]
        self.send: Dict[int, Tensor] = {}   # peer -> local rows this rank sends it
        for peer, req in enumerate(requests):
            theirs = req[shards.owners(req) == rank]
            if peer != rank and theirs.numel():
                self.send[peer] = theirs - shards.starts[rank]
        self.num_out = int(mine.numel())

    def forward(self, x: Tensor, stats: CommStats, kind: str) -> Tensor:
        """(B, H, len(request), D): the requested rows, in request order."""
        B, H, _, D = x.shape
        out = x.new_empty((B, H, self.num_out, D))
        at = x.device  # the plan's indices are CPU tensors
        sends = {p: x.index_select(2, rows.to(at)).contiguous() for p, rows in self.send.items()}
        recvs = {p: x.new_empty((B, H, slots.numel(), D)) for p, slots in self.recv.items()}
        _p2p(sends, recvs, self.group, self.tag)
        for p, buf in recvs.items():
            out.index_copy_(2, self.recv[p].to(at), buf)
        if self.local_slots.numel():
            out.index_copy_(2, self.local_slots.to(at), x.index_select(2, self.local_rows.to(at)))
        for buf in sends.values():
            stats.add(kind, buf.numel() * buf.element_size())
        return out

    def backward(self, grad: Tensor, shape, stats: CommStats) -> Tensor:
        """The gradient of this rank's shard (``shape``) from the gradient of what it fetched
        (and, through the peers, of what they fetched from it)."""
        grad = grad.contiguous()
        B, H, _, D = grad.shape
        dx = grad.new_zeros(shape)
        at = grad.device
        sends = {p: grad.index_select(2, slots.to(at)).contiguous() for p, slots in self.recv.items()}
        recvs = {p: grad.new_empty((B, H, rows.numel(), D)) for p, rows in self.send.items()}
        _p2p(sends, recvs, self.group, self.tag + 1)
        for p, buf in recvs.items():
            dx.index_add_(2, self.send[p].to(at), buf)
        if self.local_slots.numel():
            dx.index_add_(2, self.local_rows.to(at), grad.index_select(2, self.local_slots.to(at)))
        for buf in sends.values():
            stats.add("grad", buf.numel() * buf.element_size())
        return dx


def all_gather(x: Tensor, *, group=None, stats: CommStats, kind: str) -> Tensor:
    """(P, *x.shape): every rank's ``x`` stacked in rank order (not differentiable; the
    gradient of one's own slice is the all_reduce sum of every rank's output gradient)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    stats.add(kind, x.numel() * x.element_size())
    return torch.stack(parts)
