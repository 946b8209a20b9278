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

What runs where: the kernels take padding masks (bool or additive 4-D masks that only mask keys),
causal masks (the module's ``is_causal`` with a ``None`` mask, or a materialized causal+padding
mask), GQA, cross-attention and KV caches (bottom-right alignment). Anything else (T5's non-zero
``position_bias``, other masks, attention dropout in training, a batch-broadcast query, unusual
dtypes) runs transformers' own SDPA function with the pattern added to the mask: exact, dense.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..nn.functional import KERNEL_DTYPES, attend, pattern_mask
from ..nn.masks import additive_to_allowed, bottom_right_causal, can_inspect_values
from ..nn.spec import PatternSpec
from .hf_config import CONFIG_KEY, layer_spec, validate_settings

__all__ = ["NAME", "register", "enable", "hybrid_attention_forward", "hybrid_attention_mask"]

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


def hybrid_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                          kv_offset: int = 0, mask_function=None, attention_mask=None,
                          local_size=None, allow_is_causal_skip: bool = True,
                          allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
                          device="cpu", **kwargs):
    """transformers' SDPA mask, except that a plain bidirectional padding mask is returned as a
    stride-0 expansion of (B, 1, 1, Nk): same values, no Nq x Nk buffer, and recognizable as
    padding-only from its strides (so no data check, also under torch.compile)."""
    from transformers.masking_utils import (bidirectional_mask_function, causal_mask_function,
                                            prepare_padding_mask, sdpa_mask)

    if mask_function is None:
        mask_function = causal_mask_function
    if mask_function is bidirectional_mask_function and not use_vmap and local_size is None:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is not None:
            padding = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
        all_real = padding is None or (can_inspect_values() and bool(padding.all()))
        if allow_is_bidirectional_skip and all_real:
            return None
        if padding is None:
            padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        return padding[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                     device=device, **kwargs)


# Every layer of one forward gets the same mask object: remember the last one read, so a
# materialized causal+padding mask is value-checked once per forward, not once per layer.
_last_read: list = [None, None, None]  # [weakref to mask, (version, batch, nq, nk), result]


def read_mask(mask: Tensor, batch: int, nq: int, nk: int) -> Optional[Tuple[Optional[Tensor], bool]]:
    """A 4-D transformers mask -> (key padding mask (B, Nk) True = real or None, causal), or
    None when the kernels cannot express it."""
    if not can_inspect_values() or not isinstance(mask, Tensor):
        return _read_mask(mask, batch, nq, nk)
    version = -1 if mask.is_inference() else mask._version  # inference tensors have none
    key = (version, batch, nq, nk)
    ref, last_key, result = _last_read
    if ref is not None and ref() is mask and last_key == key:
        return result
    result = _read_mask(mask, batch, nq, nk)
    _last_read[:] = [weakref.ref(mask), key, result]
    return result


def _read_mask(mask: Tensor, batch: int, nq: int, nk: int) -> Optional[Tuple[Optional[Tensor], bool]]:
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if mask.shape[0] not in (1, batch) or mask.shape[-1] != nk or mask.shape[-2] not in (1, nq):
        return None
    allowed = additive_to_allowed(mask)
    if allowed is None:
        return None
    if allowed.shape[-2] == 1 or allowed.stride(-2) == 0:
        kpm, causal = allowed[:, 0, 0, :], False
    elif not can_inspect_values():
        return None
    else:
        kpm = allowed[:, 0, -1, :]  # the last query sees every real key, causal or not
        if bool((allowed == kpm[:, None, None, :]).all()):
            causal = False
        elif bool((allowed == (bottom_right_causal(nq, nk, mask.device)
                               & kpm[:, None, None, :])).all()):
            causal = True
        else:
            return None
    if can_inspect_values() and bool(kpm.all()):
        return None, causal
    return kpm.expand(batch, nk).contiguous(), causal


def hybrid_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             position_bias: Optional[Tensor] = None, **kwargs):
    """transformers attention function: (B, H, N, D) inputs -> ((B, Nq, Hq, Dv), None)."""
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"attn_implementation={NAME!r} does not support {unsupported!r}; "
                             "use 'eager'")
    if kwargs.get("output_attentions", False):
        _warn_once("does not return attention weights (output_attentions=True); use 'eager'")
    spec = layer_spec(module)
    if kwargs.get("cache") is not None:  # paged cache (continuous batching): SDPA does it all
        if spec.restricts:
            raise NotImplementedError(f"{NAME!r} with a window does not support paged caches")
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                     position_bias, kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    B, Nq, Nk = query.shape[0], query.shape[2], key.shape[2]

    if attention_mask is None:
        causal, kpm, readable = bool(is_causal) and Nq > 1, None, True
        if causal and Nk > Nq:
            # As transformers' SDPA: only an empty static cache's prefill gets here; its
            # causal mask is aligned top-left, so drop the (empty) cache slots beyond Nq.
            key, value, Nk = key[:, :, :Nq], value[:, :, :Nq], Nq
            if position_bias is not None:
                position_bias = position_bias[..., :Nq]
    else:
        read = read_mask(attention_mask, B, Nq, Nk)
        readable = read is not None
        kpm, causal = read if readable else (None, False)
        is_causal = False

    if position_bias is not None and can_inspect_values() and not bool(position_bias.any()):
        position_bias = None  # T5 cross-attention passes zeros
    use_kernels = (readable and position_bias is None and dropout == 0.0
                   and query.dtype in KERNEL_DTYPES and query.dtype == key.dtype == value.dtype
                   and key.shape[0] == B)
    if use_kernels:
        landmarks = spec.landmark_positions(B, Nk, query.device)
        out, _ = attend(query, key, value, spec, landmarks=landmarks, key_padding_mask=kpm,
                        causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    if spec.restricts:
        attention_mask = _with_pattern(attention_mask, spec, query, key,
                                       causal=bool(is_causal) and Nq > 1)
        is_causal = False
    return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                 position_bias, kwargs)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"attn_implementation={NAME!r} {message}", UserWarning, stacklevel=3)


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
