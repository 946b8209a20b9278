"""The Triton kernels compile for an H100 (sm_90) without a GPU: ahead-of-time compilation of
the launches the backend makes (captured instead of run), through triton.compile with the
bundled ptxas. Catches GPU-only compile errors (types, shapes, shared memory) in CI, where the
kernels otherwise only run under the interpreter. First autotune config of each kernel only."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from hybrid_kernels.api import plan  # noqa: E402
from hybrid_kernels.backends.triton import TritonBackend  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="kernels are interpreted in this process")

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
        torch.int8: "*i8", torch.int64: "*i64"}


def _captured_launches(run):
    """[(kernel, args, kwargs)] of every kernel launch ``run()`` makes, none executed."""
    from hybrid_kernels import triton_kernels
    kern = triton_kernels.load()
    calls, saved = [], []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    for mod, name in ((kern.forward, "_fwd_kernel"), (kern.backward, "_bwd_dq_kernel"),
                      (kern.backward, "_bwd_dkdv_kernel"), (kern.quantize, "_quantize_kernel")):
        saved.append((mod, name, getattr(mod, name)))
        setattr(mod, name, Capture(getattr(mod, name)))
    try:
        run()
    finally:
        for mod, name, kernel in saved:
            setattr(mod, name, kernel)
    return calls


def _compile_sm90(kernel, args, kwargs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    jit = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap triton.autotune
    options, constants = {}, dict(kwargs)
    if hasattr(kernel, "configs"):
        cfg = kernel.configs[0]
        constants.update(cfg.kwargs)
        options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    signature, constexprs = {}, {}
    for param, name in zip(jit.params, jit.arg_names):
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", constants[name]
            continue
        arg = args[param.num]
        if isinstance(arg, torch.Tensor):
            signature[name] = _PTR[arg.dtype]
        elif isinstance(arg, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return triton.compile(ASTSource(jit, signature, constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def test_kernels_compile_for_sm90():
    backend = TritonBackend()
    B, Hq, Hk, N, D = 1, 2, 1, 4096, 64  # N large enough for the split landmark pass
    q, k, v = (torch.randn(B, h, N, D, dtype=torch.float16) for h in (Hq, Hk, Hk))
    kpm = torch.ones(B, N, dtype=torch.bool)
    pattern, _ = plan(q, k, v, window=(256, 0), landmarks=16, causal=True, key_padding_mask=kpm)
    out, lse = torch.zeros_like(q), torch.zeros(B, Hq, N)
    launches = _captured_launches(lambda: backend.forward(q, k, v, pattern, None))
    launches += _captured_launches(lambda: backend.backward(q, q, k, v, out, lse, pattern))
    launches += _captured_launches(lambda: backend.forward(q, k, v, pattern, "int8")[0])
    # score modifiers (SOFTCAP, HAS_BIAS, and BIAS_GRAD's atomic adds into dbias)
    mods, _ = plan(q, k, v, window=(256, 0), landmarks=16, causal=True, softcap=30.0,
                   position_bias=torch.zeros(Hq, 2 * N - 1))
    launches += _captured_launches(lambda: backend.forward(q, k, v, mods, None))
    launches += _captured_launches(lambda: backend.backward(q, q, k, v, out, lse, mods,
                                                            bias_grad=True))
    launches += _captured_launches(lambda: backend.forward(q, k, v, mods, "int8")[0])
    seen = set()
    for kernel, args, kwargs in launches:
        jit = kernel.fn if hasattr(kernel, "configs") else kernel
        key = (jit.__name__, tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = _compile_sm90(kernel, args, kwargs)
        assert compiled.asm.get("cubin"), key
        if jit.__name__ == "_quantize_kernel":
            # The one int8 definition (quant.py): IEEE divisions for the scale and its inverse,
            # rint (ties to even) for the integers, and no multiply-add contracted into an fma
            # (that would skip the product's fp32 rounding): bit-equal to quant.quantize_qk.
            ptx = compiled.asm["ptx"]
            assert "cvt.rni.f32.f32" in ptx and "div.rn.f32" in ptx, key
            assert "div.full" not in ptx and "div.approx" not in ptx and "fma." not in ptx, key
    names = {name for name, _ in seen}
    assert names == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_quantize_kernel"}
    assert len(seen) >= 17  # regular + split landmark launches, fp16, int8, score modifiers
