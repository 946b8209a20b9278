"""`hybrid-kernels bench`: options -> cases -> sweep -> table, CSV, JSON and PNG."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .cases import DEFAULT_PATTERNS, DTYPES, Case, parse_pattern
from .env import environment, load_warning, resolve_device
from .providers import get_providers
from .report import (format_header, format_table, result_rows, write_csv, write_json,
                     write_plot)
from .runner import Result, run_sweep
from .timing import QUICK_TIMING, TimingConfig, set_threads

__all__ = ["BenchOptions", "build_cases", "run_benchmark", "BenchOutput"]

DEFAULT_SIZES = {"cpu": (1024, 4096, 16384), "cuda": (1024, 4096, 16384, 65536)}
QUICK_SIZES = {"cpu": (1024, 4096), "cuda": (2048, 8192)}
DEFAULT_DTYPES = {"cpu": ("fp32", "bf16"), "cuda": ("bf16", "fp16")}
QUICK_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}


@dataclass
class BenchOptions:
    patterns: Sequence[str] = DEFAULT_PATTERNS
    sizes: Optional[Sequence[int]] = None        # None: per-device default
    dtypes: Optional[Sequence[str]] = None
    modes: Sequence[str] = ("fwd",)
    providers: Optional[Sequence[str]] = None    # None: every registered provider
    batch: int = 1
    heads: int = 8
    kv_heads: Optional[int] = None
    head_dim: int = 64
    window: Tuple[int, int] = (256, 256)
    landmarks: int = 16
    device: Optional[str] = None
    threads: Optional[int] = None
    quick: bool = False
    timing: Optional[TimingConfig] = None
    out_dir: str = "bench_results"
    prefix: Optional[str] = None                 # file name stem; default hk-bench-<timestamp>
    progress: bool = True
    plot: bool = True


@dataclass
class BenchOutput:
    results: List[Result]
    env: Dict
    rows: List[Dict]
    paths: Dict[str, Optional[str]] = field(default_factory=dict)
    text: str = ""


def build_cases(opts: BenchOptions, device: str) -> List[Case]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    sizes = opts.sizes or (QUICK_SIZES if opts.quick else DEFAULT_SIZES)[kind]
    dtype_names = opts.dtypes or (QUICK_DTYPES if opts.quick else DEFAULT_DTYPES)[kind]
    for name in dtype_names:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}")
    for mode in opts.modes:
        if mode not in ("fwd", "bwd"):
            raise ValueError(f"mode must be 'fwd' or 'bwd'; got {mode!r}")
    cases = []
    for pattern_name in opts.patterns:
        spec = parse_pattern(pattern_name, opts.window, opts.landmarks)
        for dtype_name in dtype_names:
            for mode in opts.modes:
                for n in sizes:
                    cases.append(Case(spec, int(n), DTYPES[dtype_name], mode, opts.batch,
                                      opts.heads, opts.kv_heads or opts.heads, opts.head_dim,
                                      device))
    return cases


def run_benchmark(opts: BenchOptions, echo=print) -> BenchOutput:
    device = resolve_device(opts.device)
    threads = set_threads(opts.threads)
    timing = opts.timing or (QUICK_TIMING if opts.quick else TimingConfig())
    cases = build_cases(opts, device)
    providers = get_providers(list(opts.providers) if opts.providers else None)
    warning = load_warning() if device == "cpu" else None
    env = environment(device, threads)
    unavailable = {p.name: why for p in providers
                   if (why := p.unavailable_reason(device)) is not None}
    echo(format_header(env, unavailable))
    if warning:
        echo(warning)
    echo(f"{len(cases)} cases x {len(providers) - len(unavailable)} providers; each result is "
         f"checked against the fp32 reference before it is timed")
    results = run_sweep(cases, providers, timing, progress=opts.progress)
    rows = result_rows(results, env)
    os.makedirs(opts.out_dir, exist_ok=True)
    stem = opts.prefix or "hk-bench-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(opts.out_dir, stem)
    paths = {"csv": write_csv(rows, base + ".csv"), "json": write_json(rows, env, base + ".json"),
             "png": write_plot(rows, base + ".png") if opts.plot else None}
    text = format_table(results)
    echo(text)
    echo(f"\nwrote {paths['csv']}\n      {paths['json']}")
    if paths["png"]:
        echo(f"plot: {paths['png']}")
    elif opts.plot:
        echo("plot: not written (pip install matplotlib)")
    return BenchOutput(results, env, rows, paths, text)
