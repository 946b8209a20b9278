"""quant="int8" has one definition (hybrid_kernels/quant.py) and every backend computes it.

* The integers and scales each backend uses are bit-equal to quant.quantize_qk: the Triton
  quantize kernel's directly; the CPU kernel's fused quantization through its output (bit-equal
  to the same kernel fed quant.quantize_qk's integers); the CUDA host path (int8_forward_via) and
  Int8KVCache by capturing what they hand the kernel.
* The outputs of cpu, reference (emulation) and triton agree with EACH OTHER within a tolerance
  derived from their PV precision (how far quant.int8_reference's low-precision PV emulation is
  from its exact one, plus the output dtype's rounding), which is asserted to be much tighter than
  their distance to fp32 attention; their lse (of the exact scores) agrees to fp32 roundoff.
* Inputs include exact ties (values at .5 after scaling: the rounding rule decides them), odd
  sizes (97; blocks ending at 63/64/65; Nk not a multiple of 64), padding, GQA, Nq != Nk,
  causal + window + landmarks, and Triton's score modifiers against the reference.

Triton runs under TRITON_INTERPRET=1 on CPU tensors, in a child pytest process (as in
tests/test_triton.py: the variable must be set before triton is imported and must not leak into
other test modules); on a GPU machine the Triton tests also run compiled, in this process.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels import quant
from hybrid_kernels.quant import QUANT_BLOCK, int8_reference, quantize_qk
from hybrid_kernels.reference import dense_reference

from triton_child import interpreting_in_process, run_in_interpreter


INTERPRETING = interpreting_in_process()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _cpu_available() -> bool:
    from hybrid_kernels.backends.cpu import _module_error
    return _module_error() is None


# Where Triton runs in this process: the interpreter (child) or a GPU.
TRITON_DEVICE = "cpu" if INTERPRETING else ("cuda" if torch.cuda.is_available() and _has_triton()
                                            else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None,
                                  reason="triton runs in the interpreter child (or on a GPU)")
needs_cpu = pytest.mark.skipif(not _cpu_available(), reason="the C++ CPU module is not built")


@pytest.mark.skipif(INTERPRETING or not _has_triton(),
                    reason="this process is the interpreter run itself / no triton")
def test_interpreter_runs():
    """The Triton tests of this file under TRITON_INTERPRET=1, in a child pytest process."""
    run_in_interpreter(__file__, "-k", "triton")


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Case:
    id: str
    B: int = 1
    Hq: int = 2
    Hk: int = 1
    Nq: int = 97
    Nk: int = 97
    D: int = 32
    Dv: int = 32
    window: tuple = (16, 8)
    landmarks: object = None      # None | int stride
    causal: bool = False
    padding: bool = False
    ties: bool = False            # half-integer grid: exact .5 ties after scaling


CASES = [
    Case("n97_causal_window_lm_gqa_pad", B=2, Hq=4, Hk=2, window=(16, 0), landmarks=20,
         causal=True, padding=True),
    Case("n63", Nq=63, Nk=63, window=(-1, -1)),
    Case("n64_gqa", Hq=4, Hk=2, Nq=64, Nk=64, window=(10, 10), landmarks=16),
    Case("n65_pad", B=2, Nq=65, Nk=65, window=(-1, -1), padding=True),
    Case("nq65_nk130_causal_pad", B=2, Nq=65, Nk=130, window=(40, 0), landmarks=32, causal=True,
         padding=True),
    Case("decode_nq3_nk129", Hq=4, Hk=1, Nq=3, Nk=129, window=(-1, -1), causal=True),
    Case("ties_n97_gqa_pad", B=2, Hq=4, Hk=2, window=(24, 24), landmarks=16, padding=True,
         ties=True),
    Case("ties_nq65_nk129_causal", Nq=65, Nk=129, window=(48, 0), landmarks=32, causal=True,
         ties=True),
]


def _padding_mask(case: Case, gen) -> torch.Tensor:
    kpm = torch.ones(case.B, case.Nk, dtype=torch.bool)
    if case.padding:
        for b in range(case.B):  # a tail plus a few scattered pads, different per batch
            kpm[b, case.Nk - 5 - 3 * b:] = False
            kpm[b, torch.randint(0, case.Nk, (3,), generator=gen)] = False
    return kpm


def _tie_grid(shape, gen) -> torch.Tensor:
    """Half-integers in [-126.5, 126.5] with feature 0 = +-127: every row's absmax is 127, so a
    block's scale is exactly 2^-6 once multiplied by 2^-6, and about half the values are ties."""
    g = torch.randint(-253, 254, shape, generator=gen).double() / 2
    sign = torch.randint(0, 2, shape[:-1], generator=gen).double() * 2 - 1
    g[..., 0] = 127 * sign
    return g


def make_inputs(case: Case, seed: int = 0):
    """(q, k, v, kpm) float32. Gaussian K carries a large shared offset (smoothing matters).
    ties: q = grid * 2^-6; k = grid * 2^-6 + 1 on the real keys, the grid paired as +g / -g over
    the real keys so their mean is exactly 1 (fp32 sums of these values are exact) and
    k - mean = grid * 2^-6 exactly; padded keys hold large garbage."""
    gen = torch.Generator().manual_seed(seed)
    kpm = _padding_mask(case, gen)
    B, Hq, Hk, Nq, Nk, D, Dv = case.B, case.Hq, case.Hk, case.Nq, case.Nk, case.D, case.Dv
    v = torch.randn(B, Hk, Nk, Dv, generator=gen)
    if not case.ties:
        q = torch.randn(B, Hq, Nq, D, generator=gen)
        k = torch.randn(B, Hk, Nk, D, generator=gen) + 3.0 * torch.randn(1, 1, 1, D, generator=gen)
        return q, k, v, kpm
    q = (_tie_grid((B, Hq, Nq, D), gen) / 64).float()
    k = 50.0 * torch.randn(B, Hk, Nk, D, generator=gen)  # the padded keys keep this
    for b in range(B):
        real = kpm[b].nonzero().flatten()
        m = real.numel() // 2
        g = _tie_grid((Hk, m, D), gen) / 64
        k[b, :, real[:m]] = (g + 1.0).float()
        k[b, :, real[m:2 * m]] = (1.0 - g).float()
        if real.numel() % 2:
            k[b, :, real[2 * m]] = 1.0
    return q, k, v, kpm


def pattern_kwargs(case: Case, kpm: torch.Tensor) -> dict:
    return dict(window=case.window, landmarks=case.landmarks, causal=case.causal,
                key_padding_mask=kpm if case.padding else None)


def reference_kwargs(case: Case, q, k, kpm) -> dict:
    """The same pattern as hybrid_kernels.reference / quant.int8_reference arguments."""
    from hybrid_kernels.api import plan
    pattern, _ = plan(q, k, k, **pattern_kwargs(case, kpm))
    kw = pattern.reference_kwargs()
    kw.pop("softcap"), kw.pop("bias")
    return kw


# ---------------------------------------------------------------------------------------------
# The definition itself


def test_the_constants_are_the_ones_every_backend_reads():
    from hybrid_kernels import int8_cache
    from hybrid_kernels.backends import _params
    assert QUANT_BLOCK == 64 and quant.QUANT_QMAX == 127 and quant.QUANT_ROUNDING == "half_to_even"
    assert _params.QUANT_BLOCK is QUANT_BLOCK
    assert int8_cache.Int8KVCache.block == QUANT_BLOCK
    if _has_triton():
        from hybrid_kernels.triton_kernels.configs import quantize_block_sizes
        assert quantize_block_sizes() == (QUANT_BLOCK, QUANT_BLOCK)


def _spec_quantize(x: torch.Tensor, block: int, mean=None, real=None):
    """The definition written out plainly (float32 ops, torch.round = ties to even)."""
    x = x.float()
    if mean is not None:
        x = x - mean
    if real is not None:
        x = torch.where(real[:, None, :, None], x, torch.zeros((), dtype=torch.float32))
    B, H, N, D = x.shape
    x8 = torch.empty(B, H, N, D, dtype=torch.int8)
    scales = []
    for lo in range(0, N, block):
        xb = x[:, :, lo:lo + block]
        s = xb.abs().amax(dim=(2, 3)) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        inv = 1.0 / s
        x8[:, :, lo:lo + block] = torch.round(xb * inv[:, :, None, None]).to(torch.int8)
        scales.append(s)
    return x8, torch.stack(scales, dim=2)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in {
    "n97_causal_window_lm_gqa_pad", "n65_pad", "ties_n97_gqa_pad", "ties_nq65_nk129_causal"}],
    ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_qk_is_the_definition(case, dtype):
    q, k, _, kpm = make_inputs(case)
    q, k = q.to(dtype), k.to(dtype)
    pad = kpm if case.padding else None
    q8, qs, k8, ks, mean = quantize_qk(q, k, key_padding_mask=pad, return_k_mean=True)
    assert torch.equal(mean, quant.smoothing_mean(k, pad))
    eq8, eqs = _spec_quantize(q, QUANT_BLOCK)
    ek8, eks = _spec_quantize(k, QUANT_BLOCK, mean, pad)
    assert torch.equal(q8, eq8) and torch.equal(qs, eqs)
    assert torch.equal(k8, ek8) and torch.equal(ks, eks)
    if case.ties and dtype == torch.float32:
        # The tie inputs do what they claim: exact scales 2^-6, the mean exactly 1, and many
        # values exactly halfway, decided to even (never what rounding half away gives).
        assert torch.all(qs == 2.0 ** -6)
        real_blocks = ks[ks != 1.0]
        assert real_blocks.numel() > 0 and torch.all(real_blocks == 2.0 ** -6)
        assert torch.all(mean == 1.0)
        y = q.double() * 64
        tie = (y - y.floor()) == 0.5
        assert tie.float().mean() > 0.3
        assert torch.all(q8[tie].abs() % 2 == 0)


def test_ties_round_to_even():
    x = torch.tensor([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 0.0])
    x = x.reshape(1, 1, -1, 1)
    q8, qs, _, _ = quantize_qk(x, x, smooth_k=False)
    assert qs.item() == 1.0
    assert q8.flatten().tolist() == [127, 0, 0, 2, -2, 2, -2, 126, -126, 0]


def test_zero_blocks_and_padded_keys():
    q = torch.zeros(1, 1, 130, 8)
    q[:, :, 64:128] = torch.randn(1, 1, 64, 8)
    k = torch.randn(1, 1, 130, 8) * 100
    kpm = torch.ones(1, 130, dtype=torch.bool)
    kpm[0, 64:] = False                                   # keys 64.. are padding
    q8, qs, k8, ks = quantize_qk(q, k, key_padding_mask=kpm)
    assert qs[0, 0, 0] == 1.0 and qs[0, 0, 2] == 1.0 and not torch.any(q8[:, :, :64])
    assert torch.all(ks[0, 0, 1:] == 1.0) and not torch.any(k8[:, :, 64:])
    torch.testing.assert_close(quant.smoothing_mean(k, kpm), k[:, :, :64].mean(2, keepdim=True))


# ---------------------------------------------------------------------------------------------
# Each backend's integers are the definition's


@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cpu_fused_quantization_is_the_definition(case):
    """The CPU kernel quantizes inside (fused); fed quant.quantize_qk's integers instead, the same
    kernel gives a bit-equal output and lse. Pre-quantized calls of at most 8 rows take the int8
    decode kernel on avx512/amx, which rounds P to bf16 against another running max: there the
    outputs may differ by one bf16 step (of the output's magnitude), no more."""
    from hybrid_kernels.api import plan
    from hybrid_kernels.backends.cpu import CpuBackend
    from hybrid_kernels.int8_cache import smoothing_lse_offset
    q, k, v, kpm = (t.to(torch.bfloat16) if t.is_floating_point() else t
                    for t in make_inputs(case))
    pattern, _ = plan(q, k, v, **pattern_kwargs(case, kpm))
    backend = CpuBackend()
    out, lse = backend.forward(q, k, v, pattern, "int8")
    q8, qs, k8, ks, mean = quantize_qk(q, k, key_padding_mask=pattern.key_padding_mask,
                                       return_k_mean=True)
    out2, lse2 = backend.forward_int8_quantized(q8, qs, k8, ks, v, q, pattern, QUANT_BLOCK,
                                                QUANT_BLOCK)
    from hybrid_kernels.backends.cpu import load_module
    decode_kernel = q.shape[2] <= 8 and load_module().selected_isa() in ("avx512", "amx")
    if decode_kernel:
        step = 2.0 ** -8 * float(out.float().abs().max())  # one bf16 step at the output's scale
        assert float((out.float() - out2.float()).abs().max()) <= step
    else:
        assert torch.equal(out, out2)
    lse2 = lse2 + smoothing_lse_offset(q, mean, pattern.scale)
    torch.testing.assert_close(lse, lse2, rtol=0, atol=2e-5)


class _Capture:
    """A native backend stand-in: records what int8_forward_via hands the kernel."""
    def forward_int8_quantized(self, q8, q_scale, k8, k_scale, v, q_like, pattern, qb, kb):
        self.got = (q8, q_scale, k8, k_scale, qb, kb)
        B, Hq, Nq, _ = q_like.shape
        return torch.zeros(B, Hq, Nq, v.shape[3]), torch.zeros(B, Hq, Nq)


@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=lambda c: c.id)
def test_cuda_host_quantization_and_cache_are_the_definition(case):
    """The CUDA backend's int8 path (int8_forward_via: its kernel quantizes nothing itself and
    takes the block sizes it is given) and Int8KVCache hand over quant.quantize_qk's bits."""
    from hybrid_kernels.api import plan
    from hybrid_kernels.backends._params import int8_forward_via
    from hybrid_kernels.int8_cache import Int8KVCache
    q, k, v, kpm = (t.to(torch.float16) if t.is_floating_point() else t for t in make_inputs(case))
    pattern, _ = plan(q, k, v, **pattern_kwargs(case, kpm))
    cap = _Capture()
    int8_forward_via(cap, q, k, v, pattern)
    want = quantize_qk(q, k, key_padding_mask=pattern.key_padding_mask)
    assert cap.got[4:] == (QUANT_BLOCK, QUANT_BLOCK)
    assert all(torch.equal(a, b) for a, b in zip(cap.got[:4], want))
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=pattern.key_padding_mask)
    assert torch.equal(cache.k8, want[2]) and torch.equal(cache.k_scale, want[3])


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_quantization_is_the_definition(case, dtype):
    from hybrid_kernels.triton_kernels import quantize as tq
    q, k, _, kpm = make_inputs(case)
    q, k = q.to(TRITON_DEVICE, dtype), k.to(TRITON_DEVICE, dtype)
    pad = kpm.to(TRITON_DEVICE) if case.padding else None
    q8, qs, k8, ks, qb, kb, mean = tq.quantize_qk(q, k, pad)
    assert (qb, kb) == (QUANT_BLOCK, QUANT_BLOCK)
    want = quantize_qk(q, k, key_padding_mask=pad, return_k_mean=True)
    for got, exp in zip((q8, qs, k8, ks, mean), want):
        assert torch.equal(got.reshape(exp.shape), exp)


# ---------------------------------------------------------------------------------------------
# The backends' outputs agree with each other


def _half_ulp(dtype) -> float:
    """Relative rounding error bound of the output dtype (outputs are returned in q's dtype)."""
    return {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


def _pv_model(backend: str, dtype):
    """(PV precision, whether the backend rounds P exactly as the emulation does)."""
    if backend == "cpu":
        # bf16 for every dtype; its P differs from the emulation's by more than fp32 roundoff
        # (exp2 and max-shift details), so it gets the PV-error slack.
        return torch.bfloat16, False
    if backend == "triton":
        if dtype == torch.float32:
            return torch.float64, True   # fp32 V: fp32 PV (IEEE dot): exact up to roundoff
        return dtype, False              # V's dtype, P shifted by the running max
    return torch.float64, True           # reference: fp32 emulation of the exact product


class _Emulations:
    """quant.int8_reference with each PV precision, and each backend's error bound around its own."""
    def __init__(self, q, k, v, kw, dtype):
        exact, self.lse_smoothed = int8_reference(q, k, v, pv_dtype=torch.float64, **kw)
        self.out = {torch.float64: exact.double()}
        for pv in (torch.bfloat16, torch.float16):
            self.out[pv] = int8_reference(q, k, v, pv_dtype=pv, **kw)[0].double()
        self.pv_err = {pv: (o - self.out[torch.float64]).abs().max().item()
                       for pv, o in self.out.items()}
        self.scale = exact.abs().max().item()
        self.dtype = dtype

    def of(self, backend):
        return self.out[_pv_model(backend, self.dtype)[0]]

    def bound(self, backend) -> torch.Tensor:
        """Elementwise bound on |backend out - its emulation|: fp32 roundoff when it rounds P as
        the emulation does, else twice the emulation's own PV error; plus the output rounding."""
        pv, same = _pv_model(backend, self.dtype)
        slack = 1e-5 * self.scale if same else 2.0 * self.pv_err[pv]
        return slack + _half_ulp(self.dtype) * self.of(backend).abs() * 1.01


def _run(backend, q, k, v, case, kpm, device="cpu", **mods):
    dev = lambda t: t.to(device) if t is not None else None  # noqa: E731
    pk = pattern_kwargs(case, kpm)
    pk["key_padding_mask"] = dev(pk["key_padding_mask"])
    out, lse = hk.attention(dev(q), dev(k), dev(v), **pk, **mods, quant="int8", return_lse=True,
                            backend=backend)
    return out.cpu().double(), lse.cpu().double()


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


def _check_agreement(results, emu, fp32_out):
    for name, (out, _) in results.items():
        err = (out - emu.of(name)).abs() - emu.bound(name)
        assert err.max() <= 0, (f"{name} vs the int8 emulation with its PV precision: exceeds "
                                f"the bound by {err.max().item():.3g}")
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            oa, ob = results[a][0], results[b][0]
            # What their PV precisions allow (the emulations' difference) plus both bounds.
            tol = (emu.of(a) - emu.of(b)).abs() + emu.bound(a) + emu.bound(b)
            excess = ((oa - ob).abs() - tol).max().item()
            assert excess <= 0, f"{a} vs {b}: out differs beyond the PV tolerance by {excess:.3g}"
            # Much closer to each other than to fp32 attention: the same integers, not two
            # independent approximations.
            assert 2.0 * _rms(oa - ob) < _rms(oa - fp32_out), (a, b)
            if emu.dtype == torch.float32 and _pv_model(a, emu.dtype) == _pv_model(b, emu.dtype):
                assert 100 * tol.max().item() < (oa - fp32_out).abs().max().item(), (a, b)
            la, lb = results[a][1], results[b][1]
            assert torch.equal(torch.isinf(la), torch.isinf(lb))
            fin = torch.isfinite(la)
            torch.testing.assert_close(la[fin], lb[fin], rtol=1e-5, atol=2e-4,
                                       msg=lambda m: f"lse {a} vs {b}: {m}")


def _backends_here():
    names = ["reference"]
    if _cpu_available():
        names.append("cpu")
    return names


def _agreement(case, dtype, with_triton: bool):
    q, k, v, kpm = make_inputs(case)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kw = reference_kwargs(case, q, k, kpm)
    emu = _Emulations(q, k, v, kw, dtype)
    fp32_out, _ = dense_reference(q.float(), k.float(), v.float(), **kw)
    results = {name: _run(name, q, k, v, case, kpm) for name in _backends_here()}
    if with_triton:
        results["triton"] = _run("triton", q, k, v, case, kpm, device=TRITON_DEVICE)
    _check_agreement(results, emu, fp32_out.double())
    # lse: that of the exact scores (the smoothed emulation's lse plus scale * q . mean)
    from hybrid_kernels.int8_cache import smoothing_lse_offset
    mean = quant.smoothing_mean(k, kw["key_padding_mask"])
    want = emu.lse_smoothed.double() + smoothing_lse_offset(q, mean, kw["scale"]).double()
    fin = torch.isfinite(want)
    for name, (_, lse) in results.items():
        assert torch.equal(torch.isinf(lse), torch.isinf(want)), name
        torch.testing.assert_close(lse[fin], want[fin], rtol=1e-5, atol=2e-4,
                                   msg=lambda m: f"lse {name}: {m}")


@pytest.mark.skipif(INTERPRETING, reason="covered with triton in the interpreter child")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_and_reference_outputs_agree(case, dtype):
    _agreement(case, dtype, with_triton=False)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_cpu_reference_outputs_agree(case, dtype):
    _agreement(case, dtype, with_triton=True)


@needs_triton
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=lambda c: c.id)
def test_triton_score_modifiers_agree_with_reference(case):
    """softcap (which acts on the exact scores: the smoothing shift is added back first) and the
    offset bias, Triton against the reference emulation, fp32 (PV exact in both)."""
    q, k, v, kpm = make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(case.Hq, case.Nq + case.Nk - 1, generator=gen)
    for mods in (dict(softcap=2.0), dict(position_bias=bias),
                 dict(softcap=5.0, position_bias=bias)):
        ref = _run("reference", q, k, v, case, kpm, **mods)
        tri = _run("triton", q, k, v, case, kpm, device=TRITON_DEVICE, **mods)
        scale = ref[0].abs().max().item()
        torch.testing.assert_close(tri[0], ref[0], rtol=0, atol=2e-5 * scale,
                                   msg=lambda m: f"out {mods.keys()}: {m}")
        fin = torch.isfinite(ref[1])
        torch.testing.assert_close(tri[1][fin], ref[1][fin], rtol=1e-5, atol=2e-4,
                                   msg=lambda m: f"lse {mods.keys()}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_smoothing_mean_native_matches_torch(monkeypatch, dtype, masked):
    """The CPU smoothing mean (the native key_mean when built) against torch's formula: the
    same value to fp32 summation-order rounding, bit-equal for 1 and 3 threads and for a
    strided K, an all-padded batch row gives 0."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 1025, 80, generator=g) + 3.0
    k = base[..., 8:67].to(dtype)                       # D = 59, rows strided
    mask = None
    if masked:
        mask = torch.rand(2, 1025, generator=g) > 0.3
        mask[1] = False
    monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", "1")
    one = quant.smoothing_mean(k, mask)
    monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", "3")
    three = quant.smoothing_mean(k, mask)
    assert torch.equal(one, three)
    assert torch.equal(one, quant.smoothing_mean(k.contiguous(), mask))
    kf = k.float()
    if mask is None:
        want = kf.mean(dim=2, keepdim=True)
    else:
        real = mask[:, None, None, :].float()
        want = torch.matmul(real, kf) / real.sum(-1, keepdim=True).clamp_min(1.0)
    assert one.shape == (2, 3, 1, 59) and one.dtype == torch.float32
    assert float((one - want).abs().max()) <= 1025 * 2.0 ** -24 * float(kf.abs().max())
    if masked:
        assert torch.equal(one[1], torch.zeros_like(one[1]))
