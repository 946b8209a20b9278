"""``HybridAttention``: ``nn.MultiheadAttention`` with a sliding-window + landmark pattern."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import attend
from .landmarks import LearnedLandmarks
from .masks import additive_to_allowed, is_causal_mask
from .spec import PatternSpec

__all__ = ["HybridAttention"]


def _keep_off_fast_path(module, args):
    """A no-op pre-hook. Its presence turns off nn.TransformerEncoderLayer's fused inference
    fast path (which reads in_proj_weight directly and would bypass this module's forward)."""
    return None


class HybridAttention(nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` running hybrid_kernels attention.

    Same constructor, parameters (``in_proj_weight``, ``in_proj_bias``, ``q/k/v_proj_weight``,
    ``out_proj``: state dicts load either way) and ``forward`` as ``nn.MultiheadAttention``,
    plus the pattern:

    Args:
        window: None (unlimited), int w or (left, right); -1 = unlimited on that side.
        landmarks: None, an int stride or a LongTensor (G,) of key positions (see hk.attention).
        quant: None or "int8".
        backend: hk backend ("auto", "cpu", "triton", "cuda", "reference").
        num_learned_landmarks: L > 0 prepends L learned key/value tokens (key positions 0..L-1)
            that every query sees; ``landmarks``/``attn_mask``/``key_padding_mask`` keep
            referring to the real keys. Requires kdim == vdim.

    ``add_bias_kv`` and ``add_zero_attn`` are not supported (ValueError).

    Forward semantics: ``key_padding_mask`` True (or -inf) = padding, as in nn.MHA.
    ``attn_mask`` (L, S) or (B*num_heads, L, S), bool True = masked or float additive; the
    causal mask (or ``is_causal=True``, which needs no mask here) runs on the kernels, any other
    mask runs the exact dense path intersected with the pattern. The causal mask is aligned
    bottom-right when L != S (FlashAttention's convention). ``need_weights=True`` (nn.MHA's
    default) also runs the dense path and returns the pattern's attention weights (averaged over
    heads if ``average_attn_weights``; the learned landmark columns are left out); pass
    ``need_weights=False`` for the kernels. Dropout > 0 in training runs the dense path. A query
    that sees no key outputs zeros (nn.MHA gives NaN).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 window=None, landmarks=None, quant: Optional[str] = None, backend: str = "auto",
                 num_learned_landmarks: int = 0):
        if add_bias_kv:
            raise ValueError("HybridAttention does not support add_bias_kv=True")
        if add_zero_attn:
            raise ValueError("HybridAttention does not support add_zero_attn=True")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, device=device, dtype=dtype)
        self.spec = PatternSpec.make(window, landmarks, quant, backend)
        if num_learned_landmarks:
            if self.kdim != self.vdim:
                raise ValueError(f"num_learned_landmarks needs kdim == vdim; got kdim={self.kdim}, "
                                 f"vdim={self.vdim}")
            self.learned_landmarks = LearnedLandmarks(num_learned_landmarks, self.kdim,
                                                      device=device, dtype=dtype)
        else:
            self.learned_landmarks = None
        self.register_forward_pre_hook(_keep_off_fast_path)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, *, window=None, landmarks=None,
                 quant: Optional[str] = None, backend: str = "auto",
                 num_learned_landmarks: int = 0) -> "HybridAttention":
        """A HybridAttention with ``mha``'s configuration and a copy of its weights."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention; got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("cannot convert an nn.MultiheadAttention built with add_bias_kv or "
                             "add_zero_attn")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                  bias=mha.in_proj_bias is not None, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device=ref.device, dtype=ref.dtype, window=window,
                  landmarks=landmarks, quant=quant, backend=backend,
                  num_learned_landmarks=num_learned_landmarks)
        missing, unexpected = new.load_state_dict(mha.state_dict(), strict=False)
        bad = [m for m in missing if not m.startswith("learned_landmarks.")] + list(unexpected)
        if bad:
            raise ValueError(f"state dict mismatch converting nn.MultiheadAttention: {bad}")
        return new.train(mha.training)

    @property
    def num_learned_landmarks(self) -> int:
        return 0 if self.learned_landmarks is None else self.learned_landmarks.num

    def extra_repr(self) -> str:
        s = self.spec
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={s.window}, "
                f"landmarks={s.landmarks if not isinstance(s.landmarks, Tensor) else 'tensor'}, "
                f"quant={s.quant}, backend={s.backend!r}, batch_first={self.batch_first}")

    def _projection_weights(self):
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self.in_proj_bias is None:
            return w_q, w_k, w_v, None, None, None
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return w_q, w_k, w_v, b_q, b_k, b_v

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("HybridAttention does not take nested tensors; build "
                             "nn.TransformerEncoder with enable_nested_tensor=False (swap_attention "
                             "does this)")
        batched = query.dim() == 3
        self_attention = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self_attention:
            key = value = query
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    is_causal)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), (None if weights is None else weights.squeeze(0))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """Batch-first (B, L, E) inputs -> ((B, L, E), weights (B, H, L, S) or None)."""
        B, L, _ = query.shape
        S = key.shape[1]
        H, hd, extra = self.num_heads, self.head_dim, self.num_learned_landmarks
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"query, key, value disagree on batch or key length: query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        nk = S + extra
        if query is key and key is value and self._qkv_same_embed_dim and not extra:
            # Self-attention: one fused projection, as nn.MultiheadAttention does.
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.view(B, L, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            w_q, w_k, w_v, b_q, b_k, b_v = self._projection_weights()
            if extra:
                key = self.learned_landmarks.prepend(key)
                value = self.learned_landmarks.prepend(value)
            q = F.linear(query, w_q, b_q).view(B, L, H, hd).transpose(1, 2)
            k = F.linear(key, w_k, b_k).view(B, nk, H, hd).transpose(1, 2)
            v = F.linear(value, w_v, b_v).view(B, nk, H, hd).transpose(1, 2)

        real, pad_bias = _split_key_padding(key_padding_mask, B, S)
        causal, dense = _split_attn_mask(attn_mask, B, H, L, S, is_causal)
        if extra:
            if real is not None:
                real = F.pad(real, (extra, 0), value=True)
            if pad_bias is not None:
                pad_bias = F.pad(pad_bias, (extra, 0), value=0.0)
            if dense is not None:
                dense = F.pad(dense, (extra, 0), value=True if dense.dtype == torch.bool else 0.0)
        if pad_bias is not None:
            bias = pad_bias[:, None, None, :].to(q.dtype)
            if dense is None:
                dense = bias
            elif dense.dtype == torch.bool:
                dense = torch.where(dense, 0.0, float("-inf")).to(q.dtype) + bias
            else:
                dense = dense.to(q.dtype) + bias

        landmarks = self.spec.landmark_positions(B, nk, q.device, offset=extra, extra_leading=extra)
        out, weights = attend(q, k, v, self.spec, landmarks=landmarks, key_padding_mask=real,
                              causal=causal, attn_mask=dense,
                              dropout_p=self.dropout if self.training else 0.0,
                              need_weights=need_weights)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))
        if weights is not None and extra:
            weights = weights[..., extra:]
        return out, weights


def _split_key_padding(mask: Optional[Tensor], B: int, S: int):
    """nn.MHA key_padding_mask (True/-inf = pad) -> (real bool (B, S) or None, additive (B, S) or None)."""
    if mask is None:
        return None, None
    if tuple(mask.shape) != (B, S):
        raise ValueError(f"key_padding_mask must have shape (batch, source length) = ({B}, {S}); "
                         f"got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return ~mask, None
    if not mask.dtype.is_floating_point:
        raise TypeError(f"key_padding_mask must be bool or float; got {mask.dtype}")
    allowed = additive_to_allowed(mask)
    return (allowed, None) if allowed is not None else (None, mask)


def _split_attn_mask(mask: Optional[Tensor], B: int, H: int, L: int, S: int, is_causal: bool):
    """nn.MHA attn_mask -> (causal flag for the kernels, dense mask (bool True = may attend, or
    float additive) broadcastable to (B, H, L, S), or None)."""
    if mask is None:
        return bool(is_causal), None
    if mask.dim() == 2:
        if tuple(mask.shape) != (L, S):
            raise ValueError(f"2-D attn_mask must have shape (L, S) = ({L}, {S}); got {tuple(mask.shape)}")
        mask = mask.view(1, 1, L, S)
    elif mask.dim() == 3:
        if tuple(mask.shape) != (B * H, L, S):
            raise ValueError(f"3-D attn_mask must have shape (batch * num_heads, L, S) = "
                             f"({B * H}, {L}, {S}); got {tuple(mask.shape)}")
        mask = mask.view(B, H, L, S)
    else:
        raise ValueError(f"attn_mask must be 2-D or 3-D; got shape {tuple(mask.shape)}")
    if is_causal and L == S:
        return True, None  # nn.MHA's contract: is_causal is a hint that attn_mask is causal
    if mask.dtype == torch.bool:
        allowed = ~mask
    elif mask.dtype.is_floating_point:
        allowed = additive_to_allowed(mask)
    else:
        raise TypeError(f"attn_mask must be bool or float; got {mask.dtype}")
    if allowed is not None and is_causal_mask(allowed):
        return True, None
    return False, (allowed if allowed is not None else mask)
