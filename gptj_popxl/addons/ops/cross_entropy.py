"""Softmax cross entropy over the last axis, and its fused form that also returns the logits' gradient."""
from typing import Optional, Tuple, Union

from ...backend import ops, popxl


def _flat(x: popxl.Tensor, labels: popxl.Tensor, what: str) -> Tuple[popxl.Tensor, popxl.Tensor]:
    """``x`` as (samples, classes) and ``labels`` as (samples,), checking that their shapes agree."""
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{what}: labels '{labels.name}' {labels.shape} must have the shape of x '{x.name}' "
                         f"{x.shape} without its class axis")
    return x.reshape((-1, x.shape[-1])), labels.reshape((-1,))


def cross_entropy(x: popxl.Tensor, labels: popxl.Tensor, ignore_index: Optional[int] = None,
                  reduction: str = "mean") -> popxl.Tensor:
    """Cross entropy of logits ``x`` (``*dims, C``) against class ids ``labels`` (``*dims``).

    ``reduction``: 'mean' (over the samples not ignored), 'sum' or 'none' (one loss per sample, flat).
    Samples whose label equals ``ignore_index`` contribute nothing. Differentiable by autodiff.
    """
    x, labels = _flat(x, labels, "cross_entropy")
    return ops.nll_loss(ops.softmax(x, axis=-1), labels, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_with_grad(x: popxl.Tensor, labels: popxl.Tensor, loss_scaling: Union[float, popxl.Tensor] = 1,
                            ignore_index: Optional[int] = None,
                            reduction: str = "mean") -> Tuple[popxl.Tensor, popxl.Tensor]:
    """``(loss, dloss/dx * loss_scaling)`` of :func:`cross_entropy` in one op (no autodiff needed).

    The loss itself is not scaled. ``dx`` has ``x``'s shape.
    """
    shape = x.shape
    x, labels = _flat(x, labels, "cross_entropy_with_grad")
    if not isinstance(loss_scaling, popxl.Tensor):
        loss_scaling = popxl.constant(loss_scaling, popxl.float32, "loss_scaling")
    loss, dx = ops.nll_loss_with_softmax_grad(ops.softmax(x, axis=-1), labels, loss_scaling,
                                              ignore_index=ignore_index, reduction=reduction)
    return loss, dx.reshape(shape)
