"""The CPU attention benchmark report, in one run, with the ratios its performance targets are stated in.

B=1, Hq=8, D=64, window (256, 256), 16 landmarks, N in {4096, 16384, 65536}, fp32 and bf16:
hk (cpu), the blocked reference, SDPA with an explicit bool mask (where it fits) and
FlexAttention compiled in its best arrangement; the torch.mm 4096^2 rate as the anchor; hk's int8
forward (fp32 and bf16 inputs), its backward (fp32 and bf16), and its peak memory at the largest N.

The target ratios come from a separate round-robin per N (``paired_medians``): hk's fp32, bf16
and int8 (fp32 and bf16 inputs) forwards, its fp32 and bf16 backwards and torch.mm (fp32 and
bf16), in turn, one timed call each per round. Measured
minutes apart, as in the table, the machine's speed drifts between them (turbo, other tenants:
the mm anchor alone moved between 346 and 413 GF/s across runs here), and the ratios with it.

``python bench/cpu_attention_report.py [--sizes 4096,16384,65536]`` prints the table.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .cases import Case, make_inputs, parse_pattern
from .providers import get_providers
from .runner import Result, run_case, timed_callable
from .timing import TimingConfig, measure, set_threads

__all__ = ["report_case", "mm_gflops", "CpuReport", "ratio_rows", "format_report", "main",
           "SIZES", "TARGET_N", "COMPETITORS"]

SIZES = (4096, 16384, 65536)
TARGET_N = 16384
COMPETITORS = ("hk-cpu", "reference", "sdpa", "flex")
PURE_TORCH = ("sdpa", "reference")
REPORT_TIMING = TimingConfig(warmup=1, min_repeats=3, max_repeats=20, target_seconds=2.0)
PAIRED_ROUNDS = 9


def report_case(n: int, dtype: torch.dtype = torch.float32, mode: str = "fwd",
                quant: bool = False) -> Case:
    spec = parse_pattern("int8" if quant else "window+landmarks", (256, 256), 16)
    return Case(spec, n, dtype, mode, batch=1, heads_q=8, heads_kv=8, head_dim=64, device="cpu")


def mm_gflops(dtype: torch.dtype = torch.float32, n: int = 4096,
              timing: TimingConfig = REPORT_TIMING) -> float:
    """torch.mm of two n x n matrices, in GFLOP/s (2 n^3 FLOPs)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    stats = measure(lambda: torch.mm(a, b), "cpu", timing)
    return 2.0 * n ** 3 / (stats.median * 1e6)


def paired_medians(fns: Dict[str, Callable[[], object]], rounds: int = PAIRED_ROUNDS
                   ) -> Dict[str, float]:
    """Median ms per function, timed round-robin, so drift of the machine's speed hits every
    function alike. Each round calls each function twice in a row and times the second call: its
    inputs are then as warm as in a run of repeats (the others' calls evict them in between)."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


PAIRED_CASES = {  # name -> report_case arguments after n
    "fp32": (torch.float32, "fwd", False), "bf16": (torch.bfloat16, "fwd", False),
    "int8": (torch.float32, "fwd", True), "int8 bf16": (torch.bfloat16, "fwd", True),
    "bwd fp32": (torch.float32, "bwd", False), "bwd bf16": (torch.bfloat16, "bwd", False)}


def paired_run(hk, n: int, dtypes, n_mm: int = 4096) -> Dict[str, float]:
    """paired_medians of hk's report cases at ``n`` (bf16 ones if bf16 is in ``dtypes``) and
    torch.mm of n_mm^2 fp32 ('mm') and, with bf16, bf16 ('mm bf16')."""
    fns = {}
    for name, (dt, mode, quant) in PAIRED_CASES.items():
        if dt in dtypes:
            case = report_case(n, dt, mode, quant)
            fns[name] = timed_callable(hk, case, *make_inputs(case, requires_grad=mode == "bwd"))
    a, b = torch.randn(n_mm, n_mm), torch.randn(n_mm, n_mm)
    fns["mm"] = lambda: torch.mm(a, b)
    if torch.bfloat16 in dtypes:
        a16, b16 = a.bfloat16(), b.bfloat16()
        fns["mm bf16"] = lambda: torch.mm(a16, b16)
    return paired_medians(fns)


@dataclass
class CpuReport:
    """Results of one report run, indexed for the ratios."""
    mm_fp32: Optional[float] = None
    mm_bf16: Optional[float] = None
    results: List[Result] = field(default_factory=list)
    memory: Dict[int, Dict] = field(default_factory=dict)   # N -> peak_memory_subprocess()
    paired: Dict[int, Dict[str, float]] = field(default_factory=dict)  # N -> paired_run()
    warning: Optional[str] = None                            # machine busy before the run

    def get(self, provider: str, n: int, dtype=torch.float32, mode="fwd",
            quant=False) -> Optional[Result]:
        for r in self.results:
            c = r.case
            if (r.provider == provider and c.n == n and c.dtype == dtype and c.mode == mode
                    and bool(c.pattern.quant) == quant and r.ms_median):
                return r
        return None

    def add(self, results: Sequence[Result]) -> None:
        self.results.extend(results)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def ratio_rows(rep: CpuReport, n: int) -> List[Tuple[str, Optional[float], str, Optional[bool]]]:
    """(what, value, target, met) for the performance targets at sequence length ``n``: hk against
    itself and torch.mm from the round-robin (rep.paired) when it ran, else from the table."""
    f32 = rep.get("hk-cpu", n)
    ms = lambda r: r.ms_median if r else None  # noqa: E731
    flex = rep.get("flex", n)
    torch_best = min((r for r in (rep.get(p, n) for p in PURE_TORCH) if r),
                     key=lambda r: r.ms_median, default=None)
    paired = rep.paired.get(n)
    mm_rate = lambda ms_: 2.0 * 4096 ** 3 / (ms_ * 1e6) if ms_ else None  # noqa: E731
    if paired:
        hk_ms = paired.get
        mm, mm16 = mm_rate(paired["mm"]), mm_rate(paired.get("mm bf16"))
    else:
        table = {"fp32": f32, "bf16": rep.get("hk-cpu", n, torch.bfloat16),
                 "int8": rep.get("hk-cpu", n, quant=True),
                 "int8 bf16": rep.get("hk-cpu", n, torch.bfloat16, quant=True),
                 "bwd fp32": rep.get("hk-cpu", n, mode="bwd"),
                 "bwd bf16": rep.get("hk-cpu", n, torch.bfloat16, mode="bwd")}
        hk_ms = lambda name: ms(table[name])  # noqa: E731
        mm, mm16 = rep.mm_fp32, rep.mm_bf16
    gflops = lambda name: (f32.case.flops() / (hk_ms(name) * 1e6)  # noqa: E731
                           if f32 and hk_ms(name) else None)
    f32_gflops = gflops("fp32")
    rows = [
        ("hk fp32 fwd GF/s / torch.mm fp32 GF/s", _ratio(f32_gflops, mm), ">= 0.65"),
        ("hk fp32 fwd speedup vs flex (best arrangement)", _ratio(ms(flex), ms(f32)), ">= 1.5"),
        (f"hk fp32 fwd speedup vs best pure torch "
         f"({torch_best.provider if torch_best else '-'})", _ratio(ms(torch_best), ms(f32)),
         ">= 2"),
        ("hk bf16 fwd speedup vs hk fp32 fwd", _ratio(hk_ms("fp32"), hk_ms("bf16")), ">= 2"),
        ("hk int8 fwd speedup vs hk fp32 fwd", _ratio(hk_ms("fp32"), hk_ms("int8")), ">= 2"),
        ("hk fp32 bwd time / fwd time", _ratio(hk_ms("bwd fp32"), hk_ms("fp32")), "<= 3"),
    ]
    if hk_ms("bf16"):
        rows.append(("hk bf16 fwd GF/s / torch.mm bf16 GF/s", _ratio(gflops("bf16"), mm16), ">= 0.5"))
    if hk_ms("int8 bf16"):
        rows.append(("hk int8 fwd speedup vs hk bf16 fwd, bf16 inputs",
                     _ratio(hk_ms("bf16"), hk_ms("int8 bf16")), ">= 1.5"))
    if hk_ms("bwd bf16"):
        rows.append(("hk bf16 bwd time / bf16 fwd time",
                     _ratio(hk_ms("bwd bf16"), hk_ms("bf16")), "<= 3"))
    out = []
    for what, value, target in rows:
        met = None
        if value is not None:
            op, bound = target.split()
            met = value >= float(bound) if op == ">=" else value <= float(bound)
        out.append((what, value, target, met))
    return out


def _memory_row(rep: CpuReport):
    """(what, value, target, met) for peak memory at the largest measured N, or None."""
    if not rep.memory:
        return None
    n = max(rep.memory)
    mem = rep.memory[n] or {}
    if mem.get("peak_bytes") is None:
        why = mem.get("error", "not measured")
        return (f"hk fp32 fwd peak memory at N={n}: {why}"[:62], None, "<= 2", None)
    total = mem["qkv_bytes"] + mem["peak_bytes"]
    value = total / mem["io_bytes"]
    return (f"hk fp32 fwd peak memory / (q+k+v+out) at N={n} ({total / 2**20:.0f}/"
            f"{mem['io_bytes'] / 2**20:.0f} MiB)", value, "<= 2", value <= 2)


def format_report(rep: CpuReport, sizes: Sequence[int], threads: int, env_line: str = "") -> str:
    lines = ["CPU attention benchmark (window + landmarks): B=1, Hq=8, D=64, window (256, 256), 16 landmarks "
             f"(evenly spaced), threads={threads}"]
    if env_line:
        lines.append(env_line)
    if rep.warning:
        lines.append(rep.warning)
    lines.append(f"anchor: torch.mm 4096^2 fp32 {rep.mm_fp32 or 0:.1f} GF/s, "
                 f"bf16 {rep.mm_bf16 or 0:.1f} GF/s (visible pairs only: 4*pairs*D FLOPs fwd, "
                 f"2.5x that bwd)")
    lines.append("")
    head = f"{'N':>6} {'dtype':<5} {'mode':<8} {'provider':<10} {'ms median':>10} {'GF/s':>8} " \
           f"{'% mm fp32':>9} {'max err':>8}  status"
    lines += [head, "-" * len(head)]
    for r in sorted(rep.results, key=lambda r: (r.case.n, r.case.dtype != torch.float32,
                                                 r.case.mode == "bwd", bool(r.case.pattern.quant))):
        if not r.available and r.provider not in COMPETITORS:
            continue
        c = r.case
        mode = c.mode + ("/int8" if c.pattern.quant else "")
        pct = f"{100 * r.gflops / rep.mm_fp32:8.0f}%" if r.gflops and rep.mm_fp32 else "-"
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason[:70]}"
        lines.append(f"{c.n:>6} {c.dtype_name:<5} {mode:<8} {r.provider:<10} "
                     f"{(f'{r.ms_median:10.2f}' if r.ms_median else '-'):>10} "
                     f"{(f'{r.gflops:8.1f}' if r.gflops else '-'):>8} {pct:>9} "
                     f"{(f'{r.max_abs_err:8.1e}' if r.max_abs_err is not None else '-'):>8}  "
                     f"{status}")
    for n in sizes:
        paired = rep.paired.get(n)
        lines += ["", f"targets at N={n}" + (" (the reference size)" if n == TARGET_N
                                                else "")
                  + (f": hk and torch.mm {PAIRED_ROUNDS} rounds round-robin (fp32 fwd "
                     f"{paired['fp32']:.2f} ms, torch.mm {2 * 4096 ** 3 / (paired['mm'] * 1e6):.0f}"
                     f" GF/s); flex and pure torch from the table" if paired else "")]
        rows = ratio_rows(rep, n)
        mem = _memory_row(rep) if n == max(sizes) else None
        if mem:
            rows.append(mem)
        for what, value, target, met in rows:
            verdict = "n/a" if met is None else ("met" if met else "NOT met")
            lines.append(f"  {what:<62} {(f'{value:6.2f}' if value is not None else '   -  ')}"
                         f"  target {target:<7} {verdict}")
    return "\n".join(lines)


def run_report(sizes: Sequence[int] = SIZES, dtypes=(torch.float32, torch.bfloat16),
               timing: TimingConfig = REPORT_TIMING, threads: Optional[int] = None,
               memory: bool = True, progress=print) -> Tuple[CpuReport, int]:
    from .env import load_warning
    from .memory import peak_memory_subprocess
    threads = set_threads(threads)
    rep = CpuReport()
    rep.warning = load_warning()
    if rep.warning:
        progress(rep.warning)
    progress("measuring torch.mm anchors ...")
    rep.mm_fp32 = mm_gflops(torch.float32, timing=timing)
    rep.mm_bf16 = mm_gflops(torch.bfloat16, timing=timing)
    competitors = get_providers(list(COMPETITORS))
    (hk,) = get_providers(["hk-cpu"])
    for n in sizes:
        for dtype in dtypes:
            progress(f"N={n} {dtype}: {', '.join(COMPETITORS)} ...")
            rep.add(run_case(report_case(n, dtype), competitors, timing))
        progress(f"N={n}: hk int8 forward, hk backward ...")
        for dtype in dtypes:
            rep.add(run_case(report_case(n, dtype, quant=True), [hk], timing))
        for dtype in dtypes:
            rep.add(run_case(report_case(n, dtype, mode="bwd"), [hk], timing))
        progress(f"N={n}: hk and torch.mm round-robin for the target ratios ...")
        rep.paired[n] = paired_run(hk, n, dtypes)
    if memory:
        n = max(sizes)
        progress(f"N={n}: hk peak memory (fresh process) ...")
        rep.memory[n] = peak_memory_subprocess(report_case(n), "hk-cpu")
    return rep, threads


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    from .env import environment
    sizes = [int(x) for x in args.sizes.replace(",", " ").split()]
    dtypes = (torch.float32, torch.bfloat16) if args.bf16 else (torch.float32,)
    rep, threads = run_report(sizes, dtypes, threads=args.threads, memory=not args.no_memory)
    env = environment("cpu", threads)
    env_line = (f"{env['device_name']}, torch {env['versions']['torch']}, "
                f"hybrid_kernels {env['versions']['hybrid_kernels']} ({env['git_revision']})"
                + (f", kernel ISA {env['cpu_isa']}" if env.get("cpu_isa") else ""))
    print()
    print(format_report(rep, sizes, threads, env_line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
