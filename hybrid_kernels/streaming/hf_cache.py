"""A Hugging Face ``transformers`` (5.x) cache that keeps S sink tokens + the W most recent tokens
per layer (StreamingLLM), built on the cache-layer API, for ``model.generate`` on causal LMs::

    cache = SinkWindowHFCache.from_model(model, num_sinks=4, window=1020)
    model.generate(input_ids, cache=cache, max_new_tokens=10_000)   # past_key_values= before
                                                                     # transformers renamed it

Each forward attends to [sinks ‖ recent window ‖ new tokens] with the model's own attention
implementation (eager / sdpa / any registered one): :meth:`SinkWindowLayer.get_mask_sizes`
reports those keys as the last ``len(cache) + n`` positions before the queries, so the model's
causal mask lets every new token see the whole cache plus the new tokens causally.

Positions. The model rotates queries and keys at their absolute positions (``position_ids``)
before they reach the cache. Window keys keep their rotation (true relative distance); the sink
keys are re-rotated on the way out so they sit immediately before the oldest window key
(position ``seen - len(cache) + s``): for one-token decoding a query at slot S + W sees sink s at
distance S + W - s, exactly StreamingLLM's slot positions, and the same convention as
:class:`..session.StreamingSession`. The stored sinks keep their original rotation and are
rotated by the current shift in float64 angles each step, so no error accumulates. Models without
RoPE: pass ``rope_inv_freq=None`` (no re-rotation).

While the stream is shorter than S + W nothing is evicted and the returned keys are the full
cache's, bit for bit, so ``generate`` matches ``DynamicCache`` exactly.

Limits: a prompt chunk longer than the cache attends to itself in full (causally) before the
cache truncates, as in StreamingLLM. Left-padded batches are supported only while nothing is
evicted (past that, the model's padding mask cannot describe the sink/window gap). Beam search
reordering and batch expansion are supported; ``crop`` (assisted decoding) is not.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

try:
    from transformers.cache_utils import Cache, DynamicLayer
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("hybrid_kernels.streaming.hf_cache needs transformers>=5: "
                      "pip install 'transformers>=5,<6'") from exc

__all__ = ["SinkWindowLayer", "SinkWindowHFCache", "rotate_keys"]


def rotate_keys(keys: Tensor, shift: int, inv_freq: Tensor) -> Tensor:
    """Rotate HF-rotated keys (B, H, N, D) by ``shift`` more positions (rotate-half layout;
    only the first 2 * len(inv_freq) channels are rotary, as in partial-rotary models)."""
    rot = 2 * inv_freq.numel()
    angles = shift * inv_freq.to(device=keys.device, dtype=torch.float64)
    cos = torch.cos(angles).repeat(2).float()
    sin = torch.sin(angles).repeat(2).float()
    k = keys[..., :rot].float()
    half = rot // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    out = (k * cos + rotated * sin).to(keys.dtype)
    return torch.cat([out, keys[..., rot:]], dim=-1) if rot < keys.shape[-1] else out


class SinkWindowLayer(DynamicLayer):
    """One layer: the first ``num_sinks`` tokens + the ``window`` most recent ones."""

    is_sliding = False
    is_croppable = False

    def __init__(self, num_sinks: int, window: int, rope_inv_freq: Optional[Tensor] = None):
        super().__init__()
        if num_sinks < 0 or window < 1:
            raise ValueError(f"need num_sinks >= 0 and window >= 1; got {num_sinks}, {window}")
        self.num_sinks, self.window = num_sinks, window
        self.rope_inv_freq = rope_inv_freq
        self.cumulative_length = 0
        self.sink_k = self.sink_v = self.win_k = self.win_v = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.sink_k, self.win_k = key_states[..., :0, :], key_states[..., :0, :]
        self.sink_v, self.win_v = value_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    def cached_length(self) -> int:
        return 0 if not self.is_initialized else self.sink_k.shape[-2] + self.win_k.shape[-2]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        shift = self.cumulative_length - self.cached_length()
        sinks = self.sink_k
        if shift and self.rope_inv_freq is not None and sinks.shape[-2]:
            sinks = rotate_keys(sinks, shift, self.rope_inv_freq)
        keys = torch.cat([sinks, self.win_k, key_states], dim=-2)
        values = torch.cat([self.sink_v, self.win_v, value_states], dim=-2)
        take = min(self.num_sinks - self.sink_k.shape[-2], key_states.shape[-2])
        self.sink_k = torch.cat([self.sink_k, key_states[..., :take, :]], dim=-2)
        self.sink_v = torch.cat([self.sink_v, value_states[..., :take, :]], dim=-2)
        self.win_k = self._keep_recent(torch.cat([self.win_k, key_states[..., take:, :]], dim=-2))
        self.win_v = self._keep_recent(torch.cat([self.win_v, value_states[..., take:, :]], dim=-2))
        self.cumulative_length += key_states.shape[-2]
        return keys, values

    def _keep_recent(self, t: Tensor) -> Tensor:
        # clone() so the kept window does not pin the larger concatenated buffer.
        return t[..., -self.window:, :].clone() if t.shape[-2] > self.window else t

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        cached = self.cached_length()
        return cached + query_length, self.cumulative_length - cached

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.num_sinks + self.window

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.untyped_storage().nbytes() for t in (self.sink_k, self.sink_v, self.win_k, self.win_v))

    def reset(self) -> None:
        self.sink_k = self.sink_v = self.win_k = self.win_v = None
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def _map(self, fn) -> None:
        if self.is_initialized:
            self.sink_k, self.sink_v, self.win_k, self.win_v = (
                fn(t) for t in (self.sink_k, self.sink_v, self.win_k, self.win_v))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkWindowLayer cannot be cropped (evicted tokens are gone); "
                                  "assisted decoding is not supported with a sink cache")


class SinkWindowHFCache(Cache):
    """``Cache`` of :class:`SinkWindowLayer` (layers created lazily, one per attention layer).

    Args:
        num_sinks: S, the first tokens kept forever (StreamingLLM uses 4).
        window: W, the most recent tokens kept.
        rope_inv_freq: the model's RoPE inverse frequencies (``model.model.rotary_emb.inv_freq``)
            to re-rotate the sinks; None for models without RoPE. :meth:`from_model` finds it.
    """

    def __init__(self, num_sinks: int = 4, window: int = 1020, rope_inv_freq: Optional[Tensor] = None):
        self.num_sinks, self.window = num_sinks, window
        inv = None if rope_inv_freq is None else rope_inv_freq.detach().to(torch.float64)
        super().__init__(layer_class_to_replicate=functools.partial(SinkWindowLayer, num_sinks, window, inv))

    @classmethod
    def from_model(cls, model, num_sinks: int = 4, window: int = 1020) -> "SinkWindowHFCache":
        """Build for ``model``, taking RoPE frequencies from its rotary embedding module."""
        inv_freq = None
        for name, buf in model.named_buffers():
            if name.endswith("rotary_emb.inv_freq"):
                inv_freq = buf
                break
        config = getattr(model, "config", None)
        uses_rope = any(getattr(config, a, None) is not None for a in ("rope_parameters", "rope_theta"))
        if inv_freq is None and uses_rope:
            raise ValueError("the model config has RoPE parameters but no rotary_emb.inv_freq buffer "
                             "was found; build SinkWindowHFCache(..., rope_inv_freq=...) directly")
        return cls(num_sinks, window, inv_freq)

    def nbytes(self) -> int:
        """Bytes held by the cached tensors of every layer."""
        return sum(layer.nbytes() for layer in self.layers)
