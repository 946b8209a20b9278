"""SinkWindowHFCache with transformers' generate on a small random-init Llama."""
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hybrid_kernels.integrations.hf_compat import cache_kwargs  # noqa: E402
from hybrid_kernels.streaming.hf_cache import SinkWindowHFCache  # noqa: E402

S, W = 4, 16


def _model(layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def test_generate_equals_full_cache_while_shorter_than_window():
    m = _model()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=S + W - 9, do_sample=False)
    full = m.generate(ids, **cache_kwargs(m, DynamicCache()), **kw)
    sink = m.generate(ids, **cache_kwargs(m, SinkWindowHFCache.from_model(m, S, W)), **kw)
    assert torch.equal(full, sink)


def test_generate_beyond_window_bounded_memory():
    m = _model()
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    sizes = []
    for new in (25, 40):
        cache = SinkWindowHFCache.from_model(m, S, W)
        out = m.generate(ids, **cache_kwargs(m, cache), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
        assert out.shape[1] == 5 + new
        assert cache.get_seq_length() == 5 + new - 1
        assert all(layer.cached_length() == S + W for layer in cache.layers)
        sizes.append(cache.nbytes())
    head_dim = 32 // 4
    assert sizes[0] == sizes[1] == 2 * 2 * 1 * 2 * (S + W) * head_dim * 4  # layers*kv*B*Hk*(S+W)*D*fp32


def test_decode_beyond_window_matches_streamingllm_recompute():
    """One layer: keys/values depend only on token and position, so each decoding step with the
    sink cache must equal a fresh forward over [sinks, window, token] at slots 0..S+W
    (StreamingLLM's positions-by-cache-slot)."""
    m = _model(layers=1)
    seq = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = SinkWindowHFCache.from_model(m, S, W)
    with torch.no_grad():
        for t in range(seq.shape[1]):
            logits = m(seq[:, t:t + 1], use_cache=True, **cache_kwargs(m, cache)).logits[:, -1]
            ctx = list(range(min(t, S))) + list(range(max(S, t - W), t)) + [t]
            ref = m(seq[:, ctx]).logits[:, -1]
            torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_beam_search_reorders_the_sink_cache():
    m = _model()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, num_beams=3, max_new_tokens=8, do_sample=False, pad_token_id=0)
    full = m.generate(ids, **cache_kwargs(m, DynamicCache()), **kw)
    sink = SinkWindowHFCache.from_model(m, S, W)
    assert torch.equal(full, m.generate(ids, **cache_kwargs(m, sink), **kw))
    cache = SinkWindowHFCache.from_model(m, S, W)
    kw.update(max_new_tokens=30, min_new_tokens=30)
    assert m.generate(ids, **cache_kwargs(m, cache), **kw).shape == (2, 36)
    assert all(layer.cached_length() == S + W for layer in cache.layers)
