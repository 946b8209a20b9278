"""Score modifiers (softcap, offset bias: position_bias / ALiBi) on the C++ CPU kernels, forward
(blocked driver and decode path; exact and quant="int8") and backward (dq, dk, dv, dbias), on
every instruction set this machine runs, against the float64 oracle (tests/oracle.py: at most twice the error of the same
computation in the input dtype plus fp32 rounding)."""
from __future__ import annotations

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.backends.cpu import CpuBackend
from hybrid_kernels.reference import dense_reference
from hybrid_kernels.score_mods import alibi_bias

from cases import Case, ref_kwargs
from isa import force
from oracle import assert_matches_oracle

pytestmark = pytest.mark.skipif(CpuBackend().unavailable_reason() is not None,
                                reason="native CPU module not built")

ISAS = ["avx512", "avx2", "scalar"]

CASES = [
    Case("mods_odd_D59_gqa_window_lm_pad", B=2, Hq=4, Hk=2, D=59, window=(8, 5), landmarks="per_batch",
         padding=True),
    Case("mods_window_wider_than_n_stride", window=(2000, 2000), landmarks=10),
    Case("mods_causal_nq37_nk97_gqa", Hq=4, Hk=2, Nq=37, Nk=97, window=(16, 0), landmarks="shared",
         causal=True),
    Case("mods_nq_gt_nk", B=2, Nq=97, Nk=40, window=(3, 3), landmarks="per_batch", padding=True),
    Case("mods_many_landmark_rows_d64", Hq=2, Hk=1, Nq=300, Nk=300, D=64, window=(20, 20),
         landmarks="per_batch", G=70, B=2),
    Case("mods_empty_rows", B=2, window=(0, 0), empty_rows=True),
    # Decode path (few query rows): single row with a long causal window, and a GQA group.
    Case("mods_decode_nq1_nk1025", Hq=4, Hk=2, Nq=1, Nk=1025, D=64, window=(256, 0), landmarks=64,
         causal=True, padding=True),
    Case("mods_decode_nq4_gqa_full", Hq=4, Hk=1, Nq=4, Nk=300, D=64),
]
BACKWARD_CASES = [c for c in CASES if c.id in {
    "mods_odd_D59_gqa_window_lm_pad", "mods_causal_nq37_nk97_gqa", "mods_nq_gt_nk",
    "mods_many_landmark_rows_d64", "mods_empty_rows", "mods_decode_nq1_nk1025"}]

MODS = ["softcap", "bias", "both"]


def _mods(kind: str, case: Case, requires_grad: bool = False) -> dict:
    """hk.attention keywords of the modifiers; softcap small enough that tanh bends the scores
    (|s / c| reaches both sides of the tanh's two formulas)."""
    g = torch.Generator().manual_seed(1234 + len(case.id))
    kw = {}
    if kind in ("softcap", "both"):
        kw["softcap"] = 1.5
    if kind in ("bias", "both"):
        pb = 2.0 * torch.randn(case.Hq, case.Nq + case.Nk - 1, generator=g)
        kw["position_bias"] = pb.requires_grad_(requires_grad)
    if kind == "both":
        kw["alibi_slopes"] = torch.rand(case.Hq, generator=g) * 0.5
    return kw


def _table(mods: dict, Nq: int, Nk: int, dtype: torch.dtype):
    """The offset table the API builds (ALiBi + position_bias), in ``dtype``, differentiable in
    position_bias."""
    table = None
    if "alibi_slopes" in mods:
        table = alibi_bias(mods["alibi_slopes"], Nq, Nk).to(dtype)
    if "position_bias" in mods:
        pb = mods["position_bias"].to(dtype)
        table = pb if table is None else table + pb
    return table


def _ref_kw(pattern: dict, q, k, mods: dict, dtype: torch.dtype) -> dict:
    kw = ref_kwargs(pattern, q, k)
    kw["softcap"] = mods.get("softcap", 0.0)
    kw["bias"] = _table(mods, q.shape[2], k.shape[2], dtype)
    return kw


def _check_forward(case: Case, dtype: torch.dtype, kind: str, isa: str) -> None:
    q, k, v, pattern = case.make(dtype)
    mods = _mods(kind, case)
    out, lse = hk.attention(q, k, v, **pattern, **mods, return_lse=True, backend="cpu")
    o64, l64 = dense_reference(q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                               **_ref_kw(pattern, q, k, mods, torch.float64))
    ob, lb = dense_reference(q, k, v, compute_dtype=dtype, **_ref_kw(pattern, q, k, mods, torch.float32))
    assert out.dtype == dtype and out.shape == o64.shape
    assert_matches_oracle(f"{isa} {kind} out", out, o64, ob)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse is -inf exactly for rows that see nothing"
    assert_matches_oracle(f"{isa} {kind} lse", lse, l64, lb)
    if case.empty_rows:
        assert torch.all(out[-1] == 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward(monkeypatch, isa, kind, dtype, case):
    force(monkeypatch, isa)
    _check_forward(case, dtype, kind, isa)


def _grads(case: Case, dtype: torch.dtype, kind: str, backend_dtype=None):
    """(kernel grads, oracle grads, baseline grads): dq, dk, dv and, with a bias, dposition_bias."""
    q, k, v, pattern = case.make(dtype, requires_grad=True)
    mods = _mods(kind, case, requires_grad=True)
    out = hk.attention(q, k, v, **pattern, **mods, backend="cpu")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    leaves = [q, k, v] + ([mods["position_bias"]] if "position_bias" in mods else [])
    grads = torch.autograd.grad(out, leaves, dout)

    def reference(compute_dtype):
        qs, ks, vs = (t.detach().to(compute_dtype).requires_grad_(True) for t in (q, k, v))
        m = dict(mods)
        refs = [qs, ks, vs]
        if "position_bias" in m:
            m["position_bias"] = m["position_bias"].detach().double().requires_grad_(True)
            refs.append(m["position_bias"])
        table_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        kw = _ref_kw(pattern, q, k, m, table_dtype)
        o, _ = dense_reference(qs, ks, vs, compute_dtype=compute_dtype, **kw)
        return torch.autograd.grad(o, refs, dout.to(compute_dtype))

    return grads, reference(torch.float64), reference(dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=lambda c: c.id)
def test_backward(monkeypatch, isa, kind, dtype, case):
    force(monkeypatch, isa)
    grads, oracle, baseline = _grads(case, dtype, kind)
    names = ("dq", "dk", "dv", "dbias")
    for name, g, g64, gb in zip(names, grads, oracle, baseline):
        assert g.shape == g64.shape
        assert_matches_oracle(f"{isa} {kind} {name}", g, g64, gb, depth=case.D)
    if case.empty_rows:
        assert torch.all(grads[0][-1] == 0), "rows that see no key get zero gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(monkeypatch, dtype):
    """Two runs give the same bits, forward and backward with dbias, including the split of one
    (batch, kv head) item over threads (dbias partials summed in a fixed order)."""
    monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", "3")
    case = Case("mods_det", B=1, Hq=2, Hk=1, Nq=300, Nk=300, D=64, window=(40, 10), landmarks=30,
                causal=True, padding=True)
    runs = []
    for _ in range(2):
        q, k, v, pattern = case.make(dtype, requires_grad=True)
        mods = _mods("both", case, requires_grad=True)
        out, lse = hk.attention(q, k, v, **pattern, **mods, return_lse=True, backend="cpu")
        grads = torch.autograd.grad(out, (q, k, v, mods["position_bias"]),
                                    torch.ones_like(out))
        runs.append((out, lse) + grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_public_api_with_sinks_and_autograd():
    """hk.attention with softcap, position_bias, alibi_slopes and sinks: the cpu backend against
    the float64 oracle, the reference backend giving the same-precision baseline."""
    case = Case("mods_api", B=2, Hq=4, Hk=2, Nq=61, Nk=80, D=40, window=(12, 3), landmarks=8,
                causal=True, padding=True)
    g = torch.Generator().manual_seed(3)
    results = {}
    for backend in ("cpu", "reference", "oracle"):
        dtype = torch.float64 if backend == "oracle" else torch.float32
        q, k, v, pattern = case.make(torch.float32)
        q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
        g.manual_seed(3)
        pb = (2.0 * torch.randn(case.Hq, case.Nq + case.Nk - 1, generator=g)).to(dtype).requires_grad_(True)
        slopes = (torch.rand(case.Hq, generator=g) * 0.5).to(dtype)
        sinks = torch.randn(case.Hq, generator=g).to(dtype).requires_grad_(True)
        if backend == "oracle":
            kw = ref_kwargs(pattern, q.detach().float(), k.detach().float())
            kw.update(softcap=2.0, bias=alibi_bias(slopes, case.Nq, case.Nk).double() + pb)
            out, lse = dense_reference(q, k, v, compute_dtype=torch.float64, **kw)
            new_lse = torch.logaddexp(lse, sinks[None, :, None])
            out = out * torch.exp(lse - new_lse)[..., None]
        else:
            out = hk.attention(q, k, v, **pattern, softcap=2.0, position_bias=pb, alibi_slopes=slopes,
                               sinks=sinks, backend=backend)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(dtype)
        results[backend] = (out.detach(),) + torch.autograd.grad(out, (q, k, v, pb, sinks), dout)
    names = ("out", "dq", "dk", "dv", "dposition_bias", "dsinks")
    for name, a, o, b in zip(names, results["cpu"], results["oracle"], results["reference"]):
        assert_matches_oracle(f"api {name}", a, o, b, depth=case.D)


INT8_CASES = [c for c in CASES if c.id in {
    "mods_odd_D59_gqa_window_lm_pad", "mods_causal_nq37_nk97_gqa", "mods_many_landmark_rows_d64",
    "mods_empty_rows", "mods_decode_nq1_nk1025"}]


@pytest.mark.parametrize("isa", ["amx"] + ISAS)
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: c.id)
def test_int8_with_modifiers(monkeypatch, isa, kind, case):
    """quant="int8" with softcap / bias on the int8 driver cores (amx hands such calls to its
    avx512 core) against the int8 definition with modifiers (the reference backend's emulation:
    the same integers, PV in fp32). K carries a large shared offset, so the smoothing shift must
    reach the scores before a softcap. Bounds from the kernels' PV precision: P and V rounded to
    bf16 move each product by at most 2 * 2^-9 relative, so the output by at most 2^-8 * max|v|;
    the lse uses the unrounded P, off by the exp2 polynomial (< 4e-6 relative) and fp32 sums."""
    force(monkeypatch, isa)
    q, k, v, pattern = case.make(torch.float32)
    k = k + 3.0
    mods = _mods(kind, case)
    out, lse = hk.attention(q, k, v, **pattern, **mods, quant="int8", return_lse=True, backend="cpu")
    emu, emu_lse = hk.attention(q, k, v, **pattern, **mods, quant="int8", return_lse=True,
                                backend="reference")
    eps = torch.finfo(torch.float32).eps
    vmax = float(v.abs().max())
    assert float((out - emu).abs().max()) <= (2.0 ** -8 + 16 * eps) * vmax
    assert torch.equal(torch.isinf(lse), torch.isinf(emu_lse)), "rows that see nothing: lse -inf"
    fin = torch.isfinite(emu_lse)
    assert torch.all((lse - emu_lse)[fin].abs() <= 1e-5 + 16 * eps * emu_lse[fin].abs())
    if case.empty_rows:
        assert torch.all(out[-1] == 0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("softcap", [0.05, 50.0], ids=["saturated", "nearly_linear"])
def test_softcap_extremes(monkeypatch, isa, softcap):
    """A softcap far below the scores (tanh saturates: its exp underflows) and far above them
    (tanh near its Taylor branch), forward and backward."""
    force(monkeypatch, isa)
    case = Case("mods_softcap_extremes", B=1, Hq=4, Hk=2, Nq=70, Nk=90, D=48, window=(20, 5),
                landmarks=6, causal=True)
    q, k, v, pattern = case.make(torch.float32, requires_grad=True)
    q2 = (4.0 * q).detach().requires_grad_(True)  # scores up to ~30: |s / c| up to ~600
    out, lse = hk.attention(q2, k, v, **pattern, softcap=softcap, return_lse=True, backend="cpu")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(out, (q2, k, v), dout)
    kw = ref_kwargs(pattern, q2, k)
    kw["softcap"] = softcap
    for compute_dtype in (torch.float64, torch.float32):
        qs, ks, vs = (t.detach().to(compute_dtype).requires_grad_(True) for t in (q2, k, v))
        o, l = dense_reference(qs, ks, vs, compute_dtype=compute_dtype, **kw)
        g = torch.autograd.grad(o, (qs, ks, vs), dout.to(compute_dtype))
        if compute_dtype == torch.float64:
            oracle = (o.detach(), l.detach()) + g
        else:
            baseline = (o.detach(), l.detach()) + g
    for name, a, o, b in zip(("out", "lse", "dq", "dk", "dv"), (out.detach(), lse.detach()) + grads, oracle,
                              baseline):
        assert_matches_oracle(f"{isa} softcap={softcap} {name}", a, o, b, depth=case.D)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in {
    "mods_odd_D59_gqa_window_lm_pad", "mods_decode_nq1_nk1025"}], ids=lambda c: c.id)
def test_float16(case):
    """fp16 inputs (converted to fp32 in the kernels) with both modifiers, forward and backward."""
    grads, oracle, baseline = _grads(case, torch.float16, "both")
    for name, g, g64, gb in zip(("dq", "dk", "dv", "dbias"), grads, oracle, baseline):
        assert_matches_oracle(f"fp16 {name}", g, g64, gb, depth=case.D)
    _check_forward(case, torch.float16, "both", "default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_thread_counts_agree(monkeypatch, dtype):
    """The forward with modifiers gives the same bits with 1, 2 and 3 threads (the blocked driver
    with landmark rows and the decode path)."""
    for case in (CASES[4], CASES[6]):
        q, k, v, pattern = case.make(dtype)
        mods = _mods("both", case)
        outs = []
        for n in ("1", "2", "3"):
            monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
            outs.append(hk.attention(q, k, v, **pattern, **mods, return_lse=True, backend="cpu"))
        for o, l in outs[1:]:
            assert torch.equal(o, outs[0][0]) and torch.equal(l, outs[0][1])
