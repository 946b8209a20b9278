"""Int8KVCache: K quantized once, reused by every decode step."""
import warnings

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.int8_cache import Int8KVCache


def _inputs(nq=4, nk=300, d=64):
    q = torch.randn(2, 4, nq, d)
    k = torch.randn(2, 2, nk, d) + 2.0  # an offset that smoothing removes
    v = torch.randn(2, 2, nk, d)
    kpm = torch.rand(2, nk) > 0.1
    return q, k, v, kpm


@pytest.mark.parametrize("override", [None, "reference"])
def test_cache_matches_int8_attention(monkeypatch, override):
    if override:
        monkeypatch.setenv("HYBRID_KERNELS_BACKEND", override)
    q, k, v, kpm = _inputs()
    pattern = dict(window=(32, 0), landmarks=50, causal=True)
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    with warnings.catch_warnings():  # the override warns once per process; not tested here
        warnings.simplefilter("ignore", RuntimeWarning)
        out, lse = cache.attention(q, **pattern, return_lse=True)
    exact, exact_lse = hk.attention(q, k, v, **pattern, key_padding_mask=kpm, return_lse=True,
                                    backend="reference")
    cos = torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0)
    assert cos >= 0.999
    assert (lse - exact_lse).abs().max() < 0.05, "lse is that of the exact (unsmoothed) scores"
    again = cache.attention(q, **pattern)
    assert torch.equal(out, again), "decode steps are deterministic"


def test_cache_is_a_quarter_of_fp32_k():
    q, k, v, _ = _inputs(nk=1024)
    cache = Int8KVCache.from_kv(k, v.half())
    assert cache.k8.dtype == torch.int8 and cache.k8.numel() == k.numel()
    assert cache.k8.numel() * 1 <= k.numel() * k.element_size() / 4


def test_cache_rejects_mismatched_kv():
    with pytest.raises(ValueError, match="must agree"):
        Int8KVCache.from_kv(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 11, 8))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_decode_calls_replay_a_plan_bit_for_bit(dtype):
    """The second call of a shape replays the plan the first one made: same bits as the general
    path, a fresh output per call, and a new plan (not a stale one) when anything keyed changes."""
    from hybrid_kernels.backends.cpu import CpuBackend
    if CpuBackend().unavailable_reason():
        pytest.skip("native CPU module not built")
    q, k, v, kpm = _inputs(nq=1, nk=257)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    general = cache.attention(q, window=(40, 0), causal=True, return_lse=True)
    assert len(cache._plans) == 1
    for _ in range(2):
        out, lse = cache.attention(q, window=(40, 0), causal=True, return_lse=True)
        assert torch.equal(out, general[0]) and torch.equal(lse, general[1])
        assert out.data_ptr() != general[0].data_ptr()
    q2 = torch.randn_like(q)
    fresh = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    assert torch.equal(cache.attention(q2, window=(40, 0), causal=True),
                       fresh.attention(q2, window=(40, 0), causal=True)), "q is read per call"
    plans = len(cache._plans)
    wide = cache.attention(q, window=(200, 0), causal=True)
    assert len(cache._plans) == plans + 1
    assert torch.equal(wide, fresh.attention(q, window=(200, 0), causal=True))


def test_softcap_and_sinks_calls_replay_a_plan():
    """Softcap (in the plan) and sinks (applied to the plan's out and lse) replay bit for bit;
    new sink values are read per call; a softcap or sinks the general path rejects still raise."""
    from hybrid_kernels.backends.cpu import CpuBackend
    if CpuBackend().unavailable_reason():
        pytest.skip("native CPU module not built")
    q, k, v, kpm = _inputs(nq=1, nk=257)
    q = q.bfloat16()
    cache = Int8KVCache.from_kv(k, v.bfloat16(), key_padding_mask=kpm)
    sinks = torch.randn(q.shape[1])
    kw = dict(window=(40, 0), causal=True, softcap=5.0)
    general = cache.attention(q, sinks=sinks, return_lse=True, **kw)
    assert len(cache._plans) == 1
    for _ in range(2):
        out, lse = cache.attention(q, sinks=sinks, return_lse=True, **kw)
        assert torch.equal(out, general[0]) and torch.equal(lse, general[1])
    assert len(cache._plans) == 1
    fresh = Int8KVCache.from_kv(k, v.bfloat16(), key_padding_mask=kpm)
    other = sinks + 3.0
    assert torch.equal(cache.attention(q, sinks=other, **kw), fresh.attention(q, sinks=other, **kw))
    assert torch.equal(cache.attention(q, **kw), fresh.attention(q, **kw)), "no sinks: a plan of its own"
    for _ in range(2):
        with pytest.raises(ValueError, match="sinks"):
            cache.attention(q, sinks=torch.zeros(3), **kw)
        with pytest.raises(ValueError, match="softcap"):
            cache.attention(q, window=(40, 0), causal=True, softcap=-1.0)


def test_a_plan_never_skips_an_error():
    q, k, v, kpm = _inputs(nq=1)
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    cache.attention(q, window=(8, 0), causal=True)
    for _ in range(2):
        with pytest.raises(ValueError, match="window"):
            cache.attention(q, window=(-5, 0), causal=True)


def _mods(name, heads, nq, nk):
    g = torch.Generator().manual_seed(5)
    every = dict(softcap=dict(softcap=4.0), sinks=dict(sinks=torch.randn(heads, generator=g)),
                 alibi=dict(alibi_slopes=torch.rand(heads, generator=g) * 0.2),
                 position_bias=dict(position_bias=torch.randn(heads, nq + nk - 1, generator=g)))
    if name == "all":
        return {**every["softcap"], **every["sinks"], **every["alibi"]}
    return every[name]


@pytest.mark.parametrize("override", [None, "reference"])
@pytest.mark.parametrize("mods", ["softcap", "sinks", "alibi", "position_bias", "all"])
def test_cache_score_modifiers(monkeypatch, override, mods):
    """Softcap, sinks and biases on the cache: the same int8 integers as the fused int8 call
    (hk.attention(quant="int8")), so as close to the exact result as that call; on the native
    kernel and, with the reference override, on the torch emulation."""
    if override:
        monkeypatch.setenv("HYBRID_KERNELS_BACKEND", override)
    torch.manual_seed(11)
    q, k, v, kpm = _inputs(nq=3)
    kw = _mods(mods, heads=4, nq=3, nk=k.shape[2])
    pattern = dict(window=(32, 0), causal=True)
    cache = Int8KVCache.from_kv(k, v, key_padding_mask=kpm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out, lse = cache.attention(q, **pattern, return_lse=True, **kw)
        fused, fused_lse = hk.attention(q, k, v, quant="int8", key_padding_mask=kpm,
                                        return_lse=True, **pattern, **kw)
    exact, exact_lse = hk.attention(q, k, v, key_padding_mask=kpm, return_lse=True,
                                    backend="reference", **pattern, **kw)
    bf16_step = 2.0 ** -8 * float(v.abs().max())  # P's bf16 rounding, taken at another max
    assert float((out - fused).abs().max()) <= bf16_step
    assert float((out - exact).abs().max()) <= 1.5 * float((fused - exact).abs().max()) + bf16_step
    assert float((lse - fused_lse).abs().max()) <= 1e-4 + 1e-5 * float(fused_lse.abs().max())
    plain = cache.attention(q, **pattern)
    assert float((plain - out).abs().max()) > 10 * float((out - fused).abs().max()) + 1e-3, \
        "the modifier changed the result"


@pytest.mark.parametrize("d", [59, 64])
@pytest.mark.parametrize("nq", [1, 5])
def test_cache_softcap_on_the_decode_path(nq, d):
    """A softcap on the decode path (the smoothing shift joins the scores before the cap): the
    fused int8 call's result and lse, with and without the int8 dot-product tiling (D = 64 / 59)."""
    torch.manual_seed(3)
    q, k, v, kpm = _inputs(nq=nq, nk=333, d=d)
    q = q * 3.0  # scores large enough for the cap to bend them
    kw = dict(window=(100, 0), causal=True, softcap=2.0, key_padding_mask=kpm)
    cache = Int8KVCache.from_kv(k.bfloat16(), v.bfloat16(), key_padding_mask=kpm)
    args = {key: val for key, val in kw.items() if key != "key_padding_mask"}
    out, lse = cache.attention(q.bfloat16(), return_lse=True, **args)
    fused, fused_lse = hk.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), quant="int8",
                                    return_lse=True, **kw)
    exact, _ = hk.attention(q, k, v, return_lse=True, backend="reference", **kw)
    uncapped = cache.attention(q.bfloat16(), **{**args, "softcap": None})
    step = 2.0 ** -7 * float(fused.float().abs().max())  # one bf16 ulp of the largest output
    assert float((out.float() - fused.float()).abs().max()) <= 2 * step
    assert float((lse - fused_lse).abs().max()) <= 1e-5 * (1 + float(fused_lse.abs().max()))
    assert float((out.float() - exact).abs().max()) <= 1.5 * float((fused.float() - exact).abs().max()) + 2 * step
    assert float((uncapped.float() - out.float()).abs().max()) > 10 * step, "the cap changed nothing"


def test_cache_score_modifier_errors():
    q, k, v, kpm = _inputs(nq=3)
    cache = Int8KVCache.from_kv(k, v)
    with pytest.raises(ValueError, match="sinks"):
        cache.attention(q, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="position_bias"):
        cache.attention(q, position_bias=torch.zeros(4, 5))
