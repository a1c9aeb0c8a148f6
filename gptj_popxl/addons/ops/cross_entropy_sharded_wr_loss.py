"""Cross entropy over logits sharded along the class axis across IPUs of one replica."""
from typing import Iterable, List, Optional

import numpy as np

from ...backend import ops, popxl


def handle_ipus(ts: List[popxl.Tensor], ipus: Optional[Iterable[int]]) -> List[int]:
    """The IPU of each tensor of ``ts``: ``ipus`` checked against ``ts``, else each tensor's own ``ipu``."""
    if ipus is None:
        try:
            ipus = [t.ipu for t in ts]
        except Exception as e:  # popxl raises UndefinedValue for tensors without a placement
            raise ValueError("could not infer the IPU of every tensor; pass `ipus`") from e
    ipus = list(ipus)
    if len(ipus) != len(ts):
        raise ValueError(f"{len(ts)} tensors but {len(ipus)} IPUs")
    return ipus


def cross_entropy_sharded_wr_loss(logits: List[popxl.Tensor], indices: List[popxl.Tensor],
                                  ipus: Optional[Iterable[int]] = None) -> popxl.Tensor:
    """Per-sample cross entropy (n_samples,), unreduced, of logits split along the class axis into
    ``logits[i]`` (n_samples, C_i), shard ``i`` holding the classes after those of shards ``< i``.

    ``indices[i]`` (n_samples,) are the true classes, the same (global) values on every shard.
    Differentiable by autodiff. The CPU runtime has one device, so placements are only checked.
    """
    if not logits or len(logits) != len(indices):
        raise ValueError(f"cross_entropy_sharded_wr_loss: needs as many index tensors as logits shards, got "
                         f"{len(logits)} and {len(indices)}")
    if handle_ipus(logits, ipus) != handle_ipus(indices, ipus):
        raise ValueError("cross_entropy_sharded_wr_loss: the logits and indices IPUs do not match")
    # The shift cancels out of the loss; detached so no gradient flows through the max.
    shift = ops.detach(ops.max(ops.concat([ops.max(x, axis=1, keepdims=True) for x in logits], axis=1),
                               axis=1, keepdims=True))
    denominator, picked, offset = None, None, 0
    for x, idx in zip(logits, indices):
        shifted = x - shift
        # One-hot by comparing with this shard's class ids: other shards' classes match nothing.
        class_ids = popxl.constant(np.arange(offset, offset + x.shape[1], dtype=np.int32).reshape(1, -1),
                                   popxl.int32, "class_ids")
        onehot = ops.cast(ops.equal(ops.cast(idx, popxl.int32).reshape((-1, 1)), class_ids), x.dtype)
        part = ops.sum(ops.exp(shifted), axis=1)
        pick = ops.sum(shifted * onehot, axis=1)
        denominator = part if denominator is None else denominator + part
        picked = pick if picked is None else picked + pick
        offset += x.shape[1]
    return ops.log(denominator) - picked
