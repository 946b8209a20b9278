"""StreamingHybridEncoder: chunked == HybridEncoder.forward on the whole prefix, rejection with
state unchanged, bit-exact resume, bounded state, positions past max_position, unsupported configs."""
import dataclasses
import io

import pytest
import torch

from hybrid_kernels.models.encoder import HybridEncoder, HybridEncoderConfig
from hybrid_kernels.streaming import StreamingHybridEncoder

VOCAB, N = 50, 150


def _config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                conv_kernel=5, window=(9, 0), landmark_stride=0, num_landmarks=3, segment_length=0,
                segment_overlap=0, max_position=160, dropout=0.0, causal=True)
    base.update(kw)
    return HybridEncoderConfig(**base)


def _model(**kw):
    torch.manual_seed(0)
    return HybridEncoder(_config(**kw)).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return _model()


def _ids(n, b=2, seed=0):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids):
    """Per-token states of HybridEncoder.forward on the whole prefix (every stream token is real)."""
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def _stream(stream, ids, chunk):
    return torch.cat([stream.feed(ids[:, i:i + chunk]) for i in range(0, ids.shape[1], chunk)], 1)


def _assert_state_equal(a, b):
    assert a["session"]["position"] == b["session"]["position"]
    for la, lb in zip(a["session"]["layers"] or [], b["session"]["layers"] or []):
        assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert (a["conv"] is None) == (b["conv"] is None)
    assert all(torch.equal(x, y) for x, y in zip(a["conv"] or [], b["conv"] or []))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_whole_forward(model, chunk):
    ids = _ids(N)
    stream = StreamingHybridEncoder(model)
    out = _stream(stream, ids, chunk)
    assert stream.position == N and stream.model is model
    torch.testing.assert_close(out, _reference(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(num_landmarks=0, conv_kernel=0, window=6),   # (6, 6) causal
                                dict(num_landmarks=1, conv_kernel=1, window=(0, 0)),
                                dict(num_landmarks=5, conv_kernel=3, window=(200, 0))])  # W > N
def test_chunked_equals_whole_forward_other_configs(kw):
    m = _model(**kw)
    ids = _ids(N, b=1, seed=1)
    out = _stream(StreamingHybridEncoder(m), ids, 7)
    torch.testing.assert_close(out, _reference(m, ids), rtol=1e-5, atol=1e-5)


def test_bad_chunk_rejected_state_unchanged(model, monkeypatch):
    ids = _ids(60)
    stream = StreamingHybridEncoder(model)
    stream.feed(ids[:, :20])
    before = stream.state_dict()
    for bad, exc, msg in ((ids[:, 20:] + VOCAB, ValueError, "vocab_size"),
                          (ids[:1, 20:], ValueError, "batch size"),
                          (ids[:, 20:].float(), TypeError, "integer"),
                          (ids[:, :0], ValueError, "n >= 1"),
                          (ids[0], ValueError, r"\(B, n\)"),
                          ([1, 2], TypeError, "torch.Tensor")):
        with pytest.raises(exc, match=msg):
            stream.feed(bad)
        _assert_state_equal(before, stream.state_dict())
    # A failure inside the last layer, after layer 0 has staged its cache and conv state.
    with monkeypatch.context() as mp:
        mp.setattr(model.blocks[1].ffn, "forward", lambda x: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            stream.feed(ids[:, 20:27])
    _assert_state_equal(before, stream.state_dict())
    out = torch.cat([stream.feed(ids[:, 20:27]), stream.feed(ids[:, 27:])], 1)
    torch.testing.assert_close(out, _reference(model, ids)[:, 20:], rtol=1e-5, atol=1e-5)


def test_first_chunk_rejected_leaves_stream_fresh(model):
    stream = StreamingHybridEncoder(model)
    with pytest.raises(ValueError, match="vocab_size"):
        stream.feed(torch.tensor([[3, -1, 4], [1, 5, 9]]))
    assert stream.position == 0 and stream.session.position == 0 and stream.nbytes() == 0
    ids = _ids(12)
    torch.testing.assert_close(stream.feed(ids), _reference(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_resume_bit_exact(model, cache_dtype):
    ids = _ids(N, seed=2)
    a = StreamingHybridEncoder(model, cache_dtype=cache_dtype)
    _stream(a, ids[:, :53], 6)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = StreamingHybridEncoder(model, cache_dtype=cache_dtype)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert b.position == a.position == 53
    for i in range(53, N, 9):
        assert torch.equal(a.feed(ids[:, i:i + 9]), b.feed(ids[:, i:i + 9]))


def test_load_state_dict_mismatch_changes_nothing(model):
    ids = _ids(40)
    a = StreamingHybridEncoder(model)
    a.feed(ids[:, :30])
    good = a.state_dict()
    b = StreamingHybridEncoder(model)
    b.feed(ids[:, :10])
    before = b.state_dict()
    other = StreamingHybridEncoder(_model(num_layers=1))
    other.feed(ids[:, :30])
    bad_conv = dict(good, conv=[t[:, :1] for t in good["conv"]])
    bad_session = dict(good, session=dict(good["session"], position=5))
    for bad, msg in ((other.state_dict(), "config"), (bad_conv, "conv"), (bad_session, "expected"),
                     (dict(good, conv=None), "conv"), ({"format": 99}, "format"),
                     (StreamingHybridEncoder(model, beyond_max_position="wrap").state_dict(), "config")):
        with pytest.raises(ValueError, match=msg):
            b.load_state_dict(bad)
        _assert_state_equal(before, b.state_dict())
    b.load_state_dict(good)
    assert torch.equal(a.feed(ids[:, 30:]), b.feed(ids[:, 30:]))


def test_state_bytes_stop_growing_once_window_full(model):
    stream = StreamingHybridEncoder(model)
    sizes = []
    for i in range(0, N, 4):
        stream.feed(_ids(N)[:, i:i + 4])
        sizes.append((stream.position, stream.nbytes()))
    full = [b for p, b in sizes if p >= 9 + 4]     # W = 9 recent tokens, 3 memory sinks
    assert len(full) > 30 and len(set(full)) == 1
    assert sizes[0][1] < full[0]
    cfg = model.config
    per_token = 2 * cfg.hidden_size * 4 * cfg.num_layers          # k and v, fp32, every layer
    conv = (cfg.conv_kernel - 1) * cfg.hidden_size * 4 * cfg.num_layers
    assert full[0] == 2 * ((3 + 9) * per_token + conv)             # batch 2
    assert all(len(stream.session.cache(layer)) == 3 + 9 for layer in range(cfg.num_layers))


def _extended(model, rule, length):
    """A copy of ``model`` whose position table is extended to ``length`` following ``rule``."""
    cfg = dataclasses.replace(model.config, max_position=length)
    big = HybridEncoder(cfg).eval()
    state = dict(model.state_dict())
    M = model.config.max_position
    idx = torch.arange(length)
    idx = idx.clamp(max=M - 1) if rule == "clamp" else idx % M
    state["position.weight"] = model.position.weight.detach()[idx]
    big.load_state_dict(state)
    return big


@pytest.mark.parametrize("rule", ["clamp", "wrap"])
def test_beyond_max_position_rules(rule):
    m = _model(max_position=40)
    ids = _ids(100, b=1, seed=4)
    out = _stream(StreamingHybridEncoder(m, beyond_max_position=rule), ids, 7)
    torch.testing.assert_close(out, _reference(_extended(m, rule, 100), ids), rtol=1e-5, atol=1e-5)


def test_beyond_max_position_raise():
    m = _model(max_position=40)
    stream = StreamingHybridEncoder(m, beyond_max_position="raise")
    ids = _ids(41, b=1)
    stream.feed(ids[:, :35])
    before = stream.state_dict()
    with pytest.raises(ValueError, match="max_position=40"):
        stream.feed(ids[:, 35:41])
    _assert_state_equal(before, stream.state_dict())
    torch.testing.assert_close(stream.feed(ids[:, 35:40]), _reference(m, ids[:, :40])[:, 35:],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, field", [(dict(causal=False), "causal"),
                                       (dict(window=None), "window"),
                                       (dict(window=(-1, 0)), "window"),
                                       (dict(landmark_stride=4), "landmark_stride"),
                                       (dict(segment_length=64, segment_overlap=8), "segment_length"),
                                       (dict(quant="int8"), "quant")])
def test_unsupported_config_names_field(kw, field):
    with pytest.raises(ValueError, match=rf"HybridEncoderConfig\.{field}="):
        StreamingHybridEncoder(_model(**kw))


def test_bad_arguments(model):
    with pytest.raises(TypeError, match="HybridEncoder"):
        StreamingHybridEncoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="beyond_max_position"):
        StreamingHybridEncoder(model, beyond_max_position="ignore")
    with pytest.raises(ValueError, match="cache_dtype"):
        StreamingHybridEncoder(model, cache_dtype="int4")
