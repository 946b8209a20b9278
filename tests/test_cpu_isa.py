"""The CPU kernels per instruction set: the AMX tile path (bf16 forward) and every lower ISA the
machine supports, forced with HYBRID_KERNELS_CPU_ISA, against the float64 oracle."""
from __future__ import annotations

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.backends.cpu import load_module

from cases import CASES, Case, one_key_far_above, ref_kwargs
from isa import force, supported
from oracle import assert_matches_oracle, reference_pair

ISAS = ["amx", "avx512", "avx2", "scalar"]

# Shapes that reach every branch of the AMX core: whole and partial 16-key groups / 32-key
# chunks at band edges, Dv % 32 == 16 (full and windowed), D outside the compiled head sizes, more landmarks than one
# 64-key tile, landmark rows, causal with Nq < Nk, padding, GQA.
AMX_CASES = CASES + [
    Case("amx_d64_n1025_window_lm", Hq=4, Hk=2, Nq=1025, Nk=1025, D=64, window=(100, 37), landmarks=50),
    Case("amx_d96_causal_nq_lt_nk", Nq=200, Nk=333, D=96, window=(40, 0), landmarks="shared", G=70,
         causal=True),
    Case("amx_dv48_full_pad", Nq=130, Nk=130, D=32, Dv=48, padding=True),
    # Dv % 32 != 0 with a narrow window: the V^T ring's generic transpose, wrapping several times.
    Case("amx_dv48_window_wraps_ring", Nq=700, Nk=700, D=32, Dv=48, window=(20, 30), landmarks=10),
    Case("amx_d128_many_landmarks", Hq=2, Hk=1, Nq=300, Nk=300, D=128, window=(5, 5),
         landmarks="per_batch", G=90, B=2),
]


def test_best_isa_is_selected_by_default(monkeypatch):
    monkeypatch.delenv("HYBRID_KERNELS_CPU_ISA", raising=False)
    best = next(isa for isa in ISAS if supported(isa))
    assert load_module().selected_isa() == best


def test_unsupported_or_unknown_isa_is_a_clear_error(monkeypatch):
    q = k = v = torch.randn(1, 1, 8, 32)
    monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="HYBRID_KERNELS_CPU_ISA must be amx, avx512, avx2 or scalar"):
        hk.attention(q, k, v, backend="cpu")
    missing = [isa for isa in ISAS if not supported(isa)]
    if missing:  # on a machine that has every ISA there is nothing to refuse
        monkeypatch.setenv("HYBRID_KERNELS_CPU_ISA", missing[0])
        with pytest.raises(ValueError, match="does not support it"):
            hk.attention(q, k, v, backend="cpu")


@pytest.mark.parametrize("isa", ["amx", "avx512"])
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: c.id)
def test_bf16_forward_per_isa(monkeypatch, isa, case):
    force(monkeypatch, isa)
    q, k, v, pattern = case.make(torch.bfloat16)
    out, lse = hk.attention(q, k, v, **pattern, return_lse=True, backend="cpu")
    (o64, l64), (o_bf16, l_bf16) = reference_pair(q, k, v, **ref_kwargs(pattern, q, k))
    assert out.dtype == torch.bfloat16 and out.shape == o64.shape
    assert_matches_oracle(f"{isa} out", out, o64, o_bf16)
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "lse is -inf exactly for rows that see nothing"
    assert_matches_oracle(f"{isa} lse", lse, l64, l_bf16)
    if case.empty_rows:
        assert torch.all(out[-1] == 0), "rows that see no key output zeros"


def test_amx_bf16_is_deterministic_and_thread_count_invariant(monkeypatch):
    force(monkeypatch, "amx")
    q, k, v, pattern = next(c for c in AMX_CASES if c.id == "amx_d64_n1025_window_lm").make(torch.bfloat16)
    runs = []
    for threads in (1, 2, 3, 2):
        monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", str(threads))
        runs.append(hk.attention(q, k, v, **pattern, backend="cpu"))
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "AMX results must be bit-identical"


@pytest.mark.parametrize("jump", [30.0, 200.0])
def test_amx_bf16_scores_far_above_the_running_max(monkeypatch, jump):
    """The AMX softmax tries a tile against the running max without a max pass and redoes it with
    one when some P would pass 2^64: a key of a later tile scoring about `jump` (natural units)
    above the rest is taken either way (30: P up to ~2^43 against the old max; 200: redone)."""
    force(monkeypatch, "amx")
    q, k, v = one_key_far_above(jump)
    out, lse = hk.attention(q, k, v, return_lse=True, backend="cpu")  # 5 key tiles per block
    (o64, l64), (o_bf16, l_bf16) = reference_pair(q, k, v)
    assert_matches_oracle("amx out", out, o64, o_bf16)
    assert_matches_oracle("amx lse", lse, l64, l_bf16)


def test_amx_bf16_nan_stays_in_the_rows_that_see_it(monkeypatch):
    force(monkeypatch, "amx")
    q, k, v = (torch.randn(1, 2, 200, 64).bfloat16() for _ in range(3))
    q[0, 0, 10] = float("nan")
    k[0, 1, 150] = float("inf")  # inside a 16-key group and a 32-key chunk of the band tiles
    out = hk.attention(q, k, v, window=(4, 4), backend="cpu")
    assert torch.isnan(out[0, 0, 10]).all()
    bad = (~torch.isfinite(out)).any(-1)
    expected = torch.zeros_like(bad)
    expected[0, 0, 10] = True
    expected[0, 1, 146:155] = True  # exactly the rows whose window holds key 150
    assert torch.equal(bad, expected)


@pytest.mark.parametrize("quant", [None, "int8"], ids=["exact", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_large_outputs_equal_the_same_heads_one_call_each(monkeypatch, isa, dtype, quant):
    """Outputs of 8 MiB and more leave the forward with non-temporal stores: every element is
    written (the suite poisons outputs) and the window rows equal, bit for bit, the same head
    computed alone (an output small enough for ordinary stores). Landmark rows are left out of
    the comparison: how their keys are split for the merge depends on the number of heads."""
    force(monkeypatch, isa)
    g = torch.Generator().manual_seed(1)
    H, N, D = (8, 8192, 64) if dtype == torch.bfloat16 else (4, 8192, 64)
    q, k, v = (torch.randn(1, H, N, D, generator=g).to(dtype) for _ in range(3))
    landmarks = torch.tensor([0, 4000, 8191])
    kw = dict(window=(8, 8), landmarks=landmarks, quant=quant, backend="cpu")
    whole = hk.attention(q, k, v, **kw)
    assert whole.numel() * whole.element_size() >= 8 << 20
    assert torch.isfinite(whole).all()
    window_rows = torch.ones(N, dtype=torch.bool)
    window_rows[landmarks] = False
    for h in range(H):
        alone = hk.attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], **kw)
        assert torch.isfinite(alone).all()
        assert torch.equal(whole[:, h, window_rows], alone[:, 0, window_rows]), f"head {h}"


@pytest.mark.parametrize("isa", ["amx", "avx512"])
def test_large_bf16_gradients_equal_the_same_heads_one_call_each(monkeypatch, isa):
    """bf16 gradients of 8 MiB and more leave the backward with non-temporal stores: each head's
    dq, dk and dv equal, bit for bit, that head's gradients from a call of its own (small
    gradients, ordinary stores; one thread, so its dK / dV are summed as in the large call)."""
    force(monkeypatch, isa)
    g = torch.Generator().manual_seed(2)
    H, N, D = 8, 8192, 64
    q, k, v, dout = (torch.randn(1, H, N, D, generator=g).bfloat16() for _ in range(4))
    kw = dict(window=(8, 8), backend="cpu")

    def grads(q, k, v, dout):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(hk.attention(q, k, v, **kw), (q, k, v), dout)

    whole = grads(q, k, v, dout)
    assert whole[0].numel() * 2 >= 8 << 20
    monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", "1")
    for h in range(H):
        alone = grads(*(t[:, h:h + 1] for t in (q, k, v, dout)))
        for name, a, b in zip("qkv", whole, alone):
            assert torch.isfinite(b).all() and torch.equal(a[:, h:h + 1], b), f"d{name} of head {h}"
