"""Bounded KV cache for one attention layer: S sink tokens + the W most recent tokens.

Keys and values are stored *pre-RoPE* (the session rotates them by re-based positions at attention
time) in one of four formats:

* ``"float32"`` / ``"float16"`` / ``"bfloat16"``: the tensor, cast once on entry.
* ``"int8"``: symmetric per-block INT8. Each token's head vector is split into blocks of
  ``int8_block`` channels with one float32 scale per block: ``s = absmax(block) / 127``,
  ``q = round(x / s)``. Every element then satisfies ``|x - q * s| <= s / 2`` (+ fp32 rounding),
  i.e. at most ``absmax(block) / 254``. Scales are per token, so eviction never re-quantizes:
  a token's stored bytes are fixed when it enters the cache (bit-exact resume, and the chunked
  result equals the whole-stream result on the same dequantized tensors).

A token's stored form depends only on the token, never on chunking. Every tensor has the token
axis at dim -2, so concatenating and slicing the stored parts is uniform across formats.

The cache is immutable in use: :meth:`SinkWindowCache.appended` returns the next state, which the
session commits only once a whole chunk has succeeded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CACHE_DTYPES", "KVCodec", "SinkWindowCache"]

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int8": torch.int8}

Parts = Tuple[Tensor, ...]  # stored form of (B, H, N, D): (x,) or (int8 values, fp32 scales)


class KVCodec:
    """Encodes (B, H, N, D) tensors to their stored parts and back."""

    def __init__(self, cache_dtype: str = "float32", int8_block: int = 32):
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}; got {cache_dtype!r}")
        if not isinstance(int8_block, int) or isinstance(int8_block, bool) or int8_block < 1:
            raise ValueError(f"int8_block must be a positive int; got {int8_block!r}")
        self.cache_dtype = cache_dtype
        self.int8_block = int8_block

    @property
    def is_int8(self) -> bool:
        return self.cache_dtype == "int8"

    def encode(self, x: Tensor) -> Parts:
        if not self.is_int8:
            return (x.detach().to(CACHE_DTYPES[self.cache_dtype]).contiguous(),)
        blocks, D = self._blocked(x.detach().float())
        scale = blocks.abs().amax(dim=-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(blocks / safe[..., None]).clamp_(-127, 127).to(torch.int8)
        return q.flatten(-2)[..., :D].contiguous(), scale.contiguous()

    def decode(self, parts: Parts, dtype: torch.dtype) -> Tensor:
        if not self.is_int8:
            return parts[0].to(dtype)
        q, scale = parts
        blocks, D = self._blocked(q.float())
        return (blocks * scale[..., None]).flatten(-2)[..., :D].to(dtype)

    def empty(self, batch: int, heads: int, dim: int, device) -> Parts:
        return self.encode(torch.zeros(batch, heads, 0, dim, device=device))

    def _blocked(self, x: Tensor) -> Tuple[Tensor, int]:
        """(..., D) -> (..., ceil(D / block), block), zero padded."""
        D, b = x.shape[-1], self.int8_block
        pad = (-D) % b
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        return x.unflatten(-1, (x.shape[-1] // b, b)), D


def _cat(a: Parts, b: Parts) -> Parts:
    return tuple(torch.cat([x, y], dim=-2) for x, y in zip(a, b))


def _slice(p: Parts, start: int, stop: Optional[int] = None) -> Parts:
    return tuple(x[..., start:stop, :] for x in p)


def _length(p: Parts) -> int:
    return p[0].shape[-2]


@dataclass(frozen=True)
class SinkWindowCache:
    """One layer's cache state. ``window=None`` keeps every token (the full-cache baseline)."""
    num_sinks: int
    window: Optional[int]
    codec: KVCodec
    sink_k: Parts
    sink_v: Parts
    win_k: Parts
    win_v: Parts

    @staticmethod
    def empty(num_sinks: int, window: Optional[int], codec: KVCodec, batch: int, kv_heads: int,
              head_dim: int, head_dim_v: int, device) -> "SinkWindowCache":
        ek = codec.empty(batch, kv_heads, head_dim, device)
        ev = codec.empty(batch, kv_heads, head_dim_v, device)
        return SinkWindowCache(num_sinks, window, codec, ek, ev, ek, ev)

    @property
    def sink_len(self) -> int:
        return _length(self.sink_k)

    @property
    def window_len(self) -> int:
        return _length(self.win_k)

    def __len__(self) -> int:
        return self.sink_len + self.window_len

    def sinks(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        return self.codec.decode(self.sink_k, dtype), self.codec.decode(self.sink_v, dtype)

    def recent(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        return self.codec.decode(self.win_k, dtype), self.codec.decode(self.win_v, dtype)

    def appended(self, k: Parts, v: Parts) -> "SinkWindowCache":
        """The state after the chunk (already encoded) is appended: the first ``num_sinks`` tokens
        of the stream stay as sinks, of the rest only the ``window`` most recent are kept."""
        take = min(self.num_sinks - self.sink_len, _length(k))
        sink_k, sink_v = _cat(self.sink_k, _slice(k, 0, take)), _cat(self.sink_v, _slice(v, 0, take))
        win_k, win_v = _cat(self.win_k, _slice(k, take)), _cat(self.win_v, _slice(v, take))
        if self.window is not None and _length(win_k) > self.window:
            start = _length(win_k) - self.window
            # clone() so the kept window does not pin the larger concatenated buffer.
            win_k = tuple(x.clone() for x in _slice(win_k, start))
            win_v = tuple(x.clone() for x in _slice(win_v, start))
        return SinkWindowCache(self.num_sinks, self.window, self.codec, sink_k, sink_v, win_k, win_v)

    def tensors(self) -> Dict[str, Tensor]:
        out = {}
        for name in ("sink_k", "sink_v", "win_k", "win_v"):
            for i, t in enumerate(getattr(self, name)):
                out[f"{name}.{i}"] = t
        return out

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (their storages, so views of larger buffers count
        in full)."""
        seen, total = set(), 0
        for t in self.tensors().values():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
        return total

    def with_tensors(self, tensors: Dict[str, Tensor]) -> "SinkWindowCache":
        """A cache with this configuration holding ``tensors`` (from :meth:`tensors`)."""
        n = 2 if self.codec.is_int8 else 1
        parts = {}
        for name in ("sink_k", "sink_v", "win_k", "win_v"):
            try:
                parts[name] = tuple(tensors[f"{name}.{i}"] for i in range(n))
            except KeyError as exc:
                raise ValueError(f"cache state is missing tensor {exc.args[0]!r}") from None
        return SinkWindowCache(self.num_sinks, self.window, self.codec, **parts)
