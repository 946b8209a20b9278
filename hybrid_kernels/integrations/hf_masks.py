"""The masks of transformers' attention layers, as the kernels need them.

:func:`hybrid_attention_mask` is registered in ``AttentionMaskInterface``. For the mask shapes the
kernels express natively -- causal, sliding-window causal (Mistral, Gemma, Qwen2, GPT-OSS, ...),
bidirectional sliding window (ModernBERT) and plain bidirectional, each with key padding -- it
returns no Nq x Nk buffer. A plain bidirectional one is the stride-0 expansion of the padding row
(its values are the whole truth); the others are the contiguous (B, 1, 1, Nk) padding row tagged
with a :class:`CompactMask` that says what the layer sees. Contiguous, so that transformers'
``.contiguous()`` before a static-cache forward keeps the same object, tag included; an untagged
(B, 1, 1, Nk) row would read as bidirectional padding, which is what its values say. Anything else (chunked, packed sequences, custom ``and``/``or`` mask functions,
torch.compile tracing) gets transformers' own ``sdpa_mask``.

:func:`read_mask` turns the mask a layer receives back into (key padding mask, causal, window).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..nn.masks import additive_to_allowed, bottom_right_causal, can_inspect_values
from ..reference import visibility_mask

__all__ = ["CompactMask", "MaskRead", "hybrid_attention_mask", "read_mask", "recognize"]

TAG = "_hk_compact_mask"


@dataclass(frozen=True)
class CompactMask:
    """What a tagged compact mask means.

    causal: keys after the query's position are hidden. window: (left, right) in key positions
    around the query's (-1 = unlimited), from the model's sliding window. keys: only the first
    ``keys`` key slots can ever be visible (a static cache's unfilled slots are cut off so the
    last query lines up with the last key, the kernels' bottom-right alignment).
    """
    causal: bool
    window: Tuple[int, int]
    keys: int


@dataclass(frozen=True)
class MaskRead:
    """A layer's mask as the kernels take it."""
    key_padding_mask: Optional[Tensor]  # (B, keys) bool, True = real; None = all real
    causal: bool
    window: Tuple[int, int]             # (-1, -1) = none from the mask
    keys: Optional[int] = None          # use only the first ``keys`` keys (None = all)


def _closure_values(fn):
    return [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]


def recognize(mask_function) -> Optional[Tuple[bool, Optional[Tuple[int, int]]]]:
    """transformers' mask function -> (causal, window or None) for the patterns the kernels run
    natively, else None. Sliding windows follow transformers: causal ``kv > q - w`` is
    (w - 1, 0); bidirectional ``|q - kv| <= w`` is (w, w)."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = _closure_values(mask_function)
    parts = parts[0] if len(parts) == 1 and isinstance(parts[0], tuple) else None
    if not parts or len(parts) != 2:
        return None
    base = {mu.causal_mask_function: True, mu.bidirectional_mask_function: False}
    bases = [base[p] for p in parts if p in base]
    overlays = [p for p in parts if p not in base]
    if len(bases) != 1 or len(overlays) != 1:
        return None
    overlay = overlays[0]
    name = getattr(overlay, "__qualname__", "")
    values = [v for v in _closure_values(overlay) if isinstance(v, int) and not isinstance(v, bool)]
    if len(values) != 1 or values[0] < 1:
        return None
    w = values[0]
    if name == "sliding_window_overlay.<locals>.inner_mask" and bases[0]:
        return True, (w - 1, 0)
    if name == "sliding_window_bidirectional_overlay.<locals>.inner_mask" and not bases[0]:
        return False, (w, w)
    return None


def hybrid_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0,
                          kv_offset: int = 0, mask_function=None, attention_mask=None,
                          local_size=None, allow_is_causal_skip: bool = True,
                          allow_is_bidirectional_skip: bool = False, use_vmap: bool = False,
                          device="cpu", **kwargs):
    """transformers' mask builder for ``attn_implementation="hybrid_kernels"`` (see module doc)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is None:
        mask_function = causal_mask_function
    if use_vmap:
        kind = None
    elif mask_function is bidirectional_mask_function:
        kind = (False, None)  # the one shape also taken while torch.compile traces
    else:
        kind = recognize(mask_function) if can_inspect_values() else None
    offsets_are_ints = isinstance(q_offset, int) and isinstance(kv_offset, int)
    if kind is not None and offsets_are_ints:
        causal, window = kind
        q_last = q_offset + q_length - 1
        keys = kv_length
        if causal:
            keys = max(0, min(kv_length, q_last - kv_offset + 1))  # later slots are never seen
        aligned = causal or window is None or q_last == kv_offset + kv_length - 1
        if aligned and keys > 0:
            padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
            if padding is not None:
                padding = padding[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
            if not causal and window is None and allow_is_bidirectional_skip:
                # Plain bidirectional: the padding row is the whole truth; all real: no mask.
                if padding is None or (can_inspect_values() and bool(padding.all())):
                    return None
            if padding is None:
                padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
            if not causal and window is None:
                return padding[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
            mask = padding[:, None, None, :].contiguous()
            setattr(mask, TAG, CompactMask(causal, window or (-1, -1), keys))
            return mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip,
                     allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap,
                     device=device, **kwargs)


# Every layer of one forward gets the same mask object: remember the last one read, so a
# materialized mask is value-checked once per forward, not once per layer.
_last_read: list = [None, None, None]  # [weakref to mask, (version, batch, nq, nk, window), result]


def read_mask(mask: Tensor, batch: int, nq: int, nk: int,
              window: Tuple[int, int] = (-1, -1)) -> Optional[MaskRead]:
    """A 4-D transformers mask -> :class:`MaskRead`, or None when the kernels cannot express it.

    ``window`` is the sliding window the layer declares (transformers' ``sliding_window``
    argument): a materialized mask may carry it, and is then checked against it.
    """
    info = getattr(mask, TAG, None)
    if isinstance(info, CompactMask):
        if mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[-1] != nk:
            return None
        kpm = mask[:, 0, 0, :info.keys]
        if can_inspect_values() and bool(kpm.all()):
            kpm = None
        else:
            kpm = kpm.expand(batch, info.keys).contiguous()
        return MaskRead(kpm, info.causal, info.window, info.keys if info.keys < nk else None)
    if not can_inspect_values() or not isinstance(mask, Tensor):
        return _read_materialized(mask, batch, nq, nk, window)
    version = -1 if mask.is_inference() else mask._version  # inference tensors have none
    key = (version, batch, nq, nk, window)
    ref, last_key, result = _last_read
    if ref is not None and ref() is mask and last_key == key:
        return result
    result = _read_materialized(mask, batch, nq, nk, window)
    _last_read[:] = [weakref.ref(mask), key, result]
    return result


def _read_materialized(mask: Tensor, batch: int, nq: int, nk: int,
                       window: Tuple[int, int]) -> Optional[MaskRead]:
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if mask.shape[0] not in (1, batch) or mask.shape[-1] != nk or mask.shape[-2] not in (1, nq):
        return None
    allowed = additive_to_allowed(mask)
    if allowed is None:
        return None
    if allowed.shape[-2] == 1 or allowed.stride(-2) == 0:
        kpm, causal, win = allowed[:, 0, 0, :], False, (-1, -1)
    elif not can_inspect_values():
        return None
    else:
        kpm = allowed[:, 0, -1, :]  # the last query sees every real key it can, causal or not
        found = None
        for causal, win in _candidates(window):
            expected = _expected(nq, nk, causal, win, mask.device)
            if causal or win != (-1, -1):
                kpm_try = _padding_row(allowed, expected)
            else:
                kpm_try = kpm
            if kpm_try is not None and bool((allowed == (expected & kpm_try[:, None, None, :])).all()):
                found = (kpm_try, causal, win)
                break
        if found is None:
            return None
        kpm, causal, win = found
    if can_inspect_values() and bool(kpm.all()):
        return MaskRead(None, causal, win)
    return MaskRead(kpm.expand(batch, nk).contiguous(), causal, win)


def _candidates(window: Tuple[int, int]):
    yield False, (-1, -1)
    yield True, (-1, -1)
    if window != (-1, -1):
        yield True, (window[0], 0)
        yield False, window


def _expected(nq: int, nk: int, causal: bool, window: Tuple[int, int], device) -> Tensor:
    if window == (-1, -1):
        full = bottom_right_causal(nq, nk, device) if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
        return full[None, None]
    return visibility_mask(1, nq, nk, window_left=window[0], window_right=window[1],
                           causal=causal, landmarks=None, key_padding_mask=None, device=device)


def _padding_row(allowed: Tensor, expected: Tensor) -> Optional[Tensor]:
    """The padding row implied by ``allowed`` under pattern ``expected``: a key is real iff some
    query that the pattern lets see it does see it; keys no query may see count as real."""
    seen_by_pattern = expected.any(dim=-2)                        # (1, 1, Nk)
    real = (allowed & expected).any(dim=-2) | ~seen_by_pattern     # (B, 1, Nk)
    return real[:, 0, :]
