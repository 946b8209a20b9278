"""A few small calls of every GPU kernel, for compute-sanitizer (scripts/gpu_check.sh).

Each case runs the CUDA backend and the Triton backend where they accept the inputs (forward;
Triton also backward) and compares with the reference on the same device. Exits non-zero when a
backend that accepted a case gives a wrong result.
"""
import sys

import torch

import hybrid_kernels as hk

CASES = [
    # (B, Hq, Hk, Nq, Nk, D, window, landmarks, causal, padded)
    (1, 2, 1, 97, 97, 64, (16, 16), 16, False, True),
    (2, 4, 2, 33, 130, 128, (8, 0), None, True, False),
    (1, 2, 2, 1, 300, 64, None, None, False, True),  # decode
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    failures = 0
    for B, Hq, Hk, Nq, Nk, D, window, landmarks, causal, padded in CASES:
        q = torch.randn(B, Hq, Nq, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, Hk, Nk, D, device="cuda", dtype=torch.float16)
        v = torch.randn(B, Hk, Nk, D, device="cuda", dtype=torch.float16)
        kpm = None
        if padded:
            kpm = torch.ones(B, Nk, dtype=torch.bool, device="cuda")
            kpm[-1, Nk // 2:] = False
        kw = dict(window=window, landmarks=landmarks, causal=causal, key_padding_mask=kpm)
        ref = hk.attention(q.float(), k.float(), v.float(), backend="reference", **kw)
        for backend in ("cuda", "triton"):
            for quant in (None, "int8"):
                try:
                    out = hk.attention(q, k, v, backend=backend, quant=quant, **kw)
                except hk.NoBackendError as exc:
                    print(f"{backend} quant={quant} D={D} Nq={Nq}: declined ({str(exc).splitlines()[0][:80]})")
                    continue
                torch.cuda.synchronize()
                err = (out.float() - ref).abs().max().item()
                bound = 0.1 if quant else 1e-2
                ok = err <= bound
                failures += not ok
                print(f"{backend} quant={quant} D={D} Nq={Nq} Nk={Nk}: max err {err:.2e} "
                      f"{'ok' if ok else 'WRONG'}")
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        hk.attention(qg, kg, vg, backend="triton", **kw).float().sum().backward()
        torch.cuda.synchronize()
        print(f"triton backward D={D} Nq={Nq}: finite={bool(torch.isfinite(qg.grad).all())}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
