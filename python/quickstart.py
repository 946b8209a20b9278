"""Quick start: hybrid attention on a long sequence against PyTorch's SDPA.

Runs hk.attention (window (256, 256) + 16 landmarks) and SDPA with the equivalent boolean mask
on one long sequence, and prints the time of each, the speedup and the max error.

    python python/quickstart.py [--n 8192] [--dtype float32]
"""
import argparse
import time

import torch
import torch.nn.functional as F

import hybrid_kernels as hk
from hybrid_kernels.reference import visibility_mask


def bench(fn, repeats=5):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="sequence length")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.n, args.dim, dtype=dtype) for _ in range(3))
    landmarks = torch.linspace(0, args.n - 1, 16).long().unique()
    pattern = dict(window=(256, 256), landmarks=landmarks)
    mask = visibility_mask(1, args.n, args.n, window_left=256, window_right=256, causal=False,
                           landmarks=landmarks[None], key_padding_mask=None)
    backend = hk.select_backend(hk.dispatch.Problem.from_inputs(
        q, v, hk.plan(q, k, v, **pattern)[0], None, False)).name
    with torch.inference_mode():
        out = hk.attention(q, k, v, **pattern)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        t_hk = bench(lambda: hk.attention(q, k, v, **pattern))
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    err = (out.float() - ref.float()).abs().max().item()
    print(f"N={args.n} H={args.heads} D={args.dim} {args.dtype}, window (256,256) + {landmarks.numel()} landmarks, "
          f"{torch.get_num_threads()} threads")
    print(f"hk.attention [{backend}]: {t_hk * 1e3:8.1f} ms")
    print(f"SDPA + bool mask      : {t_sdpa * 1e3:8.1f} ms")
    print(f"speedup {t_sdpa / t_hk:.1f}x, max |hk - sdpa| = {err:.2e}")


if __name__ == "__main__":
    main()
