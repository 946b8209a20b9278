"""Command line: ``hybrid-kernels bench``, ``hybrid-kernels info``, ``hybrid-kernels rag`` and
``hybrid-kernels serve``
(also ``python -m hybrid_kernels``)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _int_list(text: str) -> List[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _str_list(text: str) -> List[str]:
    return [x for x in text.replace(",", " ").split() if x]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-kernels",
                                     description="hybrid-kernels: benchmarks, install info, RAG question answering")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmark hk.attention against SDPA, FlexAttention, ...")
    b.add_argument("--quick", action="store_true",
                   help="short sweep (CPU: N 1024,4096, fp32, fwd; under 3 minutes on 2 cores)")
    b.add_argument("--patterns", type=_str_list,
                   default="full,causal,window,window+landmarks,int8",
                   help="'+'-joined tokens from full, causal, window, landmarks, int8 "
                        "(int8 alone = window+landmarks+int8)")
    b.add_argument("--sizes", type=_int_list, default=None,
                   help="sequence lengths N (default: 1024,4096,16384 on CPU; see --quick)")
    b.add_argument("--dtypes", type=_str_list, default=None,
                   help="fp32, bf16, fp16 (default: fp32,bf16 on CPU, bf16,fp16 on GPU)")
    b.add_argument("--modes", type=_str_list, default="fwd", help="fwd and/or bwd")
    b.add_argument("--providers", type=_str_list, default=None,
                   help="subset of: hk-cpu, hk-triton, hk-cuda, sdpa, flex, reference, "
                        "flash-attn, xformers, sageattention (default: every one)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads")
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--window", type=int, nargs=2, default=(256, 256), metavar=("LEFT", "RIGHT"))
    b.add_argument("--landmarks", type=int, default=16, help="number of landmark positions")
    b.add_argument("--device", default="auto", help="cpu, cuda or auto")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default HYBRID_KERNELS_NUM_THREADS, else all cores)")
    b.add_argument("--out-dir", default="bench_results")
    b.add_argument("--prefix", default=None, help="output file stem (default timestamped)")
    b.add_argument("--repeats", type=int, default=None, help="max timed repeats per run")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--no-plot", action="store_true")

    sub.add_parser("info", help="versions, backends, CPU features, GPU")

    r = sub.add_parser("rag", help="retrieval + Fusion-in-Decoder question answering")
    from .rag import build_parser as build_rag_parser  # light: argparse only
    build_rag_parser(r)
    from .service.cli import build_parser as build_serve_parser  # light: argparse only
    build_serve_parser(sub.add_parser("serve", help="HTTP service: query, stream, retention, "
                                      "diffusion, cascade"))
    return parser


def _bench(args) -> int:
    from .bench.harness import BenchOptions, run_benchmark
    from .bench.timing import QUICK_TIMING, TimingConfig
    timing = None
    if args.repeats is not None:
        base = QUICK_TIMING if args.quick else TimingConfig()
        timing = TimingConfig(warmup=base.warmup, min_repeats=min(base.min_repeats, args.repeats),
                              max_repeats=args.repeats, target_seconds=base.target_seconds)
    def as_list(value):  # argparse does not run `type` on string defaults it leaves unparsed
        return value if isinstance(value, list) else _str_list(value)
    opts = BenchOptions(patterns=as_list(args.patterns), sizes=args.sizes, dtypes=args.dtypes,
                        modes=as_list(args.modes), providers=args.providers, batch=args.batch,
                        heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                        window=tuple(args.window), landmarks=args.landmarks, device=args.device,
                        threads=args.threads, quick=args.quick, timing=timing,
                        out_dir=args.out_dir, prefix=args.prefix,
                        progress=not args.no_progress, plot=not args.no_plot)
    out = run_benchmark(opts)
    return 0 if all(r.status != "WRONG" for r in out.results) else 1


def _info(args) -> int:
    import torch
    from .bench.env import backend_status, cpu_features, device_name, git_revision, versions
    from .bench.providers import get_providers
    from .bench.timing import current_threads
    print("hybrid-kernels info")
    print("versions:")
    for name, v in versions().items():
        print(f"  {name:<15} {v}")
    print(f"  {'git revision':<15} {git_revision()}")
    print(f"threads: torch {torch.get_num_threads()}, kernels {current_threads()} "
          f"(HYBRID_KERNELS_NUM_THREADS overrides)")
    print(f"cpu: {device_name('cpu')}")
    cpu = cpu_features()
    if "error" in cpu:
        print(f"  features: unknown, {cpu['error']}")
    else:
        flags = [k for k, on in cpu["features"].items() if on]
        print(f"  features: {' '.join(flags) or 'none'}")
        print(f"  selected kernel ISA: {cpu['selected_isa']}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"gpu {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("gpu: none (torch.cuda.is_available() is False)")
    print("backends (backend='auto' tries them in this order):")
    for name, why in backend_status().items():
        print(f"  {name:<10} {'usable' if why is None else 'unusable: ' + why}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"benchmark providers on {device}:")
    for p in get_providers():
        why = p.unavailable_reason(device)
        print(f"  {p.name:<14} {'available' if why is None else 'not available: ' + why}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        try:
            return _bench(args)
        except ValueError as exc:  # bad option values (pattern, dtype, provider names)
            parser.error(str(exc))
    if args.command == "rag":
        from .rag import run as run_rag
        return run_rag(args)
    if args.command == "serve":
        from .service.cli import run as run_serve
        return run_serve(args)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
