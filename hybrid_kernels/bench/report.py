"""Output of a sweep: the printed table, long-format CSV and JSON, and a PNG plot."""
from __future__ import annotations

import csv
import json
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from .runner import Result

__all__ = ["result_rows", "write_csv", "write_json", "write_plot", "format_table", "COLUMNS",
           "format_header"]

COLUMNS = ["timestamp", "git_revision", "device", "device_name", "threads", "torch_version",
           "hybrid_kernels_version", "versions", "kernel", "provider", "mode", "batch", "heads_q",
           "heads_kv", "n_q", "n_k", "head_dim", "dtype", "window_left", "window_right",
           "num_landmarks", "causal", "quant", "pairs", "gflop", "status", "reason", "ms_median",
           "ms_p20", "ms_p80", "repeats", "gflops", "speedup_vs_sdpa", "max_abs_err", "rel_l1",
           "peak_bytes"]


def result_rows(results: Sequence[Result], env: Dict) -> List[Dict]:
    """One flat dict per (case, provider): the long format of the CSV and JSON."""
    rows = []
    for r in results:
        c = r.case
        left, right = c.window_lr
        rows.append(OrderedDict(
            timestamp=env["timestamp"], git_revision=env["git_revision"], device=env["device"],
            device_name=env["device_name"], threads=env["threads"],
            torch_version=env["versions"].get("torch"),
            hybrid_kernels_version=env["versions"].get("hybrid_kernels"),
            versions=json.dumps(env["versions"], sort_keys=True),
            kernel=c.pattern.name, provider=r.provider, mode=c.mode, batch=c.batch,
            heads_q=c.heads_q, heads_kv=c.heads_kv, n_q=c.n_q, n_k=c.n, head_dim=c.head_dim,
            dtype=c.dtype_name, window_left=left, window_right=right,
            num_landmarks=c.pattern.num_landmarks, causal=c.pattern.causal,
            quant=c.pattern.quant or "", pairs=c.pairs(), gflop=c.flops() / 1e9,
            status=r.status, reason=r.reason, ms_median=r.ms_median, ms_p20=r.ms_p20,
            ms_p80=r.ms_p80, repeats=r.repeats, gflops=r.gflops,
            speedup_vs_sdpa=r.speedup_vs_sdpa, max_abs_err=r.max_abs_err, rel_l1=r.rel_l1,
            peak_bytes=r.peak_bytes))
    return rows


def write_csv(rows: List[Dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    return path


def write_json(rows: List[Dict], env: Dict, path: str) -> str:
    with open(path, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    return path


def write_plot(rows: List[Dict], path: str) -> Optional[str]:
    """Time vs sequence length per provider, one panel per (kernel, dtype, mode); None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = OrderedDict()
    for row in rows:
        if row["status"] == "ok":
            key = (row["kernel"], row["dtype"], row["mode"])
            panels.setdefault(key, {}).setdefault(row["provider"], []).append(
                (row["n_k"], row["ms_median"]))
    if not panels:
        return None
    names = sorted({p for lines in panels.values() for p in lines})
    color = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one color per provider
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, ((kernel, dtype, mode), lines) in zip(axes.flat, panels.items()):
        for provider, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider,
                    color=color[provider])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{kernel} {dtype} {mode}", fontsize=10)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_header(env: Dict, unavailable: Dict[str, str]) -> str:
    v = env["versions"]
    lines = [f"device: {env['device_name']} [{env['device']}]   threads: {env['threads']}"
             + (f"   cpu isa: {env['cpu_isa']}" if env.get("cpu_isa") else ""),
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items())
             + f"   git: {env['git_revision']}   {env['timestamp']}"]
    for name, why in unavailable.items():
        lines.append(f"not run: {name}: {why}")
    return "\n".join(lines)


def format_table(results: Sequence[Result], width: int = 120) -> str:
    """Rows grouped per case; providers that cannot run on this device are left out (the header
    lists them)."""
    head = (f"{'pattern':<18} {'dtype':<5} {'mode':<4} {'N':>6}  {'provider':<13} "
            f"{'ms median [p20, p80]':>26} {'GF/s':>8} {'vs SDPA':>8} {'max err':>8}  status")
    lines = [head, "-" * len(head)]
    last = None
    for r in results:
        if not r.available:
            continue
        c = r.case
        key = (c.pattern.name, c.dtype_name, c.mode, c.n)
        if last is not None and key != last:
            lines.append("")
        last = key
        if r.ms_median is not None:
            timing = f"{r.ms_median:9.3f} [{r.ms_p20:7.3f}, {r.ms_p80:7.3f}]"
        else:
            timing = "-"
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        line = (f"{c.pattern.name:<18} {c.dtype_name:<5} {c.mode:<4} {c.n:>6}  {r.provider:<13} "
                f"{timing:>26} {_fmt(r.gflops, '8.1f'):>8} "
                f"{_fmt(r.speedup_vs_sdpa, '7.2f') + ('x' if r.speedup_vs_sdpa else ''):>8} "
                f"{_fmt(r.max_abs_err, '8.1e'):>8}  {status}")
        lines.append(line[:width + 60] if len(line) > width + 60 else line)
    return "\n".join(lines)
