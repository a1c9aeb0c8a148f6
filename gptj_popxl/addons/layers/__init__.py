"""Layers: Modules with their own variables."""
from .embedding import Embedding
from .layer_norm import LayerNorm
from .layer_norm_distributed import LayerNormDistributed
from .linear import Linear
from .linear_gq import LinearGQ

__all__ = ["Embedding", "LayerNorm", "LayerNormDistributed", "Linear", "LinearGQ"]
