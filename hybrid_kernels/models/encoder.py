"""HybridEncoder: depthwise convolutions (local patterns) + windowed/landmark self-attention on
hybrid-kernels, fused by a learned gate; pooled and per-token outputs; long inputs processed as
overlapping segments that exchange information through their landmarks.

Per block (pre-norm)::

    h = LN(x)
    conv = pointwise(GELU(depthwise_conv(h)))                 # local patterns
    attn = hk.attention(h) with window + landmarks            # sparse global mixing
    g = sigmoid(W_g h)                                        # per-channel gate
    x = x + dropout(g * attn + (1 - g) * conv)
    [long inputs] landmark states of all segments attend to each other (cross-segment mixing)
    x = x + dropout(FFN(LN(x)))

Landmarks of a segment: its ``num_landmarks`` learned memory tokens (prepended at positions
0..G-1) and every ``landmark_stride``-th token. Landmarks see every key of their segment and every
query sees them (the hybrid-kernels pattern); between segments only landmarks communicate.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hybrid_kernels as hk

__all__ = ["HybridEncoderConfig", "HybridEncoder", "HybridEncoderOutput"]

CONFIG_NAME = "hybrid_encoder_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class HybridEncoderConfig:
    """Configuration of :class:`HybridEncoder` (saved as JSON).

    Attributes:
        vocab_size: token vocabulary size.
        hidden_size: model width d.
        num_layers: number of hybrid blocks.
        num_heads: attention heads (hidden_size % num_heads == 0).
        intermediate_size: FFN width.
        conv_kernel: depthwise convolution kernel size (odd; 0 disables the conv branch).
        window: attention window: None = unlimited, int w = (w, w), or [left, right].
        landmark_stride: every stride-th token is a landmark (0 = no strided landmarks).
        num_landmarks: learned landmark (memory) embeddings prepended to every segment.
        segment_length: tokens per segment for long inputs (0 = never segment).
        segment_overlap: tokens shared by consecutive segments (< segment_length).
        max_position: learned absolute positions (>= segment_length, or >= the input length
            when not segmenting).
        dropout: dropout on residual branches.
        quant: None or "int8" (INT8 QK^T in attention).
        causal: causal self-attention.
        pooling: "mean" (over real tokens), "first" (first token) or "landmarks" (mean of the
            memory tokens; needs num_landmarks > 0).
        pad_token_id: id of padding tokens (used when no attention_mask is given).
        layer_norm_eps: LayerNorm epsilon.
    """
    vocab_size: int = 30522
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    conv_kernel: int = 7
    window: Optional[object] = 64
    landmark_stride: int = 32
    num_landmarks: int = 4
    segment_length: int = 512
    segment_overlap: int = 64
    max_position: int = 512
    dropout: float = 0.1
    quant: Optional[str] = None
    causal: bool = False
    pooling: str = "mean"
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if isinstance(self.window, list):
            self.window = tuple(self.window)
        self.validate()

    def validate(self) -> None:
        def need(cond, name, what):
            if not cond:
                raise ValueError(f"HybridEncoderConfig.{name} {what}; got {getattr(self, name)!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 "must be a positive int")
        need(self.hidden_size % self.num_heads == 0, "hidden_size", f"must be divisible by num_heads={self.num_heads}")
        need(self.conv_kernel >= 0 and (self.conv_kernel == 0 or self.conv_kernel % 2 == 1),
             "conv_kernel", "must be 0 or an odd positive int")
        need(self.landmark_stride >= 0, "landmark_stride", "must be >= 0")
        need(self.num_landmarks >= 0, "num_landmarks", "must be >= 0")
        need(self.segment_length >= 0, "segment_length", "must be >= 0")
        need(self.segment_length == 0 or 0 <= self.segment_overlap < self.segment_length,
             "segment_overlap", "must be in [0, segment_length)")
        need(self.segment_length <= self.max_position, "segment_length", f"must be <= max_position={self.max_position}")
        need(self.quant in (None, "int8"), "quant", "must be None or 'int8'")
        need(self.pooling in ("mean", "first", "landmarks"), "pooling", "must be 'mean', 'first' or 'landmarks'")
        need(self.pooling != "landmarks" or self.num_landmarks > 0, "pooling",
             "'landmarks' needs num_landmarks > 0")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        hk.pattern.normalize_window(self.window)   # raises a clear ValueError

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["window"], tuple):
            d["window"] = list(d["window"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HybridEncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown HybridEncoderConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class HybridEncoderOutput:
    last_hidden_state: Tensor          # (B, N, d) per-token states
    pooled: Tensor                     # (B, d)
    landmark_states: Optional[Tensor] = None   # (B, n_segments * num_landmarks, d) memory tokens


class SelfAttention(nn.Module):
    def __init__(self, cfg: HybridEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, key_mask: Tensor, landmarks: Optional[Tensor]) -> Tensor:
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = hk.attention(q, k, v, window=self.cfg.window, landmarks=landmarks,
                         causal=self.cfg.causal, key_padding_mask=key_mask, quant=self.cfg.quant)
        return self.out(o.transpose(1, 2).reshape(B, N, d))


class ConvBranch(nn.Module):
    def __init__(self, cfg: HybridEncoderConfig):
        super().__init__()
        d, kk = cfg.hidden_size, cfg.conv_kernel
        self.causal = cfg.causal
        self.kernel = kk
        self.depthwise = nn.Conv1d(d, d, kk, groups=d, padding=0)
        self.pointwise = nn.Linear(d, d)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        h = (x * key_mask.unsqueeze(-1)).transpose(1, 2)          # padding contributes nothing
        pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2,) * 2
        h = self.depthwise(F.pad(h, pad)).transpose(1, 2)
        return self.pointwise(F.gelu(h))


class HybridBlock(nn.Module):
    def __init__(self, cfg: HybridEncoderConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg)
        self.conv = ConvBranch(cfg) if cfg.conv_kernel > 0 else None
        self.gate = nn.Linear(d, d) if self.conv is not None else None
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.intermediate_size), nn.GELU(),
                                 nn.Linear(cfg.intermediate_size, d))
        self.drop = nn.Dropout(cfg.dropout)

    def mix(self, x: Tensor, key_mask: Tensor, landmarks: Optional[Tensor]) -> Tensor:
        h = self.norm1(x)
        a = self.attn(h, key_mask, landmarks)
        if self.conv is not None:
            g = torch.sigmoid(self.gate(h))
            a = g * a + (1 - g) * self.conv(h, key_mask)
        return x + self.drop(a)

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.ffn(self.norm2(x)))


class SegmentMixer(nn.Module):
    """Landmark states of all segments of a sequence attend to each other (full attention)."""

    def __init__(self, cfg: HybridEncoderConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, lm: Tensor, lm_mask: Tensor) -> Tensor:
        B, G, d = lm.shape
        q, k, v = self.qkv(self.norm(lm)).view(B, G, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = hk.attention(q, k, v, key_padding_mask=lm_mask)
        return lm + self.out(o.transpose(1, 2).reshape(B, G, d))


class HybridEncoder(nn.Module):
    """``encoder(input_ids (B, N), attention_mask (B, N) bool/int, optional) -> HybridEncoderOutput``
    (or ``inputs_embeds=(B, N, d)`` with an attention_mask, and optional ``landmark_mask``)."""

    def __init__(self, config: HybridEncoderConfig):
        super().__init__()
        if not isinstance(config, HybridEncoderConfig):
            raise TypeError(f"config must be a HybridEncoderConfig; got {type(config).__name__}")
        config.validate()
        self.config = cfg = config
        d = cfg.hidden_size
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.position = nn.Embedding(cfg.max_position, d)
        self.memory = nn.Parameter(torch.randn(cfg.num_landmarks, d) * 0.02) if cfg.num_landmarks else None
        self.blocks = nn.ModuleList(HybridBlock(cfg) for _ in range(cfg.num_layers))
        self.mixers = nn.ModuleList(SegmentMixer(cfg) for _ in range(cfg.num_layers)) \
            if cfg.segment_length and cfg.num_landmarks + cfg.landmark_stride > 0 else None
        self.final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    # ------------------------------------------------------------------ segmentation
    def _segments(self, N: int) -> Tuple[int, int]:
        """(segment length S, stride) covering N tokens; one segment when N fits."""
        S = self.config.segment_length
        if S == 0 or N <= S:
            if N > self.config.max_position:
                raise ValueError(f"input length {N} exceeds max_position={self.config.max_position}; "
                                 f"set segment_length to process long inputs as segments")
            return N, N
        return S, S - self.config.segment_overlap

    def _landmark_positions(self, S: int, device) -> Optional[Tensor]:
        G, stride = self.config.num_landmarks, self.config.landmark_stride
        pos = list(range(G))
        if stride:
            pos += [G + j for j in range(0, S, stride)]
        return torch.tensor(pos, dtype=torch.long, device=device) if pos else None

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, landmark_mask) -> Tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, N) and inputs_embeds (B, N, d)")
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, N); got shape {tuple(input_ids.shape)}")
        if inputs_embeds is not None and (inputs_embeds.dim() != 3
                                          or inputs_embeds.shape[-1] != self.config.hidden_size):
            raise ValueError(f"inputs_embeds must be (B, N, {self.config.hidden_size}); "
                             f"got shape {tuple(inputs_embeds.shape)}")
        B, N = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if N == 0:
            raise ValueError("input_ids must have at least one token")
        if inputs_embeds is not None and attention_mask is None:
            raise ValueError("inputs_embeds needs an attention_mask (B, N) (True = real token)")
        if landmark_mask is not None:
            if tuple(landmark_mask.shape) != (B, N):
                raise ValueError(f"landmark_mask must have shape {(B, N)}; got {tuple(landmark_mask.shape)}")
            if self._segments(N)[0] != N:
                raise ValueError(f"landmark_mask needs an unsegmented input (N={N} <= "
                                 f"segment_length={self.config.segment_length} or segment_length=0)")
        return B, N

    def _row_landmarks(self, base: Optional[Tensor], landmark_mask: Tensor, seg_mask: Tensor):
        """Per-row landmark positions (B, G') = the config's landmarks plus the masked tokens.

        Rows with fewer extra landmarks are filled with positions of appended padding keys
        (invisible to every query), so every row has the same count; returns the positions and
        how many padding keys were appended."""
        G = self.config.num_landmarks
        B, N = landmark_mask.shape
        extra = landmark_mask.bool() & seg_mask[:, G:]
        fill = int(extra.sum(1).max())
        base_set = set(base.tolist()) if base is not None else set()
        rows = []
        for b in range(B):
            pos = set((extra[b].nonzero().flatten() + G).tolist()) | base_set
            rows.append(sorted(pos))
        width = max(len(r) for r in rows)
        total = G + N + fill
        rows = [r + list(range(G + N, G + N + width - len(r))) for r in rows]
        return torch.tensor(rows, dtype=torch.long, device=seg_mask.device), total - G - N

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                inputs_embeds: Optional[Tensor] = None,
                landmark_mask: Optional[Tensor] = None) -> HybridEncoderOutput:
        """``input_ids`` (B, N) or ``inputs_embeds`` (B, N, d) (token embeddings without positions;
        needs ``attention_mask``). ``landmark_mask`` (B, N) bool marks extra tokens to run as
        landmarks (global tokens), e.g. typed domain spans; only for unsegmented inputs."""
        cfg = self.config
        B, N = self._check_inputs(input_ids, inputs_embeds, attention_mask, landmark_mask)
        mask = (input_ids != cfg.pad_token_id) if attention_mask is None else attention_mask.bool()
        if mask.shape != (B, N):
            raise ValueError(f"attention_mask must have shape {(B, N)}; got {tuple(mask.shape)}")
        S, step = self._segments(N)
        n_seg = 1 if N <= S else math.ceil((N - S) / step) + 1
        total = (n_seg - 1) * step + S
        m = F.pad(mask, (0, total - N), value=False)
        device = mask.device
        starts = torch.arange(n_seg, device=device) * step
        idx = starts[:, None] + torch.arange(S, device=device)[None, :]        # (n_seg, S)
        seg_mask = m[:, idx].reshape(B * n_seg, S)
        if inputs_embeds is None:
            ids = F.pad(input_ids, (0, total - N), value=cfg.pad_token_id)
            tokens = self.embed(ids[:, idx].reshape(B * n_seg, S))
        else:
            emb = F.pad(inputs_embeds, (0, 0, 0, total - N))
            tokens = emb[:, idx].reshape(B * n_seg, S, -1)
        x = tokens + self.position(torch.arange(S, device=device))[None]
        G = cfg.num_landmarks
        if G:
            x = torch.cat([self.memory.unsqueeze(0).expand(B * n_seg, -1, -1).to(x.dtype), x], dim=1)
            seg_mask = torch.cat([seg_mask.new_ones(B * n_seg, G), seg_mask], dim=1)
        landmarks = self._landmark_positions(S, device)
        appended = 0
        if landmark_mask is not None:
            landmarks, appended = self._row_landmarks(landmarks, landmark_mask, seg_mask)
            x = F.pad(x, (0, 0, 0, appended))
            seg_mask = F.pad(seg_mask, (0, appended), value=False)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block.mix(x, seg_mask, landmarks)
            if n_seg > 1 and self.mixers is not None:
                x = self._mix_segments(self.mixers[i], x, seg_mask, landmarks, B, n_seg)
            x = block.feed_forward(x)
        x = self.final_norm(x)

        memory = x[:, :G].reshape(B, n_seg * G, -1) if G else None
        tokens = x[:, G:G + S].reshape(B, n_seg, S, -1)
        hidden = self._merge_segments(tokens, idx, total, N)
        pooled = self._pool(hidden, mask, memory)
        return HybridEncoderOutput(hidden, pooled, memory)

    def _mix_segments(self, mixer, x, seg_mask, landmarks, B, n_seg):
        if landmarks is None:
            return x
        d = x.shape[-1]
        lm = x[:, landmarks].reshape(B, n_seg * landmarks.numel(), d)
        lm_mask = seg_mask[:, landmarks].reshape(B, -1)
        mixed = mixer(lm, lm_mask).reshape(B * n_seg, landmarks.numel(), d)
        return x.index_copy(1, landmarks, mixed)

    @staticmethod
    def _merge_segments(tokens: Tensor, idx: Tensor, total: int, N: int) -> Tensor:
        """Average the states a token gets from the segments that contain it."""
        B, n_seg, S, d = tokens.shape
        if n_seg == 1:
            return tokens[:, 0, :N]
        flat = idx.reshape(-1)
        summed = tokens.new_zeros(B, total, d).index_add(1, flat, tokens.reshape(B, n_seg * S, d))
        count = torch.zeros(total, device=tokens.device, dtype=tokens.dtype).index_add(
            0, flat, torch.ones_like(flat, dtype=tokens.dtype))
        return (summed / count[None, :, None])[:, :N]

    def _pool(self, hidden: Tensor, mask: Tensor, memory: Optional[Tensor]) -> Tensor:
        how = self.config.pooling
        if how == "first":
            return hidden[:, 0]
        if how == "landmarks":
            return memory.mean(1)
        w = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str) -> None:
        """Write ``hybrid_encoder_config.json`` and ``model.safetensors``."""
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=1)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str = "cpu") -> "HybridEncoder":
        from safetensors.torch import load_file
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(path):
            raise ValueError(f"{directory!r} has no {CONFIG_NAME}: not a saved HybridEncoder")
        with open(path) as f:
            config = HybridEncoderConfig.from_dict(json.load(f))
        model = cls(config)
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME), device=map_location))
        return model
