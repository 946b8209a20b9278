"""Sequence-parallel window + landmark attention: time and bytes sent per rank, against what ring
attention would send for the same N.

    PYTHONPATH=. python bench/sequence_parallel_bytes.py [--ranks 1 2] [--n 16384 65536 262144]
                                                       [--backward]

P processes on this machine (gloo over loopback, one thread each), B=1, H=8, D=64, fp32, window
(256, 256), 16 landmarks evenly spaced. Each rank holds N/P rows. Printed per (P, N): the median
time of a forward (and backward), the bytes this scheme sends per rank (halo + landmark keys and
values, landmark query rows, the landmark rows' softmax states; measured by counting every send),
and ring attention's: every rank passes its K and V shard around the ring, so each sends
(P - 1) * 2 * B * H * (N / P) * D * 4 bytes in the forward. Expected: ours flat in N for a fixed
window, ring's linear in N.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybrid_kernels.service.process import free_port  # noqa: E402

B, H, D = 1, 8, 64
WINDOW = (256, 256)
LANDMARKS = 16


def ring_bytes(P: int, N: int) -> int:
    return (P - 1) * 2 * B * H * (N // P) * D * 4


def _worker(rank, P, port, sizes, backward, reps, queue):
    import hybrid_kernels as hk
    import hybrid_kernels.distributed as hkd
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=P, timeout=datetime.timedelta(minutes=5))
    torch.set_num_threads(1)
    for N in sizes:
        n = N // P
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(B, H, n, D, generator=g).requires_grad_(backward) for _ in range(3))
        kw = dict(window=WINDOW, landmarks=N // LANDMARKS)
        times, stats = [], None
        for _ in range(reps + 1):
            stats = hkd.CommStats()
            dist.barrier()
            t0 = time.perf_counter()
            if P == 1:
                out = hk.attention(q, k, v, **kw)
            else:
                out = hkd.attention(q, k, v, stats=stats, **kw)
            if backward:
                out.sum().backward()
            times.append(time.perf_counter() - t0)
        sent = {kind: nbytes for kind, nbytes in stats.sent.items()}
        if rank == 0:
            queue.put((P, N, statistics.median(times[1:]) * 1e3, sent))
    hkd.shutdown()  # no rank tears down the group while another still uses it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for P in args.ranks:
        queue = ctx.Queue()
        mp.start_processes(_worker, args=(P, free_port(), args.n, args.backward, args.reps, queue),
                           nprocs=P, start_method="spawn")
        rows += [queue.get() for _ in args.n]
    from hybrid_kernels.bench.env import cpu_model
    cpu = cpu_model()
    mode = "fwd+bwd" if args.backward else "fwd"
    print(f"# sequence-parallel attention, {mode}, B={B} H={H} D={D} fp32, window {WINDOW}, "
          f"{LANDMARKS} landmarks; {cpu}, {os.cpu_count()} CPUs, 1 thread per rank")
    print("| P | N | ms | bytes sent / rank | ring attention bytes / rank (fwd) | ring / ours |")
    print("|---|---|---|---|---|---|")
    for P, N, ms, sent in rows:
        ours = sum(v for k, v in sent.items() if k != "grad") if not args.backward else sum(sent.values())
        ring = ring_bytes(P, N) * (2 if args.backward else 1)
        ratio = f"{ring / ours:.0f}x" if ours else "-"
        print(f"| {P} | {N} | {ms:.1f} | {ours:,} | {ring:,} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
