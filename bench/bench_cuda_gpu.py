"""GPU benchmark of the CUDA backend: the CUDA C++ kernels against Triton, FlexAttention and SDPA.

    python bench/bench_cuda_gpu.py            # on a machine with a CUDA GPU

1. Prefill: fp16, B=4, H=16, D=128, N=16384, window (256, 256) + 16 landmarks, forward:
   hk-cuda vs hk-triton vs FlexAttention (compiled, best arrangement) vs SDPA (flash, full
   attention), through the benchmark harness (each result checked against the reference before
   it is timed). Target: hk-cuda >= 1.1x hk-triton.
2. Decode: Nq in {1, 4, 16}, Nk = 65536, B=4, Hk=Hq=16, D=Dv=128, INT8 K cache + fp16 V
   (Int8KVCache): achieved bandwidth (bytes of the INT8 K and fp16 V read once / time) against
   this GPU's copy bandwidth measured in the same run. Target: >= 70%.
"""
from __future__ import annotations

import argparse
import sys

import torch


def measured_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s from a large device-to-device copy (read + write)."""
    from hybrid_kernels.bench.timing import measure
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src), "cuda").median
    return 2 * nbytes / (ms * 1e-3)


def prefill(args) -> None:
    from hybrid_kernels.bench.cases import Case, parse_pattern
    from hybrid_kernels.bench.providers import get_providers
    from hybrid_kernels.bench.report import format_table
    from hybrid_kernels.bench.runner import run_sweep
    case = Case(parse_pattern("window+landmarks"), n=args.n, dtype=torch.float16, batch=4,
                heads_q=16, heads_kv=16, head_dim=128, device="cuda")
    providers = get_providers(["hk-cuda", "hk-triton", "flex", "sdpa"])
    results = run_sweep([case], providers)
    print(format_table(results))
    times = {r.provider: r.ms_median for r in results if r.ms_median}
    if "hk-cuda" in times and "hk-triton" in times:
        print(f"prefill: hk-cuda is {times['hk-triton'] / times['hk-cuda']:.2f}x hk-triton (target >= 1.1x)")


def decode(args) -> None:
    from hybrid_kernels.bench.timing import measure
    from hybrid_kernels.int8_cache import Int8KVCache
    peak = measured_copy_bandwidth()
    B, H, Nk, D = 4, 16, 65536, 128
    k = torch.randn(B, H, Nk, D, device="cuda", dtype=torch.float16)
    v = torch.randn(B, H, Nk, D, device="cuda", dtype=torch.float16)
    cache = Int8KVCache.from_kv(k, v)
    bytes_read = cache.k8.numel() + cache.v.numel() * cache.v.element_size()
    print(f"copy bandwidth (measured): {peak / 1e9:.0f} GB/s; INT8 K + fp16 V = {bytes_read / 2**20:.0f} MiB")
    print("ms: Int8KVCache.attention (whole call); kernel: the split-K kernel + merge alone "
          "(pre-quantized q), which the bandwidth columns use")
    print(f"{'Nq':>4} {'ms':>8} {'kernel ms':>10} {'GB/s':>8} {'of copy bw':>10} {'vs fp16 hk-triton':>18}")
    from hybrid_kernels import api
    from hybrid_kernels.dispatch import get_backend
    from hybrid_kernels.quant import quantize_qk
    backend = get_backend("cuda")
    for nq in (1, 4, 16):
        q = torch.randn(B, H, nq, D, device="cuda", dtype=torch.float16)
        ms_call = measure(lambda: cache.attention(q), "cuda").median
        pattern, _ = api.plan(q, q.new_empty((1,)).expand(*cache.k8.shape), cache.v, quant="int8")
        q8, q_scale, _, _ = quantize_qk(q, q[:, :1, :1], q_block=cache.block, k_block=cache.block,
                                        smooth_k=False)
        ms = measure(lambda: backend.forward_int8_quantized(
            q8, q_scale, cache.k8, cache.k_scale, cache.v, q, pattern, cache.block, cache.block),
            "cuda").median
        try:
            import hybrid_kernels as hk
            ms_fp16 = measure(lambda: hk.attention(q, k, v, backend="triton"), "cuda").median
            rel = f"{ms_fp16 / ms:.2f}x"
        except Exception as exc:  # triton missing: report, do not fail the decode table
            rel = f"n/a ({type(exc).__name__})"
        bw = bytes_read / (ms * 1e-3)
        print(f"{nq:>4} {ms_call:8.3f} {ms:10.3f} {bw / 1e9:8.0f} {bw / peak:10.0%} {rel:>18}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384, help="prefill sequence length")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda_gpu: no CUDA device here; run it on a machine with a GPU.")
        return 0
    print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    if not args.skip_prefill:
        prefill(args)
    if not args.skip_decode:
        decode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
