"""The dispatcher: declarations, explanations, env override."""
import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.dispatch import Problem, get_backend, select_backend


def _problem(**kw):
    base = dict(device_type="cpu", dtype=torch.float32, head_dim=64, head_dim_v=64, quant=None,
                needs_grad=False)
    base.update(kw)
    return Problem(**base)


def test_auto_prefers_native_cpu_kernels():
    assert select_backend(_problem()).name == "cpu"
    assert select_backend(_problem(quant="int8", needs_grad=True)).name == "cpu"


def test_every_backend_reports_a_verdict():
    verdicts = hk.explain(_problem())
    assert set(verdicts) == {"cuda", "triton", "cpu", "reference"}
    assert verdicts["cpu"] == [] and verdicts["reference"] == []
    assert verdicts["cuda"], "CUDA cannot take CPU tensors and must say why"


def test_requested_backend_that_cannot_run_explains_every_rejection():
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.raises(hk.NoBackendError) as info:
        hk.attention(q, k, v, backend="cuda")
    msg = str(info.value)
    assert "backend='cuda' cannot run" in msg
    for name in ("cuda:", "triton:", "cpu:", "reference:"):
        assert name in msg


def test_head_dim_rejection_is_explained():
    reasons = get_backend("cpu").rejection_reasons(_problem(head_dim=4096))
    assert any("head dims" in r for r in reasons)


def test_env_override_is_loud(monkeypatch):
    monkeypatch.setenv("HYBRID_KERNELS_BACKEND", "reference")
    q = k = v = torch.randn(1, 1, 4, 8)
    with pytest.warns(RuntimeWarning, match="HYBRID_KERNELS_BACKEND='reference' overrides"):
        hk.attention(q, k, v, backend="cpu")
    assert select_backend(_problem()).name == "reference"


def test_env_override_rejects_unknown(monkeypatch):
    monkeypatch.setenv("HYBRID_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="HYBRID_KERNELS_BACKEND"):
        select_backend(_problem())


def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(_problem()).name == "cpu"
    assert get_backend("triton").rejection_reasons(_problem()) == [], \
        "explicitly requested, triton runs CPU tensors under the interpreter"
