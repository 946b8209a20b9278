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

