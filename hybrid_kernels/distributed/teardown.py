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

import torch.distributed as dist

_KEY = "hybrid_kernels/shutdown"


def shutdown() -> None:
    """Synchronize every rank of the default group, then destroy it (a no-op when none exists).

    Call it on every rank instead of ``dist.destroy_process_group()`` at the end of a program.
    """
    if not dist.is_initialized():
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.set(f"{_KEY}/done/{rank}", "1")
    store.wait([f"{_KEY}/done/{r}" for r in range(world)])
    if rank == 0:
        store.wait([f"{_KEY}/left/{r}" for r in range(1, world)])
    else:
        store.set(f"{_KEY}/left/{rank}", "1")
    dist.destroy_process_group()
