"""Layer normalisation of activations whose hidden axis is sharded over replicas."""
from typing import Optional

from ...backend import ops, popxl


def layer_norm_distributed(t: popxl.Tensor, w: popxl.Tensor, b: popxl.Tensor, epsilon: float = 1e-5,
                           group: Optional[object] = None) -> popxl.Tensor:
    """Layer norm of ``t`` (N, H_shard) whose full hidden axis is the concatenation of the shards
    held by the replicas of each ``group`` (default: all replicas); ``w``, ``b`` (H_shard,) are this
    replica's shards of the scale and shift.

    Mean and (biased) variance are all-reduced over the group, so the result equals
    ``layer_norm`` of the gathered tensor, sliced back to this replica's shard. Differentiable.
    """
    if t.rank != 2 or w.rank != 1 or b.rank != 1:
        raise ValueError(f"layer_norm_distributed: t '{t.name}' must be (N, H) and w '{w.name}', b '{b.name}' "
                         f"(H,); got {t.shape}, {w.shape}, {b.shape}")
    if w.shape[0] != t.shape[1] or b.shape[0] != t.shape[1]:
        raise ValueError(f"layer_norm_distributed: w {w.shape} and b {b.shape} must match t's hidden shard "
                         f"{t.shape[1]}")
    group = group if group is not None else popxl.gcg().ir.replica_grouping()
    hidden = popxl.constant(float(t.shape[1] * group.group_size), t.dtype, "hidden_size")
    mean = ops.collectives.replicated_all_reduce(ops.sum(t, axis=1, keepdims=True), "add", group) / hidden
    centred = t - mean
    var = ops.collectives.replicated_all_reduce(ops.sum(centred * centred, axis=1, keepdims=True), "add",
                                                group) / hidden
    return centred / ops.sqrt(var + popxl.constant(epsilon, t.dtype, "epsilon")) * w + b
