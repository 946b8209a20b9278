"""The CPU kernels' scratch cache (packed K/V reused across calls): results never depend on what
a reused buffer held, HYBRID_KERNELS_CPU_CACHE_MB caps (or disables) what is kept."""
from __future__ import annotations

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.backends.cpu import load_module

# Large enough for 1 MiB+ pack buffers per kv head (the cached size class).
SHAPE = (1, 2, 8192, 64)
PATTERN = dict(window=(64, 64), landmarks=512, backend="cpu")


def _calls(dtype, quant, pattern=PATTERN):
    outs = []
    for seed in (1, 2):  # the second call reuses the first call's buffers
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(*SHAPE, generator=g).to(dtype) for _ in range(3))
        outs.append(hk.attention(q, k, v, quant=quant, **pattern))
    return outs


# The bf16 forward's large scratch is its per-thread V^T rings, which span every key only
# without a window.
@pytest.mark.parametrize("dtype,quant,pattern", [
    (torch.float32, "int8", PATTERN),
    (torch.bfloat16, None, dict(PATTERN, window=None)),
    (torch.bfloat16, "int8", PATTERN)], ids=["fp32-int8", "bf16-full", "bf16-int8"])
def test_reused_buffers_give_the_same_bits(monkeypatch, dtype, quant, pattern):
    mod = load_module()
    monkeypatch.setenv("HYBRID_KERNELS_CPU_CACHE_MB", "0")
    mod.scratch_cache_clear()
    fresh = _calls(dtype, quant, pattern)
    assert mod.scratch_cache_bytes() == 0, "HYBRID_KERNELS_CPU_CACHE_MB=0 keeps nothing"
    monkeypatch.setenv("HYBRID_KERNELS_CPU_CACHE_MB", "256")
    cached = _calls(dtype, quant, pattern)
    assert 0 < mod.scratch_cache_bytes() <= 256 << 20
    for a, b in zip(fresh, cached):
        assert torch.equal(a, b)


def test_the_cap_is_respected(monkeypatch):
    mod = load_module()
    mod.scratch_cache_clear()
    monkeypatch.setenv("HYBRID_KERNELS_CPU_CACHE_MB", "3")
    _calls(torch.float32, "int8")
    assert mod.scratch_cache_bytes() <= 3 << 20
    mod.scratch_cache_clear()
    assert mod.scratch_cache_bytes() == 0


def test_large_outputs_reuse_cached_memory(monkeypatch):
    """A 1 MiB+ CPU output views scratch-cache memory: once it dies the next call's output
    lands on the same (already mapped) pages, and the values are those of a plain allocation."""
    mod = load_module()
    monkeypatch.setenv("HYBRID_KERNELS_CPU_CACHE_MB", "256")
    mod.scratch_cache_clear()
    q, k, v = (torch.randn(*SHAPE) for _ in range(3))
    first = hk.attention(q, k, v, **PATTERN)
    assert first.numel() * 4 >= mod.SCRATCH_MIN_CACHED_BYTES
    ptr, expected = first.data_ptr(), first.clone()
    del first
    second = hk.attention(q, k, v, **PATTERN)
    assert second.data_ptr() == ptr, "the freed output's buffer is handed out again"
    assert torch.equal(second, expected)
    mod.scratch_cache_clear()  # frees only unused buffers: the live output stays valid
    assert torch.equal(second, expected)
    # Usable like any tensor: in-place updates, autograd through the op, serialization.
    second.add_(1.0)
    assert torch.equal(second, expected + 1.0)
    qg = q.clone().requires_grad_()
    hk.attention(qg, k, v, **PATTERN).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_outputs_are_plain_tensors_when_the_cache_is_off(monkeypatch):
    mod = load_module()
    monkeypatch.setenv("HYBRID_KERNELS_CPU_CACHE_MB", "0")
    mod.scratch_cache_clear()
    q, k, v = (torch.randn(*SHAPE) for _ in range(3))
    out = hk.attention(q, k, v, **PATTERN)
    out.untyped_storage().resize_(out.untyped_storage().nbytes())  # resizable: torch-owned
    assert mod.scratch_cache_bytes() == 0
