"""Layer normalisation of activations whose hidden axis is sharded over a replica group."""
from functools import partial

import numpy as np

from ...backend import popxl
from ..module import Module
from ..ops.layer_norm_distributed import layer_norm_distributed


class LayerNormDistributed(Module):
    """``layer_norm_distributed`` over the replicas of each ``replica_grouping`` group (default: all).

    ``build(x, eps=1e-5)``, ``x`` (N, H_shard). Variables ``weight`` (ones) and ``bias`` (zeros) of
    shape (H_shard,): each replica of a group holds a different shard, so they are grouped by the
    transpose of ``replica_grouping`` (host data ``(group_size, H_shard)`` when it has several groups).
    """

    def __init__(self, replica_grouping=None):
        super().__init__()
        self.replica_grouping = replica_grouping

    def build(self, x: popxl.Tensor, eps: float = 1e-5) -> popxl.Tensor:
        group = self.replica_grouping or popxl.gcg().ir.replica_grouping()
        shards = group.transpose()
        w = self.add_variable_input("weight", partial(np.ones, x.shape[-1]), x.dtype, replica_grouping=shards)
        b = self.add_variable_input("bias", partial(np.zeros, x.shape[-1]), x.dtype, replica_grouping=shards)
        return layer_norm_distributed(x, w, b, epsilon=eps, group=group)
