"""The hybrid pattern of one transformers attention layer, read from ``config.hybrid_attention``.

Format (every key optional)::

    config.hybrid_attention = {
        "window": [64, 64],        # None | int | [left, right]; -1 = unlimited side
        "landmarks": 32,           # None | int stride | [positions]
        "quant": None,             # None | "int8"
        "backend": "auto",
        "cross_attention": False,  # also apply the pattern to cross-attention layers
        "layers": {"0": {"window": None}, "5": {"landmarks": 16}},  # per-layer overrides
    }

A per-layer entry (keyed by the module's ``layer_idx``, int or str as after a JSON round trip)
overrides the top-level keys for that layer. No ``hybrid_attention`` = full attention.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..nn.spec import PatternSpec

__all__ = ["layer_spec", "is_cross_attention", "validate_settings", "CONFIG_KEY"]

CONFIG_KEY = "hybrid_attention"
_KEYS = {"window", "landmarks", "quant", "backend", "cross_attention", "layers"}
_FULL = PatternSpec()


def _as_dict(settings) -> Dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise TypeError(f"config.{CONFIG_KEY} must be a dict; got {type(settings).__name__}")
    unknown = set(settings) - _KEYS
    if unknown:
        raise ValueError(f"config.{CONFIG_KEY} has unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    return settings


def _spec(settings: Dict[str, Any]) -> PatternSpec:
    window = settings.get("window")
    if isinstance(window, list):
        window = tuple(window)
    landmarks = settings.get("landmarks")
    if isinstance(landmarks, (list, tuple)):
        landmarks = torch.tensor(landmarks, dtype=torch.int64)
    return PatternSpec.make(window, landmarks, settings.get("quant"), settings.get("backend", "auto"))


def validate_settings(settings) -> None:
    """Raise ValueError/TypeError naming the bad entry of a ``hybrid_attention`` dict."""
    settings = _as_dict(settings)
    _spec(settings)
    layers = settings.get("layers") or {}
    if not isinstance(layers, dict):
        raise TypeError(f"config.{CONFIG_KEY}['layers'] must be a dict {{layer_idx: settings}}")
    for idx, override in layers.items():
        if not str(idx).isdigit():
            raise ValueError(f"config.{CONFIG_KEY}['layers'] keys must be layer indices; got {idx!r}")
        _spec({**settings, **_as_dict(override)})


def is_cross_attention(module) -> bool:
    """Best-effort: the module attends from one sequence to another.

    True if the module says so (``is_cross_attention``), its class name contains
    "CrossAttention" (BERT), or it is a decoder attention that is not causal (T5, BART style).
    """
    flag = getattr(module, "is_cross_attention", None)
    if isinstance(flag, bool):
        return flag
    if "CrossAttention" in type(module).__name__:
        return True
    return bool(getattr(module, "is_decoder", False)) and not getattr(module, "is_causal", True)


def layer_spec(module) -> PatternSpec:
    """The pattern for this attention module (full attention when nothing is configured)."""
    config = getattr(module, "config", None)
    settings = _as_dict(getattr(config, CONFIG_KEY, None))
    if not settings:
        return _FULL
    layers = settings.get("layers") or {}
    idx: Optional[int] = getattr(module, "layer_idx", None)
    if idx is not None:
        override = layers.get(idx, layers.get(str(idx)))
        if override is not None:
            settings = {**settings, **_as_dict(override)}
    if is_cross_attention(module) and not settings.get("cross_attention", False):
        return _FULL
    return _spec(settings)
