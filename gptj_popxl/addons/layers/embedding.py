"""Embedding lookup, optionally with the vocabulary sharded over replica groups."""
from functools import partial

import numpy as np

from ...backend import ops, popxl
from ..module import Module
from ..variable_factory import DeferredData
from ._init import truncated_normal


class Embedding(Module):
    """``weight[indices]`` along ``axis``, ``weight`` shaped (vocab_shard_size, hidden_size).

    With ``replica_grouping`` of ``n = num_groups > 1`` groups the vocabulary is sharded: group ``g``
    holds rows ``[g * s, (g + 1) * s)`` of the (zero-padded) table, ``s = get_vocab_shard_size(V, n)
    = ceil(V / n)``. The caller gives each shard its indices minus that shard's offset
    (``get_offsets``; on the host see ``offset_input``): indices outside ``[0, s)`` give zero rows
    (gather ``zero_OOR``), so summing the shards' outputs over the group (an all-reduce) gives the
    full lookup.

    Unlike popxl-addons, the shard size is not rounded up to a multiple of 16: a weight table is
    exactly ``ceil(V / n)`` rows per shard, so unsharded tables keep their exact (V, hidden) shape and
    sharded ones match a vocabulary zero-padded to a multiple of ``n``.
    """

    def __init__(self, dtype, vocab_size: int, hidden_size: int, axis: int = 0, replica_grouping=None):
        super().__init__()
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.axis = axis
        self.replica_grouping = replica_grouping
        self.n_shards = replica_grouping.num_groups if replica_grouping is not None else 1
        self.vocab_shard_size = self.get_vocab_shard_size(vocab_size, self.n_shards)
        self.offsets = self.get_offsets(vocab_size, self.n_shards)

    @staticmethod
    def get_vocab_shard_size(vocab_size: int, n_shards: int) -> int:
        """Rows per shard: ``ceil(vocab_size / n_shards)``."""
        if n_shards < 1 or vocab_size < 1:
            raise ValueError(f"vocab_size and n_shards must be >= 1, got {vocab_size} and {n_shards}")
        return -(-vocab_size // n_shards)

    @staticmethod
    def get_offsets(vocab_size: int, n_shards: int) -> np.ndarray:
        """The first vocabulary index of each shard, shape (n_shards,)."""
        size = Embedding.get_vocab_shard_size(vocab_size, n_shards)
        return np.arange(n_shards, dtype=np.int64) * size

    @staticmethod
    def offset_input(indices: np.ndarray, vocab_size: int, n_shards: int) -> np.ndarray:
        """Host indices for each shard: ``(n_shards, *indices.shape)``, shard ``g`` holding ``indices - offset[g]``."""
        indices = np.asarray(indices)
        offsets = Embedding.get_offsets(vocab_size, n_shards).reshape((n_shards,) + (1,) * indices.ndim)
        return (indices[None] - offsets).astype(indices.dtype)

    def variables(self) -> popxl.Tensor:
        """Declares the ``weight`` table shard (an addition to popxl-addons' class, for fused kernels that
        take the layer's variables)."""
        shape = (self.vocab_shard_size, self.hidden_size)
        return self.add_variable_input("weight", DeferredData(shape, np.float64, partial(truncated_normal, shape)),
                                       self.dtype, replica_grouping=self.replica_grouping)

    def build(self, indices: popxl.Tensor) -> popxl.Tensor:
        self.weight = self.variables()
        return ops.gather(self.weight, indices, axis=self.axis, zero_OOR=self.n_shards > 1)
