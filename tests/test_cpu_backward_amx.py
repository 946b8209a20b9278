"""The AMX build of the CPU backward (bf16 inputs, products on AMX tiles; D or Dv not a multiple
of 32 falls back to the avx512 build), forced with HYBRID_KERNELS_CPU_ISA=amx: gradients against
the float64 oracle, determinism across runs and thread counts, agreement with the avx512 build."""
from __future__ import annotations

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.backends.cpu import load_module

from cases import CASES, FAST_CASES, Case, ref_kwargs
from oracle import assert_matches_oracle, max_err, reference_grads, tolerance

# Shapes that reach the AMX tile step and its edges: D = 32 / 64 / 128, partial 64-row query
# blocks and 64-key tiles (N = 1025, Nq != Nk, a single query), landmark key tiles and landmark
# query rows, causal, padding, GQA / MQA, Dv != D, plus shapes the tiles cannot take (fallback).
AMX_BWD_CASES = FAST_CASES + [c for c in CASES if c.id in {
    "n1025_d64_causal_pad", "full_mqa_d128", "single_query"}] + [
    Case("amxb_d64_n1025_window_lm", Hq=4, Hk=2, Nq=1025, Nk=1025, D=64, window=(100, 37),
         landmarks=50),
    Case("amxb_d128_causal_nq_lt_nk", Nq=200, Nk=333, D=128, window=(40, 0), landmarks="shared",
         G=70, causal=True),
    Case("amxb_d64_gqa_pad_many_lm", B=2, Hq=4, Hk=1, Nq=300, Nk=300, D=64, window=(5, 5),
         landmarks="per_batch", G=90, padding=True),
    Case("amxb_d64_nq_gt_nk", Nq=150, Nk=70, D=64, window=(3, 3), landmarks="per_batch", G=9,
         padding=True),
    Case("amxb_d32_dv64_full_pad", Nq=130, Nk=130, D=32, Dv=64, padding=True),
    Case("amxb_d64_empty_rows", B=2, D=64, window=(0, 0), empty_rows=True),
    Case("amxb_fallback_d64_dv48", Nq=100, Nk=100, D=64, Dv=48, window=(10, 10), landmarks=8),
]


def _force_amx(monkeypatch) -> None:
    f = load_module().cpu_features()
    if not (f["amx_tile"] and f["amx_bf16"]):
        pytest.skip("this CPU has no AMX (amx_tile / amx_bf16): the AMX backward cannot run here")
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", "amx")
    assert load_module().selected_isa() == "amx"


def _grads(q, k, v, dout, pattern):
    out = hk.attention(q, k, v, **pattern, backend="cpu")
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("case", AMX_BWD_CASES, ids=lambda c: c.id)
def test_amx_backward_matches_oracle(monkeypatch, case):
    _force_amx(monkeypatch)
    q, k, v, pattern = case.make(torch.bfloat16, requires_grad=True)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.Dv or case.D).bfloat16()
    grads = _grads(q, k, v, dout, pattern)
    kw = ref_kwargs(pattern, q, k)
    oracle = reference_grads(q, k, v, dout, torch.float64, **kw)
    baseline = reference_grads(q, k, v, dout, torch.bfloat16, **kw)
    for name, g, g64, gb in zip(("dq", "dk", "dv"), grads, oracle, baseline):
        assert g.dtype == torch.bfloat16 and g.shape == g64.shape
        assert_matches_oracle(f"amx {name}", g, g64, gb, depth=case.D)
    if case.empty_rows:
        assert torch.all(grads[0][-1] == 0), "rows that see no key get zero gradient"


@pytest.mark.parametrize("case", [c for c in AMX_BWD_CASES if c.id in {
    "n1025_d64_causal_pad", "amxb_d128_causal_nq_lt_nk", "amxb_d64_gqa_pad_many_lm",
    "decode_like_nq_lt_nk"}], ids=lambda c: c.id)
def test_amx_backward_agrees_with_avx512(monkeypatch, case):
    """Both builds round P and dS to bf16 and accumulate in fp32: they differ by accumulation
    order only, far inside the oracle tolerance."""
    _force_amx(monkeypatch)
    q, k, v, pattern = case.make(torch.bfloat16, requires_grad=True)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.Dv or case.D).bfloat16()
    amx = _grads(q, k, v, dout, pattern)
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", "avx512")
    avx512 = _grads(q, k, v, dout, pattern)
    kw = ref_kwargs(pattern, q, k)
    oracle = reference_grads(q, k, v, dout, torch.float64, **kw)
    baseline = reference_grads(q, k, v, dout, torch.bfloat16, **kw)
    for name, a, b, g64, gb in zip(("dq", "dk", "dv"), amx, avx512, oracle, baseline):
        tol = tolerance(max_err(gb, g64), g64, case.D)
        diff = max_err(a, b)
        assert diff <= tol, f"{name}: amx vs avx512 differ by {diff:.3e} > {tol:.3e}"


def test_amx_backward_deterministic_across_runs_and_threads(monkeypatch):
    """Bit-identical across runs and for 1, 2 and 3 threads. B * Hk = 4 work items, at least one
    per thread: with fewer items than threads dK / dV are split into per-thread partials, whose
    sum depends on the thread count (as in every build)."""
    _force_amx(monkeypatch)
    case = Case("amxb_det", B=2, Hq=4, Hk=2, Nq=333, Nk=333, D=64, window=(40, 20),
                landmarks="per_batch", G=70, causal=True, padding=True)
    q, k, v, pattern = case.make(torch.bfloat16, requires_grad=True)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D).bfloat16()
    runs = []
    for n in ("1", "2", "3", "2"):
        monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
        runs.append(_grads(q, k, v, dout, pattern))
    for other in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], other):
            assert torch.equal(a, b), f"{name} differs between runs / thread counts"


def test_amx_backward_dq_deterministic_with_split_items(monkeypatch):
    """One work item over 1, 2, 3 threads (query blocks split across threads): dQ never depends
    on the split; dK / dV agree to the oracle tolerance."""
    _force_amx(monkeypatch)
    case = [c for c in CASES if c.id == "n1025_d64_causal_pad"][0]
    q, k, v, pattern = case.make(torch.bfloat16, requires_grad=True)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D).bfloat16()
    runs = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
        runs.append(_grads(q, k, v, dout, pattern))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][0], runs[2][0])
    assert torch.equal(_grads(q, k, v, dout, pattern)[1], runs[2][1]), "same thread count, same dK"


def _fp32_accumulated_grads(q, k, v, dout, pattern):
    """The CPU backward of bf16/fp16 inputs with its fp32 accumulators returned unrounded
    (grad_dtype F32), through the module directly."""
    from hybrid_kernels.api import plan
    from hybrid_kernels.backends import cpu as cpu_backend
    from hybrid_kernels.backends._params import Keep, fill_params, strides3
    mod = load_module()
    pat, _ = plan(q, k, v, **pattern)
    out, lse = cpu_backend.CpuBackend().forward(q, k, v, pat, None)
    keep = Keep()
    params = mod.AttnBwdParams()
    fwd = params.fwd
    fill_params(mod, fwd, q, k, v, out, lse, pat, keep)
    fwd.num_threads = cpu_backend.num_threads()
    params.fwd = fwd
    params.dout, params.dout_stride = keep(dout), strides3(dout)
    grads = [torch.full(t.shape, float("nan")) for t in (q, k, v)]
    params.dq, params.dk, params.dv = (keep(g) for g in grads)
    mod.attention_backward(params)
    return grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2", "scalar"])
def test_low_precision_grads_are_the_fp32_accumulators_rounded_once(monkeypatch, isa, dtype):
    """For bf16/fp16 inputs the kernel writes dQ/dK/dV in the input dtype itself: each is its
    fp32 accumulator rounded to nearest even, bit for bit what torch's conversion gives (NaN
    poisoned outputs first: every element is written)."""
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", isa)
    try:
        load_module().selected_isa()
    except ValueError:
        pytest.skip(f"this CPU has no {isa}")
    for case in (CASES[0], CASES[4]):  # D=59 GQA padding per-batch landmarks; N=1025 causal
        q, k, v, pattern = case.make(dtype, requires_grad=True)
        out = hk.attention(q, k, v, **pattern, backend="cpu")
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), dout)
        want = _fp32_accumulated_grads(q.detach(), k.detach(), v.detach(), dout, pattern)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert g.dtype == dtype
            assert torch.equal(g, w.to(dtype)), f"{isa} {dtype} {name}"
