"""The decode path (few query rows) and the per-call fast path of hk.attention (cached plans that
skip validation, dispatch and the custom op when no autograd graph or compile is involved).

Correctness against the float64 oracle (tests/oracle.py: at most twice the error of the same
computation in the input dtype plus fp32 rounding), the full pattern contract on the decode
kernel, plans never going stale, thread-count determinism, and unchanged errors."""
from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hybrid_kernels as hk
from hybrid_kernels import fast_path
from hybrid_kernels.backends._alloc import replay_allocator
from hybrid_kernels.backends.cpu import CpuBackend
from hybrid_kernels.reference import dense_reference

from oracle import assert_matches_oracle, reference_pair

pytestmark = pytest.mark.skipif(CpuBackend().unavailable_reason() is not None,
                                reason="native CPU module not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(B, Hq, Hk, Nq, Nk, D, dtype, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, Nk, Dv or D, generator=g).to(dtype)
    return q, k, v


def _check(name, q, k, v, out, lse, **pattern):
    (o64, l64), (ob, lb) = reference_pair(q, k, v, **pattern)
    assert_matches_oracle(f"{name} out", out, o64, ob)
    assert_matches_oracle(f"{name} lse", lse, l64, lb)


def _pattern_kwargs(kw, B, Nk):
    """hk.attention keywords -> dense_reference keywords."""
    out = {}
    if "window" in kw:
        w = kw["window"]
        out["window_left"], out["window_right"] = (w, w) if isinstance(w, int) else w
    if "causal" in kw:
        out["causal"] = kw["causal"]
    if "landmarks" in kw:
        out["landmarks"] = torch.arange(0, Nk, kw["landmarks"]).expand(B, -1)
    if "key_padding_mask" in kw:
        out["key_padding_mask"] = kw["key_padding_mask"]
    if "scale" in kw:
        out["scale"] = kw["scale"]
    if "softcap" in kw:
        out["softcap"] = kw["softcap"]
    return out


VARIANTS = ["mha", "gqa", "window_lm_pad"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("Nk", [1, 16, 97, 1025])
@pytest.mark.parametrize("Nq", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_oracle(dtype, Nq, Nk, variant):
    B, Hq, Hk = (2, 4, 2) if variant == "window_lm_pad" else (1, 8, 8 if variant == "mha" else 2)
    q, k, v = _inputs(B, Hq, Hk, Nq, Nk, 64, dtype, seed=Nq * 1000 + Nk)
    kw = {}
    if variant == "window_lm_pad":
        g = torch.Generator().manual_seed(7)
        mask = torch.rand(B, Nk, generator=g) < 0.8
        kw = dict(window=(16, 0), causal=True, landmarks=8, key_padding_mask=mask)
    with torch.inference_mode():
        for _ in range(2):  # the second call replays the cached plan where there is one
            out, lse = hk.attention(q, k, v, return_lse=True, **kw)
            _check(f"{dtype} Nq={Nq} Nk={Nk} {variant}", q, k, v, out, lse,
                   **_pattern_kwargs(kw, B, Nk))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_band_in_chunks(dtype):
    """Rows long enough to be cut into chunks, with a band that starts past key 0: chunks of band
    keys only (addressed as one run of keys) next to chunks that reach the landmarks (addressed by
    the key table), padded keys and key strides over a (B, N, H, D) layout."""
    B, Hq, Hk, Nq, Nk, D = 2, 4, 2, 3, 2049, 64
    q, k, v = _inputs(B, Hq, Hk, Nq, Nk, D, dtype, seed=11)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # rows Hk * D apart
    g = torch.Generator().manual_seed(12)
    mask = torch.rand(B, Nk, generator=g) < 0.9
    for kw in (dict(window=(700, 0), causal=True, landmarks=97, key_padding_mask=mask),
               dict(window=(1300, 0), causal=True)):
        with torch.inference_mode():
            out, lse = hk.attention(q, k, v, return_lse=True, **kw)
        _check(f"{dtype} {sorted(kw)}", q, k, v, out, lse, **_pattern_kwargs(kw, B, Nk))


@pytest.mark.parametrize("D,Dv", [(32, 32), (96, 96), (128, 128), (256, 256), (64, 32), (64, 96),
                                  (59, 59), (48, 64)])
@pytest.mark.parametrize("Hk", [8, 2])
def test_decode_head_dims(D, Dv, Hk):
    """Head dims around the bf16 vdpbf16ps path (D and Dv multiples of 32; P V alone when only Dv
    is; 64-feature and 32-feature V blocks; neither) and the widening path, odd key counts."""
    for dtype in DTYPES:
        q, k, v = _inputs(1, 8, Hk, 1, 333, D, dtype, seed=D * 7 + Dv, Dv=Dv)
        with torch.inference_mode():
            out, lse = hk.attention(q, k, v, return_lse=True)
        _check(f"{dtype} D={D} Dv={Dv} Hk={Hk}", q, k, v, out, lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mods", ["softcap", "position_bias", "sinks", "all"])
def test_score_modifiers_through_the_fast_path(dtype, mods):
    B, Hq, Hk, Nq, Nk, D = 1, 8, 2, 1, 97, 64
    q, k, v = _inputs(B, Hq, Hk, Nq, Nk, D, dtype, seed=3)
    g = torch.Generator().manual_seed(5)
    kw, ref = {}, {}
    if mods in ("softcap", "all"):
        kw["softcap"] = ref["softcap"] = 1.5
    if mods in ("position_bias", "all"):
        kw["position_bias"] = 2.0 * torch.randn(Hq, Nq + Nk - 1, generator=g)
        ref["bias"] = kw["position_bias"]
    sinks = None
    if mods in ("sinks", "all"):
        sinks = kw["sinks"] = torch.randn(Hq, generator=g)
    with torch.inference_mode():
        out, lse = hk.attention(q, k, v, return_lse=True, **kw)
    (o64, l64), (ob, lb) = reference_pair(q, k, v, **ref)
    if sinks is not None:  # the sink joins each row's denominator without a value
        results = []
        for o, l in ((o64, l64), (ob, lb)):
            s = sinks.to(torch.float64 if o is o64 else torch.float32)[None, :, None]
            new_l = torch.logaddexp(l.to(s.dtype), s)
            results.append(((o.to(s.dtype) * torch.exp(l.to(s.dtype) - new_l)[..., None]).to(o.dtype),
                            new_l))
        (o64, l64), (ob, lb) = results
    assert_matches_oracle(f"{mods} out", out, o64, ob)
    assert_matches_oracle(f"{mods} lse", lse, l64, lb)


def test_the_fast_path_is_taken_and_replays():
    q, k, v = _inputs(1, 8, 2, 1, 64, 64, torch.float32)
    fast_path._PLANS.clear()
    with torch.inference_mode():
        a = hk.attention(q, k, v)
        plans = [p for p in fast_path._PLANS.values() if isinstance(p, fast_path._CpuPlan)]
        assert len(plans) == 1
        b = hk.attention(q, k, v)
    assert torch.equal(a, b)
    # New data at the same shapes: the plan's pointers follow the call's tensors.
    q2, k2, v2 = _inputs(1, 8, 2, 1, 64, 64, torch.float32, seed=9)
    with torch.inference_mode():
        c = hk.attention(q2, k2, v2)
    (o64, _), (ob, _) = reference_pair(q2, k2, v2)
    assert_matches_oracle("new data", c, o64, ob)


def test_native_replay_entries_reject_bad_calls():
    """The plan replays' native entries (METH_FASTCALL, positional) name what is wrong: the
    argument count, the params type, a non-integer pointer, and the kernel's own checks."""
    from hybrid_kernels import _C_cpu as mod
    with pytest.raises(TypeError, match="takes 14 positional arguments"):
        mod.attention_forward_ptrs_kv()
    with pytest.raises(TypeError, match="params must be a .*AttnParams, got int"):
        mod.attention_forward_ptrs_kv(*([1] * 14))
    with pytest.raises(TypeError):
        mod.attention_forward_ptrs_kv(mod.AttnParams(), *([0] * 6), "x", *([0] * 6))
    with pytest.raises(ValueError, match="attention_forward: Hq and Hk must be > 0"):
        mod.attention_forward_ptrs_kv(mod.AttnParams(), *([0] * 13))
    with pytest.raises(TypeError, match="params must be a .*AttnInt8Params"):
        mod.attention_forward_int8_ptrs(mod.AttnParams(), 0, 0, 0)
    with pytest.raises(TypeError, match="takes 4 positional arguments"):
        mod.attention_forward_int8_ptrs(mod.AttnInt8Params(), 0, 0)


@pytest.mark.parametrize("q_layout", ["contiguous", "size-1 dims strided", "(B, N, H, D) view",
                                      "Dv != D"])
def test_replayed_outputs_are_new_contiguous_tensors(q_layout):
    """A replay makes its output like q when q is contiguous with the output's shape (strides may
    then differ over dims of size 1 only), else with the output's own shape: either way a new,
    contiguous tensor, equal to the first call's and written in full (NaN-filled beforehand)."""
    g = torch.Generator().manual_seed(5)
    Nq = 3 if q_layout == "(B, N, H, D) view" else 1
    Dv = 32 if q_layout == "Dv != D" else 64
    if q_layout == "size-1 dims strided":
        # (2, 8, 1, 64) with strides (512, 64, 512, 1): contiguous, not the default strides
        q = torch.randn(2, 1, 8, 64, generator=g).transpose(1, 2)
    elif q_layout == "(B, N, H, D) view":
        q = torch.randn(2, Nq, 8, 64, generator=g).transpose(1, 2)
    else:
        q = torch.randn(2, 8, Nq, 64, generator=g)
    k = torch.randn(2, 2, 77, 64, generator=g)
    v = torch.randn(2, 2, 77, Dv, generator=g)
    fast_path._PLANS.clear()
    with torch.inference_mode():
        first = hk.attention(q, k, v)
        plan, = [p for p in fast_path._PLANS.values() if isinstance(p, fast_path._CpuPlan)]
        plan.new_out = replay_allocator((2, 8, Nq, Dv), q.dtype, q, poison=True)
        again = hk.attention(q, k, v)
    assert again.shape == (2, 8, Nq, Dv) and again.is_contiguous()
    assert again.data_ptr() not in (first.data_ptr(), q.data_ptr())
    assert torch.equal(first, again)
    (o64, _), (ob, _) = reference_pair(q, k, v)
    assert_matches_oracle(q_layout, again, o64, ob)


@pytest.mark.parametrize("layout", ["fresh", "static buffer", "v transposed storage"])
@pytest.mark.parametrize("kw", [{}, {"causal": True, "window": (6, 0)}, {"softcap": 2.0},
                                {"padded": True}],
                         ids=["plain", "causal window", "softcap", "padding"])
def test_a_growing_kv_cache_replays_one_plan(layout, kw):
    """Decode steps against a cache one key longer per call (generation): one plan serves every
    length (with a padding mask too: each call's (B, Nk) mask is read), each call passes its K/V
    length and strides, every result matches the oracle, and the plan holds none of its first
    call's tensors."""
    kw = dict(kw)
    padded = kw.pop("padded", False)
    g = torch.Generator().manual_seed(21)
    B, Hq, Hk, Nq, D = 2, 8, 2, 3 if kw.get("causal") else 1, 64
    q = torch.randn(B, Hq, Nq, D, generator=g)
    buf_k, buf_v = (torch.randn(B, Hk, 1200, D, generator=g) for _ in range(2))
    fast_path._PLANS.clear()
    for nk in [1, 2, 3, 17, 18, 97, 98, 1025, 1026]:
        if layout == "fresh":
            k, v = buf_k[:, :, :nk].clone(), buf_v[:, :, :nk].clone()
        elif layout == "static buffer":
            k, v = buf_k[:, :, :nk], buf_v[:, :, :nk]
        else:
            k = buf_k[:, :, :nk].clone()
            v = buf_v[:, :, :nk].transpose(1, 2).contiguous().transpose(1, 2)
        if padded:
            kw["key_padding_mask"] = torch.rand(B, nk, generator=g) < 0.7
            if nk == 98:
                kw["key_padding_mask"][1] = False  # a batch row that sees nothing
        with torch.inference_mode():
            out, lse = hk.attention(q, k, v, return_lse=True, **kw)
        ref_kw = _pattern_kwargs(kw, B, nk)
        (o64, l64), (ob, lb) = reference_pair(q, k, v, **ref_kw)
        assert_matches_oracle(f"Nk={nk} out", out, o64, ob)
        assert torch.equal(torch.isinf(lse), torch.isinf(l64)), f"Nk={nk}: -inf rows"
        assert_matches_oracle(f"Nk={nk} lse", lse, l64, lb)
    plans = [p for p in fast_path._PLANS.values() if isinstance(p, fast_path._CpuPlan)]
    assert len(plans) == 1, "one plan for every length"
    held = [weakref.ref(t) for t in (k, v, out, lse, *([kw["key_padding_mask"]] if padded else []))]
    del k, v, out, lse, kw, ref_kw
    gc.collect()
    assert all(ref() is None for ref in held), "a plan keeps no call's tensors alive"


def test_an_any_length_plan_leaves_length_checks_to_the_general_path():
    q, k, v = _inputs(1, 8, 2, 1, 40, 64, torch.float32)
    with torch.inference_mode():
        hk.attention(q, k, v)
        with pytest.raises(ValueError, match="must agree on Hk and Nk"):
            hk.attention(q, k, v[:, :, :39])
        empty = hk.attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    ref = hk.attention(q, k[:, :, :0], v[:, :, :0], return_lse=True, backend="reference")
    assert torch.equal(empty[0], ref[0]) and torch.equal(empty[1], ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_masks_replay_a_plan_reading_each_calls_mask(dtype):
    """A key padding mask is keyed by its layout: every call reads its own mask's bytes, so new
    mask contents at the same shape give new (correct) results, and an all-padding row zeros."""
    q, k, v = _inputs(2, 8, 2, 1, 97, 64, dtype)
    fast_path._PLANS.clear()
    g = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for step in range(4):
            kpm = torch.rand(2, 97, generator=g) < 0.6
            if step == 3:
                kpm[1] = False  # a batch row that sees nothing
            out, lse = hk.attention(q, k, v, key_padding_mask=kpm, return_lse=True)
            (o64, l64), (ob, lb) = reference_pair(q, k, v, key_padding_mask=kpm)
            assert_matches_oracle(f"step {step} out", out, o64, ob)
            assert torch.equal(torch.isinf(lse), torch.isinf(l64))
            assert_matches_oracle(f"step {step} lse", lse, l64, lb)
    plans = [p for p in fast_path._PLANS.values() if isinstance(p, fast_path._CpuPlan)]
    assert len(plans) == 1, "one plan served every mask of this layout"
    with torch.inference_mode():
        with pytest.raises(TypeError, match="torch.bool"):
            hk.attention(q, k, v, key_padding_mask=kpm.to(torch.uint8))
        with pytest.raises(ValueError, match="shape"):
            hk.attention(q, k, v, key_padding_mask=kpm[:, :96])
        # A strided mask (not one row of bytes per batch) takes the general path, correctly.
        wide = torch.rand(2, 194, generator=g) < 0.6
        out = hk.attention(q, k, v, key_padding_mask=wide[:, ::2])
        (o64, _), (ob, _) = reference_pair(q, k, v, key_padding_mask=wide[:, ::2])
        assert_matches_oracle("strided mask", out, o64, ob)


def test_plans_never_go_stale():
    """One call after another, changing one thing each time; every result against the oracle."""
    base = dict(B=1, Hq=8, Hk=2, Nq=1, Nk=33, D=64)
    g = torch.Generator().manual_seed(11)
    steps = []
    q, k, v = _inputs(**base, dtype=torch.float32)
    steps.append(("base", q, k, v, {}))
    steps.append(("Nk", *_inputs(**{**base, "Nk": 40}, dtype=torch.float32), {}))
    steps.append(("Nq", *_inputs(**{**base, "Nq": 3}, dtype=torch.float32), {}))
    steps.append(("Hk", *_inputs(**{**base, "Hk": 8}, dtype=torch.float32), {}))
    steps.append(("bf16", *_inputs(**base, dtype=torch.bfloat16), {}))
    steps.append(("fp16", *_inputs(**base, dtype=torch.float16), {}))
    steps.append(("Dv", *_inputs(**base, dtype=torch.float32, Dv=32), {}))
    big = torch.randn(1, 2, 80, 64, generator=g)
    steps.append(("k strides", q, big[:, :, 5:38], v, {}))
    steps.append(("v transposed storage", q, k,
                  torch.randn(1, 33, 2, 64, generator=g).transpose(1, 2), {}))
    steps.append(("k expanded", q, torch.randn(1, 1, 33, 64, generator=g).expand(1, 2, 33, 64), v, {}))
    steps.append(("k last dim strided", q, torch.randn(1, 2, 33, 128, generator=g)[..., ::2], v, {}))
    steps.append(("window", q, k, v, {"window": (4, 0)}))
    steps.append(("window int", q, k, v, {"window": 3}))
    steps.append(("causal", *_inputs(**{**base, "Nq": 3}, dtype=torch.float32),
                  {"causal": True, "window": (5, 0)}))
    steps.append(("padding", q, k, v, {"key_padding_mask": torch.rand(1, 33, generator=g) < 0.5}))
    steps.append(("landmarks", q, k, v, {"window": (2, 0), "landmarks": 4}))
    steps.append(("scale", q, k, v, {"scale": 0.3}))
    steps.append(("scale int", q, k, v, {"scale": 1}))
    steps.append(("softcap", q, k, v, {"softcap": 0.7}))
    steps.append(("base again", q, k, v, {}))
    for name, q, k, v, kw in steps:
        for return_lse in (False, True, False):
            with torch.inference_mode():
                res = hk.attention(q, k, v, return_lse=return_lse, **kw)
            out, lse = res if return_lse else (res, None)
            ref_kw = _pattern_kwargs(kw, q.shape[0], k.shape[2])
            if "landmarks" in kw:
                ref_kw["landmarks"] = torch.arange(0, k.shape[2], kw["landmarks"]).expand(1, -1)
            (o64, l64), (ob, lb) = reference_pair(q, k, v, **ref_kw)
            assert out.shape == o64.shape and out.dtype == q.dtype, name
            assert_matches_oracle(f"{name} out", out, o64, ob)
            if lse is not None:
                assert_matches_oracle(f"{name} lse", lse, l64, lb)


def test_env_changes_make_new_plans(monkeypatch):
    q, k, v = _inputs(1, 8, 2, 1, 16, 64, torch.float32)
    with torch.inference_mode():
        monkeypatch.setenv("HYBRID_KERNELS_POISON", "1")
        a = hk.attention(q, k, v)
        monkeypatch.setenv("HYBRID_KERNELS_POISON", "0")
        b = hk.attention(q, k, v)
        fast_path._PLANS.clear()
        monkeypatch.setenv("HYBRID_KERNELS_BACKEND", "reference")
        with warnings.catch_warnings():  # the override warns once per process
            warnings.simplefilter("ignore", RuntimeWarning)
            c = hk.attention(q, k, v)
    assert list(fast_path._PLANS.values()) == [False], "the reference override takes the general path"
    monkeypatch.delenv("HYBRID_KERNELS_BACKEND")
    with torch.inference_mode():
        monkeypatch.setenv("HYBRID_KERNELS_POISON", "1")
        hk.attention(q, k, v)
        monkeypatch.setenv("HYBRID_KERNELS_POISON", "0")
        hk.attention(q, k, v)
    poisons = {p.poison for p in fast_path._PLANS.values() if isinstance(p, fast_path._CpuPlan)}
    assert poisons == {True, False}
    (o64, _), (ob, _) = reference_pair(q, k, v)
    for name, out in (("poison", a), ("no poison", b), ("reference override", c)):
        assert_matches_oracle(name, out, o64, ob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Nk", [16, 1025, 5000])
@pytest.mark.parametrize("Hk", [8, 2])
def test_thread_count_determinism(monkeypatch, dtype, Nk, Hk):
    q, k, v = _inputs(1, 8, Hk, 1, Nk, 64, dtype, seed=Nk)
    outs = []
    with torch.inference_mode():
        for n in ("1", "2", "3", "1"):
            monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
            for _ in range(2):
                outs.append(hk.attention(q, k, v, return_lse=True))
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_autograd_and_modes_take_the_custom_op():
    q, k, v = _inputs(1, 8, 2, 1, 16, 64, torch.float32)
    q.requires_grad_(True)
    out = hk.attention(q, k, v)
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), Log():
        hk.attention(q.detach(), k, v)
    assert any("hybrid_kernels.attention_fwd" in s for s in seen), seen


def test_bad_inputs_still_raise_after_a_plan_is_cached():
    q, k, v = _inputs(1, 8, 2, 1, 16, 64, torch.float32)
    with torch.inference_mode():
        hk.attention(q, k, v)
        hk.attention(q, k, v, scale=1)
        hk.attention(q, k, v, window=1)
        with pytest.raises(TypeError, match="scale must be a Python float"):
            hk.attention(q, k, v, scale=True)
        with pytest.raises(ValueError, match="scale must be finite"):
            hk.attention(q, k, v, scale=math.nan)
        with pytest.raises(ValueError, match="window"):
            hk.attention(q, k, v, window=(True, 1))
        with pytest.raises(ValueError, match="window"):
            hk.attention(q, k, v, window=[1, 1, 1])
        with pytest.raises(TypeError, match="causal must be a bool"):
            hk.attention(q, k, v, causal=0)
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            hk.attention(q, k, v, return_lse=0)
        with pytest.raises(ValueError, match="backend must be one of"):
            hk.attention(q, k, v, backend="nope")
        with pytest.raises(TypeError, match="share one dtype"):
            hk.attention(q, k.bfloat16(), v)
        with pytest.raises(ValueError, match="softcap"):
            hk.attention(q, k, v, softcap=-1.0)
        with pytest.raises(ValueError, match="multiple"):
            hk.attention(q[:, :7], k[:, :2], v[:, :2])


def test_poisoned_outputs_are_fully_written():
    """HYBRID_KERNELS_POISON=1 (tests/conftest.py): the fast path NaN-fills its outputs too, and
    the kernel overwrites every element."""
    q, k, v = _inputs(1, 8, 2, 5, 97, 64, torch.float32)
    with torch.inference_mode():
        for _ in range(3):
            out, lse = hk.attention(q, k, v, return_lse=True)
            assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert any(p.poison for p in fast_path._PLANS.values() if isinstance(p, fast_path._CpuPlan))


@pytest.mark.parametrize("v_dtype", DTYPES)
@pytest.mark.parametrize("Nq,Nk,kw,pad", [
    (1, 16, {}, False), (1, 1025, {}, False),
    (5, 97, dict(window=(8, 0), causal=True, landmarks=10), True), (8, 300, {}, True)])
def test_int8_cache_decode_path(monkeypatch, v_dtype, Nq, Nk, kw, pad):
    """The int8 K cache on the decode path against the tiled int8 kernel (the fused int8 forward
    of the same float K: the same integers, by the one int8 definition) and the exact float64
    attention: its error against the exact result stays that of the int8 kernel (up to P's bf16
    rounding, taken against another running max), and the same rows are empty."""
    from hybrid_kernels.int8_cache import Int8KVCache
    g = torch.Generator().manual_seed(Nq * 100 + Nk)
    q = torch.randn(2, 8, Nq, 64, generator=g).to(v_dtype)
    k = torch.randn(2, 2, Nk, 64, generator=g) + 1.0
    v = torch.randn(2, 2, Nk, 64, generator=g).to(v_dtype)
    kpm = (torch.rand(2, Nk, generator=g) > 0.2) if pad else None
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    o_tiled, l_tiled = hk.attention(q, k.to(v_dtype) if v_dtype != torch.float32 else k, v,
                                    quant="int8", key_padding_mask=kpm, return_lse=True,
                                    backend="cpu", **kw)
    with torch.inference_mode():
        o_dec, l_dec = cache.attention(q, return_lse=True, **kw)
        again, _ = cache.attention(q, return_lse=True, **kw)
    assert torch.equal(o_dec, again)
    ref_kw = _pattern_kwargs(kw, 2, Nk)
    if kpm is not None:
        ref_kw["key_padding_mask"] = kpm
    exact, exact_lse = dense_reference(q.double(), k.double(), v.double(),
                                       compute_dtype=torch.float64, **ref_kw)
    assert torch.equal(torch.isfinite(l_dec), torch.isfinite(l_tiled))
    fin = torch.isfinite(exact_lse)
    err_dec = float((o_dec.double() - exact).abs().max())
    err_tiled = float((o_tiled.double() - exact).abs().max())
    assert err_dec <= 1.5 * err_tiled + 2e-3, (err_dec, err_tiled)
    assert float((l_dec.double() - exact_lse)[fin].abs().max()) <= \
        1.5 * float((l_tiled.double() - exact_lse)[fin].abs().max()) + 1e-4


def test_int8_cache_decode_thread_count_determinism(monkeypatch):
    from hybrid_kernels.int8_cache import Int8KVCache
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 1, 64, generator=g).bfloat16()
    cache = Int8KVCache.from_kv(torch.randn(1, 2, 5000, 64, generator=g),
                                torch.randn(1, 2, 5000, 64, generator=g).bfloat16())
    outs = []
    with torch.inference_mode():
        for n in ("1", "2", "3"):
            monkeypatch.setenv("HYBRID_KERNELS_NUM_THREADS", n)
            outs.append(cache.attention(q, return_lse=True))
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


@pytest.mark.parametrize("Nq", [1, 8, 20])
def test_int8_cache_q_quantized_in_the_kernel(Nq):
    """Int8KVCache on the CPU quantizes q inside the kernel: the same output bits as quantizing q
    in Python (quant.quantize_qk) and running the pre-quantized kernel, and the same exact lse up
    to the rounding of the smoothing offset."""
    from hybrid_kernels.dispatch import get_backend
    from hybrid_kernels.int8_cache import Int8KVCache, smoothing_lse_offset
    from hybrid_kernels.pattern import Pattern
    from hybrid_kernels.quant import quantize_qk
    g = torch.Generator().manual_seed(Nq)
    q = torch.randn(2, 4, Nq, 64, generator=g).bfloat16()
    k = torch.randn(2, 2, 150, 64, generator=g) + 2.0
    v = torch.randn(2, 2, 150, 64, generator=g).bfloat16()
    kpm = torch.rand(2, 150, generator=g) > 0.1
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    out, lse = cache.attention(q, window=(16, 0), causal=True, return_lse=True)
    pattern = Pattern(window_left=16, window_right=0, causal=True, key_padding_mask=kpm,
                      scale=1 / 8)
    q8, q_scale, _, _ = quantize_qk(q, q[:, :1, :1], q_block=cache.block, k_block=cache.block,
                                    smooth_k=False)
    ref_out, ref_lse = get_backend("cpu").forward_int8_quantized(
        q8, q_scale, cache.k8, cache.k_scale, cache.v, q, pattern, cache.block, cache.block)
    ref_lse = ref_lse + smoothing_lse_offset(q, cache.k_mean, pattern.scale)
    assert torch.equal(out, ref_out)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert float((lse - ref_lse)[fin].abs().max()) <= 1e-4
