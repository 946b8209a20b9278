"""Score modifiers through the public API: softcap, sinks, ALiBi and offset position bias.

The oracle here is written independently of hybrid_kernels.reference: explicit float64 scores with
the modifiers applied as the models do (Gemma 2's tanh cap, GPT-OSS's sink column, an explicit
(Nq, Nk) bias), masked by the visibility mask, softmax, @ V. Every backend that declares a modifier
is checked against it, forward and backward (autograd through the custom op), with the derived
tolerance of tests/oracle.py: 2x the error of the same computation in float32.
"""
import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.dispatch import get_backend
from hybrid_kernels.reference import visibility_mask

from oracle import max_err, tolerance

CASES = {
    # name: (B, Hq, Hk, Nq, Nk, D, window, landmarks, causal, padded)
    "mha_window_lm": (2, 4, 4, 97, 97, 32, (5, 3), 16, False, True),
    "gqa_causal_wide": (1, 4, 2, 61, 61, 59, (200, 0), None, True, False),
    "gqa_nq_ne_nk": (2, 4, 2, 37, 97, 16, (8, 8), torch.tensor([0, 50]), True, True),
    "decode": (2, 4, 2, 1, 130, 32, (40, 0), 32, True, True),
    "full_bidirectional": (1, 2, 1, 45, 45, 16, None, None, False, True),
}
MODS = {
    "softcap": dict(softcap=1.5),
    "bias": dict(position_bias=True),
    "alibi": dict(alibi_slopes=True),
    "sinks": dict(sinks=True),
    "all": dict(softcap=3.0, position_bias=True, alibi_slopes=True, sinks=True),
}


def _inputs(case, mods, dtype, seed=0):
    B, Hq, Hk, Nq, Nk, D, window, landmarks, causal, padded = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g) * 1.5
    k = torch.randn(B, Hk, Nk, D, generator=g) * 1.5
    v = torch.randn(B, Hk, Nk, D, generator=g)
    kpm = None
    if padded:
        kpm = torch.ones(B, Nk, dtype=torch.bool)
        kpm[-1, Nk * 3 // 4:] = False
    extra = {}
    if mods.get("softcap"):
        extra["softcap"] = mods["softcap"]
    if mods.get("position_bias"):
        extra["position_bias"] = torch.randn(Hq, Nq + Nk - 1, generator=g)
    if mods.get("alibi_slopes"):
        extra["alibi_slopes"] = torch.rand(Hq, generator=g) * 0.3
    if mods.get("sinks"):
        extra["sinks"] = torch.randn(Hq, generator=g)
    pattern = dict(window=window, landmarks=landmarks, causal=causal, key_padding_mask=kpm)
    return (q, k, v), pattern, extra, dtype


def explicit(q, k, v, *, window, landmarks, causal, key_padding_mask, softcap=None, sinks=None,
             alibi_slopes=None, position_bias=None, dtype=torch.float64):
    """Dense attention with the modifiers written out; returns (out, lse) in ``dtype``."""
    B, Hq, Nq, D = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k, v = (t.repeat_interleave(Hq // Hk, dim=1) for t in (k, v))
    left, right = (-1, -1) if window is None else window
    lm = None
    if isinstance(landmarks, int):
        lm = torch.arange(0, Nk, landmarks).expand(B, -1)
    elif landmarks is not None:
        lm = landmarks.expand(B, -1)
    mask = visibility_mask(B, Nq, Nk, window_left=left, window_right=right, causal=causal,
                           landmarks=lm, key_padding_mask=key_padding_mask)
    s = q @ k.transpose(-1, -2) * D ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    r = torch.arange(Nq)[:, None] + (Nk - Nq)
    j = torch.arange(Nk)[None, :]
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(dtype)[:, None, None] * (j - r).abs()
    if position_bias is not None:
        s = s + position_bias.to(dtype)[:, j - r + Nk - 1]
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype)[None, :, None, None].expand(B, Hq, Nq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v, lse


def _backends(mods):
    used = {"softcap"} if mods.get("softcap") else set()
    if mods.get("position_bias") or mods.get("alibi_slopes"):
        used.add("bias")
    return [name for name in ("reference", "cpu")
            if used <= get_backend(name).score_mods and not get_backend(name).unavailable_reason()]


def _grad_inputs(inputs, extra, dtype):
    tensors = [t.to(dtype).requires_grad_(True) for t in inputs]
    diff = {}
    for name, t in extra.items():
        if isinstance(t, torch.Tensor):
            t = t.clone().requires_grad_(name in ("position_bias", "sinks"))
        diff[name] = t
    return tensors, diff


@pytest.mark.parametrize("mod", list(MODS))
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_explicit_oracle(case, mod):
    mods = MODS[mod]
    inputs, pattern, extra, _ = _inputs(CASES[case], mods, torch.float32)
    (q64, k64, v64), x64 = _grad_inputs(inputs, extra, torch.float64)
    out64, lse64 = explicit(q64, k64, v64, **pattern, **x64)
    dout = torch.randn_like(out64)
    wrt64 = [q64, k64, v64] + [t for t in x64.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    g64 = torch.autograd.grad(out64, wrt64, dout)
    (q32, k32, v32), x32 = _grad_inputs(inputs, extra, torch.float32)
    base, base_lse = explicit(q32, k32, v32, **pattern, **x32, dtype=torch.float32)
    wrt32 = [q32, k32, v32] + [t for t in x32.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    gbase = torch.autograd.grad(base, wrt32, dout.float())
    backends = _backends(mods)
    assert "reference" in backends
    for backend in backends:
        (q, k, v), x = _grad_inputs(inputs, extra, torch.float32)
        out, lse = hk.attention(q, k, v, **pattern, **x, return_lse=True, backend=backend)
        wrt = [q, k, v] + [t for t in x.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out, wrt, dout.float())
        for name, got, want, b in [("out", out, out64, base), ("lse", lse, lse64, base_lse)] + [
                (f"grad{i}", gg, gw, gb) for i, (gg, gw, gb) in enumerate(zip(grads, g64, gbase))]:
            assert not torch.isnan(got).any(), f"{backend} {name}: NaN"
            err, tol = max_err(got, want), tolerance(max_err(b, want), want, depth=q.shape[-1])
            assert err <= tol, f"{backend} {name}: {err:.3e} > {tol:.3e}"


def test_sinks_on_rows_that_see_nothing():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    kpm = torch.tensor([[False, False, True, True]])
    sinks = torch.tensor([0.5, -1.0])
    out, lse = hk.attention(q, k, v, causal=True, key_padding_mask=kpm, sinks=sinks, return_lse=True)
    assert torch.equal(out[:, :, :2], torch.zeros(1, 2, 2, 8))  # rows 0, 1 see only padding
    assert torch.equal(lse[0, :, 0], sinks)


def test_int8_with_modifiers_takes_a_backend_that_can():
    q, k, v = (torch.randn(1, 2, 70, 32) for _ in range(3))
    why = hk.explain(q, k, v, softcap=2.0, quant="int8")
    assert why.selected is not None and why[why.selected] == []
    out = hk.attention(q, k, v, softcap=2.0, quant="int8")
    ref, _ = explicit(q, k, v, window=None, landmarks=None, causal=False, key_padding_mask=None,
                      softcap=2.0)
    cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.flatten(), dim=0)
    assert cos > 0.999


def test_explain_names_modifier_rejections():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    why = hk.explain(q, k, v, softcap=1.0, position_bias=torch.zeros(2, 17))
    assert why.selected in ("cpu", "reference")
    assert any("score modifier" in r for r in why["cuda"]) or why["cuda"]  # cuda declines
    assert "selected" in str(why)
    plain = hk.explain(q, k, v)
    assert plain.selected == "cpu" or get_backend("cpu").unavailable_reason()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=torch.tensor(1.0)), TypeError, "softcap"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(Hq,\) = \(2,\)"),
    (dict(sinks=torch.zeros(2, dtype=torch.long)), TypeError, "sinks"),
    (dict(sinks=[0.0, 1.0]), TypeError, "sinks"),
    (dict(alibi_slopes=torch.zeros(2, 1)), ValueError, "alibi_slopes"),
    (dict(position_bias=torch.zeros(2, 16)), ValueError, r"position_bias must have shape \(Hq, Nq \+ Nk - 1\) = \(2, 17\)"),
    (dict(position_bias=torch.zeros(2, 17, dtype=torch.int32)), TypeError, "position_bias"),
])
def test_bad_modifiers_raise_naming_the_argument(kwargs, error, match):
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    with pytest.raises(error, match=match):
        hk.attention(q, k, v, **kwargs)
