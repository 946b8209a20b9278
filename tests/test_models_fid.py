"""FiDT5: equality with plain T5, multi-passage fusion, checkpoints, INT8 K/V, landmark fusion."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

import hybrid_kernels as hk  # noqa: E402
from hybrid_kernels.models import FiDT5  # noqa: E402
from hybrid_kernels.models.cross_kv import CrossKV, attend_dense_masked  # noqa: E402

# Documented bound (README): INT8 cross-attention (the one INT8 definition: int8 K per 64-token
# block, bf16 V) changes the logits by at most 2% of max |logit|.
INT8_LOGIT_BOUND = 0.02


def tiny_config(**kw):
    base = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                eos_token_id=1, relative_attention_num_buckets=8)
    base.update(kw)
    return T5Config(**base)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    t5 = T5ForConditionalGeneration(tiny_config()).eval()
    ref = copy.deepcopy(t5)
    return ref, FiDT5(t5).eval()


def padded_inputs(B, P, L, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, P, L), generator=g)
    lengths = torch.randint(2, L + 1, (B, P), generator=g)
    mask = torch.arange(L)[None, None, :] < lengths[..., None]
    return ids.masked_fill(~mask, 0), mask


def test_one_passage_logits_equal_plain_t5(models):
    ref, fid = models
    ids, mask = padded_inputs(3, 1, 11)
    dec = torch.randint(2, 97, (3, 6))
    with torch.no_grad():
        want = ref(input_ids=ids[:, 0], attention_mask=mask[:, 0].long(), decoder_input_ids=dec).logits
        got = fid(ids, mask, decoder_input_ids=dec)["logits"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_passage_generate_equals_plain_t5(models):
    ref, fid = models
    ids, mask = padded_inputs(2, 1, 9, seed=3)
    for beams in (1, 3):
        want = ref.generate(input_ids=ids[:, 0], attention_mask=mask[:, 0].long(), max_new_tokens=6,
                            do_sample=False, num_beams=beams)
        got = fid.generate(ids, mask, max_new_tokens=6, num_beams=beams)
        assert torch.equal(got, want), (beams, got, want)


def test_multi_passage_equals_t5_decoder_over_concatenated_states(models):
    ref, fid = models
    B, P, L = 2, 4, 7
    ids, mask = padded_inputs(B, P, L, seed=5)
    labels = torch.randint(2, 97, (B, 5))
    with torch.no_grad():
        enc = ref.encoder(input_ids=ids.view(B * P, L), attention_mask=mask.view(B * P, L).long())
        states = enc.last_hidden_state.view(B, P * L, -1)
        want = ref(encoder_outputs=(states,), attention_mask=mask.view(B, P * L).long(),
                   labels=labels)
        got = fid(ids, mask, labels=labels)
    torch.testing.assert_close(got["logits"], want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"], want.loss, atol=1e-5, rtol=1e-5)


def test_training_gradients_flow_through_hk_cross_attention():
    fid = FiDT5.from_config(tiny_config()).train()
    ids, mask = padded_inputs(2, 3, 6)
    loss = fid(ids, mask, labels=torch.randint(2, 97, (2, 4)))["loss"]
    loss.backward()
    for block in fid.t5.decoder.block:
        g = block.layer[1].EncDecAttention.k.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path, models):
    _, fid = models
    fid.save_pretrained(str(tmp_path))
    loaded = FiDT5.from_pretrained(str(tmp_path)).eval()
    plain = T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()   # still plain T5
    ids, mask = padded_inputs(2, 3, 8)
    dec = torch.randint(2, 97, (2, 4))
    with torch.no_grad():
        a = fid(ids, mask, decoder_input_ids=dec)["logits"]
        b = loaded(ids, mask, decoder_input_ids=dec)["logits"]
        c = plain(input_ids=ids[:, 0], attention_mask=mask[:, 0].long(), decoder_input_ids=dec).logits
        d = loaded(ids[:, :1], mask[:, :1], decoder_input_ids=dec)["logits"]
    assert torch.equal(a, b)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="checkpoint directory"):
        FiDT5.from_pretrained(str(tmp_path / "missing"))


def test_int8_cross_attention_logit_change_is_bounded(models):
    _, fid = models
    ids, mask = padded_inputs(3, 5, 10, seed=7)
    dec = torch.randint(2, 97, (3, 6))
    with torch.no_grad():
        exact = fid(ids, mask, decoder_input_ids=dec)["logits"]
        fid.cross_attention_quant = "int8"
        try:
            quant = fid(ids, mask, decoder_input_ids=dec)["logits"]
            gen = fid.generate(ids, mask, max_new_tokens=4)
        finally:
            fid.cross_attention_quant = None
    change = (quant - exact).abs().max() / exact.abs().max()
    assert 0 < change < INT8_LOGIT_BOUND, float(change)
    assert gen.shape[0] == 3


def test_int8_cache_is_the_one_int8_definition():
    """quant="int8" cross-attention is an Int8KVCache (int8 K per 64-token block, bf16 V): 3/8 of
    the fp32 bytes, and the same result as hk.attention(quant="int8") on the same K/V."""
    k, v = torch.randn(2, 4, 128, 16), torch.randn(2, 4, 128, 16)
    mask = torch.ones(2, 128, dtype=torch.bool)
    mask[1, 100:] = False
    fp, i8 = CrossKV(k, v, mask), CrossKV(k, v, mask, quant="int8")
    assert i8.nbytes() <= fp.nbytes() * (0.375 + 1.0 / 16) + 1
    q = torch.randn(2, 4, 3, 16) * 0.25
    with torch.no_grad():
        out = i8.attend(q)
        same = hk.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), key_padding_mask=mask,
                            scale=1.0, quant="int8").float()
    assert out.dtype == q.dtype
    torch.testing.assert_close(out, same, atol=8e-3, rtol=8e-3)  # two bf16 roundings of out
    assert (out - attend_dense_masked(q, k, v, mask)).abs().max() < 0.05
    with pytest.raises(ValueError, match="inference-only"):
        CrossKV(k.requires_grad_(), v, quant="int8")


@pytest.mark.parametrize("quant", [None, "int8"])
def test_passage_selection_gathers_whole_passages(quant):
    """top_passages with int8 gathers the chosen passages' int8 keys and block scales: the same
    as a cache built from those passages' own K/V rows and the full cache's smoothing."""
    B, H, P, L, D = 1, 2, 4, 64, 16
    k, v = torch.randn(B, H, P * L, D), torch.randn(B, H, P * L, D)
    q = torch.randn(B, H, 2, D) * 0.25
    cache = CrossKV(k, v, None, passage_len=L, quant=quant)
    with torch.no_grad():
        out = cache.attend(q, top_passages=2)
    idx = cache.passage_scores(q).topk(2, dim=-1).indices.sort(dim=-1).values[0]  # (M, m)
    for row in range(2):
        keys = torch.cat([torch.arange(p * L, (p + 1) * L) for p in idx[row].tolist()])
        exact = attend_dense_masked(q[:, :, row:row + 1], k[:, :, keys], v[:, :, keys], None)
        tol = 1e-5 if quant is None else 0.05
        assert (out[:, :, row:row + 1] - exact).abs().max() < tol
    if quant == "int8":
        with pytest.raises(ValueError, match="multiple of the int8 block"):
            CrossKV(k[:, :, :120], v[:, :, :120], None, passage_len=30, quant="int8").attend(
                q, top_passages=2)


def _landmark_reference(q, k, v, mask, L, m):
    """Per query: score passages by first-token keys (head mean), attend to the top m."""
    B, H, M, D = q.shape
    P = k.shape[2] // L
    out = torch.zeros(B, H, M, v.shape[-1])
    for b in range(B):
        for i in range(M):
            s = torch.stack([(q[b, :, i] * k[b, :, p * L]).sum(-1).mean() for p in range(P)])
            s[~mask[b, ::L]] = float("-inf")
            keep = torch.zeros(P * L, dtype=torch.bool)
            for p in s.topk(m).indices.tolist():
                keep[p * L:(p + 1) * L] = True
            keep &= mask[b]
            sc = torch.einsum("hd,hnd->hn", q[b, :, i], k[b])
            sc[:, ~keep] = float("-inf")
            out[b, :, i] = torch.einsum("hn,hnd->hd", torch.softmax(sc, -1), v[b])
    return out


def test_landmark_sparse_fusion_matches_reference():
    B, H, P, L, D = 2, 3, 5, 4, 8
    k, v = torch.randn(B, H, P * L, D), torch.randn(B, H, P * L, D)
    mask = torch.ones(B, P * L, dtype=torch.bool)
    mask[0, 3:4] = False                  # padding inside passage 0
    mask[1, 4 * L:] = False               # question 1 has only 4 passages
    q = torch.randn(B * 2, H, 3, D)       # 2 beams per question, 3 query rows each
    cache = CrossKV(k, v, mask, passage_len=L)
    got = cache.attend(q, top_passages=2)
    qg = q.view(B, 2, H, 3, D).transpose(1, 2).reshape(B, H, 6, D)
    want = _landmark_reference(qg, k, v, mask, L, 2).view(B, H, 2, 3, D).transpose(1, 2).reshape(B * 2, H, 3, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.attend(q, top_passages=P), cache.attend(q))


def test_landmark_fusion_in_generate_runs_and_all_passages_is_exact(models):
    _, fid = models
    ids, mask = padded_inputs(2, 6, 5, seed=9)
    dec = torch.randint(2, 97, (2, 4))
    with torch.no_grad():
        full = fid(ids, mask, decoder_input_ids=dec)["logits"]
        fid.top_passages = 6
        same = fid(ids, mask, decoder_input_ids=dec)["logits"]
        fid.top_passages = 2
        try:
            sparse = fid(ids, mask, decoder_input_ids=dec)["logits"]
            out = fid.generate(ids, mask, max_new_tokens=3, num_beams=2)
        finally:
            fid.top_passages = None
    torch.testing.assert_close(same, full)
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, full)
    assert out.shape[0] == 2 and out.shape[1] <= 4


def test_bad_inputs_raise_clear_errors(models):
    _, fid = models
    with pytest.raises(ValueError, match="input_ids must be"):
        fid.generate(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="cross_attention_quant"):
        FiDT5(fid.t5, cross_attention_quant="int4")
    with pytest.raises(ValueError, match="top_passages"):
        FiDT5(fid.t5, top_passages=0)
    with pytest.raises(ValueError, match="passage_len"):
        CrossKV(torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4), passage_len=3)


def test_self_attention_runs_on_the_kernels_without_sdpa(models, monkeypatch):
    """Encoder and decoder self-attention go through hk.attention (T5's relative bias as an
    offset table); cross-attention through HKCrossAttention; torch's SDPA is never called."""
    hkt = hk.integrations.transformers
    counts = {"self": 0, "sdpa": 0}
    kernels, sdpa = hkt.hk_attention, torch.nn.functional.scaled_dot_product_attention

    def counting_kernels(*args, **kwargs):
        counts["self"] += 1
        assert kwargs["position_bias"] is not None  # every self-attention layer has T5's bias
        return kernels(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(hkt, "hk_attention", counting_kernels)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    _, fid = models
    ids, mask = padded_inputs(2, 3, 10, seed=5)
    dec = torch.randint(2, 97, (2, 5))
    with torch.no_grad():
        fid(ids, mask, decoder_input_ids=dec)
    assert counts == {"self": 2 + 2, "sdpa": 0}  # 2 encoder + 2 decoder layers
    counts["self"] = 0
    fid.generate(ids, mask, max_new_tokens=4)
    assert counts["sdpa"] == 0 and counts["self"] == 2 + 2 * 4
