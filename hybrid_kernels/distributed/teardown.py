"""Leaving torch.distributed without one rank's teardown aborting another.

A gloo barrier returns on a rank once it has what it needs from the others, which is not the
moment the others have finished with their sockets. A rank that destroys its process group right
after the barrier closes connections the others may still be using, and gloo then aborts that
rank's process at exit ("terminate called without an active exception", a known gloo problem:
barrier followed by context destruction). `shutdown()` therefore meets the other ranks twice on
the rendezvous store, which does not travel over the gloo connections:

1. every rank has left its last collective (so no gloo traffic is in flight anywhere);
2. every rank other than 0 has passed step 1, so rank 0, which may host the store, keeps it up
   until nobody needs it, and only then destroys its group.
"""
from __future__ import annotations

import datetime
import itertools

import torch.distributed as dist

_KEY = "hybrid_kernels/shutdown"
_round = itertools.count()  # every rank calls shutdown() as often: keys never repeat on a store


def shutdown(timeout: datetime.timedelta = datetime.timedelta(minutes=5)) -> None:
    """Synchronize every rank of the default group, then destroy it (a no-op when none exists).

    Call it on every rank instead of ``dist.destroy_process_group()`` at the end of a program.
    A rank that does not arrive within ``timeout`` makes the others raise (the store's error)
    instead of waiting forever.
    """
    if not dist.is_initialized():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    key = f"{_KEY}/{next(_round)}"
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.set(f"{key}/done/{rank}", "1")
    store.wait([f"{key}/done/{r}" for r in range(world)], timeout)
    if rank == 0:
        store.wait([f"{key}/left/{r}" for r in range(1, world)], timeout)
    else:
        store.set(f"{key}/left/{rank}", "1")
    dist.destroy_process_group()
