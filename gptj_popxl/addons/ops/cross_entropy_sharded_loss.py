"""Cross entropy over logits whose class axis is sharded across replicas, without gathering them."""
from typing import Optional, Union

import numpy as np

from ...backend import ops, popxl
from .replicated_all_reduce_TP import replicated_all_reduce_identical_grad_inputs

_REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_sharded_loss(logits: popxl.Tensor, indices: popxl.Tensor,
                               ignore_index: Optional[Union[int, popxl.Tensor]] = None, replica_grouping=None,
                               reduction: str = "mean", available_memory_proportion: float = 0.4) -> popxl.Tensor:
    """Softmax cross entropy of ``logits`` (n_samples, classes_per_shard), sharded over the replicas of
    each ``replica_grouping`` group (default: all replicas; shard order is irrelevant).

    ``indices`` (n_samples,): each shard's true class relative to its own first class (the global
    class minus the shard's offset), so out-of-range values mean "held by another shard".
    ``ignore_index``: samples whose ``indices`` equal it are skipped; give it in the same per-shard
    frame as ``indices`` (e.g. ``IGNORE - shard_offset``) so every shard masks the same samples.
    Returns the loss, identical on every shard of a group: per sample for ``reduction="none"``,
    else its sum or mean (over non-ignored samples). The gradient with respect to each shard's
    logits is ``(softmax - onehot) * dloss`` for that shard's classes.

    Computed as ``log(sum_shards(sum(exp(x - m)))) + m - x[label]`` with ``m`` the max over all
    shards (no gradient flows through ``m``; it cancels).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy_sharded_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.rank != 2:
        raise ValueError(f"cross_entropy_sharded_loss: logits '{logits.name}' must be (n_samples, classes_per_shard), "
                         f"got shape {logits.shape}; flatten the sample axes first")
    if indices.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_sharded_loss: indices '{indices.name}' {indices.shape} must be "
                         f"({logits.shape[0]},) to match logits '{logits.name}' {logits.shape}")
    if not indices.dtype.is_int:
        raise TypeError(f"cross_entropy_sharded_loss: indices '{indices.name}' must be integers, got "
                        f"{indices.dtype.name}")
    group = replica_grouping
    classes = logits.shape[1]
    # Detached after the all-reduce, so autodiff never reaches the max reduction (which has no gradient).
    shift = ops.detach(ops.collectives.replicated_all_reduce(ops.max(logits, axis=1), "max", group))
    shifted = logits - shift.reshape((-1, 1))
    denominator = replicated_all_reduce_identical_grad_inputs(ops.sum(ops.exp(shifted), axis=1), "add", group)
    # One-hot by comparison with the class ids: out-of-range indices (other shards' classes) match nothing.
    class_ids = popxl.constant(np.arange(classes, dtype=np.int32).reshape(1, classes), popxl.int32, "class_ids")
    onehot = ops.cast(ops.equal(ops.cast(indices, popxl.int32).reshape((-1, 1)), class_ids), logits.dtype)
    picked = replicated_all_reduce_identical_grad_inputs(ops.sum(shifted * onehot, axis=1), "add", group)
    loss = ops.log(denominator) - picked
    if ignore_index is None:
        if reduction == "mean":
            return ops.mean(loss)
        return ops.sum(loss) if reduction == "sum" else loss
    if not isinstance(ignore_index, popxl.Tensor):
        ignore_index = popxl.constant(int(ignore_index), indices.dtype, "ignore_index")
    keep = ops.cast(ops.logical_not(ops.equal(indices, ignore_index)), loss.dtype)
    loss = loss * keep
    if reduction == "mean":
        return ops.sum(loss) / ops.maximum(ops.sum(keep), popxl.constant(1.0, loss.dtype))
    return ops.sum(loss) if reduction == "sum" else loss
