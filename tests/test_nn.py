"""hk.nn: HybridAttention (nn.MultiheadAttention drop-in), swap_attention, learned landmarks."""
import copy

import pytest
import torch
from torch import nn

import hybrid_kernels as hk
from hybrid_kernels.reference import visibility_mask

HybridAttention = hk.nn.HybridAttention
TOL = dict(atol=2e-6, rtol=1e-5)


def _pattern_block_mask(B, nq, nk, *, window, landmarks, causal=False, real=None):
    """nn.MHA-style bool attn_mask (True = masked), (B, nq, nk), for the hk pattern."""
    left, right = (-1, -1) if window is None else window
    return ~visibility_mask(B, nq, nk, window_left=left, window_right=right, causal=causal,
                            landmarks=landmarks, key_padding_mask=real)[:, 0]


def _padding(B, S, lengths):
    pad = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        pad[b, n:] = True
    return pad


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_from_mha_unlimited_matches(batch_first, need_weights):
    mha = nn.MultiheadAttention(48, 4, batch_first=batch_first)
    hyb = HybridAttention.from_mha(mha)
    B, L = 3, 17
    x = torch.randn(B, L, 48) if batch_first else torch.randn(L, B, 48)
    pad = _padding(B, L, [17, 11, 5])
    for kwargs in (dict(key_padding_mask=pad),
                   dict(key_padding_mask=pad.float().masked_fill(pad, float("-inf"))),
                   dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L)),
                   dict(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), key_padding_mask=pad),
                   dict(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1), is_causal=True),
                   dict(attn_mask=torch.randn(L, L)),                      # a real additive bias
                   dict(key_padding_mask=torch.randn(B, L),                # additive padding bias
                        attn_mask=(torch.rand(L, L) > 0.7).fill_diagonal_(False)),
                   dict(attn_mask=torch.randn(B * 4, L, L), average_attn_weights=False)):
        a, wa = mha(x, x, x, need_weights=need_weights, **kwargs)
        b, wb = hyb(x, x, x, need_weights=need_weights, **kwargs)
        torch.testing.assert_close(b, a, **TOL)
        if need_weights:
            torch.testing.assert_close(wb, wa, **TOL)
        else:
            assert wb is None


def test_cross_attention_kdim_vdim_no_bias_unbatched():
    mha = nn.MultiheadAttention(32, 2, kdim=24, vdim=40, bias=False, batch_first=True)
    hyb = HybridAttention.from_mha(mha)
    q, k, v = torch.randn(2, 9, 32), torch.randn(2, 13, 24), torch.randn(2, 13, 40)
    pad = _padding(2, 13, [13, 6])
    torch.testing.assert_close(hyb(q, k, v, key_padding_mask=pad, need_weights=False)[0],
                               mha(q, k, v, key_padding_mask=pad, need_weights=False)[0], **TOL)
    a, wa = mha(q[0], k[0], v[0])
    b, wb = hyb(q[0], k[0], v[0])
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(wb, wa, **TOL)


def test_state_dicts_interchangeable():
    hyb = HybridAttention(32, 4, batch_first=True, window=(2, 2))
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    mha.load_state_dict(hyb.state_dict())
    assert set(hyb.state_dict()) == set(mha.state_dict())
    hyb2 = HybridAttention(32, 4, batch_first=True)
    hyb2.load_state_dict(mha.state_dict())
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(hyb2(x, x, x)[0], mha(x, x, x)[0], **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_window_and_landmarks_match_masked_mha(causal):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(40, 5, batch_first=True)
    hyb = HybridAttention.from_mha(mha, window=(3, 2), landmarks=7)
    B, L = 2, 29
    x = torch.randn(B, L, 40)
    pad = _padding(B, L, [29, 20])
    lm = torch.arange(0, L, 7).expand(B, -1)
    masked = _pattern_block_mask(B, L, L, window=(3, 2), landmarks=lm, causal=causal)
    ref, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False,
                 attn_mask=masked.repeat_interleave(5, dim=0))
    causal_mask = torch.ones(L, L, dtype=torch.bool).triu(1) if causal else None
    for need_weights in (False, True):
        out, w = hyb(x, x, x, key_padding_mask=pad, need_weights=need_weights, attn_mask=causal_mask)
        torch.testing.assert_close(out, ref, **TOL)
    assert torch.all(w[masked | pad[:, None, :]] == 0)


def test_learned_landmarks_equal_explicit_prepend():
    torch.manual_seed(2)
    hyb = HybridAttention(32, 4, batch_first=True, window=(2, 2), landmarks=5, num_learned_landmarks=3)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    mha.load_state_dict({k: v for k, v in hyb.state_dict().items() if not k.startswith("learned")})
    B, L, E = 2, 15, 3
    x = torch.randn(B, L, 32)
    pad = _padding(B, L, [15, 9])
    kv = torch.cat([hyb.learned_landmarks.tokens.expand(B, -1, -1), x], dim=1)
    lm = torch.cat([torch.arange(E), torch.arange(0, L, 5) + E]).expand(B, -1)
    masked = _pattern_block_mask(B, L, L + E, window=(2, 2), landmarks=lm)
    pad_kv = torch.cat([torch.zeros(B, E, dtype=torch.bool), pad], 1)
    ref, _ = mha(x, kv, kv, need_weights=False, key_padding_mask=pad_kv,
                 attn_mask=masked.repeat_interleave(4, dim=0))
    out, _ = hyb(x, x, x, key_padding_mask=pad, need_weights=False)
    assert out.shape == (B, L, 32)
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    assert hyb.learned_landmarks.tokens.grad is not None
    assert hyb.learned_landmarks.tokens.grad.abs().sum() > 0
    _, w = hyb(x, x, x, key_padding_mask=pad)
    assert w.shape == (B, L, L)  # learned landmark columns left out


def test_gradients_match_mha():
    mha = nn.MultiheadAttention(24, 3, batch_first=True)
    hyb = HybridAttention.from_mha(mha)
    x1 = torch.randn(2, 11, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    pad = _padding(2, 11, [11, 7])
    mha(x1, x1, x1, key_padding_mask=pad, need_weights=False)[0][~pad].square().sum().backward()
    hyb(x2, x2, x2, key_padding_mask=pad, need_weights=False)[0][~pad].square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hyb.in_proj_weight.grad, mha.in_proj_weight.grad, atol=1e-5, rtol=1e-4)


def test_dropout_training_runs_dense_path():
    hyb = HybridAttention(16, 2, dropout=0.5, batch_first=True, window=(1, 1)).train()
    x = torch.randn(2, 8, 16, requires_grad=True)
    out, _ = hyb(x, x, x, need_weights=False)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    hyb.eval()
    a, _ = hyb(x, x, x, need_weights=False)
    b, _ = hyb(x, x, x, need_weights=False)
    assert torch.equal(a, b)


def test_swap_attention_transformer_encoder():
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval()
    swapped = hk.nn.swap_attention(copy.deepcopy(enc))
    assert all(type(l.self_attn) is HybridAttention for l in swapped.layers)
    assert isinstance(swapped.layers[0].self_attn, nn.MultiheadAttention)
    calls = []
    for l in swapped.layers:
        l.self_attn.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(3, 21, 32)
    pad = _padding(3, 21, [21, 14, 6])
    with torch.no_grad():  # inference: the conditions of torch's fused fast paths
        ref = enc(x, src_key_padding_mask=pad)
        out = swapped(x, src_key_padding_mask=pad)
        assert len(calls) == 2 and not out.is_nested
        if ref.is_nested:
            ref = ref.to_padded_tensor(0.0)
        torch.testing.assert_close(out[~pad], ref[~pad], atol=1e-5, rtol=1e-5)
        windowed = hk.nn.swap_attention(copy.deepcopy(enc), window=(2, 2), landmarks=8)
        masked = _pattern_block_mask(1, 21, 21, window=(2, 2), landmarks=torch.arange(0, 21, 8)[None])[0]
        expect = enc(x, mask=masked, src_key_padding_mask=pad)
        got = windowed(x, src_key_padding_mask=pad)
        torch.testing.assert_close(got[~pad], expect[~pad], atol=1e-5, rtol=1e-5)
        causal = hk.nn.swap_attention(copy.deepcopy(enc))
        cm = nn.Transformer.generate_square_subsequent_mask(21)
        torch.testing.assert_close(causal(x, mask=cm, is_causal=True), enc(x, mask=cm, is_causal=True),
                                   atol=1e-5, rtol=1e-5)


def test_swap_attention_filter_and_plain_mha():
    model = nn.ModuleDict({"a": nn.MultiheadAttention(8, 2), "b": nn.MultiheadAttention(8, 2)})
    hk.nn.swap_attention(model, window=1, filter=lambda name, m: name == "a")
    assert type(model["a"]) is HybridAttention and type(model["b"]) is nn.MultiheadAttention
    assert model["a"].spec.window == (1, 1)
    assert type(hk.nn.swap_attention(nn.MultiheadAttention(8, 2))) is HybridAttention


def test_rejections_are_clear():
    with pytest.raises(ValueError, match="add_bias_kv"):
        HybridAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_zero_attn"):
        HybridAttention(8, 2, add_zero_attn=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        HybridAttention.from_mha(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="window"):
        HybridAttention(8, 2, window=(1, 2, 3))
    with pytest.raises(ValueError, match="quant"):
        HybridAttention(8, 2, quant="int4")
    with pytest.raises(ValueError, match="num_learned_landmarks"):
        HybridAttention(8, 2, kdim=4, vdim=6, num_learned_landmarks=2)
    hyb = HybridAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        hyb(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        hyb(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))


def test_int8_close_to_exact():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    exact = HybridAttention.from_mha(mha, window=(8, 8), landmarks=16)
    q8 = HybridAttention.from_mha(mha, window=(8, 8), landmarks=16, quant="int8")
    x = torch.randn(2, 40, 64)
    a, _ = exact(x, x, x, need_weights=False)
    b, _ = q8(x, x, x, need_weights=False)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_compile_fullgraph():
    hyb = HybridAttention(16, 2, batch_first=True, window=(2, 2), landmarks=4).eval()
    x = torch.randn(2, 9, 16)
    pad = _padding(2, 9, [9, 5])
    with torch.no_grad():
        ref, _ = hyb(x, x, x, key_padding_mask=pad, need_weights=False)
        out, _ = torch.compile(hyb, fullgraph=True, backend="eager")(x, x, x, key_padding_mask=pad,
                                                                      need_weights=False)
    torch.testing.assert_close(out, ref)
