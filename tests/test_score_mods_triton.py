"""Triton backend with score modifiers (softcap, offset bias table; sinks through the public API):
forward, lse, backward and dbias against the float64 oracle, with the tolerances of oracle.py.

Runs under TRITON_INTERPRET=1 on CPU tensors (in a child pytest process unless this process
already interprets, as tests/test_triton.py explains) and, when CUDA is there, compiled on the
GPU. Sizes are small: the interpreter is slow.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.api import plan
from hybrid_kernels.backends.triton import TritonBackend
from hybrid_kernels.dispatch import Problem
from hybrid_kernels.reference import blocked_reference_backward, dense_reference

from cases import Case
from oracle import assert_matches_oracle
from triton_child import interpreting_in_process, run_in_interpreter

triton = pytest.importorskip("triton")


INTERPRETING = interpreting_in_process()
DEVICES = ["interpreter"] if INTERPRETING else ["cuda"]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "interpreter":
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return "cuda"


@pytest.mark.skipif(INTERPRETING, reason="this process is the interpreter run itself")
def test_interpreter_runs():
    """Every kernel test of this file under TRITON_INTERPRET=1, in a child pytest process."""
    run_in_interpreter(__file__)


# (geometry, modifiers): softcap c, "bias" = a random position_bias table, "alibi" = slopes.
MOD_CASES = [
    (Case("softcap_gqa_window_lm_pad_d59", B=2, Hq=4, Hk=2, Nq=61, Nk=61, D=59, window=(8, 5),
          landmarks="per_batch", padding=True), dict(softcap=1.0)),
    (Case("bias_causal_window_wider_than_n", Hq=2, Hk=1, Nq=70, Nk=70, window=(100, 0),
          landmarks="shared", G=3, causal=True), dict(bias=True)),
    (Case("both_nq_lt_nk_causal", Nq=40, Nk=97, window=(10, -1), landmarks="shared",
          causal=True), dict(softcap=2.0, bias=True, alibi=True)),
    (Case("both_nq_gt_nk_pad", B=2, Nq=70, Nk=40, window=(3, 3), landmarks="per_batch",
          padding=True), dict(softcap=1.5, bias=True)),
    (Case("both_n97_d59_stride", Hq=2, Hk=1, Nq=97, Nk=97, D=59, window=(16, 16),
          landmarks=10), dict(softcap=1.0, bias=True)),
    (Case("bias_full_mqa", Hq=4, Hk=1, Nq=45, Nk=45, D=32), dict(alibi=True, bias=True)),
    (Case("both_empty_rows", B=2, Nq=33, Nk=33, window=(0, 0), empty_rows=True),
     dict(softcap=1.0, bias=True)),
]
HALF_IDS = {"softcap_gqa_window_lm_pad_d59", "both_nq_gt_nk_pad"}


def _mods(case: Case, mods: dict, device, requires_grad: bool) -> dict:
    g = torch.Generator().manual_seed(zlib.crc32(("mods" + case.id).encode()))
    out = {}
    if "softcap" in mods:
        out["softcap"] = mods["softcap"]
    if mods.get("bias"):
        pb = torch.randn(case.Hq, case.Nq + case.Nk - 1, generator=g)
        out["position_bias"] = pb.to(device).requires_grad_(requires_grad)
    if mods.get("alibi"):
        slopes = 2.0 ** -torch.arange(1, case.Hq + 1, dtype=torch.float32)
        out["alibi_slopes"] = slopes.to(device)
    return out


def _inputs(case, mods, dtype, device):
    q, k, v, pattern = case.make(dtype)
    q, k, v = (t.to(device).requires_grad_(True) for t in (q, k, v))
    pattern = {name: (x.to(device) if isinstance(x, torch.Tensor) else x)
               for name, x in pattern.items()}
    return q, k, v, pattern, _mods(case, mods, device, requires_grad=True)


def _references(q, k, v, dout, kwargs, compute_dtype):
    """dense_reference forward and blocked_reference_backward (dq, dk, dv, dbias) in
    ``compute_dtype`` (float64: the oracle; the input dtype: the same-precision baseline)."""
    cast = (lambda t: t.double()) if compute_dtype == torch.float64 else (lambda t: t)
    q, k, v, dout = (cast(t) for t in (q, k, v, dout))
    out, lse = dense_reference(q, k, v, compute_dtype=compute_dtype, **kwargs)
    grads = blocked_reference_backward(dout, q, k, v, lse, bias_grad=True,
                                       compute_dtype=compute_dtype, **kwargs)
    return out, lse, grads


CASES_DTYPES = [(c, m, torch.float32) for c, m in MOD_CASES] + [
    (c, m, dt) for c, m in MOD_CASES if c.id in HALF_IDS for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("case,mods,dtype", CASES_DTYPES,
                         ids=[f"{c.id}-{str(dt)[6:]}" for c, _, dt in CASES_DTYPES])
def test_forward_backward_dbias(device, case, mods, dtype):
    q, k, v, pattern, mod_kw = _inputs(case, mods, dtype, device)
    out, lse = hk.attention(q, k, v, **pattern, **mod_kw, return_lse=True, backend="triton")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    wrt = (q, k, v) + ((mod_kw["position_bias"],) if "position_bias" in mod_kw else ())
    grads = [g.detach().cpu() for g in torch.autograd.grad(out, wrt, dout.to(device))]
    out, lse = out.detach().cpu(), lse.detach().cpu()
    q, k, v = (t.detach().cpu() for t in (q, k, v))
    cpu_kw = {n: (x.detach().cpu() if isinstance(x, torch.Tensor) else x)
              for n, x in mod_kw.items()}
    p, _ = plan(q, k, v, **{n: (x.cpu() if isinstance(x, torch.Tensor) else x)
                            for n, x in pattern.items()}, **cpu_kw)
    kwargs = p.reference_kwargs()
    o64, l64, g64 = _references(q, k, v, dout, kwargs, torch.float64)
    ob, lb, gb = _references(q, k, v, dout, kwargs, dtype)

    assert out.dtype == dtype and out.shape == o64.shape
    assert_matches_oracle("out", out, o64, ob, depth=case.D)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse is -inf exactly for empty rows"
    assert_matches_oracle("lse", lse, l64, lb.float(), depth=case.D)
    assert torch.all(out[torch.isinf(l64)] == 0), "rows that see no key output zeros"
    for name, g, r64, rb in zip(("dq", "dk", "dv"), grads, g64, gb):
        assert g.dtype == dtype and g.shape == r64.shape
        assert_matches_oracle(name, g, r64, rb, depth=case.D)
    if "position_bias" in mod_kw:
        dbias = grads[3]
        assert dbias.shape == (case.Hq, case.Nq + case.Nk - 1)
        # dbias sums up to B * Nq products of D-long dot products per offset
        assert_matches_oracle("dbias", dbias, g64[3], gb[3], depth=case.D + case.B * case.Nq)
    if case.empty_rows:
        assert torch.all(grads[0][-1] == 0), "rows that see no key get zero gradient"


def test_backend_backward_returns_dbias(device):
    """TritonBackend.backward: dbias (Hq, Nq + Nk - 1) fp32 iff bias_grad and there is a bias."""
    case, mods = MOD_CASES[3]
    q, k, v, pattern, mod_kw = _inputs(case, mods, torch.float32, device)
    backend = TritonBackend()
    with torch.no_grad():
        p, _ = plan(q, k, v, **pattern, **{n: (x.detach() if isinstance(x, torch.Tensor) else x)
                                           for n, x in mod_kw.items()})
        out, lse = backend.forward(q, k, v, p, None)
        dout = torch.randn_like(out)
        dq, dk, dv, dbias = backend.backward(dout, q, k, v, out, lse, p, bias_grad=True)
        assert dbias.dtype == torch.float32 and dbias.shape == (case.Hq, case.Nq + case.Nk - 1)
        again = backend.backward(dout, q, k, v, out, lse, p)
        assert again[3] is None
        for a, b in zip((dq, dk, dv), again[:3]):
            assert torch.equal(a, b), "dq, dk, dv stay deterministic with a bias"
        torch.testing.assert_close(backend.backward(dout, q, k, v, out, lse, p,
                                                   bias_grad=True)[3], dbias)
        no_bias = plan(q, k, v, **pattern, softcap=1.0)[0]
        assert backend.backward(dout, q, k, v, out, lse, no_bias, bias_grad=True)[3] is None


def _api_oracle(q, k, v, pattern, softcap, pb, slopes, sinks, dout):
    """float64 forward and autograd gradients of the public contract, sinks included."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, pb, slopes, sinks)]
    q64, k64, v64, pb64, sl64, sk64 = leaves
    Nq, Nk = q.shape[2], k.shape[2]
    offsets = torch.arange(-(Nk - 1), Nq, dtype=torch.float64)
    bias = pb64 - sl64[:, None] * offsets.abs()[None, :]
    p, _ = plan(q, k, v, **pattern, softcap=softcap)
    kwargs = dict(p.reference_kwargs(), bias=bias)
    out, lse = dense_reference(q64, k64, v64, compute_dtype=torch.float64, **kwargs)
    new_lse = torch.logaddexp(lse, sk64[None, :, None])
    out = out * torch.exp(lse - new_lse)[..., None]
    return out, torch.autograd.grad(out, leaves, dout.double())


def test_public_api_with_sinks_and_autograd(device):
    """hk.attention(softcap, position_bias, alibi_slopes, sinks) on the triton backend, with
    autograd into every input, against the float64 oracle; baseline: backend="reference"."""
    case = Case("api_all_mods", B=2, Hq=4, Hk=2, Nq=50, Nk=57, D=40, window=(6, 9),
                landmarks="per_batch", G=3, causal=True, padding=True)
    q, k, v, pattern = case.make(torch.float32)
    g = torch.Generator().manual_seed(11)
    pb = torch.randn(case.Hq, case.Nq + case.Nk - 1, generator=g)
    slopes = torch.rand(case.Hq, generator=g) * 0.3
    sinks = torch.randn(case.Hq, generator=g)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=g)
    softcap = 2.0

    def run(backend, dev):
        leaves = [t.to(dev).requires_grad_(True) for t in (q, k, v, pb, slopes, sinks)]
        pat = {n: (x.to(dev) if isinstance(x, torch.Tensor) else x) for n, x in pattern.items()}
        out = hk.attention(*leaves[:3], **pat, softcap=softcap, position_bias=leaves[3],
                           alibi_slopes=leaves[4], sinks=leaves[5], backend=backend)
        grads = torch.autograd.grad(out, leaves, dout.to(dev))
        return out.detach().cpu(), [t.cpu() for t in grads]

    out, grads = run("triton", device)
    out_ref, grads_ref = run("reference", "cpu")
    out64, grads64 = _api_oracle(q, k, v, pattern, softcap, pb, slopes, sinks, dout)
    out64 = out64.detach()
    assert_matches_oracle("out", out, out64, out_ref, depth=case.D)
    names = ("dq", "dk", "dv", "dposition_bias", "dalibi_slopes", "dsinks")
    depths = (case.D,) * 3 + (case.D + case.B * case.Nq,) * 2 + (case.Nq * case.B,)
    for name, gt, g64, gr, depth in zip(names, grads, grads64, grads_ref, depths):
        assert_matches_oracle(name, gt, g64, gr, depth=depth)


def _int8_quality(out, ref):
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(),
                                                dim=0)
    rel_l1 = (out.double() - ref.double()).abs().sum() / ref.double().abs().sum()
    return float(cos), float(rel_l1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_int8_with_modifiers(device, dtype):
    """quant="int8" with softcap and bias vs exact attention (the thresholds of test_triton.py's
    int8 test). K carries a large shared offset: the smoothing shift must be added back before
    the softcap, not only to lse."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hk, N, D = 1, 2, 1, 97, 64
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hk, Hk))
    k = k + 3.0
    pb = torch.randn(Hq, 2 * N - 1, generator=g)
    kpm = torch.rand(B, N, generator=g) > 0.2
    for pattern in (dict(window=(16, 16), landmarks=20, key_padding_mask=kpm, softcap=2.0,
                         position_bias=pb),
                    dict(window=(8, 0), landmarks=torch.tensor([0, 40, 90]), causal=True,
                         softcap=4.0),
                    dict(window=(8, 8), alibi_slopes=torch.tensor([0.5, 0.25]))):
        qd, kd, vd = (t.to(dtype).to(device) for t in (q, k, v))
        pd = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in pattern.items()}
        out, lse = hk.attention(qd, kd, vd, **pd, quant="int8", return_lse=True, backend="triton")
        ref, ref_lse = hk.attention(q, k, v, **pattern, return_lse=True, backend="reference")
        out, lse = out.cpu(), lse.cpu()
        assert not torch.isnan(out).any()
        cos, rel_l1 = _int8_quality(out, ref)
        assert cos >= 0.999 and rel_l1 <= 0.02, (sorted(pattern), cos, rel_l1)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        assert (lse[fin] - ref_lse[fin]).abs().max() < 0.05, "lse of the modified scores"


def test_int8_backward_with_modifiers_is_exact(device):
    case, mods = MOD_CASES[3]
    q, k, v, pattern, mod_kw = _inputs(case, mods, torch.float32, device)
    pb = mod_kw["position_bias"]
    out = hk.attention(q, k, v, **pattern, **mod_kw, quant="int8", backend="triton")
    g8 = torch.autograd.grad(out.sum(), (q, k, v, pb))
    out = hk.attention(q, k, v, **pattern, **mod_kw, backend="triton")
    g = torch.autograd.grad(out.sum(), (q, k, v, pb))
    for a, b in zip(g8, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_declarations():
    backend = TritonBackend()
    assert backend.score_mods == frozenset({"softcap", "bias"})
    assert backend.int8_score_mods == frozenset({"softcap", "bias"})
    problem = Problem(device_type="cuda", dtype=torch.float16, head_dim=64, head_dim_v=64,
                      quant=None, needs_grad=True, score_mods=frozenset({"softcap", "bias"}))
    assert not any("score modifier" in r for r in backend.rejection_reasons(problem))
    int8 = Problem(device_type="cuda", dtype=torch.float16, head_dim=64, head_dim_v=64,
                   quant="int8", needs_grad=False, score_mods=frozenset({"softcap", "bias"}))
    assert not any("score modifier" in r for r in backend.rejection_reasons(int8))
