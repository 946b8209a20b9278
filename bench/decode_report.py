"""One-token decode on the CPU: hk.attention against torch SDPA and a streaming read, one table.

    PYTHONPATH=. python bench/decode_report.py [--nk 16,1024,4096,32768] [--threads N]
                                              [--rounds R] [--no-int8] [--layers L]

The call is timed as a user makes it: ``torch.inference_mode()``, q (1, 8, 1, 64), K/V cache
(1, Hk, Nk, 64), no window, not causal; Hk = 8 (MHA) and Hk = 2 (GQA), fp32 and bf16, and the
pre-quantized INT8 K cache (``Int8KVCache``: int8 K, bf16 V, bf16 q) against SDPA in fp32.

``--layers L`` gives every function L independent inputs (a model's L layers, each with its own
K/V cache) and each call takes the next layer's: a layer's cache is read once per token, after
the other layers' caches went through the CPU's caches. With L times the K/V bytes above the
last-level cache this measures decode as a model runs it, from DRAM; with L = 1 (the default)
the same K/V are read by every call and stay in cache up to the cache's size.

Timing: every round times, in turn, a batch of calls of each function of one row (SDPA, hk,
the streaming read), so drift of this shared machine's speed hits all of them alike; the table
shows the median over rounds of the time per call.

Columns:
* ``sdpa us`` / ``hk us``: median time per call (whole call, Python included);
* ``hk/sdpa``: hk time over SDPA time (< 1: hk is faster);
* ``hk GB/s``: bytes of K + V the call reads (the int8 cache: its int8 K, fp32 block scales and
  V) over hk's time;
* ``stream GB/s``: the anchor, a streaming read of the same number of bytes in the same run:
  ``torch.sum`` over a contiguous float32 buffer of that size, L of them taken in turn just as
  the K/V caches are (so they sit in the same level of the memory hierarchy), same thread count;
* ``% stream``: hk GB/s over stream GB/s. At small Nk both are dominated by per-call cost, so
  the ratio only means something from Nk = 4096 on.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

try:  # this checkout when run from it, else the installed package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import hybrid_kernels as hk
finally:
    pass

import torch
import torch.nn.functional as F

from hybrid_kernels.bench.env import device_name


def _batch_size(fn, target_s: float = 2e-3) -> int:
    """Calls per timed sample: enough for about ``target_s`` seconds."""
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < target_s / 4:
        fn()
        n += 1
    return max(1, n * 4)


def interleaved_us(fns, rounds: int):
    """Median microseconds per call of each function, timed round-robin."""
    sizes = {name: _batch_size(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = sizes[name]
            fn()
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter_ns() - t0) / n / 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def in_turn(fn, inputs):
    """A function of no argument that calls ``fn(*inputs[i])`` for i = 0, 1, ... in turn."""
    if len(inputs) == 1:
        return lambda: fn(*inputs[0])
    turn = itertools.cycle(inputs)
    return lambda: fn(*next(turn))


def row(label, nk, layers, kv_bytes, rounds):
    """layers: per layer (sdpa_args, sdpa_kwargs, hk_fn, hk_args)."""
    streams = [(torch.randn(max(1, kv_bytes // 4)),) for _ in layers]
    fns = {
        "sdpa": in_turn(lambda a, kw: F.scaled_dot_product_attention(*a, **kw),
                        [(a, kw) for a, kw, _, _ in layers]),
        "hk": in_turn(lambda f, a: f(*a), [(f, a) for _, _, f, a in layers]),
        "stream": in_turn(torch.sum, streams),
    }
    us = interleaved_us(fns, rounds)
    hk_gbs = kv_bytes / us["hk"] / 1e3
    st_gbs = kv_bytes / us["stream"] / 1e3
    return (label, nk, us["sdpa"], us["hk"], us["hk"] / us["sdpa"], hk_gbs, st_gbs,
            100 * hk_gbs / st_gbs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nk", default="16,1024,4096,32768")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--layers", type=int, default=1,
                    help="independent K/V caches taken in turn (see the module docstring)")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers must be >= 1, got {args.layers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from hybrid_kernels.int8_cache import Int8KVCache

    B, Hq, D = 1, 8, 64
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for nk in (int(x) for x in args.nk.split(",")):
            for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                for hk_heads in (8, 2):
                    kw = {"enable_gqa": True} if hk_heads != Hq else {}
                    layers = []
                    for _ in range(args.layers):
                        q = torch.randn(B, Hq, 1, D, dtype=dtype)
                        k = torch.randn(B, hk_heads, nk, D, dtype=dtype)
                        v = torch.randn(B, hk_heads, nk, D, dtype=dtype)
                        layers.append(((q, k, v), kw, hk.attention, (q, k, v)))
                    kv_bytes = 2 * k.numel() * k.element_size()
                    label = f"{dname} {'MHA' if hk_heads == Hq else f'GQA {Hq}/{hk_heads}'}"
                    rows.append(row(label, nk, layers, kv_bytes, args.rounds))
            if not args.no_int8:
                for hk_heads in (8, 2):
                    kw = {"enable_gqa": True} if hk_heads != Hq else {}
                    layers = []
                    for _ in range(args.layers):
                        q = torch.randn(B, Hq, 1, D)
                        k = torch.randn(B, hk_heads, nk, D)
                        v = torch.randn(B, hk_heads, nk, D)
                        cache = Int8KVCache.from_kv(k, v.bfloat16())
                        layers.append(((q, k, v), kw, cache.attention, (q.bfloat16(),)))
                    kv_bytes = (cache.k8.numel() + cache.k_scale.numel() * 4
                                + cache.v.numel() * cache.v.element_size())
                    label = (f"int8 K cache {'MHA' if hk_heads == Hq else f'GQA {Hq}/{hk_heads}'}"
                             " (vs fp32 SDPA)")
                    rows.append(row(label, nk, layers, kv_bytes, args.rounds))

    print("# one-token decode, B=1, Hq=8, D=64, Nq=1, no window, torch.inference_mode()")
    print(f"# CPU: {device_name('cpu')}; torch threads: {torch.get_num_threads()}; "
          f"hk ISA: {_isa()}; torch {torch.__version__}")
    print(f"# times: medians over {args.rounds} interleaved rounds; stream = torch.sum over a "
          f"float32 buffer of the K+V bytes; layers: {args.layers} (K/V caches taken in turn)")
    head = ("case", "Nk", "sdpa us", "hk us", "hk/sdpa", "hk GB/s", "stream GB/s", "% stream")
    fmt = "{:<34} {:>6} {:>10} {:>10} {:>8} {:>9} {:>12} {:>9}"
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(r[0], r[1], f"{r[2]:.1f}", f"{r[3]:.1f}", f"{r[4]:.2f}", f"{r[5]:.1f}",
                         f"{r[6]:.1f}", f"{r[7]:.0f}%"))
    return 0


def _isa() -> str:
    try:
        from hybrid_kernels.backends.cpu import load_module
        return load_module().selected_isa()
    except ImportError:
        return "none (native module not built)"


if __name__ == "__main__":
    raise SystemExit(main())
