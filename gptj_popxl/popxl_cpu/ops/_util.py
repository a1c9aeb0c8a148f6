"""Helpers shared by op definitions."""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..tensor import Tensor, constant


def broadcast_shape(a: Sequence[int], b: Sequence[int]) -> Tuple[int, ...]:
    """Numpy broadcasting of two shapes; ValueError naming both when they do not broadcast."""
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        raise ValueError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast") from None


def norm_axis(axis: int, of, what: str = "axis") -> int:
    """``axis`` of a tensor ``of`` (or of a rank) made non-negative; ValueError naming both when out of range."""
    rank = of.rank if isinstance(of, Tensor) else of
    if not -rank <= axis < max(rank, 1):
        where = f" of '{of.name}' {of.shape}" if isinstance(of, Tensor) else ""
        raise ValueError(f"{what} {axis} is out of range for rank {rank}{where}")
    return axis % rank if rank else 0


def norm_axes(axis, of) -> Tuple[int, ...]:
    """``None`` -> all axes of ``of`` (a tensor or a rank); int or list -> sorted non-negative axes."""
    if axis is None:
        return tuple(range(of.rank if isinstance(of, Tensor) else of))
    if isinstance(axis, int):
        axis = [axis]
    return tuple(sorted({norm_axis(int(a), of) for a in axis}))


def scalar_like(value, t: Tensor) -> Tensor:
    return value if isinstance(value, Tensor) else constant(np.asarray(value), t.dtype, name="scalar")


def replica_view_shape(shape: Sequence[int], rank: int, replicas: int) -> Tuple[int, ...]:
    """Runtime shape ``(R, 1.., *shape)`` padding ``shape`` with leading ones up to ``rank``."""
    return (replicas,) + (1,) * (rank - len(shape)) + tuple(shape)


def broadcast_view(shape: Sequence[int], rank: int, replicas: int) -> Optional[Tuple[int, ...]]:
    """The view a ``(R, *shape)`` value needs to broadcast against rank-``rank`` values with its replica
    axis lined up (``replica_view_shape``), or None where it broadcasts as it is: with one replica the
    leading 1 lines up with anything (a view costs microseconds, which a decode step pays per op)."""
    if len(shape) == rank or replicas == 1:
        return None
    return replica_view_shape(shape, rank, replicas)


def unbroadcast(dy: Tensor, shape: Sequence[int]) -> Tensor:
    """Sums ``dy`` over the axes that broadcasting added or stretched, giving a ``shape`` gradient."""
    from .reduce import sum as reduce_sum
    from .shape import reshape
    shape = tuple(shape)
    if dy.shape == shape:
        return dy
    lead = dy.rank - len(shape)
    axes = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and dy.shape[lead + i] != 1]
    out = reduce_sum(dy, axes, keepdims=False) if axes else dy
    return reshape(out, shape) if out.shape != shape else out


def check_same_dtype(*ts: Tensor) -> None:
    dtypes = {t.dtype for t in ts}
    if len(dtypes) > 1:
        raise TypeError("inputs must have the same dtype, got " + ", ".join(f"{t.dtype.name}" for t in ts))


def check_float(t: Tensor, what: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{what} needs a floating point tensor, got '{t.name}' {t.dtype.name}")


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two runtime values are views of one storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# The int64 with only the top bit set: flipping it maps uint64 order (held as int64 bits) onto int64 order.
INT64_SIGN_BIT = -(1 << 63)


def _uint64_at_least(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a >= b`` of uint64 values held as int64 bits: flipping the top bit maps unsigned order to signed."""
    return (a ^ INT64_SIGN_BIT) >= (b ^ INT64_SIGN_BIT)


def uint64_trunc_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a // b`` of uint64 values held as int64 bits (as the runtime gives them to kernels), which a
    signed division would read as negative from 2**63 up."""
    small_b = b >= 0  # below 2**63
    divisor = torch.where(small_b, b, 1)
    # Half of a fits int64's positive range; twice its quotient is a's, or one short of it.
    quotient = (((a >> 1) & ~INT64_SIGN_BIT) // divisor) << 1
    quotient += _uint64_at_least(a - quotient * divisor, divisor)
    # A divisor from 2**63 up goes into a once or not at all.
    return torch.where(small_b, quotient, _uint64_at_least(a, b).to(torch.int64))


def uint64_remainder(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a % b`` of uint64 values held as int64 bits (the products and differences wrap as uint64's)."""
    return a - uint64_trunc_div(a, b) * b
