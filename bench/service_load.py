"""Bounded loopback load test of ``POST /query/hybrid``.

Starts ``hybrid-kernels serve`` (default reader, hashing embedder) on 127.0.0.1, indexes a small
generated corpus, then for each concurrency level sends a fixed number of requests (or stops at
the duration cap) and prints throughput, p50/p95/p99 latency and the status codes. The last level
exceeds workers + queue limit on purpose: the excess must be answered 503, never time out.

    python bench/service_load.py [--requests 64] [--levels 1,8,32] [--over 96] [--max-seconds 60]
"""
import argparse
import asyncio
import collections
import tempfile
import time

import httpx
import numpy as np

from hybrid_kernels.bench.env import cpu_model
from hybrid_kernels.service.process import ServerProcess
from hybrid_kernels.training import QATask

KEY = "load-test-key"


async def level(url: str, questions, concurrency: int, count: int, max_seconds: float, timeout: float):
    latencies, codes = [], collections.Counter()
    sent = 0
    start = time.perf_counter()

    async def client():
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            while sent < count and time.perf_counter() - start < max_seconds:
                q = questions[sent % len(questions)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await c.post("/query/hybrid", json={"question": q, "top_k": 5})
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                except httpx.TimeoutException:
                    codes["timeout"] += 1
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "requests": sum(codes.values()), "ok": len(latencies),
            "seconds": wall, "throughput": len(latencies) / wall,
            "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99),
            "codes": dict(codes)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64, help="requests per level")
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--over", type=int, default=96, help="concurrency of the over-the-limit level")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--queue-limit", type=int, default=32)
    p.add_argument("--max-seconds", type=float, default=60.0, help="cap per level")
    p.add_argument("--documents", type=int, default=300)
    p.add_argument("--default-model", choices=("random", "trained"), default="random",
                   help="the server's default reader (trained: 2-3 minutes on first use, then cached)")
    args = p.parse_args()
    task = QATask(seed=7)
    examples = task.examples(args.documents, "test")
    docs = [{"title": ex.passages[ex.gold_index][0], "text": ex.passages[ex.gold_index][1]} for ex in examples]
    questions = [ex.question for ex in examples]
    with tempfile.TemporaryDirectory() as tmp:
        srv = ServerProcess(f"{tmp}/load.db", KEY, "--default-model", args.default_model,
                            "--workers", str(args.workers), "--queue-limit", str(args.queue_limit),
                            "--timeout", "60", startup_s=300)
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                for i in range(0, len(docs), 64):
                    c.post("/retention/update", json={"add": docs[i:i + 64]},
                           headers={"X-API-Key": KEY}).raise_for_status()
                c.post("/query/hybrid", json={"question": questions[0]}).raise_for_status()   # warm-up
            levels = [int(x) for x in args.levels.split(",")] + [args.over]
            print(f"POST /query/hybrid on {cpu_model()}, loopback, server workers={args.workers} "
                  f"queue_limit={args.queue_limit}; default reader ({args.default_model} tiny FiD, up to 16 new tokens), "
                  f"hashing embedder, {len(docs)} documents, top_k 5")
            print(f"{'clients':>7} {'requests':>8} {'ok':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
                  f"{'p99 ms':>8}  status codes")
            for n in levels:
                r = asyncio.run(level(srv.url, questions, n, args.requests if n <= args.workers + args.queue_limit
                                      else max(args.requests, 2 * n), args.max_seconds, timeout=120.0))
                print(f"{n:>7} {r['requests']:>8} {r['ok']:>5} {r['throughput']:>7.1f} {r['p50']:>8.1f} "
                      f"{r['p95']:>8.1f} {r['p99']:>8.1f}  {r['codes']}", flush=True)
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
