"""Every backend that runs here, checked against the float64 oracle: forward, lse, backward,
int8, determinism, strides. Backends the build must provide fail (not skip) when unusable."""
from __future__ import annotations

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.dispatch import get_backend

from cases import CASES, FAST_CASES, ref_kwargs
from oracle import assert_matches_oracle, max_err, reference_grads, reference_pair, tolerance

BACKENDS = ["cpu", "reference"]


def _require(backend: str) -> None:
    reason = get_backend(backend).unavailable_reason()
    assert reason is None, f"backend {backend!r} must be usable in this build: {reason}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_fp32(backend, case):
    _require(backend)
    q, k, v, pattern = case.make(torch.float32)
    out, lse = hk.attention(q, k, v, **pattern, return_lse=True, backend=backend)
    (o64, l64), (o32, l32) = reference_pair(q, k, v, **ref_kwargs(pattern, q, k))
    assert out.dtype == q.dtype and out.shape == o64.shape
    assert_matches_oracle("out", out, o64, o32)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse must be -inf exactly for rows that see nothing"
    assert_matches_oracle("lse", lse, l64, l32)
    if case.empty_rows:
        assert torch.all(out[-1] == 0), "rows that see no key must output zeros"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: c.id)
def test_forward_half(backend, dtype, case):
    _require(backend)
    q, k, v, pattern = case.make(dtype)
    out = hk.attention(q, k, v, **pattern, backend=backend)
    (o64, _), (o_half, _) = reference_pair(q, k, v, **ref_kwargs(pattern, q, k))
    assert out.dtype == dtype
    assert_matches_oracle("out", out, o64, o_half)


BACKWARD_PARAMS = (
    [(c, torch.float32) for c in FAST_CASES + [c for c in CASES if c.id == "n1025_d64_causal_pad"]]
    + [(c, torch.bfloat16) for c in FAST_CASES])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", BACKWARD_PARAMS, ids=lambda x: getattr(x, "id", str(x)))
def test_backward(backend, case, dtype):
    _require(backend)
    q, k, v, pattern = case.make(dtype, requires_grad=True)
    out = hk.attention(q, k, v, **pattern, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw = ref_kwargs(pattern, q, k)
    oracle = reference_grads(q, k, v, dout, torch.float64, **kw)
    baseline = reference_grads(q, k, v, dout, dtype, **kw)
    for name, g, g64, gb in zip(("dq", "dk", "dv"), grads, oracle, baseline):
        assert g.dtype == dtype and g.shape == g64.shape
        assert_matches_oracle(name, g, g64, gb, depth=case.D)
    if case.empty_rows:
        assert torch.all(grads[0][-1] == 0), "rows that see no key get zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    _require(backend)
    case = CASES[0]
    q, k, v, pattern = case.make(torch.float32, requires_grad=True)

    def run():
        out = hk.attention(q, k, v, **pattern, backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b), "two runs must be bit-equal"


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_inputs(backend):
    """(B, N, H, D) layouts viewed as (B, H, N, D), and K/V expanded over heads, just work."""
    _require(backend)
    B, N, H, D = 2, 97, 4, 32
    q = torch.randn(B, N, H, D).transpose(1, 2)
    k = torch.randn(B, N, 1, D).transpose(1, 2).expand(B, H, N, D)
    v = torch.randn(B, N, H, 2 * D)[..., ::2].transpose(1, 2)  # last dim strided
    out = hk.attention(q, k, v, window=(7, 7), landmarks=13, backend=backend)
    ref = hk.attention(q.contiguous(), k.contiguous(), v.contiguous(), window=(7, 7),
                       landmarks=13, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_accuracy(backend):
    """quant="int8" vs the fp32 result on Gaussian inputs: cosine >= 0.999, rel-L1 <= 0.02."""
    _require(backend)
    q, k, v = (torch.randn(2, 4, 513, 64) for _ in range(3))
    k = k + 3.0  # a large shared offset: K smoothing must remove it
    for pattern in (dict(window=(64, 64), landmarks=32), dict(causal=True), dict()):
        out, lse = hk.attention(q, k, v, **pattern, quant="int8", return_lse=True, backend=backend)
        ref, ref_lse = hk.attention(q, k, v, **pattern, return_lse=True, backend="reference")
        assert (lse - ref_lse).abs().max() < 0.05, "int8 lse is that of the exact scores"
        cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
        rel_l1 = (out - ref).abs().sum() / ref.abs().sum()
        assert cos >= 0.999 and rel_l1 <= 0.02, (pattern, float(cos), float(rel_l1))
    assert torch.equal(k, k.clone()), "the caller's K is never mutated"


def assert_int8_matches_emulation(name, out, q, k, v, pattern):
    """The int8 kernel vs the exact int8 emulation (float64 PV), within twice the error of the
    bf16-PV emulation (the kernels' PV precision, output rounded to the output dtype like the
    kernel's) plus fp32 rounding."""
    from hybrid_kernels.quant import int8_reference
    kw = ref_kwargs(pattern, q, k)
    emu64, _ = int8_reference(q, k, v, **kw, pv_dtype=torch.float64)
    emu_bf16, _ = int8_reference(q, k, v, **kw, pv_dtype=torch.bfloat16)
    emu_bf16 = emu_bf16.to(out.dtype)
    assert_matches_oracle(name, out, emu64, emu_bf16, depth=q.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int8_cpu_matches_int8_emulation(dtype):
    """The CPU int8 kernel computes the quantized scores of the torch emulation and its bf16 PV."""
    _require("cpu")
    case = CASES[0]
    q, k, v, pattern = case.make(dtype)
    out = hk.attention(q, k, v, **pattern, quant="int8", backend="cpu")
    assert out.dtype == dtype
    assert_int8_matches_emulation(f"int8 {dtype}", out, q, k, v, pattern)


INT8_ISA_CASES = [c for c in CASES if c.id in {
    "odd_D59_gqa_window_lm_pad", "causal_window_stride", "nq_gt_nk_negative_rows",
    "n1025_d64_causal_pad", "full_mqa_d128", "left_only_unlimited_right", "single_query",
    "empty_rows"}]


@pytest.mark.parametrize("case", INT8_ISA_CASES, ids=lambda c: c.id)
def test_int8_every_isa_agrees(monkeypatch, case):
    """quant="int8" forced onto each instruction set this CPU has (amx, avx512, avx2, scalar):
    every one matches the int8 emulation, gives bit-equal results on 1 and 3 threads, and any two
    differ by at most that same bound (outputs are NaN-poisoned first, so unwritten elements
    show)."""
    _require("cpu")
    from hybrid_kernels.backends.cpu import load_module
    mod = load_module()
    q, k, v, pattern = case.make(torch.float32)
    outs, lses = {}, {}
    for isa in ("amx", "avx512", "avx2", "scalar"):
        monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", isa)
        try:
            assert mod.selected_isa() == isa
        except ValueError:  # this CPU lacks it
            continue
        outs[isa], lses[isa] = hk.attention(q, k, v, **pattern, quant="int8", backend="cpu",
                                            return_lse=True)
        assert_int8_matches_emulation(f"int8 {isa}", outs[isa], q, k, v, pattern)
        for threads in ("1", "3"):
            monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", threads)
            out_t, lse_t = hk.attention(q, k, v, **pattern, quant="int8", backend="cpu",
                                        return_lse=True)
            assert torch.equal(out_t, outs[isa]) and torch.equal(lse_t, lses[isa]), \
                f"int8 {isa}: {threads} thread(s) changed the result"
        monkeypatch.delenv("HYBRID_KERNELS_NUM_THREADS")
    if "amx" in lses and "avx512" in lses:
        # Same fp32 scores (exact int32 dot products times the same scale products); the two cores
        # differ in the exp2 polynomial, the max rule and the key tiling (test_int8_amx_driver.py
        # derives this bound).
        from test_int8_amx_driver import _lse_tolerance
        a, b = lses["amx"], lses["avx512"]
        assert torch.equal(torch.isinf(a), torch.isinf(b)), "amx and avx512: the same empty rows"
        fin = torch.isfinite(b)
        assert torch.all((a - b)[fin].abs() <= _lse_tolerance(b[fin])), "amx and avx512 QK must agree"
    monkeypatch.delenv("HYBRID_KERNELS_CPU_ISA")
    if mod.selected_isa() in outs:
        assert torch.equal(hk.attention(q, k, v, **pattern, quant="int8", backend="cpu"),
                           outs[mod.selected_isa()]), "the default ISA is one of those forced"
    from hybrid_kernels.quant import int8_reference
    emu_bf16, _ = int8_reference(q, k, v, **ref_kwargs(pattern, q, k))
    emu64, _ = int8_reference(q, k, v, **ref_kwargs(pattern, q, k), pv_dtype=torch.float64)
    tol = tolerance(max_err(emu_bf16, emu64), emu64, depth=case.D)
    names = list(outs)
    for a, b in zip(names, names[1:]):
        err = max_err(outs[a], outs[b])
        assert err <= tol, f"int8 {a} vs {b}: max difference {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_backward_is_exact(backend):
    _require(backend)
    q, k, v, pattern = CASES[1].make(torch.float32, requires_grad=True)
    out = hk.attention(q, k, v, **pattern, quant="int8", backend=backend)
    g8 = torch.autograd.grad(out.sum(), (q, k, v))
    out = hk.attention(q, k, v, **pattern, backend=backend)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g8, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_without_crash(backend):
    _require(backend)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    q[0, 0, 10] = float("nan")
    k[0, 1, 40] = float("inf")
    out = hk.attention(q, k, v, window=(4, 4), backend=backend)
    assert torch.isnan(out[0, 0, 10]).all(), "a NaN query row propagates like SDPA"
    assert torch.isfinite(out[0, 0, :5]).all() and torch.isfinite(out[0, 1, :30]).all(), \
        "rows that do not see the bad elements stay finite"


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_gradient(backend):
    """Gradients through return_lse (used by users merging partial attentions) are exact."""
    _require(backend)
    q, k, v, pattern = CASES[1].make(torch.float32, requires_grad=True)
    out, lse = hk.attention(q, k, v, **pattern, return_lse=True, backend=backend)
    loss = out.square().sum() + lse.sum()
    g = torch.autograd.grad(loss, (q, k, v))
    kw = ref_kwargs(pattern, q, k)
    from hybrid_kernels.reference import dense_reference
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    o64, l64 = dense_reference(q64, k64, v64, compute_dtype=torch.float64, **kw)
    g64 = torch.autograd.grad(o64.square().sum() + l64.sum(), (q64, k64, v64))
    for a, b in zip(g, g64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id in {
    "odd_D59_gqa_window_lm_pad", "nq_gt_nk_negative_rows", "n1025_d64_causal_pad"}], ids=lambda c: c.id)
def test_cpu_lower_isas(monkeypatch, isa, case):
    """The AVX2 and portable paths (selected at run time) agree with the oracle too."""
    _require("cpu")
    from hybrid_kernels.backends.cpu import load_module
    if not load_module().cpu_features()["avx2"] and isa == "avx2":
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", isa)
    assert load_module().selected_isa() == isa
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, pattern = case.make(dtype, requires_grad=True)
        out = hk.attention(q, k, v, **pattern, backend="cpu")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        kw = ref_kwargs(pattern, q, k)
        (o64, _), (o_base, _) = reference_pair(q.detach(), k.detach(), v.detach(), **kw)
        assert_matches_oracle(f"{isa} {dtype} out", out, o64, o_base)
        oracle = reference_grads(q, k, v, dout, torch.float64, **kw)
        baseline = reference_grads(q, k, v, dout, dtype, **kw)
        for name, g, g64, gb in zip(("dq", "dk", "dv"), grads, oracle, baseline):
            assert_matches_oracle(f"{isa} {dtype} {name}", g, g64, gb, depth=case.D)
    q, k, v, pattern = case.make(torch.float32)
    out = hk.attention(q, k, v, **pattern, quant="int8", backend="cpu")
    assert_int8_matches_emulation(f"{isa} int8", out, q, k, v, pattern)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_thread_counts_agree(monkeypatch, dtype):
    """1, 2 and 3 threads give the same result (static partition, fixed summation order). The
    landmark query rows are accumulated per segment of the window pass (17 segments here, split
    differently between the threads) and merged in a fixed order."""
    _require("cpu")
    q, k, v, pattern = CASES[4].make(dtype)
    outs = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
        outs.append(hk.attention(q, k, v, **pattern, backend="cpu", return_lse=True))
    for a, b in zip(outs, outs[1:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_many_landmarks_and_landmark_rows():
    """More landmarks than one tile (> 64) and many landmark query rows."""
    _require("cpu")
    q, k, v = (torch.randn(2, 2, 300, 32) for _ in range(3))
    lm = torch.stack([torch.randperm(300)[:150].sort().values for _ in range(2)])
    for causal in (False, True):
        out = hk.attention(q, k, v, window=(5, 3), landmarks=lm, causal=causal, backend="cpu")
        ref = hk.attention(q, k, v, window=(5, 3), landmarks=lm, causal=causal, backend="reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
