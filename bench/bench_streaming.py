"""Stream tokens through a small StreamingEncoder: hk (sinks + window cache) vs a full cache.

Each mode runs in its own process (so peak RSS is its own) and reports, every --report-every
tokens: tokens/s over the last interval, cumulative tokens/s, peak RSS and the bytes of the
stream state (KV caches). Also reported at --ratio-at tokens (100k), where the hk / full-cache
ratios are taken. The full-cache baseline stops once its state exceeds --baseline-mem-mb
or its run exceeds --baseline-time-s.

    PYTHONPATH=. python bench/bench_streaming.py                 # 1M tokens
    PYTHONPATH=. python bench/bench_streaming.py --tokens 200000
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time


def _use_cpu_module(directory) -> None:
    """Load a development build of the C++ CPU module (tools/dev_build.sh BUILD_DIR=...) as
    hybrid_kernels._C_cpu, for use before it is installed into the package."""
    if directory:
        import importlib
        sys.path.insert(0, directory)
        sys.modules["hybrid_kernels._C_cpu"] = importlib.import_module("_C_cpu")
        sys.path.pop(0)


def _backend_name(backend: str) -> str:
    import torch
    import hybrid_kernels as hk
    from hybrid_kernels.dispatch import Problem, select_backend
    q = torch.zeros(1, 1, 1, 16)
    pattern, quant = hk.plan(q, q, q, causal=True)
    return select_backend(Problem.from_inputs(q, q, pattern, quant, False), backend).name


def run_mode(mode: str, args, queue) -> None:
    _use_cpu_module(args.cpu_module)
    import torch
    from hybrid_kernels.streaming import StreamingEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = StreamingEncoder(vocab_size=1000, dim=args.dim, num_layers=args.layers,
                             num_heads=args.heads, num_kv_heads=args.kv_heads).eval()
    if mode == "hk":
        session = model.new_session(num_sinks=args.sinks, window=args.window,
                                    cache_dtype=args.cache_dtype, backend=args.backend)
    else:
        session = model.new_session(num_sinks=0, window=None, cache_dtype=args.cache_dtype,
                                    backend=args.backend)
    gen = torch.Generator().manual_seed(1)
    t0 = t_last = time.perf_counter()
    done = last_report = 0
    stop = None
    while done < args.tokens:
        n = min(args.chunk, args.tokens - done)
        ids = torch.randint(0, 1000, (1, n), generator=gen)
        model.feed(session, ids)
        done += n
        now = time.perf_counter()
        due = done - last_report >= args.report_every or done == args.tokens
        if due or (last_report < args.ratio_at <= done):
            queue.put(dict(mode=mode, tokens=done, interval_tok_s=(done - last_report) / (now - t_last),
                           cum_tok_s=done / (now - t0), peak_rss_mb=_peak_rss_mb(),
                           state_mb=session.nbytes() / 2**20))
            last_report, t_last = done, now
        if mode == "full":
            if session.nbytes() > args.baseline_mem_mb * 2**20:
                stop = f"state exceeded {args.baseline_mem_mb} MB at {done} tokens"
            elif now - t0 > args.baseline_time_s:
                stop = f"time exceeded {args.baseline_time_s} s at {done} tokens"
            if stop:
                queue.put(dict(mode=mode, tokens=done, interval_tok_s=(done - last_report) / max(now - t_last, 1e-9),
                               cum_tok_s=done / (now - t0), peak_rss_mb=_peak_rss_mb(),
                               state_mb=session.nbytes() / 2**20, stopped=stop))
                break
    queue.put(dict(mode=mode, finished=True))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run(mode: str, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_mode, args=(mode, args, queue))
    proc.start()
    rows = []
    while True:
        row = queue.get()
        if row.get("finished"):
            break
        rows.append(row)
        line = (f"{mode:>4} {row['tokens']:>9,d} tok  {row['interval_tok_s']:>9,.0f} tok/s (interval)  "
                f"{row['cum_tok_s']:>9,.0f} tok/s (cum)  peak RSS {row['peak_rss_mb']:>7.1f} MB  "
                f"state {row['state_mb']:>8.2f} MB")
        print(line + (f"  STOPPED: {row['stopped']}" if "stopped" in row else ""), flush=True)
    proc.join()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--report-every", type=int, default=100_000)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16", "int8"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = torch default; 1 by default: on a shared 2-core machine "
                        "more threads mostly add spin-wait contention)")
    p.add_argument("--ratio-at", type=int, default=100_000, help="token count for the hk/full ratio")
    p.add_argument("--baseline-mem-mb", type=float, default=1024.0)
    p.add_argument("--baseline-time-s", type=float, default=900.0)
    p.add_argument("--modes", default="hk,full")
    p.add_argument("--cpu-module", help="directory of a dev build of _C_cpu to use as hybrid_kernels._C_cpu")
    p.add_argument("--json", help="write all report rows to this file")
    args = p.parse_args(argv)

    _use_cpu_module(args.cpu_module)
    print(f"# model: dim={args.dim} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"chunk={args.chunk}; hk: sinks={args.sinks} window={args.window} cache={args.cache_dtype}; "
          f"attention backend: {_backend_name(args.backend)}", flush=True)
    results = {mode: _run(mode, args) for mode in args.modes.split(",")}
    if "hk" in results and "full" in results:
        at = args.ratio_at
        hk_row = next((r for r in results["hk"] if r["tokens"] >= at), None)
        full_row = next((r for r in results["full"] if r["tokens"] >= at and "stopped" not in r), None)
        if hk_row and full_row:
            print(f"# at {at:,d} tokens: hk / full-cache throughput = "
                  f"{hk_row['interval_tok_s'] / full_row['interval_tok_s']:.2f}x (interval), "
                  f"{hk_row['cum_tok_s'] / full_row['cum_tok_s']:.2f}x (cumulative); "
                  f"state memory = {hk_row['state_mb']:.2f} MB vs {full_row['state_mb']:.2f} MB "
                  f"({full_row['state_mb'] / hk_row['state_mb']:.1f}x less); peak RSS "
                  f"{hk_row['peak_rss_mb']:.0f} MB vs {full_row['peak_rss_mb']:.0f} MB")
        else:
            print(f"# no ratio: the baseline did not reach {at:,d} tokens within its budget")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
