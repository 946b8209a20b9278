"""GPU benchmark of the Triton backend.

    python bench/bench_triton_gpu.py [--n 4096 16384 65536] [--d 64 128] [--reps 20]

fp16, B=4, H=16, two patterns: window (256, 256) + 16 landmarks, and causal window (1024, 0).
Compared, forward and backward (CUDA events, median of --reps after warm-up):
  * hk        hk.attention(backend="triton")
  * hk_int8   hk.attention(backend="triton", quant="int8") (forward only)
  * flex      torch FlexAttention, compiled, in its best arrangement (hybrid_kernels.bench.flex)
  * sdpa_full SDPA (flash backend) over all keys (causal when the pattern is): the dense anchor
  * sage      SageAttention (full attention, int8 QK, forward only) when importable
TFLOP/s count the visible (query, key) pairs of what each one computes: the pattern for hk and
flex, all pairs for sdpa_full and sage (forward 4*D flops per pair, backward 2.5x that).
Ratios are time(x) / time(hk) from the same run. Exits with a message when there is no GPU.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, H = 4, 16
PATTERNS = {
    "win256+16lm": dict(window=(256, 256), num_landmarks=16, causal=False),
    "causal_win1024": dict(window=(1024, 0), num_landmarks=0, causal=True),
}


def landmark_positions(n: int, g: int):
    return None if g == 0 else torch.arange(0, n, n // g, device="cuda")[:g]


def visible_pairs(n: int, window, landmarks, causal: bool) -> int:
    """Exact number of visible pairs of the pattern (Nq = Nk = n, no padding), per (b, h)."""
    left, right = window
    r = torch.arange(n, dtype=torch.int64)
    lo = (r - left).clamp(min=0)
    hi = (r + right).clamp(max=n - 1)
    if causal:
        hi = torch.minimum(hi, r)
    count = (hi - lo + 1).clamp(min=0)
    if landmarks is not None:
        lm = landmarks.cpu()
        outside = torch.searchsorted(lm, lo) + (lm.numel() - torch.searchsorted(lm, hi, right=True))
        if causal:  # landmarks above the band are also above r
            outside = torch.searchsorted(lm, lo)
        count = count + outside
        is_lm_row = torch.zeros(n, dtype=torch.bool)
        is_lm_row[lm] = True
        count = torch.where(is_lm_row, r + 1 if causal else torch.full_like(r, n), count)
    return int(count.sum())


def cuda_time_ms(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps runs (after 2 warm-up runs)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if sum(times) > 3000 and len(times) >= 3:  # slow dense anchors: enough samples
            break
    times.sort()
    return times[len(times) // 2]


def fwd_bwd_timer(forward, inputs, reps: int, backward: bool = True):
    """(forward ms, backward ms or None) for forward(*inputs) -> out."""
    with torch.no_grad():
        fwd_ms = cuda_time_ms(lambda: forward(*inputs), reps)
    if not backward:
        return fwd_ms, None
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = forward(*leaves)
    dout = torch.randn_like(out)
    bwd_ms = cuda_time_ms(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), reps)
    return fwd_ms, bwd_ms


def make_hk(pattern, landmarks, quant=None):
    import hybrid_kernels as hk

    def run(q, k, v):
        return hk.attention(q, k, v, window=pattern["window"], landmarks=landmarks,
                            causal=pattern["causal"], quant=quant, backend="triton")
    return run


def make_flex(pattern):
    """FlexAttention in its best arrangement (hybrid_kernels.bench.flex, as in the harness); the
    block mask is built on the first call for given inputs, outside the timed calls."""
    from hybrid_kernels.bench.cases import Case, PatternSpec
    from hybrid_kernels.bench.flex import FlexProvider

    spec = PatternSpec("bench", window=pattern["window"], num_landmarks=pattern["num_landmarks"],
                       causal=pattern["causal"])
    # The timer replays one graph's backward (retain_graph=True), which donated buffers forbid.
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    # Each shape and mask is a recompile of the one flex_attention; past dynamo's default limit
    # (8) it silently runs flex eagerly (dense, ~50x slower), which is not what users run.
    torch._dynamo.config.recompile_limit = 256
    built = {}

    def run(q, k, v):
        key = (id(q), id(k), id(v))
        if key not in built:
            b, h, n, d = q.shape
            case = Case(spec, n, q.dtype, "fwd", b, h, k.shape[1], d, q.device.type)
            built.clear()
            built[key] = FlexProvider().build(case, q, k, v)
        return built[key]()
    return run


def make_sdpa(causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    def run(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def make_sage(causal):
    from sageattention import sageattn  # noqa: F401  (optional)

    def run(q, k, v):
        return sageattn(q, k, v, tensor_layout="HND", is_causal=causal)
    return run


def check_against_flex(pattern, landmarks, d):
    """Sanity check at a small size: hk output vs flex output (max abs diff, fp16)."""
    n = 2048
    q, k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    lm = landmark_positions(n, pattern["num_landmarks"])
    a = make_hk(pattern, lm)(q, k, v)
    b = make_flex(pattern)(q, k, v)
    return float((a.float() - b.float()).abs().max())


def tflops(pairs, d, ms, backward=False):
    if ms is None or ms != ms:
        return float("nan")
    flops = 4.0 * d * pairs * B * H * (2.5 if backward else 1.0)
    return flops / (ms * 1e-3) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], help="impls to skip (flex, sdpa_full, sage, hk_int8)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton_gpu: no CUDA device here; this benchmark needs an NVIDIA GPU. Nothing run.")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}; fp16, B={B}, H={H}")
    try:
        make_sage(False)
        have_sage = "sage" not in args.skip
    except ImportError:
        have_sage = False
        print("sageattention not importable: the sage column is skipped")

    rows = []
    for d in args.d:
        for pname, pattern in PATTERNS.items():
            try:
                print(f"check D={d} {pname}: max |hk - flex| at N=2048 = "
                      f"{check_against_flex(pattern, landmark_positions(2048, pattern['num_landmarks']), d):.2e}")
            except Exception as exc:  # noqa: BLE001
                print(f"check D={d} {pname}: failed ({type(exc).__name__}: {exc})")
            for n in args.n:
                lm = landmark_positions(n, pattern["num_landmarks"])
                causal = pattern["causal"]
                pairs = visible_pairs(n, pattern["window"], lm, causal)
                full_pairs = n * (n + 1) // 2 if causal else n * n
                q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.float16)
                           for _ in range(3))
                impls = [("hk", lambda: make_hk(pattern, lm), pairs, True),
                         ("hk_int8", lambda: make_hk(pattern, lm, "int8"), pairs, False),
                         ("flex", lambda: make_flex(pattern), pairs, True),
                         ("sdpa_full", lambda: make_sdpa(causal), full_pairs, True)]
                if have_sage:
                    impls.append(("sage", lambda: make_sage(causal), full_pairs, False))
                results = {}
                for name, factory, npairs, bwd in impls:
                    if name in args.skip:
                        continue
                    try:
                        fwd_ms, bwd_ms = fwd_bwd_timer(factory(), (q, k, v), args.reps, bwd)
                    except Exception as exc:  # noqa: BLE001  (OOM, missing kernel, ...)
                        print(f"  {name} D={d} {pname} N={n}: {type(exc).__name__}: {str(exc)[:200]}")
                        fwd_ms, bwd_ms = float("nan"), None
                    torch.cuda.empty_cache()
                    results[name] = (fwd_ms, bwd_ms, npairs)
                base_f, base_b, _ = results.get("hk", (float("nan"), None, 0))
                for name, (fwd_ms, bwd_ms, npairs) in results.items():
                    rows.append((d, pname, n, name, fwd_ms, bwd_ms,
                                 tflops(npairs, d, fwd_ms), tflops(npairs, d, bwd_ms, True),
                                 fwd_ms / base_f if base_f == base_f else float("nan"),
                                 (bwd_ms / base_b) if (bwd_ms and base_b) else float("nan"),
                                 npairs / (n * n)))
                    print(_fmt(rows[-1]), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    print()
    print(_header())
    for row in rows:
        print(_fmt(row))
    return 0


def _header() -> str:
    return (f"{'D':>4} {'pattern':<15} {'N':>6} {'impl':<10} {'fwd ms':>9} {'bwd ms':>9} "
            f"{'fwd TF/s':>9} {'bwd TF/s':>9} {'fwd/hk':>7} {'bwd/hk':>7} {'density':>8}")


def _fmt(row) -> str:
    d, pname, n, name, f, b, tf, tb, rf, rb, dens = row
    num = lambda x, w, p: f"{x:>{w}.{p}f}" if x is not None and x == x else f"{'-':>{w}}"  # noqa: E731
    return (f"{d:>4} {pname:<15} {n:>6} {name:<10} {num(f, 9, 3)} {num(b, 9, 3)} "
            f"{num(tf, 9, 1)} {num(tb, 9, 1)} {num(rf, 7, 2)} {num(rb, 7, 2)} {dens:>8.4f}")


if __name__ == "__main__":
    sys.exit(main())
