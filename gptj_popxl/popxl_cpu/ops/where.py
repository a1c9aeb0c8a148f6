"""Selection ops: ``where`` and ``clip``."""
import torch

from .. import dtypes
from ..primitive import Primitive, spec
from ..tensor import Tensor
from ._util import broadcast_shape, broadcast_view, check_float, check_same_dtype, scalar_like, unbroadcast
from .elementwise import as_bool, equal, logical_and, logical_not

__all__ = ["where", "clip"]


class Where(Primitive):
    """``condition ? lhs : rhs`` elementwise, broadcasting all three."""
    name = "where"

    @staticmethod
    def infer(condition, lhs, rhs):
        if condition.dtype != dtypes.bool_:
            raise TypeError(f"condition '{condition.name}' must be bool, got {condition.dtype.name}")
        check_same_dtype(lhs, rhs)
        return spec(broadcast_shape(condition.shape, broadcast_shape(lhs.shape, rhs.shape)), lhs.dtype)

    @classmethod
    def lower(cls, op, runtime):
        rank = op.outputs[0].rank
        shapes = [broadcast_view(t.shape, rank, runtime.replicas) for t in op.inputs]
        if shapes == [None] * 3:
            return torch.where
        return lambda *xs: torch.where(*(x if s is None else x.reshape(s) for x, s in zip(xs, shapes)))

    @staticmethod
    def grad(g):
        zero = scalar_like(0, g.dy)
        cond = g.x(0)
        return [None,
                unbroadcast(where(cond, g.dy, zero), g.in_spec(1).shape) if g.needs(1) else None,
                unbroadcast(where(cond, zero, g.dy), g.in_spec(2).shape) if g.needs(2) else None]


def where(condition: Tensor, lhs, rhs) -> Tensor:
    """``lhs`` where ``condition`` (cast to bool) is true, else ``rhs`` (numpy broadcasting; either may be a
    python number)."""
    if not isinstance(lhs, Tensor) and isinstance(rhs, Tensor):
        lhs = scalar_like(lhs, rhs)
    if not isinstance(lhs, Tensor):
        raise TypeError("where: lhs or rhs must be a Tensor")
    if not isinstance(condition, Tensor):
        raise TypeError(f"where: condition must be a Tensor, got {type(condition).__name__}")
    return Where.create(as_bool(condition), lhs, scalar_like(rhs, lhs))


class Clip(Primitive):
    name = "clip"

    @staticmethod
    def infer(t, min, max):  # noqa: A002 - popxl's names
        check_float(t, "clip")
        if min > max:
            raise ValueError(f"clip of '{t.name}': min {min} is greater than max {max}")
        return t.spec

    @staticmethod
    def kernel(x, min, max):  # noqa: A002
        return torch.clamp(x, min, max)

    @staticmethod
    def grad(g):
        # As PopART: the gradient passes where the result is neither bound (so not at a bound itself,
        # and through NaN).
        y = g.y(0)
        inside = logical_and(logical_not(equal(y, scalar_like(g.attrs["min"], y))),
                             logical_not(equal(y, scalar_like(g.attrs["max"], y))))
        return [where(inside, g.dy, 0)]


def clip(t: Tensor, min: float = float("-inf"), max: float = float("inf")) -> Tensor:  # noqa: A002
    """``t`` with every element clamped to ``[min, max]``."""
    return Clip.create(t, min=float(min), max=float(max))
