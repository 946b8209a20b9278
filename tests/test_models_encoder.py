"""HybridEncoder: forward/backward with every pattern option, padding, segments, save/load."""
import pytest
import torch

from hybrid_kernels.models import HybridEncoder, HybridEncoderConfig


def cfg(**kw):
    base = dict(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                conv_kernel=3, window=3, landmark_stride=4, num_landmarks=2, segment_length=0,
                segment_overlap=0, max_position=64, dropout=0.0)
    base.update(kw)
    return HybridEncoderConfig(**base)


OPTIONS = [
    dict(),                                           # window + strided + learned landmarks
    dict(window=None),                                # unlimited
    dict(window=(2, 0), causal=True),                 # causal, asymmetric window
    dict(window=[1, 3], landmark_stride=0),           # learned landmarks only, JSON-style window
    dict(num_landmarks=0, landmark_stride=5),         # strided landmarks only
    dict(num_landmarks=0, landmark_stride=0),         # pure sliding window
    dict(conv_kernel=0),                              # attention only, no gate
    dict(quant="int8"),                               # INT8 QK^T
    dict(pooling="first"),
    dict(pooling="landmarks"),
    dict(segment_length=8, segment_overlap=3, max_position=8),        # long input as segments
    dict(segment_length=8, segment_overlap=0, max_position=8, causal=True, window=(3, 0)),
]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) or "default" for o in OPTIONS])
def test_forward_backward(options):
    model = HybridEncoder(cfg(**options))
    ids = torch.randint(1, 40, (2, 21))
    ids[1, 15:] = 0                                   # padding
    out = model(ids)
    assert out.last_hidden_state.shape == (2, 21, 16)
    assert out.pooled.shape == (2, 16)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooled).all()
    (out.pooled.sum() + out.last_hidden_state[:, :15].pow(2).mean()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.embed.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    if model.memory is not None and options.get("pooling") == "landmarks":
        assert model.memory.grad.abs().sum() > 0


def test_padding_content_does_not_change_real_tokens():
    model = HybridEncoder(cfg()).eval()
    ids = torch.randint(1, 40, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[0, 9:] = False
    other = ids.clone()
    other[0, 9:] = torch.randint(1, 40, (4,))
    a, b = model(ids, mask), model(other, mask)
    torch.testing.assert_close(a.last_hidden_state[0, :9], b.last_hidden_state[0, :9])
    torch.testing.assert_close(a.pooled, b.pooled)


def test_segments_exchange_information_only_through_landmarks():
    ids = torch.randint(1, 40, (1, 40))
    changed = ids.clone()
    changed[0, :5] = (ids[0, :5] % 39) + 1            # edit the first segment only
    for options, expect_change in ((dict(), True), (dict(num_landmarks=0, landmark_stride=0), False)):
        torch.manual_seed(0)
        model = HybridEncoder(cfg(segment_length=10, segment_overlap=2, max_position=10,
                                  **options)).eval()
        tail_a = model(ids).last_hidden_state[0, 30:]  # tokens of the last segments only
        tail_b = model(changed).last_hidden_state[0, 30:]
        assert (not torch.allclose(tail_a, tail_b)) == expect_change, options


def test_save_load_round_trip(tmp_path):
    model = HybridEncoder(cfg(window=(2, 1), quant=None, segment_length=8, segment_overlap=2,
                              max_position=8)).eval()
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "hybrid_encoder_config.json").exists()
    loaded = HybridEncoder.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == model.config
    ids = torch.randint(1, 40, (2, 19))
    assert torch.equal(model(ids).last_hidden_state, loaded(ids).last_hidden_state)


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_size=15), "hidden_size"),
    (dict(conv_kernel=4), "conv_kernel"),
    (dict(segment_length=8, segment_overlap=8, max_position=8), "segment_overlap"),
    (dict(quant="int4"), "quant"),
    (dict(window=(-2, 1)), "window"),
    (dict(pooling="landmarks", num_landmarks=0), "pooling"),
])
def test_bad_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        cfg(**bad)


def test_too_long_input_without_segments_raises():
    model = HybridEncoder(cfg(max_position=8))
    with pytest.raises(ValueError, match="max_position"):
        model(torch.ones(1, 9, dtype=torch.long))
