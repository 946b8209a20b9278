"""``swap_attention``: replace every nn.MultiheadAttention in a model by HybridAttention."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .attention import HybridAttention

__all__ = ["swap_attention"]


def swap_attention(model: nn.Module, *, window=None, landmarks=None, quant: Optional[str] = None,
                   backend: str = "auto", num_learned_landmarks: int = 0,
                   filter: Optional[Callable[[str, nn.MultiheadAttention], bool]] = None) -> nn.Module:
    """Replace each ``nn.MultiheadAttention`` of ``model`` (in place) by
    ``HybridAttention.from_mha(...)`` with the given pattern, and return the model.

    ``filter(name, module)`` may restrict which modules are swapped. ``nn.TransformerEncoder``
    modules get ``use_nested_tensor = False`` (their nested-tensor fast path would bypass the
    swapped modules); the swapped modules themselves keep nn.TransformerEncoderLayer off its fused
    fast path. If ``model`` is itself an nn.MultiheadAttention, the new module is returned.
    """
    kwargs = dict(window=window, landmarks=landmarks, quant=quant, backend=backend,
                  num_learned_landmarks=num_learned_landmarks)
    if isinstance(model, nn.MultiheadAttention) and not isinstance(model, HybridAttention):
        return HybridAttention.from_mha(model, **kwargs)
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.MultiheadAttention and (filter is None or filter(name, m))]
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, HybridAttention.from_mha(mha, **kwargs))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
    return model
