"""Timing: warm-up, many repeats, median with p20/p80.

GPU: one pair of CUDA events per repeat, with the L2 cache flushed (a 256 MiB buffer zeroed)
before each repeat. CPU: wall clock (perf_counter) around each repeat, at a fixed thread count.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

__all__ = ["Stats", "TimingConfig", "measure", "set_threads", "current_threads", "synchronize",
           "peak_rss_increase", "synchronized", "rounds_for"]

THREADS_ENV = "HYBRID_KERNELS_NUM_THREADS"


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 1              # untimed calls first (after the harness's checked call)
    min_repeats: int = 5
    max_repeats: int = 100
    target_seconds: float = 1.0  # stop repeating once this much time has been measured


QUICK_TIMING = TimingConfig(warmup=0, min_repeats=2, max_repeats=15, target_seconds=0.25)


@dataclass(frozen=True)
class Stats:
    times_ms: tuple

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times_ms)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def p20(self) -> float:
        return self.quantile(0.2)

    @property
    def p80(self) -> float:
        return self.quantile(0.8)

    @property
    def repeats(self) -> int:
        return len(self.times_ms)


def set_threads(n: Optional[int]) -> int:
    """Fix the CPU thread count for torch and the hk kernels; returns the count in effect."""
    if n is None:
        env = os.environ.get(THREADS_ENV)
        n = int(env) if env else (os.cpu_count() or 1)
    n = max(1, int(n))
    torch.set_num_threads(n)
    os.environ[THREADS_ENV] = str(n)
    return n


def current_threads() -> int:
    env = os.environ.get(THREADS_ENV)
    return int(env) if env else torch.get_num_threads()


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn`` followed by a device synchronize (for wall-clock timers such as pytest-benchmark)."""
    if not str(device).startswith("cuda"):
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def rounds_for(fn: Callable[[], object], device: str = "cpu",
               config: TimingConfig = TimingConfig()) -> int:
    """How many repeats of ``fn`` fill ``config.target_seconds`` (within min/max repeats)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - t0, 1e-6)
    return int(min(config.max_repeats, max(config.min_repeats, config.target_seconds / once)))


_L2_FLUSH = {}


def _l2_buffer(device: str) -> torch.Tensor:
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _L2_FLUSH[device]


def measure(fn: Callable[[], object], device: str = "cpu",
            config: TimingConfig = TimingConfig()) -> Stats:
    """Run ``fn`` ``config.warmup`` times, then time repeats until ``target_seconds`` of measured
    time (at least ``min_repeats``, at most ``max_repeats``). Milliseconds per call."""
    is_cuda = str(device).startswith("cuda")
    for _ in range(config.warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    total = 0.0
    while len(times) < config.max_repeats and (len(times) < config.min_repeats
                                                or total < config.target_seconds * 1e3):
        if is_cuda:
            _l2_buffer(device).zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        total += ms
    return Stats(tuple(times))


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_increase(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
    """Bytes by which one call of ``fn`` raises the process's peak memory above its memory
    before the call (GPU: peak allocated; CPU: peak RSS, reset through /proc/self/clear_refs).
    None where this cannot be measured."""
    if str(device).startswith("cuda"):
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    before = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024
