"""RetrievalAugmentedSegments: shapes and masks, the kernels against the reference backend,
information crossing segments only through the landmarks, gradients to the passages, and clear
errors for bad input."""
from __future__ import annotations

import pytest
import torch

from hybrid_kernels.backends.cpu import CpuBackend
from hybrid_kernels.models import RetrievalAugmentedSegments

needs_cpu = pytest.mark.skipif(CpuBackend().unavailable_reason() is not None,
                               reason="native CPU module not built")


def _inputs(B=2, N=97, P=3, Lp=11, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g)
    passages = torch.randn(B, P, Lp, d, generator=g)
    pmask = torch.rand(B, P, Lp, generator=g) > 0.2
    pmask[:, :, 0] = True
    pmask[-1, -1] = False  # one passage entirely padding
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[-1, -7:] = False
    return x, passages, pmask, kpm


def _model(backend="auto", **kw):
    torch.manual_seed(1)
    args = dict(segment_len=16, window=(4, 4), num_layers=2)
    args.update(kw)
    return RetrievalAugmentedSegments(32, 4, backend=backend, **args).eval()


def test_shapes_and_relevance():
    x, passages, pmask, kpm = _inputs()
    out = _model()(x, passages, pmask, kpm)
    assert out.hidden.shape == x.shape and out.summary.shape == (2, 32)
    assert out.relevance.shape == (2, 7, 3)  # ceil(97 / 16) segments
    assert torch.allclose(out.relevance.sum(-1), torch.ones(2, 7))
    assert torch.all(out.relevance[1, :, 2] == 0), "an all-padding passage gets no relevance"
    assert torch.isfinite(out.hidden).all()


@needs_cpu
def test_cpu_kernels_match_the_reference_backend():
    x, passages, pmask, kpm = _inputs()
    with torch.no_grad():
        a = _model("cpu")(x, passages, pmask, kpm)
        b = _model("reference")(x, passages, pmask, kpm)
    # fp32 attention on both sides: differences are summation order through two layers.
    for name in ("hidden", "relevance", "summary"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert torch.allclose(ta, tb, atol=2e-5, rtol=1e-5), (name, float((ta - tb).abs().max()))


def test_segments_talk_only_through_landmarks():
    """Changing a token deep in the last segment reaches token 1 (outside its window) through
    the landmarks, and not at all without them."""
    x, passages, pmask, _ = _inputs(B=1)
    x2 = x.clone()
    x2[0, 90] += 3.0 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(5))
    for cross, reaches in ((True, True), (False, False)):
        m = _model(cross_segment=cross)
        with torch.no_grad():
            d = (m(x, passages, pmask).hidden - m(x2, passages, pmask).hidden)[0, 1].abs().max()
        assert (float(d) > 1e-4) == reaches, (cross, float(d))


def test_gradients_reach_the_passages_and_the_input():
    x, passages, pmask, kpm = _inputs()
    x.requires_grad_(True)
    passages.requires_grad_(True)
    out = _model().train()(x, passages, pmask, kpm)
    (out.hidden.square().mean() + out.relevance[:, :, 0].sum() + out.summary.sum()).backward()
    assert x.grad.abs().sum() > 0 and passages.grad.abs().sum() > 0
    assert torch.all(passages.grad[pmask.logical_not()] == 0), "padded passage tokens get no gradient"


def test_bad_input_is_a_clear_error():
    m = _model()
    x, passages, pmask, kpm = _inputs()
    with pytest.raises(ValueError, match="passages must be"):
        m(x, passages[..., :8], pmask)
    with pytest.raises(ValueError, match="passage_mask must be"):
        m(x, passages, pmask.float())
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        m(x, passages, pmask, kpm[:, :5])
    with pytest.raises(ValueError, match="segment_len"):
        RetrievalAugmentedSegments(32, 4, segment_len=0)
