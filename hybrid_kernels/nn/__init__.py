"""Drop-in modules: ``HybridAttention`` (an ``nn.MultiheadAttention`` replacement),
``swap_attention`` (swap it into an existing model) and learnable landmark tokens."""
from .attention import HybridAttention
from .landmarks import LearnedLandmarks
from .spec import PatternSpec
from .swap import swap_attention

__all__ = ["HybridAttention", "LearnedLandmarks", "PatternSpec", "swap_attention"]
