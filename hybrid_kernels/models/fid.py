"""Fusion-in-Decoder (Izacard & Grave, 2021) over ``transformers.T5ForConditionalGeneration``.

Each (question, passage) pair is encoded independently (batched as B * n_passages), the encoder
states are concatenated to (B, n_passages * L, d) and the decoder cross-attends over all of them.
The decoder's cross-attention modules are replaced by :class:`HKCrossAttention`, which reuses the
original q/k/v/o projections (so state-dict keys and saved checkpoints stay plain T5) and runs the
attention on hybrid-kernels (T5: scale 1.0, no position bias in cross-attention, key padding mask).
The encoder's and decoder's self-attention run on the kernels too, through the transformers
integration (``attn_implementation="hybrid_kernels"``: T5's relative position bias becomes an
offset table, the decoder's cache and causal mask are read as such).

Options (constructor or attributes):
    cross_attention_quant: None or "int8" -- keep the cross-attention K/V as int8 (see
        :mod:`hybrid_kernels.models.cross_kv`), computed once per question in ``generate``.
    top_passages: None or m -- landmark sparse fusion: each decoding step attends only to the m
        passages whose first-token key scores highest for it.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cross_kv import CrossKV
from ..integrations.hf_compat import cache_kwargs

__all__ = ["FiDT5", "HKCrossAttention", "format_passage", "small_t5_config"]


def small_t5_config(vocab_size: int, d_model: int, layers: int = 2):
    """A small T5 config for training a FiD reader from scratch (benches, tests): d_kv = d / 4,
    d_ff = 2 d, 4 heads, ``layers`` encoder and decoder layers, no dropout, pad 0, eos 1."""
    from transformers import T5Config
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                    num_layers=layers, num_decoder_layers=layers, num_heads=4, dropout_rate=0.0,
                    relative_attention_num_buckets=16, relative_attention_max_distance=64,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def format_passage(question: str, title: str, text: str) -> str:
    """The FiD input string of one (question, passage) pair."""
    return f"question: {question} title: {title} context: {text}"


class _CrossContext:
    """State shared by FiDT5 and its cross-attention modules for one forward/generate call."""

    def __init__(self):
        self.caches: Optional[List[CrossKV]] = None   # precomputed per layer (generate)
        self.key_mask: Optional[Tensor] = None         # (B, P*L) bool
        self.passage_len: Optional[int] = None
        self.quant: Optional[str] = None
        self.top_passages: Optional[int] = None
        self.backend = "auto"
        self.attention_probs: Optional[List[Tensor]] = None   # filled per layer when recording


class HKCrossAttention(nn.Module):
    """Drop-in for a T5 decoder's ``EncDecAttention`` computing attention with hybrid-kernels."""

    def __init__(self, original: nn.Module, layer_idx: int, context: _CrossContext):
        super().__init__()
        self.q, self.k, self.v, self.o = original.q, original.k, original.v, original.o
        self.n_heads = original.n_heads
        self.key_value_proj_dim = original.key_value_proj_dim
        self.layer_idx = layer_idx
        self._ctx = context

    def project_kv(self, states: Tensor):
        B, N, _ = states.shape
        shape = (B, N, self.n_heads, self.key_value_proj_dim)
        return (self.k(states).view(shape).transpose(1, 2),
                self.v(states).view(shape).transpose(1, 2))

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                past_key_values=None, **kwargs):
        ctx = self._ctx
        B, Nq, _ = hidden_states.shape
        q = self.q(hidden_states).view(B, Nq, self.n_heads, self.key_value_proj_dim).transpose(1, 2)
        if ctx.caches is not None:
            cache = ctx.caches[self.layer_idx]
        else:
            k, v = self.project_kv(key_value_states)
            key_mask = ctx.key_mask if ctx.key_mask is not None else _key_mask_from_hf(mask)
            cache = CrossKV(k, v, key_mask, ctx.passage_len, ctx.quant)
        if ctx.attention_probs is not None:
            ctx.attention_probs.append(_dense_cross_probs(q, cache))
        out = cache.attend(q, top_passages=ctx.top_passages, backend=ctx.backend)
        out = self.o(out.transpose(1, 2).reshape(B, Nq, -1))
        return out, None, None


def _dense_cross_probs(q: Tensor, cache: CrossKV) -> Tensor:
    """T5 cross-attention weights in plain torch (scale 1, key padding mask): q (B, H, Nq, D)
    against the cache's keys -> (B, H, Nq, Nk). Only for analysis; the output uses the kernels."""
    if cache.k is None:
        raise NotImplementedError("passage attention is recorded from float K (cross_attention_quant=None)")
    logits = q.float() @ cache.k.float().transpose(-1, -2)
    if cache.key_mask is not None:
        logits = logits.masked_fill(~cache.key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def _key_mask_from_hf(mask: Optional[Tensor]) -> Optional[Tensor]:
    """HF's 4-D encoder mask (bool keep, or additive float) -> (B, Nk) bool, or None."""
    if mask is None:
        return None
    row = mask[:, 0, -1, :]
    return row if row.dtype == torch.bool else row == 0


class FiDT5(nn.Module):
    """Fusion-in-Decoder T5. ``self.t5`` is an ordinary ``T5ForConditionalGeneration``.

    Inputs are ``input_ids`` / ``attention_mask`` of shape (B, n_passages, L); passages are padded
    to a common length L (the landmark of a passage is its first token).
    """

    def __init__(self, t5, *, cross_attention_quant: Optional[str] = None,
                 top_passages: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        if cross_attention_quant not in (None, "int8"):
            raise ValueError(f"cross_attention_quant must be None or 'int8'; got {cross_attention_quant!r}")
        if top_passages is not None and (not isinstance(top_passages, int) or top_passages < 1):
            raise ValueError(f"top_passages must be None or an int >= 1; got {top_passages!r}")
        self.t5 = t5
        self.config = t5.config
        self.cross_attention_quant = cross_attention_quant
        self.top_passages = top_passages
        self.backend = backend
        self._ctx = _CrossContext()
        from ..integrations.transformers import register
        t5.set_attn_implementation(register())
        for i, block in enumerate(t5.decoder.block):
            layer = block.layer[1]
            if not isinstance(layer.EncDecAttention, HKCrossAttention):
                layer.EncDecAttention = HKCrossAttention(layer.EncDecAttention, i, self._ctx)

    # ----------------------------------------------------------------- construction / I/O
    @classmethod
    def from_config(cls, config, **options) -> "FiDT5":
        from transformers import T5ForConditionalGeneration
        return cls(T5ForConditionalGeneration(config), **options)

    @classmethod
    def from_pretrained(cls, path: str, **options) -> "FiDT5":
        """Load any saved T5 checkpoint directory (local files only; nothing is downloaded)."""
        from transformers import T5ForConditionalGeneration
        if not os.path.isdir(path):
            raise ValueError(f"path must be a saved T5 checkpoint directory; got {path!r}")
        return cls(T5ForConditionalGeneration.from_pretrained(path, local_files_only=True), **options)

    def save_pretrained(self, path: str) -> None:
        """Save as a plain T5 checkpoint (loadable by transformers or :meth:`from_pretrained`)."""
        self.t5.save_pretrained(path)

    # ----------------------------------------------------------------- forward
    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None):
        """(B, P, L) ids -> encoder states (B, P*L, d) and key mask (B, P*L) bool."""
        if input_ids.dim() != 3:
            raise ValueError(f"input_ids must be (B, n_passages, L); got shape {tuple(input_ids.shape)}")
        B, P, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                             f"got {tuple(attention_mask.shape)}")
        enc = self.t5.encoder(input_ids=input_ids.reshape(B * P, L),
                              attention_mask=attention_mask.reshape(B * P, L).long()).last_hidden_state
        return enc.reshape(B, P * L, -1), attention_mask.reshape(B, P * L).bool()

    @contextlib.contextmanager
    def _cross(self, key_mask, passage_len, caches=None):
        ctx = self._ctx
        ctx.key_mask, ctx.passage_len, ctx.caches = key_mask, passage_len, caches
        ctx.quant, ctx.top_passages = self.cross_attention_quant, self.top_passages
        ctx.backend = self.backend
        try:
            yield
        finally:
            ctx.key_mask = ctx.caches = None

    def lm_logits(self, decoder_hidden: Tensor) -> Tensor:
        if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
            decoder_hidden = decoder_hidden * (self.config.d_model ** -0.5)
        return self.t5.lm_head(decoder_hidden)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None):
        """Teacher-forced pass. Returns a dict with ``logits`` (B, T, V) and ``loss`` if labels."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.t5._shift_right(labels)
        enc, key_mask = self.encode(input_ids, attention_mask)
        with self._cross(key_mask, input_ids.shape[2]):
            hidden = self.t5.decoder(input_ids=decoder_input_ids, encoder_hidden_states=enc).last_hidden_state
        logits = self.lm_logits(hidden)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                          labels.reshape(-1), ignore_index=-100)
        return out

    @torch.no_grad()
    def passage_attention(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                          labels: Optional[Tensor] = None,
                          decoder_input_ids: Optional[Tensor] = None) -> Tensor:
        """Cross-attention mass per passage (Izacard & Grave's reader signal): the decoder's
        attention weights summed over each passage's tokens, averaged over layers, heads and the
        decoder positions of real answer tokens (labels != -100). Inputs (B, P, L) -> (B, P), rows
        sum to 1. Weights are recomputed in plain torch from the layers' q/k."""
        B, P, L = input_ids.shape
        was_training = self.training
        self.eval()
        self._ctx.attention_probs = []
        try:
            self.forward(input_ids, attention_mask, decoder_input_ids=decoder_input_ids, labels=labels)
            probs = torch.stack(self._ctx.attention_probs)          # (layers, B, H, T, P*L)
        finally:
            self._ctx.attention_probs = None
            self.train(was_training)
        per_passage = probs.reshape(*probs.shape[:4], P, L).sum(-1).mean(dim=(0, 2))   # (B, T, P)
        if labels is None:
            return per_passage.mean(1)
        w = (labels != -100).float()
        return (per_passage * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)

    # ----------------------------------------------------------------- generation
    def cross_caches(self, enc: Tensor, key_mask: Tensor, passage_len: int) -> List[CrossKV]:
        """Per-layer cross K/V, projected (and quantized if configured) once per question."""
        caches = []
        for block in self.t5.decoder.block:
            attn = block.layer[1].EncDecAttention
            k, v = attn.project_kv(enc)
            caches.append(CrossKV(k, v, key_mask, passage_len, self.cross_attention_quant))
        return caches

    def _decode_step(self, tokens: Tensor, past, dummy_enc: Tensor) -> Tensor:
        out = self.t5.decoder(input_ids=tokens, encoder_hidden_states=dummy_enc, use_cache=True,
                              **cache_kwargs(self.t5.decoder, past))
        return self.lm_logits(out.last_hidden_state[:, -1]).float()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
                 max_new_tokens: int = 32, num_beams: int = 1, length_penalty: float = 1.0,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 decoder_start_token_id: Optional[int] = None) -> Tensor:
        """Greedy (num_beams=1) or beam search. Returns (B, 1 + T) ids starting with the decoder
        start token (as transformers' ``generate`` does), padded with ``pad_token_id``."""
        from transformers.cache_utils import DynamicCache
        cfg = self.config
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
        start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1; got {num_beams}")
        was_training = self.training
        self.eval()
        try:
            enc, key_mask = self.encode(input_ids, attention_mask)
            B = enc.shape[0]
            caches = self.cross_caches(enc, key_mask, input_ids.shape[2])
            past = DynamicCache(config=self.t5.decoder.config)
            dummy = enc.new_zeros((B * num_beams, 1, enc.shape[-1]))
            with self._cross(key_mask, input_ids.shape[2], caches):
                step = lambda tok: self._decode_step(tok, past, dummy)  # noqa: E731
                if num_beams == 1:
                    return _greedy(step, B, start, eos, pad, max_new_tokens, enc.device)
                return _beam_search(step, past, B, num_beams, start, eos, pad, max_new_tokens,
                                    length_penalty, enc.device)
        finally:
            self.train(was_training)


def _greedy(step, B, start, eos, pad, max_new_tokens, device) -> Tensor:
    seqs = torch.full((B, 1), start, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = step(seqs[:, -1:]).argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        finished |= nxt == eos
        if bool(finished.all()):
            break
    return seqs


def _beam_search(step, past, B, K, start, eos, pad, max_new_tokens, length_penalty, device) -> Tensor:
    """Standard beam search: hypotheses finish at eos and are ranked by logp / len**length_penalty;
    a question is done when it has K finished hypotheses and no live beam can beat the best."""
    seqs = torch.full((B * K, 1), start, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")          # all beams start identical: keep one
    finished: List[List[tuple]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(1, max_new_tokens + 1):
        logp = F.log_softmax(step(seqs[:, -1:]), dim=-1)
        V = logp.shape[-1]
        cand = (scores.unsqueeze(-1) + logp.view(B, K, V)).view(B, K * V)
        top_s, top_i = cand.topk(2 * K, dim=-1)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        new_src = torch.zeros((B, K), dtype=torch.long, device=device)
        new_tok = torch.full((B, K), pad, dtype=torch.long, device=device)
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                src, tok = divmod(i, V)
                if s == float("-inf"):
                    break
                if tok == eos:
                    seq = seqs[b * K + src].tolist() + [eos]
                    finished[b].append((s / (t ** length_penalty), seq))
                    continue
                new_scores[b, j], new_src[b, j], new_tok[b, j] = s, src, tok
                j += 1
                if j == K:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
            best_live = float(new_scores[b].max())
            if len(finished[b]) >= K and finished[b][-1][0] >= best_live / (t ** length_penalty):
                done[b] = True
        if all(done):
            break
        flat = (torch.arange(B, device=device).unsqueeze(1) * K + new_src).view(-1)
        seqs = torch.cat([seqs[flat], new_tok.view(-1, 1)], dim=1)
        past.reorder_cache(flat)
        scores = new_scores
    best = []
    for b in range(B):
        if not finished[b]:
            k = int(scores[b].argmax())
            finished[b].append((0.0, seqs[b * K + k].tolist()))
        best.append(max(finished[b], key=lambda h: h[0])[1])
    width = max(len(s) for s in best)
    out = torch.full((B, width), pad, dtype=torch.long, device=device)
    for b, s in enumerate(best):
        out[b, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
    return out
