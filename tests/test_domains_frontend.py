"""Mixed streams through HybridEncoder: padding/masking equivalence (a batch equals its rows
run one by one), spans as landmarks, and the encoder's inputs_embeds / landmark_mask hook."""
import pytest
import torch

pytest.importorskip("fluxem")

from hybrid_kernels.domains import MixedStreamBatcher, MixedStreamEncoder  # noqa: E402
from hybrid_kernels.models import HybridEncoder, HybridEncoderConfig  # noqa: E402

DOMAINS = ("number", "quantity", "unit", "formula")
TEXTS = ["12 + 345 =", "Water (H2O) boils at 373.15 K", "5 km in cm", "ok"]


def _chars(s):
    return [3 + (ord(c) % 90) for c in s]


def _encoder(window=None, num_landmarks=2, landmark_stride=0):
    cfg = HybridEncoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              conv_kernel=3, window=window, landmark_stride=landmark_stride,
                              num_landmarks=num_landmarks, segment_length=0, max_position=64, dropout=0.0)
    return HybridEncoder(cfg).eval()


@pytest.fixture(scope="module")
def batcher():
    return MixedStreamBatcher(_chars, DOMAINS)


def test_batch_layout(batcher):
    batch = batcher(TEXTS)
    B, N = batch.token_ids.shape
    lengths = batch.attention_mask.sum(1).tolist()
    assert B == 4 and N == max(lengths)
    # "12 + 345 =": one position per number, one token per character of the text between
    assert lengths[0] == 1 + len(" + ") + 1 + len(" =")
    assert batch.domain_mask[0].tolist()[:lengths[0]] == [True, False, False, False, True, False, False]
    assert batch.domain_types[0, 0].item() == DOMAINS.index("number") + 1
    assert batch.spans[0][4].text == "345"
    assert not batch.domain_mask[3].any() and (batch.domain_types[~batch.attention_mask] == 0).all()
    assert (batch.encodings[~batch.domain_mask] == 0).all()


@pytest.mark.parametrize("landmarks", [False, True])
@pytest.mark.parametrize("window", [None, (2, 2)])
def test_batch_equals_rows_one_by_one(batcher, landmarks, window):
    model = MixedStreamEncoder(_encoder(window), DOMAINS, spans_as_landmarks=landmarks).eval()
    with torch.no_grad():
        out = model(batcher(TEXTS))
        for b, text in enumerate(TEXTS):
            one = model(batcher([text]))
            n = one.last_hidden_state.shape[1]
            torch.testing.assert_close(out.last_hidden_state[b, :n], one.last_hidden_state[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out.pooled[b], one.pooled[0], atol=2e-5, rtol=1e-4)


def test_spans_as_landmarks_reach_distant_tokens(batcher):
    """Window (1, 1), one layer view: a token far from a span sees it only when the span is a landmark."""
    enc = _encoder(window=(1, 1), num_landmarks=0)
    a, b = "7 kg and then a long tail of text", "9 mg and then a long tail of text"
    last = batcher([a]).token_ids.shape[1] - 1   # far outside two layers of a (1, 1) window from 0
    for landmarks, changes in ((False, False), (True, True)):
        model = MixedStreamEncoder(enc, DOMAINS, spans_as_landmarks=landmarks).eval()
        with torch.no_grad():
            ha, hb = (model(batcher([t])).last_hidden_state[0, last] for t in (a, b))
        assert (not torch.allclose(ha, hb)) == changes


def test_projection_heads_and_types_get_gradients(batcher):
    model = MixedStreamEncoder(_encoder(), DOMAINS)
    hidden = model(batcher(TEXTS)).last_hidden_state
    # a fixed random readout: a plain sum of LayerNorm outputs has zero gradient
    (hidden * torch.randn(hidden.shape[-1])).sum().backward()
    used = {DOMAINS.index(d) for d in ("number", "quantity", "unit", "formula")}
    for i in used:
        assert model.embedder.heads[i].weight.grad.abs().sum() > 0
    assert model.embedder.types.weight.grad[1:].abs().sum() > 0


def test_inputs_embeds_equals_input_ids():
    enc = _encoder(window=(3, 3), landmark_stride=4)
    ids = torch.randint(1, 96, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        ref = enc(ids, mask)
        out = enc(inputs_embeds=enc.embed(ids), attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    torch.testing.assert_close(out.pooled, ref.pooled)


def test_encoder_hook_rejects_bad_input():
    enc = _encoder()
    ids = torch.randint(1, 96, (2, 5))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        enc(ids, inputs_embeds=enc.embed(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        enc()
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(B, N, 32\); got shape \(2, 5, 8\)"):
        enc(inputs_embeds=torch.zeros(2, 5, 8), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="inputs_embeds needs an attention_mask"):
        enc(inputs_embeds=enc.embed(ids))
    with pytest.raises(ValueError, match=r"landmark_mask must have shape \(2, 5\); got \(2, 4\)"):
        enc(ids, landmark_mask=torch.zeros(2, 4, dtype=torch.bool))


def test_batcher_rejects_bad_input(batcher):
    with pytest.raises(ValueError, match="non-empty sequence of str"):
        batcher("12 + 3")
    with pytest.raises(TypeError, match="text_tokenizer must be callable"):
        MixedStreamBatcher("chars", DOMAINS)
