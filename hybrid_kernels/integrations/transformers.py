"""HF transformers (5.x) integration: ``attn_implementation="hybrid_kernels"``.

    import hybrid_kernels as hk
    hk.integrations.transformers.register()
    config = AutoConfig.from_pretrained(path)
    config.hybrid_attention = {"window": [64, 64], "landmarks": 32}
    model = AutoModel.from_pretrained(path, config=config, attn_implementation="hybrid_kernels")
    # or, on a loaded model:  hk.integrations.transformers.enable(model, window=(64, 64), landmarks=32)

``register()`` adds the attention function to transformers' ``AttentionInterface`` and a mask
builder to ``AttentionMaskInterface`` (without that entry transformers passes ``None`` instead of
the padding mask to unknown implementations). The pattern comes from ``config.hybrid_attention``
(see :mod:`hybrid_kernels.integrations.hf_config`).

What runs where: each layer keeps its own semantics and runs on the kernels -- causal and
bidirectional masks with key padding, the model's sliding windows (per layer where the model
alternates: Gemma 2/3, Cohere2, GPT-OSS, ModernBERT), logit softcapping (Gemma 2), attention-sink
logits (GPT-OSS), T5's relative position bias (as an O(H * (Nq + Nk)) offset table), GQA,
cross-attention and KV caches (bottom-right alignment; a static cache's empty slots are cut off).
The user's pattern (window, landmarks) composes on top: windows intersect. Anything else (custom
mask functions, a non-offset bias, attention dropout in training, other dtypes) runs exact dense
attention and warns once per layer, naming it and the reason.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..api import attention as hk_attention
from ..nn.functional import KERNEL_DTYPES, pattern_mask
from ..nn.masks import bottom_right_causal, can_inspect_values
from ..nn.spec import PatternSpec
from .hf_config import CONFIG_KEY, layer_spec, validate_settings
from .hf_masks import hybrid_attention_mask, read_mask

__all__ = ["NAME", "register", "enable", "hybrid_attention_forward", "hybrid_attention_mask",
           "read_mask", "dense_fallback"]

NAME = "hybrid_kernels"


def register() -> str:
    """Register ``"hybrid_kernels"`` with transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, hybrid_attention_forward)
    AttentionMaskInterface.register(NAME, hybrid_attention_mask)
    return NAME


def enable(model, *, window=None, landmarks=None, quant: Optional[str] = None,
           backend: str = "auto", layers: Optional[dict] = None, cross_attention: bool = False):
    """Register, store the pattern in every config of ``model`` and switch it to hybrid attention.

    Sub-models with their own config copy (T5's encoder/decoder stacks) get the pattern too.
    """
    register()
    if isinstance(window, tuple):
        window = list(window)
    if isinstance(landmarks, Tensor):
        landmarks = landmarks.tolist()  # the config must stay JSON-serializable
    settings = {"window": window, "landmarks": landmarks, "quant": quant, "backend": backend,
                "cross_attention": cross_attention,
                "layers": {str(k): v for k, v in (layers or {}).items()}}  # JSON-safe keys
    validate_settings(settings)
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and id(config) not in seen:
            seen.add(id(config))
            setattr(config, CONFIG_KEY, settings)
    model.set_attn_implementation(NAME)
    return model


def hybrid_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             position_bias: Optional[Tensor] = None,
                             sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                             s_aux: Optional[Tensor] = None, **kwargs):
    """transformers attention function: (B, H, N, D) inputs -> ((B, Nq, Hq, Dv), None).

    Runs on the kernels with the layer's own semantics: its sliding window (from the mask, or
    ``sliding_window``), logit ``softcap`` (Gemma 2), sink logits ``s_aux`` (GPT-OSS) and T5's
    relative ``position_bias`` (as an offset table), plus the user's pattern from
    ``config.hybrid_attention``. What cannot be expressed runs an exact dense path and warns once
    per layer with the reason.
    """
    if kwargs.get("output_attentions", False):
        _warn_once(module, "does not return attention weights (output_attentions=True); use 'eager'")
    spec = layer_spec(module)
    if kwargs.get("cache") is not None:  # paged cache (continuous batching): SDPA does it all
        if spec.restricts or sliding_window or softcap or s_aux is not None:
            raise NotImplementedError(f"{NAME!r} does not support paged caches with a window, "
                                      "softcap or sinks")
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                     position_bias, kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    B, Nq, Nk = query.shape[0], query.shape[2], key.shape[2]
    declared = _declared_window(sliding_window, bool(is_causal))

    why = None
    if attention_mask is None:
        causal, kpm, window = bool(is_causal) and Nq > 1, None, declared
        keys = Nq if causal and Nk > Nq else None
        # As transformers' SDPA: only an empty static cache's prefill gets a None mask with more
        # keys than queries; its causal mask is aligned top-left, so the later slots are empty.
    else:
        read = read_mask(attention_mask, B, Nq, Nk, declared)
        if read is None:
            why = "its attention mask is not a (sliding-window) causal/padding mask"
            causal, kpm, window, keys = False, None, (-1, -1), None
        else:
            causal, kpm, window, keys = read.causal, read.key_padding_mask, read.window, read.keys

    bias = None
    if position_bias is not None and why is None:
        bias, why = _offset_table(position_bias, query.shape[1], Nq, keys or Nk)
    if why is None:
        why = _unsupported(query, key, value, dropout, B)
    if why is None:
        if keys is not None and keys < Nk:
            key, value = key[:, :, :keys], value[:, :, :keys]
            Nk = keys
        pattern_window = _intersect(window, spec.window)
        out = hk_attention(query, key, value, window=pattern_window,
                           landmarks=spec.landmark_positions(B, Nk, query.device), causal=causal,
                           key_padding_mask=kpm, scale=scaling, quant=spec.quant,
                           softcap=softcap or None, sinks=_sinks(s_aux, query),
                           position_bias=bias, backend=spec.backend)
        return out.transpose(1, 2).contiguous(), None

    _warn_once(module, f"runs exact dense attention for this layer: {why}")
    return dense_fallback(module, query, key, value, attention_mask, dropout=dropout,
                          scaling=scaling, is_causal=bool(is_causal), position_bias=position_bias,
                          window=declared, softcap=softcap, s_aux=s_aux, spec=spec, kwargs=kwargs)


def _declared_window(sliding_window: Optional[int], causal: bool) -> Tuple[int, int]:
    """transformers' ``sliding_window`` argument (FlashAttention's window_size = (w-1, w-1))."""
    if not sliding_window:
        return -1, -1
    w = int(sliding_window) - 1
    return (w, 0) if causal else (w, w)


def _intersect(a: Tuple[int, int], b: Optional[Tuple[int, int]]):
    """The stricter of two (left, right) windows (-1 = unlimited); None when unlimited."""
    b = b or (-1, -1)
    pick = lambda x, y: y if x < 0 else x if y < 0 else min(x, y)  # noqa: E731
    left, right = pick(a[0], b[0]), pick(a[1], b[1])
    return None if left < 0 and right < 0 else (left, right)


def _sinks(s_aux: Optional[Tensor], query: Tensor) -> Optional[Tensor]:
    if s_aux is None:
        return None
    return s_aux.reshape(-1).to(device=query.device)


def _unsupported(query: Tensor, key: Tensor, value: Tensor, dropout: float, batch: int) -> Optional[str]:
    if dropout != 0.0:
        return f"attention dropout p={dropout} in training"
    if query.dtype not in KERNEL_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return f"dtypes q {query.dtype}, k {key.dtype}, v {value.dtype}"
    if key.shape[0] != batch:
        return f"key batch {key.shape[0]} != query batch {batch}"
    return None


def _offset_table(position_bias: Tensor, heads: int, nq: int, nk: int):
    """T5's (1 or B, H, Nq, Nk) relative bias -> ((H, Nq + Nk - 1) offset table, None), or
    (None, reason). The table is read from the last row (offsets -(Nk-1)..0) and the first row
    (offsets 1..Nq-1), so gradients flow back to T5's bucket embedding; the bias must depend only
    on j - r (checked in eager mode)."""
    if position_bias.dim() != 4 or position_bias.shape[-2] != nq or position_bias.shape[-1] < nk:
        return None, f"position_bias of shape {tuple(position_bias.shape)}"
    pb = position_bias[..., :nk]
    if pb.shape[1] != heads:
        return None, f"position_bias with {pb.shape[1]} heads for {heads} query heads"
    if can_inspect_values():
        if not bool(pb.any()):
            return None, None  # T5 cross-attention passes zeros
        same_rows = pb.shape[0] == 1 or bool((pb == pb[:1]).all())
        toeplitz = bool((pb[..., 1:, 1:] == pb[..., :-1, :-1]).all())
        if not (same_rows and toeplitz):
            return None, "position_bias does not depend on the query-key offset alone"
    elif pb.shape[0] != 1:
        return None, "a per-batch position_bias while tracing"
    first = pb[0, :, 0, nk - nq + 1:] if nq > 1 else pb[0, :, 0, :0]
    table = torch.cat([pb[0, :, nq - 1, :], first], dim=-1)
    if table.shape[-1] != nq + nk - 1:  # Nq > Nk: rows before every key
        return None, f"position_bias with more queries ({nq}) than keys ({nk})"
    return table, None


_warned: set = set()


def _layer_name(module) -> str:
    idx = getattr(module, "layer_idx", None)
    return type(module).__name__ + (f"[layer {idx}]" if idx is not None else "")


def _warn_once(module, message: str) -> None:
    if torch.compiler.is_compiling():  # a warning would break the graph; eager runs warn
        return
    key = (_layer_name(module), message)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"attn_implementation={NAME!r}: {_layer_name(module)} {message}",
                      UserWarning, stacklevel=3)


def dense_fallback(module, query, key, value, attention_mask, *, dropout, scaling, is_causal,
                   position_bias, window, softcap, s_aux, spec: PatternSpec, kwargs):
    """Exact dense attention with the layer's own mask plus the user's pattern: transformers'
    SDPA function, or an explicit softmax when softcap or sinks are involved (SDPA has neither)."""
    if spec.restricts:
        attention_mask = _with_pattern(attention_mask, spec, query, key,
                                       causal=bool(is_causal) and query.shape[2] > 1)
        is_causal = False
    if softcap is None and s_aux is None:
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                     position_bias, kwargs)
    return _explicit(query, key, value, attention_mask, dropout, scaling, is_causal, position_bias,
                     softcap, s_aux, module.training)


def _explicit(query, key, value, mask, dropout, scaling, is_causal, position_bias, softcap, s_aux,
              training):
    B, Hq, Nq, D = query.shape
    Hk, Nk = key.shape[1], key.shape[2]
    if Hq != Hk:
        key, value = (t.repeat_interleave(Hq // Hk, dim=1) for t in (key, value))
    scaling = D ** -0.5 if scaling is None else scaling
    s = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if position_bias is not None:
        s = s + position_bias[..., :Nk].float()
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask[..., :Nk], float("-inf"))
        else:
            s = s + mask[..., :Nk].float()
    elif is_causal and Nq > 1:
        s = s.masked_fill(~bottom_right_causal(Nq, Nk, s.device), float("-inf"))
    if s_aux is not None:
        sink = s_aux.reshape(1, -1, 1, 1).float().expand(B, Hq, Nq, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see nothing
    p = torch.nn.functional.dropout(p, p=dropout, training=training)
    out = torch.matmul(p.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None




def _with_pattern(mask: Optional[Tensor], spec: PatternSpec, query: Tensor, key: Tensor,
                  causal: bool) -> Tensor:
    """The model's mask intersected with the pattern's visibility (causal folded in when the
    model relied on ``is_causal`` with no mask)."""
    B, Nq, Nk = key.shape[0], query.shape[2], key.shape[2]
    landmarks = spec.landmark_positions(B, Nk, query.device)
    visible = pattern_mask(spec, B, Nq, Nk, landmarks=landmarks, key_padding_mask=None,
                           causal=causal and mask is None, device=query.device)
    if mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, torch.finfo(mask.dtype).min)


def _sdpa(module, query, key, value, mask, dropout, scaling, is_causal, position_bias, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal,
                                  position_bias=position_bias, **kwargs)
