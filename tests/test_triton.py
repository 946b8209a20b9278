"""Triton backend: forward, lse, backward, int8, determinism, strides, declarations.

Each kernel test runs under the Triton interpreter on CPU tensors and, when CUDA is there,
compiled on the GPU. The interpreter only works if TRITON_INTERPRET=1 was set before triton was
first imported (triton.language's own helpers are decorated at import time), and the variable must
not leak into other test modules (it makes the triton backend accept CPU tensors). So, unless this
process already interprets, the interpreter runs of this file happen in one child pytest process
started with TRITON_INTERPRET=1 (test_interpreter_runs); GPU runs stay in this process.
Sizes are small: the interpreter is slow.
"""
from __future__ import annotations


import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.backends.triton import TritonBackend
from hybrid_kernels.dispatch import Problem

from cases import CASES, Case, ref_kwargs
from oracle import assert_matches_oracle, reference_grads, reference_pair
from triton_child import interpreting_in_process, run_in_interpreter

triton = pytest.importorskip("triton")

# The interpreter-friendly subset: every pattern feature, GQA, Nq != Nk both ways, causal,
# padding, shared and per-batch landmarks, empty rows, odd D, Dv != D, N = 1, 17, 97.
# The interpreter-friendly subset: every pattern feature, GQA, Nq != Nk both ways, causal,
# padding, shared and per-batch landmarks, empty rows, odd D, Dv != D, N = 1, 17, 61, 97.
LIGHT_GQA = Case("d59_gqa_window_lm_pad", B=2, Hq=2, Hk=1, Nq=61, Nk=61, D=59, window=(8, 5),
                 landmarks="per_batch", padding=True)
TRITON_CASES = [LIGHT_GQA] + [c for c in CASES if c.id not in {
    "n1025_d64_causal_pad", "odd_D59_gqa_window_lm_pad"}] + [
    Case("n17_d64_causal_lm_pad", B=2, Hq=4, Hk=1, Nq=17, Nk=17, D=64, window=(3, 2),
         landmarks="per_batch", G=3, causal=True, padding=True),
    Case("n1_single_key", Nq=1, Nk=1, window=(0, 0), landmarks="shared", G=1),
    # windows wider than a tile: interior (unmasked) tiles next to masked edge tiles
    Case("causal_wide_window_gqa", B=1, Hq=2, Hk=1, window=(80, 0), landmarks="shared", G=3,
         causal=True),
    Case("wide_window_nq_lt_nk", Nq=70, Nk=97, window=(35, 45), landmarks=None),
]
FAST_IDS = {"d59_gqa_window_lm_pad", "decode_like_nq_lt_nk", "nq_gt_nk_negative_rows",
            "empty_rows", "causal_window_stride", "n17_d64_causal_lm_pad",
            "causal_wide_window_gqa", "wide_window_nq_lt_nk"}
FAST = [c for c in TRITON_CASES if c.id in FAST_IDS]


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


def _make(case, dtype, device, requires_grad=False):
    q, k, v, pattern = case.make(dtype)
    q, k, v = (t.to(device).requires_grad_(requires_grad) for t in (q, k, v))
    pattern = {name: (x.to(device) if isinstance(x, torch.Tensor) else x)
               for name, x in pattern.items()}
    return q, k, v, pattern


def _cpu(*ts):
    return [t.detach().cpu() for t in ts]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_forward_fp32(device, case):
    q, k, v, pattern = _make(case, torch.float32, device)
    out, lse = hk.attention(q, k, v, **pattern, return_lse=True, backend="triton")
    q, k, v, out, lse = _cpu(q, k, v, out, lse)
    (o64, l64), (o32, l32) = reference_pair(q, k, v, **ref_kwargs(pattern, q, k))
    assert out.dtype == torch.float32 and out.shape == o64.shape and lse.dtype == torch.float32
    assert_matches_oracle("out", out, o64, o32, depth=case.D)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse is -inf exactly for empty rows"
    assert_matches_oracle("lse", lse, l64, l32, depth=case.D)
    assert torch.all(out[torch.isinf(l64)] == 0), "rows that see no key output zeros"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", FAST, ids=lambda c: c.id)
def test_forward_half(device, dtype, case):
    q, k, v, pattern = _make(case, dtype, device)
    out, lse = hk.attention(q, k, v, **pattern, return_lse=True, backend="triton")
    q, k, v, out, lse = _cpu(q, k, v, out, lse)
    (o64, l64), (o_half, l_half) = reference_pair(q, k, v, **ref_kwargs(pattern, q, k))
    assert out.dtype == dtype
    assert_matches_oracle("out", out, o64, o_half)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64))
    assert_matches_oracle("lse", lse, l64, l_half.float(), depth=case.D)


BACKWARD = [(c, torch.float32) for c in FAST] + [
    (c, dt) for c in FAST if c.id in {"d59_gqa_window_lm_pad", "nq_gt_nk_negative_rows"}
    for dt in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", BACKWARD, ids=lambda x: getattr(x, "id", str(x)))
def test_backward(device, case, dtype):
    q, k, v, pattern = _make(case, dtype, device, requires_grad=True)
    out = hk.attention(q, k, v, **pattern, backend="triton")
    dout = torch.randn_like(out)
    grads = _cpu(*torch.autograd.grad(out, (q, k, v), dout))
    q, k, v, dout = _cpu(q, k, v, dout)
    kw = ref_kwargs(pattern, q, k)
    oracle = reference_grads(q, k, v, dout, torch.float64, **kw)
    baseline = reference_grads(q, k, v, dout, dtype, **kw)
    for name, g, g64, gb in zip(("dq", "dk", "dv"), grads, oracle, baseline):
        assert g.dtype == dtype and g.shape == g64.shape
        assert_matches_oracle(name, g, g64, gb, depth=case.D)
    if case.empty_rows:
        assert torch.all(grads[0][-1] == 0), "rows that see no key get zero gradient"


def test_deterministic(device):
    q, k, v, pattern = _make(LIGHT_GQA, torch.float32, device, requires_grad=True)

    def run():
        out = hk.attention(q, k, v, **pattern, backend="triton")
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b), "two runs must be bit-equal"


def test_strided_and_expanded_inputs(device):
    B, N, H, D = 2, 37, 4, 32
    q = torch.randn(B, N, H, D).transpose(1, 2)
    k = torch.randn(B, N, 1, D).transpose(1, 2).expand(B, H, N, D)
    v = torch.randn(B, N, H, 2 * D)[..., ::2].transpose(1, 2)  # last dim strided
    ref = hk.attention(q, k, v, window=(7, 7), landmarks=13, backend="reference")
    q, k, v = (t.to(device) for t in (q, k, v))
    out = hk.attention(q, k, v, window=(7, 7), landmarks=13, backend="triton")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def _int8_quality(out, ref):
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
    rel_l1 = (out.double() - ref.double()).abs().sum() / ref.double().abs().sum()
    return float(cos), float(rel_l1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_int8_accuracy(device, dtype):
    """quant="int8" vs exact attention on Gaussian inputs: cosine >= 0.999, rel-L1 <= 0.02; and
    no worse than the torch int8 emulation (hybrid_kernels.quant) when it is there."""
    g = torch.Generator().manual_seed(1)
    B, Hq, Hk, N, D = 1, 2, 1, 97, 64
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hk, Hk))
    k = k + 3.0  # a large shared offset: K smoothing must remove it
    kpm = torch.rand(B, N, generator=g) > 0.2
    for pattern in (dict(window=(16, 16), landmarks=20, key_padding_mask=kpm),
                    dict(window=(8, 0), landmarks=torch.tensor([0, 40, 90]), causal=True)):
        qd, kd, vd = (t.to(dtype).to(device) for t in (q, k, v))
        pd = {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in pattern.items()}
        out, lse = hk.attention(qd, kd, vd, **pd, quant="int8", return_lse=True, backend="triton")
        ref, ref_lse = hk.attention(q, k, v, **pattern, return_lse=True, backend="reference")
        out, lse = out.cpu(), lse.cpu()
        assert not torch.isnan(out).any()
        cos, rel_l1 = _int8_quality(out, ref)
        assert cos >= 0.999 and rel_l1 <= 0.02, (pattern, cos, rel_l1)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        fin = torch.isfinite(ref_lse)
        assert (lse[fin] - ref_lse[fin]).abs().max() < 0.05, "lse includes the K-smoothing shift"
        try:
            from hybrid_kernels.quant import int8_reference
        except ImportError:
            continue
        kw = ref_kwargs(pattern, q, k)
        assert kw.pop("softcap") == 0.0 and kw.pop("bias") is None  # no score modifiers here
        emu, _ = int8_reference(q.to(dtype), k.to(dtype), v.to(dtype), **kw,
                                pv_dtype=torch.float64)
        _, emu_l1 = _int8_quality(emu.float(), ref)
        assert rel_l1 <= 2 * emu_l1 + 1e-3, (pattern, rel_l1, emu_l1)


def test_int8_backward_is_exact(device):
    q, k, v, pattern = _make(CASES[1], torch.float32, device, requires_grad=True)
    out = hk.attention(q, k, v, **pattern, quant="int8", backend="triton")
    g8 = torch.autograd.grad(out.sum(), (q, k, v))
    out = hk.attention(q, k, v, **pattern, backend="triton")
    g = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g8, g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nan_propagates_without_crash(device):
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    q[0, 0, 10] = float("nan")
    k[0, 1, 30] = float("inf")
    out = hk.attention(q.to(device), k.to(device), v.to(device), window=(4, 4), backend="triton")
    out = out.cpu()
    assert torch.isnan(out[0, 0, 10]).all(), "a NaN query row propagates like SDPA"
    assert torch.isfinite(out[0, 0, :10]).all() and torch.isfinite(out[0, 1, :20]).all()


def test_padding_keys_are_never_read(device):
    """NaN in padded K/V must not leak into any output."""
    q, k, v = (torch.randn(2, 2, 33, 32) for _ in range(3))
    kpm = torch.rand(2, 33) > 0.3
    kpm[:, 0] = True
    k[~kpm[:, None, :, None].expand_as(k)] = float("nan")
    v[~kpm[:, None, :, None].expand_as(v)] = float("nan")
    for pattern in (dict(window=(5, 5), landmarks=torch.tensor([0, 7, 20])), dict(causal=True)):
        out = hk.attention(q.to(device), k.to(device), v.to(device), key_padding_mask=kpm.to(device),
                           **{n: (x.to(device) if isinstance(x, torch.Tensor) else x)
                              for n, x in pattern.items()}, backend="triton")
        assert torch.isfinite(out.cpu()).all(), pattern


def test_declarations(monkeypatch):
    backend = TritonBackend()
    assert backend.head_dim_reason(59, 59) is None and backend.head_dim_reason(128, 96) is None
    assert "head dims" in backend.head_dim_reason(300, 64)
    problem = Problem(device_type="cpu", dtype=torch.float16, head_dim=64, head_dim_v=64,
                      quant="int8", needs_grad=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.rejection_reasons(problem) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = backend.rejection_reasons(problem)
    assert reasons, "CPU tensors are rejected unless interpreting"
    if not torch.cuda.is_available():
        assert "no CUDA device" in reasons[0]
