"""quant="int8" on the forward driver with AMX tiles (csrc/cpu/int8/fwd_core_int8_amx.h), the path
hk.attention takes on an AMX machine (fused quantization, Dv % 16 == 0; other calls run the
avx512 int8 core, csrc/cpu/int8/fwd_core_int8.h): against the int8 emulation, against the avx512
core (HYBRID_KERNELS_CPU_ISA=avx512), determinism across runs and thread counts. Outputs are
NaN-poisoned first (conftest), so unwritten elements show."""
from __future__ import annotations

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.backends.cpu import load_module

from cases import CASES, Case, one_key_far_above
from test_attention_backends import assert_int8_matches_emulation

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DRIVER_CASES = CASES + [
    Case("i8amx_bench_shape", Hq=8, Hk=8, Nq=1025, Nk=1025, D=64, window=(256, 256), landmarks=64),
    Case("i8amx_d48_nq_lt_nk_many_lm", Hq=4, Hk=2, Nq=300, Nk=777, D=48, window=(33, 70),
         landmarks="shared", G=150, causal=True),
    Case("i8amx_d128_full_pad", B=2, Nq=130, Nk=130, D=128, padding=True),
]
# The exp2 polynomial of the int8 softmaxes (Exp2::kCoarse, cpu/simd/exp2.h): relative error < 1.4e-4.
EXP2_REL_ERR = 1.4e-4


def _force_amx(monkeypatch) -> None:
    f = load_module().cpu_features()
    if not (f["amx_tile"] and f["amx_bf16"] and f["amx_int8"]):
        pytest.skip("this CPU has no AMX int8 tiles")
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", "amx")


def _force_avx512(monkeypatch) -> None:
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", "avx512")


def _int8(q, k, v, pattern):
    return hk.attention(q, k, v, **pattern, quant="int8", backend="cpu", return_lse=True)


def _lse_tolerance(lse: torch.Tensor) -> torch.Tensor:
    """|lse_amx - lse_avx512|: both compute the same fp32 scores (the same int32 dot products
    times the same k_scale * q_scale products) and l = sum exp2(S - m) with the same polynomial;
    the AMX core moves its max only by integers (rescaling l by exp2 of an integer, off by the
    polynomial's error), the avx512 core to the running max (likewise). So the two l differ by the
    summation order (a few fp32 ulps of l, i.e. of |lse|) and two polynomial errors."""
    eps = torch.finfo(torch.float32).eps
    return 8 * eps * lse.abs().clamp_min(1.0) + 2 * EXP2_REL_ERR


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DRIVER_CASES, ids=lambda c: c.id)
def test_driver_matches_emulation_and_avx512_core(monkeypatch, case, dtype):
    q, k, v, pattern = case.make(dtype)
    _force_amx(monkeypatch)
    out, lse = _int8(q, k, v, pattern)
    assert out.dtype == dtype
    assert_int8_matches_emulation(f"int8 amx driver {case.id}", out, q, k, v, pattern)
    _force_avx512(monkeypatch)
    _, lse_avx512 = _int8(q, k, v, pattern)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_avx512)), "rows that see nothing: lse -inf"
    fin = torch.isfinite(lse_avx512)
    diff = (lse - lse_avx512)[fin].abs()
    assert torch.all(diff <= _lse_tolerance(lse_avx512[fin])), float(diff.max())
    if case.empty_rows:
        assert torch.all(out[-1] == 0), "rows that see no key output zeros"


@pytest.mark.parametrize("jump", [4.0, 12.0, 200.0])
def test_driver_scores_rising_above_the_running_max(monkeypatch, jump):
    """The AMX int8 softmax tries each tile against the running max, taking the tile's max in the
    same pass, and keeps the result only where its max rule keeps the max (a rise of at most 8
    in log2 units); otherwise the tile is redone. A key of a later tile scoring about `jump`
    (natural units) above the rest rises 5.8 (kept), 17 or 289 (redone) log2 units above it."""
    _force_amx(monkeypatch)
    q, k, v = one_key_far_above(jump)
    pattern = {}
    out, lse = _int8(q, k, v, pattern)  # 5 key tiles per block
    assert_int8_matches_emulation(f"int8 amx jump {jump}", out, q, k, v, pattern)
    _force_avx512(monkeypatch)
    _, lse_avx512 = _int8(q, k, v, pattern)
    diff = (lse - lse_avx512).abs()
    assert torch.all(diff <= _lse_tolerance(lse_avx512)), float(diff.max())


def test_driver_is_the_amx_int8_path(monkeypatch):
    """The benchmark's shape class (fp32, D = 64, window + landmarks) runs on the AMX core (results
    differ from the avx512 core's in the last bits); Dv % 16 != 0 runs the avx512 core."""
    for case, driver_used in ((DRIVER_CASES[-3], True), (CASES[0], False)):
        q, k, v, pattern = case.make(torch.float32)
        assert (case.D % 16 == 0) == driver_used, case.id
        _force_amx(monkeypatch)
        out, lse = _int8(q, k, v, pattern)
        _force_avx512(monkeypatch)
        out_avx512, lse_avx512 = _int8(q, k, v, pattern)
        same = torch.equal(out, out_avx512) and torch.equal(lse, lse_avx512)
        assert same != driver_used, case.id


def test_driver_is_deterministic(monkeypatch):
    """Two runs, and 1 / 2 / 3 threads, are bit-equal (static partition, per-block arithmetic)."""
    q, k, v, pattern = DRIVER_CASES[-3].make(torch.float32)
    _force_amx(monkeypatch)
    runs = []
    for n in ("1", "2", "2", "3"):
        monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
        runs.append(_int8(q, k, v, pattern))
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])


def test_driver_keeps_non_finite_v_out_of_blocks_that_do_not_see_it(monkeypatch):
    """An inf in V right past a band's end (inside the last, partial 32-key chunk of the block's
    tiles) never meets a zero P. (Rows of a 32-row block that does see the key share its tiles:
    0 * inf reaches them, as in the fp32 and bf16 forwards.)"""
    q, k, v = (torch.randn(1, 1, 200, 64) for _ in range(3))
    v[0, 0, 150] = float("inf")  # rows 96..127 see keys up to 135: their last tile reaches 151
    _force_amx(monkeypatch)
    out, _ = _int8(q, k, v, dict(window=(8, 8)))
    assert torch.isfinite(out[0, 0, :128]).all() and torch.isfinite(out[0, 0, 160:]).all()
    assert not torch.isfinite(out[0, 0, 142:159]).all(dim=-1).any(), "rows that see it: inf/NaN"
