"""Peak memory of one provider call, measured in a fresh process so that memory cached by
earlier work (allocator free lists) cannot hide it.

``python -m hybrid_kernels.bench.memory PATTERN N DTYPE PROVIDER`` prints one JSON line:
peak_bytes (process peak above the moment before the call, q/k/v already allocated) and
io_bytes (q, k, v and the output).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Optional

import torch

from .cases import DTYPES, Case, make_inputs, parse_pattern
from .timing import peak_rss_increase

__all__ = ["peak_memory_subprocess"]


def peak_memory_subprocess(case: Case, provider: str, timeout: float = 600) -> Optional[Dict]:
    """Run the measurement for ``case`` (B=batch etc. from the case) in a child process."""
    args = [sys.executable, "-m", "hybrid_kernels.bench.memory", case.pattern.name, str(case.n),
            case.dtype_name, provider, str(case.batch), str(case.heads_q), str(case.heads_kv),
            str(case.head_dim), str(case.window_lr[0]), str(case.window_lr[1]),
            str(case.pattern.num_landmarks)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # cwd = the directory holding this package, so `-m` imports the same copy of it
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv) -> None:
    pattern, n, dtype, provider, b, hq, hk, d, left, right, g = argv
    from .providers import get_providers
    spec = parse_pattern(pattern, (int(left), int(right)), int(g))
    case = Case(spec, int(n), DTYPES[dtype], "fwd", int(b), int(hq), int(hk), int(d))
    small = Case(spec, 1024, DTYPES[dtype], "fwd", int(b), int(hq), int(hk), int(d))
    (p,) = get_providers([provider])
    why = p.unavailable_reason("cpu") or p.skip_reason(case)
    if why:
        print(json.dumps({"error": why}))
        return
    with torch.no_grad():
        p.build(small, *make_inputs(small))()  # load libraries, start threads
        q, k, v = make_inputs(case)
        fn = p.build(case, q, k, v)
        peak = peak_rss_increase(fn)
    print(json.dumps({"peak_bytes": peak, "io_bytes": case.io_bytes(),
                      "qkv_bytes": sum(t.numel() * t.element_size() for t in (q, k, v))}))


if __name__ == "__main__":
    _main(sys.argv[1:])
