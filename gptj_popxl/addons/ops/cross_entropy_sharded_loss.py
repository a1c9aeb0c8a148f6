"""Cross entropy over logits whose class axis is sharded across replicas, without gathering them."""
import functools
import os
from typing import Optional, Union

import numpy as np

from ...backend import IS_CPU, custom_op, native, ops, popxl
from .replicated_all_reduce_TP import replicated_all_reduce_identical_grad_inputs

_REDUCTIONS = ("mean", "sum", "none")

if IS_CPU:
    import torch

    @functools.lru_cache(maxsize=None)
    def _kernels():
        """The C++ passes over float32 logits (``softmax_terms.cpp``), built by cppimport on first use."""
        return native.build(os.path.join(os.path.dirname(os.path.abspath(__file__)), "softmax_terms.cpp"),
                            "softmax_terms")

    def _label_columns(logits, indices):
        """Each row's label clamped into this shard, and whether it really lies in this shard."""
        idx = indices.long()
        in_shard = (idx >= 0) & (idx < logits.shape[-1])
        return idx.clamp(0, logits.shape[-1] - 1).unsqueeze(-1), in_shard

    def _exp_sums(logits, shift):
        """``sum(exp(x - shift))`` per row: float32 in one read of the logits (torch's shift, exp and
        sum made five passes over a fresh 50 MB tensor on the benchmark model)."""
        if logits.dtype != torch.float32:
            return (logits - shift.unsqueeze(-1)).exp_().sum(-1)
        totals = torch.empty_like(shift)
        _kernels().shifted_exp_sums(logits.contiguous().numpy(), shift.contiguous().numpy(), totals.numpy(),
                                    torch.get_num_threads())
        return totals

    def _scaled_exps(logits, shift, scale, out):
        """``exp(x - shift) * scale`` per row, into ``out`` when given; float32 in one read and one write."""
        if logits.dtype != torch.float32:
            return torch.sub(logits, shift.unsqueeze(-1), out=out).exp_().mul_(scale.unsqueeze(-1))
        out = torch.empty_like(logits) if out is None else out
        _kernels().scaled_shifted_exp(logits.contiguous().numpy(), shift.contiguous().numpy(),
                                      scale.contiguous().numpy(), out.numpy(), torch.get_num_threads())
        return out

    class ShardSoftmaxTerms(custom_op.CustomOp):
        """``(sum(exp(x - m)), x[label] - m)`` per row of one shard (a label outside the shard picks 0).
        Gradient: :class:`ShardSoftmaxTermsGrad`; none for ``m``."""
        name = "shard_softmax_terms"

        @staticmethod
        def infer(logits, indices, shift):
            row = custom_op.spec(logits.shape[:1], logits.dtype)
            return row, row

        @staticmethod
        def kernel(logits, indices, shift):
            column, in_shard = _label_columns(logits, indices)
            picked = torch.gather(logits, -1, column).squeeze(-1) - shift
            return _exp_sums(logits, shift), torch.where(in_shard, picked, 0.0)

        @staticmethod
        def grad(g):
            dtotal, dpicked = g.dys
            return [ShardSoftmaxTermsGrad.create(g.x(0), g.x(1), g.x(2), dtotal, dpicked), None, None]

    class ShardSoftmaxTermsGrad(custom_op.CustomOp):
        """``dtotal * exp(x - m) + dpicked * onehot(label)``: the logits' gradient of ShardSoftmaxTerms,
        written into one buffer."""
        name = "shard_softmax_terms_grad"

        @staticmethod
        def infer(logits, indices, shift, dtotal, dpicked):
            return logits.spec

        @staticmethod
        def kernel(logits, indices, shift, dtotal, dpicked, out=None):
            column, in_shard = _label_columns(logits, indices)
            dx = _scaled_exps(logits, shift, dtotal, out)
            return dx.scatter_add_(-1, column, torch.where(in_shard, dpicked, 0.0).unsqueeze(-1))

        @classmethod
        def lower_out(cls, op, runtime):
            return cls.kernel  # the runtime may hand it memory to write

    def _softmax_terms(logits, indices, shift):
        return ShardSoftmaxTerms.create(logits, indices, shift, name=logits.name + "_softmax_terms")
else:
    def _softmax_terms(logits, indices, shift):
        shifted = logits - shift.reshape((-1, 1))
        # One-hot by comparison with the class ids: out-of-range indices (other shards' classes) match nothing.
        classes = logits.shape[1]
        class_ids = popxl.constant(np.arange(classes, dtype=np.int32).reshape(1, classes), popxl.int32, "class_ids")
        onehot = ops.cast(ops.equal(ops.cast(indices, popxl.int32).reshape((-1, 1)), class_ids), logits.dtype)
        return ops.sum(ops.exp(shifted), axis=1), ops.sum(shifted * onehot, axis=1)


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
    else its sum or mean (over non-ignored samples; NaN when all are ignored). The gradient with respect to each shard's
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
    # Detached after the all-reduce, so autodiff never reaches the max reduction (which has no gradient).
    shift = ops.detach(ops.collectives.replicated_all_reduce(ops.max(logits, axis=1), "max", group))
    total, picked = _softmax_terms(logits, indices, shift)
    denominator = replicated_all_reduce_identical_grad_inputs(total, "add", group)
    picked = replicated_all_reduce_identical_grad_inputs(picked, "add", group)
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
        # As torch's (and popxl-addons'): NaN when every sample is ignored; the gradient is then 0, as torch's.
        count = ops.sum(keep)
        mean = ops.sum(loss) / ops.maximum(count, popxl.constant(1.0, loss.dtype))
        return ops.where(ops.greater(count, popxl.constant(0.0, loss.dtype)), mean,
                         popxl.constant(np.nan, loss.dtype))
    return ops.sum(loss) if reduction == "sum" else loss
