"""The sweep: for each case, build inputs and the reference once, then for each provider check
its result (WRONG / ERROR rows are not timed) and time it."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import torch

from .cases import Case, make_inputs
from .check import compare, expected_result
from .providers import Provider
from .timing import TimingConfig, measure, peak_rss_increase

__all__ = ["Result", "run_case", "run_sweep", "Progress", "prepare"]

OK, WRONG, ERROR, SKIP = "ok", "WRONG", "ERROR", "SKIP"


@dataclass
class Result:
    case: Case
    provider: str
    status: str                    # ok | WRONG | ERROR | SKIP
    reason: str = ""
    ms_median: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    repeats: int = 0
    max_abs_err: Optional[float] = None
    rel_l1: Optional[float] = None
    speedup_vs_sdpa: Optional[float] = None
    peak_bytes: Optional[int] = None   # peak extra memory of one call, when measured
    available: bool = True             # False: the provider cannot run on this device at all

    @property
    def gflops(self) -> Optional[float]:
        if self.ms_median is None or self.ms_median <= 0:
            return None
        return self.case.flops() / (self.ms_median * 1e6)


class Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="run", leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(label[:60])
            self._bar.update(1)
        else:
            sys.stderr.write(f"\r[{self.count}/{self.total}] {label[:70]:<70}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 90 + "\r")
            sys.stderr.flush()


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:240]


def timed_callable(provider: Provider, case: Case, q, k, v,
                   dout: Optional[torch.Tensor] = None) -> Optional[Callable[[], object]]:
    """What is timed for ``case``: the provider's forward under no_grad, or (mode 'bwd') the
    gradients w.r.t. q, k, v of one kept forward for upstream gradient ``dout`` (random when
    None). None when that forward's output is not differentiable."""
    fn = provider.build(case, q, k, v)
    if case.mode == "fwd":
        def forward():
            with torch.no_grad():
                return fn()
        return forward
    out = fn()
    if not out.requires_grad:
        return None
    dout = torch.randn_like(out) if dout is None else dout.to(out.dtype)
    return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)


def prepare(provider: Provider, case: Case, inputs, expected):
    """Build ``provider``'s timed callable for ``case`` and check it against ``expected``.

    Returns (callable or None, Result with status ok/WRONG/ERROR/SKIP and the errors)."""
    why = provider.unavailable_reason(case.device)
    if why:
        return None, Result(case, provider.name, SKIP, why, available=False)
    why = provider.skip_reason(case)
    if why:
        return None, Result(case, provider.name, SKIP, why)
    try:
        timed = timed_callable(provider, case, *inputs, dout=expected.dout)
        if timed is None:
            return None, Result(case, provider.name, ERROR, "output is not differentiable")
        got = (timed(),) if case.mode == "fwd" else timed()
    except Exception as exc:  # a provider failing must not stop the sweep
        return None, Result(case, provider.name, ERROR, _short(exc))
    verdict = compare(case, got, expected)
    result = Result(case, provider.name, OK if verdict.ok else WRONG, verdict.reason,
                    max_abs_err=verdict.max_abs_err, rel_l1=verdict.rel_l1)
    return (timed if verdict.ok else None), result


def run_case(case: Case, providers: Sequence[Provider], timing: TimingConfig = TimingConfig(),
             on_step: Optional[Callable[[str], None]] = None, seed: int = 0,
             measure_memory: bool = False) -> List[Result]:
    """All providers on one case; speedups relative to the 'sdpa' provider when it ran."""
    inputs = make_inputs(case, seed=seed, requires_grad=case.mode == "bwd")
    expected = expected_result(case, *inputs, seed=seed + 1)
    results = []
    for provider in providers:
        if on_step:
            on_step(f"{case.pattern.name} {case.dtype_name} {case.mode} N={case.n} {provider.name}")
        timed, result = prepare(provider, case, inputs, expected)
        if timed is not None:
            try:
                stats = measure(timed, case.device, timing)
                result.ms_median, result.ms_p20, result.ms_p80 = stats.median, stats.p20, stats.p80
                result.repeats = stats.repeats
                if measure_memory:
                    result.peak_bytes = peak_rss_increase(timed, case.device)
            except Exception as exc:
                result.status, result.reason = ERROR, _short(exc)
        results.append(result)
        del timed  # free the provider's buffers before the next one runs
    sdpa = next((r for r in results if r.provider == "sdpa" and r.ms_median), None)
    for r in results:
        if sdpa is not None and r.ms_median:
            r.speedup_vs_sdpa = sdpa.ms_median / r.ms_median
    return results


def run_sweep(cases: Iterable[Case], providers: Sequence[Provider],
              timing: TimingConfig = TimingConfig(), progress: bool = True,
              measure_memory: bool = False) -> List[Result]:
    cases = list(cases)
    bar = Progress(len(cases) * len(providers), enabled=progress)
    results: List[Result] = []
    try:
        for case in cases:
            results.extend(run_case(case, providers, timing, on_step=bar.step,
                                    measure_memory=measure_memory))
    finally:
        bar.close()
    return results
