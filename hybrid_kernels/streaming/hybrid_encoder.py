"""StreamingHybridEncoder: a trained causal :class:`~hybrid_kernels.models.encoder.HybridEncoder`
run over an unbounded token stream, chunk by chunk, in bounded memory.

What is reproduced. Feeding a stream in chunks of any size returns, for every token, the hidden
state ``HybridEncoder.forward(ids, attention_mask=ones).last_hidden_state`` gives that token on the
whole stream prefix (up to fp rounding; eval semantics, no dropout). Every stream token is real:
``pad_token_id`` has no special meaning in a stream (pass ``attention_mask=ones`` to compare).

How. The forward sequence is ``[memory tokens (G) ‖ stream]`` and every block is causal, so:

* Attention: query r sees the G memory tokens (landmarks) and keys r - W .. r, W = the left extent
  of ``cfg.window`` (under ``causal`` the right extent hides nothing). That is exactly a
  :class:`.session.StreamingSession` with ``num_sinks=G``, ``window=W`` and no RoPE, one cache per
  layer; the memory tokens are the first G tokens the session sees (prepended to the first chunk),
  so they become its sinks.
* Causal depthwise conv (kernel K): output r reads the normalized inputs r - K + 1 .. r, so each
  layer keeps the last K - 1 normalized inputs as state (zeros before the sequence starts, as the
  model's left padding).
* Memory-token rows only ever see memory tokens, so they do not depend on the stream.

Positions. Stream token t gets the absolute position embedding of t. Past ``cfg.max_position``
(where the model has no learned embedding) ``beyond_max_position`` decides: ``"clamp"`` (default:
every later token uses position max_position - 1, the farthest position the model knows),
``"wrap"`` (position t % max_position) or ``"raise"`` (a chunk that would cross it is rejected,
state unchanged). Within max_position all three are identical to the model.

Supported configs: ``causal=True``, a finite window left extent, ``landmark_stride=0``,
``segment_length=0``, ``quant=None`` (anything else raises a ValueError naming the field).
A chunk is one transaction: if it fails validation or raises anywhere, the state is unchanged.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pattern import normalize_window
from .session import StreamingSession

__all__ = ["StreamingHybridEncoder", "BEYOND_MAX_POSITION"]

_STATE_FORMAT = 1
BEYOND_MAX_POSITION = ("clamp", "wrap", "raise")


def _check_supported(cfg) -> int:
    """Raise ValueError naming the config field the streaming path cannot run; return W."""
    def bad(name, why):
        raise ValueError(f"StreamingHybridEncoder: HybridEncoderConfig.{name}={getattr(cfg, name)!r} "
                         f"is not supported; {why}")
    if cfg.causal is not True:
        bad("causal", "streaming needs causal=True (a bidirectional encoder's states depend on "
                      "tokens that have not arrived yet)")
    left, _ = normalize_window(cfg.window)
    if left < 0:
        bad("window", "the left extent must be finite (an unlimited window needs an unbounded cache)")
    if cfg.landmark_stride != 0:
        bad("landmark_stride", "strided landmarks stay visible forever, so the cache would grow "
                               "with the stream; use landmark_stride=0 (memory tokens are the sinks)")
    if cfg.segment_length != 0:
        bad("segment_length", "segmented inputs are not a causal stream; use segment_length=0")
    if cfg.quant is not None:
        bad("quant", "INT8 QK^T scales depend on the call's keys, so chunked and whole-stream "
                     "results would differ; use quant=None (cache_dtype='int8' compresses the cache)")
    return left


class StreamingHybridEncoder:
    """One stream (B sequences in lockstep) through a trained ``HybridEncoder``.

    The model is referenced, not copied; :meth:`state_dict` holds only the stream state.

    Args:
        model: a :class:`~hybrid_kernels.models.encoder.HybridEncoder` with a supported config.
        cache_dtype, int8_block, backend: passed to the :class:`.session.StreamingSession`
            ("float32" cache = exact; "float16"/"bfloat16"/"int8" trade accuracy for memory).
        beyond_max_position: "clamp" | "wrap" | "raise" (module docstring).
    """

    def __init__(self, model, *, cache_dtype: str = "float32", int8_block: int = 32,
                 backend: str = "auto", beyond_max_position: str = "clamp"):
        from ..models.encoder import HybridEncoder
        if not isinstance(model, HybridEncoder):
            raise TypeError(f"model must be a HybridEncoder; got {type(model).__name__}")
        if beyond_max_position not in BEYOND_MAX_POSITION:
            raise ValueError(f"beyond_max_position must be one of {BEYOND_MAX_POSITION}; "
                             f"got {beyond_max_position!r}")
        cfg = model.config
        window = _check_supported(cfg)
        self.model = model
        self.beyond_max_position = beyond_max_position
        self.num_memory = cfg.num_landmarks
        self.conv_state_len = max(cfg.conv_kernel - 1, 0)
        self.session = StreamingSession(
            num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
            num_layers=cfg.num_layers, num_sinks=cfg.num_landmarks, window=window,
            rope_theta=None, cache_dtype=cache_dtype, int8_block=int8_block, backend=backend)
        self._conv: Optional[List[Tensor]] = None   # per layer (B, K - 1, d) normalized inputs

    # -- shortcuts -------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Stream tokens consumed so far (the session also counts the memory tokens)."""
        return max(0, self.session.position - self.num_memory)

    @property
    def batch_size(self) -> Optional[int]:
        return self.session.batch_size

    def _param(self) -> Tensor:
        return self.model.embed.weight

    # -- validation ------------------------------------------------------------------------------
    def check_tokens(self, token_ids: Tensor) -> None:
        """Raise TypeError/ValueError naming the problem if ``token_ids`` is not a valid chunk."""
        cfg = self.model.config
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor; got {type(token_ids).__name__}")
        if token_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"token_ids must be an integer tensor; got {token_ids.dtype}")
        if token_ids.dim() != 2 or token_ids.shape[0] == 0 or token_ids.shape[1] == 0:
            raise ValueError(f"token_ids must be (B, n) with B, n >= 1; "
                             f"got shape {tuple(token_ids.shape)}")
        if self.batch_size is not None and token_ids.shape[0] != self.batch_size:
            raise ValueError(f"token_ids has batch size {token_ids.shape[0]} but the stream has "
                             f"{self.batch_size}")
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size={cfg.vocab_size}); got "
                             f"min {lo}, max {hi}")
        end = self.position + token_ids.shape[1]
        if self.beyond_max_position == "raise" and end > cfg.max_position:
            raise ValueError(f"the stream would reach {end} tokens, beyond max_position="
                             f"{cfg.max_position} (beyond_max_position='raise'); the chunk was "
                             f"rejected and the stream state is unchanged")

    def _position_ids(self, start: int, n: int, device) -> Tensor:
        pos = torch.arange(start, start + n, device=device)
        limit = self.model.config.max_position
        if self.beyond_max_position == "wrap":
            return pos % limit
        return pos.clamp(max=limit - 1)   # "raise" never gets here past the limit

    # -- one chunk -------------------------------------------------------------------------------
    @torch.no_grad()
    def feed(self, token_ids: Tensor) -> Tensor:
        """Consume one chunk (B, n) of token ids; return its hidden states (B, n, hidden_size)."""
        self.check_tokens(token_ids)
        model, G = self.model, self.num_memory
        w = self._param()
        ids = token_ids.to(w.device).long()
        B, n = ids.shape
        x = model.embed(ids) + model.position(self._position_ids(self.position, n, w.device))[None]
        first = self.session.position == 0
        if first and G:
            x = torch.cat([model.memory.unsqueeze(0).expand(B, -1, -1).to(x.dtype), x], dim=1)
        conv = self._conv if self._conv is not None else \
            [x.new_zeros(B, self.conv_state_len, x.shape[-1])] * len(model.blocks)
        new_conv = []
        with self.session.chunk(x.shape[1]):
            for i, block in enumerate(model.blocks):
                x, state = self._mix(block, i, x, conv[i])
                x = x + block.ffn(block.norm2(x))
                new_conv.append(state)
            x = model.final_norm(x)
        self._conv = new_conv
        return x[:, G:] if first else x

    def _mix(self, block, layer: int, x: Tensor, conv_state: Tensor):
        """``HybridBlock.mix`` with the attention on the session and the conv on its state."""
        h = block.norm1(x)
        B, n, d = h.shape
        heads = block.attn.heads
        q, k, v = block.attn.qkv(h).view(B, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        o = self.session.attend(layer, q, k, v)
        a = block.attn.out(o.transpose(1, 2).reshape(B, n, d))
        hist = torch.cat([conv_state, h], dim=1)
        if block.conv is not None:
            c = block.conv.depthwise(hist.transpose(1, 2)).transpose(1, 2)
            c = block.conv.pointwise(F.gelu(c))
            g = torch.sigmoid(block.gate(h))
            a = g * a + (1 - g) * c
        # clone() so the kept rows do not pin the chunk-sized buffer.
        return x + a, hist[:, hist.shape[1] - self.conv_state_len:].clone()

    # -- memory and checkpoints ------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of tensor storage held by the stream state (caches + conv states)."""
        conv = sum(t.untyped_storage().nbytes() for t in self._conv) if self._conv else 0
        return self.session.nbytes() + conv

    def reset(self) -> None:
        self.session.reset()
        self._conv = None

    def _config(self) -> Dict[str, Any]:
        return {"model": self.model.config.to_dict(), "beyond_max_position": self.beyond_max_position}

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume the stream bit-exactly (tensors are cloned)."""
        return {"format": _STATE_FORMAT, "config": self._config(),
                "session": self.session.state_dict(),
                "conv": None if self._conv is None else [t.clone() for t in self._conv]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; on any mismatch raise ValueError and change nothing."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state must be a dict from StreamingHybridEncoder.state_dict() "
                             f"(format {_STATE_FORMAT})")
        if state.get("config") != self._config():
            raise ValueError(f"state was saved with config {state.get('config')} but this stream "
                             f"has {self._config()}")
        session, conv = state.get("session"), state.get("conv")
        if not isinstance(session, dict):
            raise ValueError("state['session'] must be a StreamingSession state dict")
        started = bool(session.get("position"))
        if started != (conv is not None):
            raise ValueError("state['conv'] must be None exactly when the stream has not started")
        if conv is not None:
            w = self._param()
            want = (session.get("batch"), self.conv_state_len, w.shape[1])
            if (not isinstance(conv, (list, tuple)) or len(conv) != len(self.model.blocks)
                    or any(not isinstance(t, Tensor) or tuple(t.shape) != want or t.dtype != w.dtype
                           for t in conv)):
                raise ValueError(f"state['conv'] must be {len(self.model.blocks)} tensors of shape "
                                 f"{want} and dtype {w.dtype}")
            conv = [t.to(w.device) for t in conv]
        self.session.load_state_dict(session)   # validates before changing anything
        self._conv = conv
