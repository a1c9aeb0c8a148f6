"""Negative log likelihood losses.

``probs`` has the classes on its last axis and ``labels`` the shape of the other axes. A label
outside ``[0, C)`` that is not ``ignore_index`` stops the run with an IndexError naming it (as torch's
loss does; popxl gives no result for it, and a graph cannot check values when it is built). Rows
whose label is ``ignore_index`` add nothing, and 'mean' then divides by the number of rows not ignored
(at least 1). Probabilities are clamped to 1e-7 (6.104e-5 for float16) before the log, as popart
does; everything is computed in float32.
"""
from typing import Optional, Tuple, Union

import torch

from .. import dtypes
from ..primitive import Primitive, spec
from ..tensor import Tensor, constant
from ._util import check_float

__all__ = ["nll_loss", "nll_loss_with_softmax_grad"]

_REDUCTIONS = ("mean", "sum", "none")


def _eps(dtype: torch.dtype) -> float:
    return 6.104e-5 if dtype == torch.float16 else 1e-7


class _Rows:
    """One replica-batched view of the inputs: ``p`` rows ``(R, N, C)`` (float32), each row's picked
    probability, and each row's weight in the reduced loss (0 for ignored rows, 1/count for 'mean')."""

    def __init__(self, probs: torch.Tensor, labels: torch.Tensor, ignore_index: Optional[int], reduction: str,
                 what: str):
        replicas, classes = probs.shape[0], probs.shape[-1]
        self.shape = probs.shape
        self.p = probs.reshape(replicas, -1, classes).float()
        lab = labels.reshape(replicas, -1).long()
        self.in_range = (lab >= 0) & (lab < classes)
        valid = (lab != ignore_index) if ignore_index is not None else torch.ones_like(lab, dtype=torch.bool)
        bad = valid & ~self.in_range
        if bad.any():
            raise IndexError(f"{what}: label {lab[bad][0].item()} is outside the {classes} classes [0, {classes}) "
                             f"and is not ignore_index ({ignore_index})")
        self.column = lab.clamp(0, classes - 1).unsqueeze(-1)
        self.picked = torch.where(self.in_range, torch.gather(self.p, -1, self.column).squeeze(-1), 0.0)
        self.weight = valid.float()
        if reduction == "mean":
            self.weight = self.weight / valid.sum(1, keepdim=True).clamp(min=1)

    def add_at_labels(self, base: torch.Tensor, per_row: torch.Tensor) -> torch.Tensor:
        """``base`` (R, N, C) plus ``per_row`` (R, N) at each row's label column; reshaped like probs."""
        per_row = torch.where(self.in_range, per_row, 0.0).unsqueeze(-1)
        return base.scatter_add_(-1, self.column, per_row).reshape(self.shape)


def _loss(rows: _Rows, labels_shape, reduction: str, log_prob: bool, dtype: torch.dtype) -> torch.Tensor:
    nll = -rows.picked if log_prob else -torch.log(rows.picked.clamp(min=_eps(dtype)))
    nll = nll * rows.weight
    return (nll.reshape(labels_shape) if reduction == "none" else nll.sum(1)).to(dtype)


class NllLoss(Primitive):
    name = "nll_loss"

    @staticmethod
    def infer(probs, labels, ignore_index, reduction, log_prob):
        return spec(labels.shape if reduction == "none" else (), probs.dtype)

    @staticmethod
    def kernel(probs, labels, ignore_index, reduction, log_prob):
        return _loss(_Rows(probs, labels, ignore_index, reduction, "nll_loss"), labels.shape, reduction, log_prob,
                     probs.dtype)

    @staticmethod
    def grad(g):
        return [NllLossGrad.create(g.dy, g.x(0), g.x(1), **g.attrs), None]


class NllLossGrad(Primitive):
    name = "nll_loss_grad"

    @staticmethod
    def infer(dy, probs, labels, ignore_index, reduction, log_prob):
        return probs.spec

    @staticmethod
    def kernel(dy, probs, labels, ignore_index, reduction, log_prob):
        rows = _Rows(probs, labels, ignore_index, reduction, "nll_loss_grad")
        scale = -dy.reshape(dy.shape[0], -1).float() * rows.weight
        if not log_prob:
            # d/dp -log(max(p, eps)) is -1/p above eps and 0 where the clamp holds.
            scale = torch.where(rows.picked >= _eps(probs.dtype), scale / rows.picked, 0.0)
        return rows.add_at_labels(torch.zeros_like(rows.p), scale).to(probs.dtype)


class NllLossWithSoftmaxGrad(Primitive):
    """The NLL loss of softmax outputs and the gradient of ``loss_grad * loss`` for the softmax's input."""
    name = "nll_loss_with_softmax_grad"

    @staticmethod
    def infer(probs, labels, loss_grad, ignore_index, reduction):
        return NllLoss.infer(probs, labels, ignore_index, reduction, False), probs.spec

    @staticmethod
    def kernel(probs, labels, loss_grad, ignore_index, reduction):
        rows = _Rows(probs, labels, ignore_index, reduction, "nll_loss_with_softmax_grad")
        loss = _loss(rows, labels.shape, reduction, False, probs.dtype)
        scale = loss_grad.reshape(-1, 1).float() * rows.weight
        dx = rows.add_at_labels(rows.p * scale.unsqueeze(-1), -scale)
        return loss, dx.to(probs.dtype)


def _check(probs: Tensor, labels: Tensor, ignore_index, reduction: str, what: str) -> None:
    check_float(probs, what)
    if probs.rank < 1:
        raise ValueError(f"{what}: probs '{probs.name}' must have a class axis (last), got a scalar")
    if not labels.dtype.is_int:
        raise TypeError(f"{what}: labels '{labels.name}' must have an integer dtype, got {labels.dtype.name}")
    if labels.shape != probs.shape[:-1]:
        raise ValueError(f"{what}: labels '{labels.name}' {labels.shape} must have the shape of probs '{probs.name}' "
                         f"{probs.shape} without its class axis, {probs.shape[:-1]}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{what}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if ignore_index is not None and int(ignore_index) != ignore_index:
        raise ValueError(f"{what}: ignore_index must be an int or None, got {ignore_index!r}")


def nll_loss(probs: Tensor, labels: Tensor, ignore_index: Optional[int] = None, reduction: str = "mean",
             log_prob: bool = False) -> Tensor:
    """Negative log likelihood of ``labels`` under ``probs`` (log-probabilities when ``log_prob``)."""
    _check(probs, labels, ignore_index, reduction, "nll_loss")
    return NllLoss.create(probs, labels, ignore_index=None if ignore_index is None else int(ignore_index),
                          reduction=reduction, log_prob=bool(log_prob))


def nll_loss_with_softmax_grad(probs: Tensor, labels: Tensor, loss_grad: Union[float, Tensor] = 1,
                               ignore_index: Optional[int] = None, reduction: str = "mean") -> Tuple[Tensor, Tensor]:
    """``(nll_loss(probs, labels), dx)``, ``dx`` being the gradient of ``loss_grad * loss`` for the logits
    that ``probs = softmax(logits, -1)`` came from: ``(probs - onehot(labels)) * loss_grad`` per row, scaled
    as the reduction scales the loss."""
    _check(probs, labels, ignore_index, reduction, "nll_loss_with_softmax_grad")
    if not isinstance(loss_grad, Tensor):
        loss_grad = constant(float(loss_grad), dtypes.float32, name="loss_grad")
    if loss_grad.nelms != 1:
        raise ValueError(f"nll_loss_with_softmax_grad: loss_grad '{loss_grad.name}' must be a scalar, got "
                         f"{loss_grad.shape}")
    return NllLossWithSoftmaxGrad.create(probs, labels, loss_grad, reduction=reduction,
                                         ignore_index=None if ignore_index is None else int(ignore_index))
