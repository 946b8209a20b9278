"""StreamingSession: chunked == whole stream, RoPE convention, INT8 bound, bounded memory,
transactional rejection, bit-exact resume."""
import io
import math

import pytest
import torch

import hybrid_kernels as hk
from hybrid_kernels.reference import visibility_mask
from hybrid_kernels.streaming import (KVCodec, StreamingSession, apply_rope,
                                      whole_stream_attention)

B, HQ, HK, D = 2, 4, 2, 16


def _qkv(n, seed=0, d=D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, generator=g).to(dtype) for h in (HQ, HK, HK))


def _session(**kw):
    kw.setdefault("num_sinks", 4)
    kw.setdefault("window", 16)
    return StreamingSession(num_heads=HQ, num_kv_heads=HK, head_dim=D, **kw)


def _stream(session, q, k, v, chunk):
    n = q.shape[2]
    return torch.cat([session.feed(q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk])
                      for i in range(0, n, chunk)], dim=2)


def _brute_force(q, k, v, S, W, theta):
    """fp64 oracle with an explicit mask and an independent (complex) RoPE: window keys at
    true distance r - j, sinks outside the window at distance min(r, S + W) - s."""
    N = q.shape[2]
    q, k, v = (t.double() for t in (q, k, v))
    k, v = k.repeat_interleave(HQ // HK, 1), v.repeat_interleave(HQ // HK, 1)

    def rot(x, pos):  # x (..., n, D), pos (n,) float64
        if theta is None:
            return x
        freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(
            torch.ones(len(pos), D // 2, dtype=torch.float64), pos[:, None] * freqs)
        return torch.cat([z.real, z.imag], -1)

    pos = torch.arange(N, dtype=torch.float64)
    kr = rot(k, pos)                                             # keys at true positions
    qa = rot(q, pos)                                             # queries at true positions
    qb = rot(q, pos.clamp(max=S + W))                            # queries as seen by the sinks
    r, j = torch.arange(N)[:, None], torch.arange(N)[None]
    in_win = (j >= r - W) & (j <= r)
    vis = in_win | ((j < S) & (j <= r))
    s = torch.where(in_win, qa @ kr.transpose(-1, -2), qb @ kr.transpose(-1, -2)) / math.sqrt(D)
    out = s.masked_fill(~vis, float("-inf")).softmax(-1) @ v
    return out


def test_sink_landmarks_two_way_equals_one_way_under_causal():
    # hk landmarks are two-way; with causal, sink rows only see keys <= themselves (all sinks).
    for N, S, W in ((40, 4, 8), (40, 4, 0), (10, 12, 3)):
        two_way = visibility_mask(1, N, N, window_left=W, window_right=0, causal=True,
                                  landmarks=torch.arange(min(S, N))[None], key_padding_mask=None)[0, 0]
        r, j = torch.arange(N)[:, None], torch.arange(N)[None]
        one_way = ((j >= r - W) | (j < S)) & (j <= r)
        assert torch.equal(two_way, one_way)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_whole_stream_single_call(chunk):
    q, k, v = _qkv(90)
    whole = hk.attention(q, k, v, causal=True, window=(16, 0), landmarks=torch.arange(4))
    out = _stream(_session(), q, k, v, chunk)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_rope_chunked_equals_whole_stream_and_oracle(chunk):
    q, k, v = _qkv(70, seed=1)
    theta = 100.0
    whole = whole_stream_attention(q, k, v, num_sinks=4, window=16, rope_theta=theta)
    out = _stream(_session(rope_theta=theta), q, k, v, chunk)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(out.double(), _brute_force(q, k, v, 4, 16, theta), rtol=1e-4, atol=1e-5)


def test_edge_configs_match_oracle():
    q, k, v = _qkv(30, seed=2)
    for S, W, theta in ((0, 5, 10.0), (3, 0, 10.0), (6, 40, 10.0), (2, 3, None)):
        out = _stream(_session(num_sinks=S, window=W, rope_theta=theta), q, k, v, 4)
        torch.testing.assert_close(out.double(), _brute_force(q, k, v, S, W, theta), rtol=1e-4, atol=1e-5)


def test_full_cache_baseline_is_causal_attention():
    q, k, v = _qkv(40, seed=3)
    out = _stream(_session(num_sinks=0, window=None), q, k, v, 7)
    torch.testing.assert_close(out, hk.attention(q, k, v, causal=True), rtol=1e-5, atol=2e-6)


def test_fp16_cache_equals_whole_stream_on_rounded_kv():
    q, k, v = _qkv(50, seed=4)
    out = _stream(_session(cache_dtype="float16", rope_theta=50.0), q, k, v, 7)
    whole = whole_stream_attention(q, k.half().float(), v.half().float(), num_sinks=4, window=16,
                                   rope_theta=50.0)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=5e-6)


def test_int8_codec_elementwise_bound():
    x = torch.randn(2, 3, 17, 40) * torch.linspace(0.1, 10, 40)
    codec = KVCodec("int8", int8_block=16)
    err = (codec.decode(codec.encode(x), torch.float32) - x).abs()
    absmax = torch.nn.functional.pad(x, (0, 8)).unflatten(-1, (3, 16)).abs().amax(-1)
    bound = absmax.repeat_interleave(16, -1)[..., :40] / 254
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())


@pytest.mark.parametrize("theta", [None, 100.0])
def test_int8_cache_within_documented_bound(theta):
    """Documented bound: with ||dk_j||_2 <= sqrt(sum_blocks b * (absmax_b / 254)^2) (RoPE
    rotations preserve it), every logit moves by at most eps_r = scale * ||q_r||_2 * max_j ||dk_j||,
    so ||p' - p||_1 <= exp(2 eps_r) - 1 and |o' - o| <= (exp(2 eps_r) - 1) * max|v'| + max|dv|."""
    q, k, v = _qkv(60, seed=5)
    block = 8
    exact = _stream(_session(rope_theta=theta), q, k, v, 7)
    out = _stream(_session(rope_theta=theta, cache_dtype="int8", int8_block=block), q, k, v, 7)

    def token_bounds(x):
        absmax = x.unflatten(-1, (D // block, block)).abs().amax(-1) / 254    # (B,H,N,nb)
        return (absmax.square() * block).sum(-1).sqrt(), absmax.amax(-1)

    dk_l2, _ = token_bounds(k)
    _, dv_max = token_bounds(v)
    v_hat = KVCodec("int8", block).decode(KVCodec("int8", block).encode(v), torch.float32)
    eps = (q.norm(dim=-1) / math.sqrt(D)) * dk_l2.amax().item()                # (B,HQ,N)
    bound = (torch.exp(2 * eps) - 1) * v_hat.abs().amax().item() + dv_max.amax().item()
    err = (out - exact).abs().amax(-1)
    assert bool((err <= bound * 1.001 + 1e-6).all())
    assert err.mean().item() < 0.05  # and in practice far below the bound


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "int8"])
def test_memory_flat_after_window_fills(cache_dtype):
    S, W, chunk = 4, 16, 5
    s = _session(cache_dtype=cache_dtype, rope_theta=100.0)
    q, k, v = _qkv(120, seed=6)
    sizes = []
    for i in range(0, 120, chunk):
        s.feed(q[:, :, i:i + chunk], k[:, :, i:i + chunk], v[:, :, i:i + chunk])
        sizes.append((s.position, s.nbytes()))
    full = [b for pos, b in sizes if pos >= S + W]
    assert len(set(full)) == 1, sizes
    per_token = {"float32": 4 * D, "bfloat16": 2 * D, "int8": D + 4 * (D // 32 + (D % 32 > 0))}[cache_dtype]
    assert full[0] == 2 * B * HK * (S + W) * per_token
    assert len(s.cache(0)) == S + W


def _states_equal(a, b):
    assert a["position"] == b["position"] and a["config"] == b["config"]
    for la, lb in zip(a["layers"], b["layers"]):
        assert la.keys() == lb.keys()
        assert all(torch.equal(la[n], lb[n]) for n in la)


def test_bad_chunk_rejected_and_state_unchanged():
    s = _session(rope_theta=100.0)
    q, k, v = _qkv(30, seed=7)
    s.feed(q[:, :, :25], k[:, :, :25], v[:, :, :25])
    before = s.state_dict()
    nan_k = k[:, :, 25:].clone()
    nan_k[0, 1, 2, 3] = float("nan")
    bad = [
        ((q[:, :, 25:], nan_k, v[:, :, 25:]), ValueError, "k contains NaN"),
        ((q[:1, :, 25:], k[:1, :, 25:], v[:1, :, 25:]), ValueError, "batch size"),
        ((q[:, :, 25:, :8], k[:, :, 25:], v[:, :, 25:]), ValueError, "q must have shape"),
        ((q[:, :, 25:], k[:, :, 25:27], v[:, :, 25:]), ValueError, "k must have shape"),
        ((q[:, :, 25:].double(), k[:, :, 25:], v[:, :, 25:]), TypeError, "q must be float32"),
        ((q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, "empty"),
    ]
    for args, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            s.feed(*args)
        _states_equal(before, s.state_dict())
    # An error raised inside a staged chunk (after attend) also leaves nothing behind.
    with pytest.raises(RuntimeError, match="boom"):
        with s.chunk(5):
            s.attend(0, q[:, :, 25:], k[:, :, 25:], v[:, :, 25:])
            raise RuntimeError("boom")
    _states_equal(before, s.state_dict())
    # The stream goes on as if nothing happened.
    ref = _session(rope_theta=100.0)
    ref.feed(q[:, :, :25], k[:, :, :25], v[:, :, :25])
    assert torch.equal(s.feed(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:]),
                       ref.feed(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:]))


@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_resume_from_checkpoint_is_bit_exact(cache_dtype):
    q, k, v = _qkv(80, seed=8)
    a = _session(cache_dtype=cache_dtype, rope_theta=100.0)
    _stream(a, q[:, :, :43], k[:, :, :43], v[:, :, :43], 6)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _session(cache_dtype=cache_dtype, rope_theta=100.0)
    b.load_state_dict(torch.load(buf))
    assert b.position == 43
    rest = (q[:, :, 43:], k[:, :, 43:], v[:, :, 43:])
    assert torch.equal(_stream(a, *rest, 5), _stream(b, *rest, 5))


def test_load_state_dict_rejects_mismatch_without_change():
    q, k, v = _qkv(30, seed=9)
    a = _session(window=16)
    a.feed(q, k, v)
    state = a.state_dict()
    b = _session(window=8)
    with pytest.raises(ValueError, match="config"):
        b.load_state_dict(state)
    c = _session(window=16)
    c.feed(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    broken = dict(state, layers=[{n: t[..., :-1, :] if n == "win_k.0" else t
                                  for n, t in state["layers"][0].items()}])
    before = c.state_dict()
    with pytest.raises(ValueError, match="win_k.0"):
        c.load_state_dict(broken)
    _states_equal(before, c.state_dict())


def test_apply_rope_is_relative():
    x, y = torch.randn(2, 1, 1, 3, D).unbind(0)
    a = (apply_rope(x, torch.tensor([5, 6, 7]), 10.0) * apply_rope(y, torch.tensor([2, 2, 2]), 10.0)).sum(-1)
    b = (apply_rope(x, torch.tensor([3, 4, 5]), 10.0) * apply_rope(y, torch.tensor([0, 0, 0]), 10.0)).sum(-1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
