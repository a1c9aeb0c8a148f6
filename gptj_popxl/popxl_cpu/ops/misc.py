"""Assorted ops: counters, scaled adds, printing, device copies, cumulative sums, subsampling, histograms."""
import sys
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .. import dtypes
from ..context import ipu
from ..primitive import Primitive, spec
from ..tensor import Tensor, constant
from ._util import norm_axis, shares_memory, uint64_remainder
from .elementwise import Identity, cast, mul
from .reduce import sum as reduce_sum
from .shape import reshape, slice as slice_op

__all__ = ["increment_mod", "increment_mod_", "scaled_add", "scaled_add_", "print_tensor", "ipu_copy",
           "io_tile_copy", "cumsum", "subsample", "histogram", "lamb_square"]


# ---------------------------------------------------------------- increment_mod

def _int64_bits(value: int, bits: int) -> int:
    """The int64 holding the low ``bits`` bits of ``value`` as the runtime gives uint16/32/64 values to kernels."""
    value %= 1 << bits
    return value - (1 << 64) if value >= 1 << 63 else value


def _increment_mod_kernel(dtype, increment, modulus):
    """``(x + increment) % modulus`` as PopART computes it: the sum wraps around in ``x``'s dtype, then
    the remainder (C's: its sign follows the sum's) is taken."""
    if dtype not in (dtypes.uint16, dtypes.uint32, dtypes.uint64):
        # torch keeps the tensor's dtype for a python scalar, wrapping an integer sum as PopART does.
        return lambda x: torch.fmod(x + increment, modulus)
    # Kernels get these as int64 (executor): the sum is wrapped here, uint64's by int64 arithmetic itself.
    bits = np.dtype(dtype.as_numpy()).itemsize * 8
    increment, modulus = _int64_bits(increment, bits), _int64_bits(modulus, bits)
    if dtype == dtypes.uint64:
        modulus = torch.tensor(modulus)
        return lambda x: uint64_remainder(x + increment, modulus)
    return lambda x: torch.fmod((x + increment) & ((1 << bits) - 1), modulus)


class IncrementMod(Primitive):
    """``(t + increment) % modulus`` in ``t``'s dtype, e.g. a counter cycling through ``[0, modulus)``."""
    name = "increment_mod"

    @staticmethod
    def infer(t, increment, modulus):
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        return _increment_mod_kernel(op.inputs[0].dtype, op.attrs["increment"], op.attrs["modulus"])

    @staticmethod
    def grad(g):
        return [g.dy]


class IncrementModInplace(IncrementMod):
    name = "increment_mod_"
    modifies = (0,)
    grad = None

    @classmethod
    def lower(cls, op, runtime):
        kernel = _increment_mod_kernel(op.inputs[0].dtype, op.attrs["increment"], op.attrs["modulus"])
        return lambda x: x.copy_(kernel(x))


def _increment_mod(prim, t: Tensor, increment: float, modulus: float) -> Tensor:
    # As PopART, increment and modulus take t's dtype first (an integer one truncates them).
    kind = int if t.dtype.is_int else float
    increment, modulus = kind(increment), kind(modulus)
    if modulus == 0:
        raise ValueError(f"{prim.name} of '{t.name}': modulus must not be 0 (in {t.dtype.name})")
    return prim.create(t, increment=increment, modulus=modulus)


def increment_mod(t: Tensor, increment: float, modulus: float) -> Tensor:
    """``(t + increment) % modulus``, the sum wrapping around in ``t``'s dtype (an integer one) before the
    remainder, whose sign follows the sum's (C's fmod)."""
    return _increment_mod(IncrementMod, t, increment, modulus)


def increment_mod_(t: Tensor, increment: float, modulus: float) -> Tensor:
    """:func:`increment_mod` writing ``t`` in place."""
    return _increment_mod(IncrementModInplace, t, increment, modulus)


# ---------------------------------------------------------------- scaled_add

class ScaledAdd(Primitive):
    """``a * X + b * Y``; a scale is a float attribute or, when that is None, a scalar tensor input."""
    name = "scaled_add"

    @staticmethod
    def infer(x, y, *scales, a, b):
        return x.spec

    @classmethod
    def lower(cls, op, runtime):
        a, b = op.attrs["a"], op.attrs["b"]
        inplace, view = bool(cls.modifies), (-1,) + (1,) * op.inputs[0].rank

        def scale(given, tensors):
            return given if given is not None else tensors.pop(0).reshape(view).float()

        def scaled_add(x, y, *scales):
            tensors = list(scales)
            sa, sb = scale(a, tensors), scale(b, tensors)
            if inplace and x.dtype == torch.float32 and not shares_memory(x, y):
                # Written into x: no full-size temporary (unless y is x's memory, which scaling x would change).
                x = x if a == 1.0 else x.mul_(sa)
                return x.add_(y.float(), alpha=b) if b is not None else x.addcmul_(y.float(), sb)
            out = sa * x.float() + sb * y.float()
            return x.copy_(out) if inplace else out.to(x.dtype)
        return scaled_add

    @staticmethod
    def grad(g):
        given = (g.attrs["a"], g.attrs["b"])
        # Input index of the tensor scale of each operand that has one.
        scale_input = {}
        for operand in (0, 1):
            if given[operand] is None:
                scale_input[operand] = 2 + len(scale_input)

        def factor(operand):
            if given[operand] is not None:
                return constant(given[operand], g.dy.dtype)
            return cast(g.x(scale_input[operand]), g.dy.dtype)

        def as_dtype_of(t, k):  # X and Y may differ in dtype; the result (and dy) is X's
            return t if t.dtype == g.in_spec(k).dtype else cast(t, g.in_spec(k).dtype)
        grads = [as_dtype_of(mul(g.dy, factor(i)), i) if g.needs(i) else None for i in (0, 1)]
        for operand, k in scale_input.items():
            if not g.needs(k):
                grads.append(None)
                continue
            s = g.in_spec(k)
            # In float32, as the forward: the operands may be of two dtypes, one too narrow for the other.
            product = mul(cast(g.dy, dtypes.float32), cast(g.x(operand), dtypes.float32))
            grads.append(reshape(cast(reduce_sum(product), s.dtype), s.shape))
        return grads


class ScaledAddInplace(ScaledAdd):
    """scaled_add's gradient rule: the gradient of a tensor scale of X reads X as it was before this op
    wrote it, which autodiff copies for it."""
    name = "scaled_add_"
    modifies = (0,)


def _scaled_add(prim, X: Tensor, Y: Tensor, a, b) -> Tensor:
    if X.shape != Y.shape or not (X.dtype.is_floating_point and Y.dtype.is_floating_point):
        raise ValueError(f"{prim.name}: X '{X.name}' {X.shape} {X.dtype.name} and Y '{Y.name}' {Y.shape} "
                         f"{Y.dtype.name} must be floating point tensors of one shape")
    scales, attrs = [], {}
    for key, v in (("a", a), ("b", b)):
        if isinstance(v, Tensor):
            if v.nelms != 1 or not v.dtype.is_floating_point:
                raise ValueError(f"{prim.name}: scale {key} '{v.name}' must be a floating point scalar, got "
                                 f"{v.shape} {v.dtype.name}")
            scales.append(v)
            attrs[key] = None
        else:
            attrs[key] = float(v)
    return prim.create(X, Y, *scales, **attrs)


def scaled_add(X: Tensor, Y: Tensor, a: Union[float, Tensor] = 1.0, b: Union[float, Tensor] = 1.0) -> Tensor:
    """``a * X + b * Y`` for same-shaped X and Y (of X's dtype, computed in float32 when they differ, as
    poplibs' mixed-precision scaled add); ``a``/``b`` are floats or scalar tensors."""
    return _scaled_add(ScaledAdd, X, Y, a, b)


def scaled_add_(X: Tensor, Y: Tensor, a: Union[float, Tensor] = 1.0, b: Union[float, Tensor] = 1.0) -> Tensor:
    """``X = a * X + b * Y`` in place."""
    return _scaled_add(ScaledAddInplace, X, Y, a, b)


# ---------------------------------------------------------------- print_tensor

_FLOAT_FORMATS = ("auto", "fixed", "scientific", "none")


class PrintTensor(Primitive):
    """Identity that writes ``title: values`` to stderr each time it runs (one line block per replica)."""
    name = "print_tensor"
    view = True

    @staticmethod
    def infer(t, title, print_self, print_gradient, fmt):
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        a = op.attrs
        if not a["print_self"]:
            return lambda x: x

        def print_tensor(x):
            for r in range(x.shape[0]):
                head = a["title"] if x.shape[0] == 1 else f"{a['title']} (replica {r})"
                print(f"{head}: {_format(x[r], **a['fmt'])}", file=sys.stderr, flush=True)
            return x
        return print_tensor

    @staticmethod
    def grad(g):
        a = g.attrs
        if not a["print_gradient"]:
            return [g.dy]
        return [PrintTensor.create(g.dy, title=f"{a['title']}_gradient", print_self=True, print_gradient=False,
                                   fmt=a["fmt"])]


def _format(x: torch.Tensor, threshold, edgeitems, linewidth, digits, float_format, separator, brackets):
    formatter = {"fixed": {"float_kind": lambda v: f"{v:.{digits}f}"},
                 "scientific": {"float_kind": lambda v: f"{v:.{digits}e}"}}.get(float_format)
    text = np.array2string(x.numpy(), max_line_width=linewidth, precision=digits, separator=separator,
                           threshold=threshold, edgeitems=edgeitems, formatter=formatter)
    return text.translate(str.maketrans({"[": brackets[0], "]": brackets[1]}))


def print_tensor(t: Tensor, title: Optional[str] = None, print_self: bool = True, print_gradient: bool = False,
                 summarise_threshold: int = 1000, edge_items: int = 3, max_line_width: int = 75, digits: int = 8,
                 float_format: str = "auto", separator: str = " ", open_bracket: str = "[",
                 close_bracket: str = "]") -> Tensor:
    """Returns ``t`` and prints it to stderr when it runs (its gradient too with ``print_gradient``).

    Arrays with more than ``summarise_threshold`` elements are summarised by ``edge_items`` per edge;
    ``float_format`` is 'auto', 'fixed', 'scientific' or 'none'. The gradient is printed as
    ``<title>_gradient``.
    """
    if float_format not in _FLOAT_FORMATS:
        raise ValueError(f"print_tensor: float_format must be one of {_FLOAT_FORMATS}, got {float_format!r}")
    fmt = {"threshold": int(summarise_threshold), "edgeitems": int(edge_items), "linewidth": int(max_line_width),
           "digits": int(digits), "float_format": float_format, "separator": separator,
           "brackets": (open_bracket, close_bracket)}
    return PrintTensor.create(t, title=f"print{t.name}" if title is None else title, print_self=bool(print_self),
                              print_gradient=bool(print_gradient), fmt=fmt)


# ---------------------------------------------------------------- device copies

class IpuCopy(Identity):
    name = "ipu_copy"


class IoTileCopy(Identity):
    name = "io_tile_copy"


def ipu_copy(t: Tensor, destination: int, source: Optional[int] = None) -> Tensor:
    """``t`` on virtual IPU ``destination`` (all IPUs share the CPU, so the values are unchanged)."""
    if source is not None and t._producer is not None and source != t.ipu:
        raise ValueError(f"ipu_copy: source {source} is not the ipu of '{t.name}' ({t.ipu})")
    with ipu(int(destination)):
        return IpuCopy.create(t)


def io_tile_copy(t: Tensor) -> Tensor:
    """``t`` copied between compute and IO tiles (placement only: the values are unchanged)."""
    return IoTileCopy.create(t)


# ---------------------------------------------------------------- cumsum, subsample

class CumSum(Primitive):
    """Inclusive cumulative sum along ``dim`` (from the end when ``reverse``)."""
    name = "cumsum"

    @staticmethod
    def infer(t, dim, reverse):
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        axis, reverse = op.attrs["dim"] + 1, op.attrs["reverse"]

        def cumsum(x):
            acc = x.float() if x.dtype == torch.float16 else x
            if reverse:
                return acc.flip(axis).cumsum(axis).flip(axis).to(x.dtype)
            return acc.cumsum(axis).to(x.dtype)
        return cumsum

    @staticmethod
    def grad(g):
        return [CumSum.create(g.dy, dim=g.attrs["dim"], reverse=not g.attrs["reverse"])]


def cumsum(t: Tensor, dim: int = 0) -> Tensor:
    """Running sum of ``t`` along ``dim``."""
    if t.rank == 0:
        raise ValueError(f"cumsum of the scalar '{t.name}': needs a tensor of rank >= 1")
    return CumSum.create(t, dim=norm_axis(dim, t, "dim"), reverse=False)


def subsample(t: Tensor, strides: Sequence[int]) -> Tensor:
    """Every ``strides[i]``-th element along each axis ``i``, starting from the first."""
    strides = [int(s) for s in strides]
    if len(strides) != t.rank or any(s < 1 for s in strides):
        raise ValueError(f"subsample of '{t.name}' {t.shape}: strides {strides} must be {t.rank} positive ints")
    return slice_op(t, step=strides)


# ---------------------------------------------------------------- statistics

class Histogram(Primitive):
    """uint32 counts of ``t`` in the ``len(levels) + 1`` bins the levels bound: below ``levels[0]``,
    each ``[levels[i-1], levels[i])``, and from ``levels[-1]`` up."""
    name = "histogram"
    unsigned = "torch"  # the kernel compares the values converted to float64, which torch does from any dtype

    @staticmethod
    def infer(t, levels, absolute_of_input):
        return spec((len(levels) + 1,), dtypes.uint32)

    @classmethod
    def lower(cls, op, runtime):
        levels, absolute = torch.tensor(op.attrs["levels"], dtype=torch.float64), op.attrs["absolute_of_input"]
        bins = len(levels) + 1

        def histogram(x):
            x = x.reshape(x.shape[0], -1).double()
            x = x.abs() if absolute else x
            which = torch.bucketize(x, levels, right=True)
            counts = torch.zeros((x.shape[0], bins), dtype=torch.int64).scatter_add_(1, which, torch.ones_like(which))
            return counts.to(torch.uint32)
        return histogram


def histogram(t: Tensor, levels: Sequence[float], absolute_of_input: bool) -> Tensor:
    """Counts of ``t``'s elements (of their absolute values with ``absolute_of_input``) between ``levels``."""
    levels = [float(v) for v in levels]
    if any(a >= b for a, b in zip(levels, levels[1:])):
        raise ValueError(f"histogram of '{t.name}': levels {levels} must be strictly increasing")
    return Histogram.create(t, levels=tuple(levels), absolute_of_input=bool(absolute_of_input))


class LambSquare(Primitive):
    """The sum of the squares of all elements, as a float32 scalar (LAMB's weight and update norms)."""
    name = "lamb_square"

    @staticmethod
    def infer(t):
        return spec((), dtypes.float32)

    @staticmethod
    def kernel(x):
        x = x.reshape(x.shape[0], -1).float()
        return (x * x).sum(1)


def lamb_square(t: Tensor) -> Tensor:
    """``sum(t ** 2)`` over all elements, accumulated and returned in float32."""
    return LambSquare.create(t)
