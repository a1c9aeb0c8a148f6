"""Elementwise ops: unary maths, broadcasting binary maths, comparisons and casts."""
import math
from typing import Callable

import torch

from .. import dtypes, kernels
from ..primitive import Primitive, spec
from ..tensor import Tensor
from ._util import (broadcast_shape, broadcast_view, check_float, check_same_dtype, scalar_like, shares_memory,
                    uint64_remainder, uint64_trunc_div, unbroadcast)

# ---------------------------------------------------------------- unary

class ElementwiseGrad(Primitive):
    """``dy * f'(x)`` for a unary primitive ``of``, computed from ``v``: the forward input ``x``, the output
    ``y`` or ``dy`` itself, whichever ``of.derivative_reads`` names (so autodiff keeps only that value).

    A primitive with a ``fused_grad(dy, x)`` (one kernel for the whole product) uses it on float32
    values; otherwise ``derivative(v)`` is built from separate torch ops.
    """
    name = "elementwise_grad"

    @staticmethod
    def infer(dy, v, of):
        return dy.spec

    @classmethod
    def lower(cls, op, runtime):
        of = op.attrs["of"]
        fused = getattr(of, "fused_grad", None)
        if fused is not None and all(t.dtype == dtypes.float32 for t in op.inputs):
            return fused
        derivative = of.derivative
        return lambda dy, v: dy * derivative(v).to(dy.dtype)


def _unary_grad(g):
    reads = g.op.prim.derivative_reads
    v = g.x(0) if reads == "x" else g.y(0) if reads == "y" else g.dy
    return [ElementwiseGrad.create(g.dy, v, of=g.op.prim)]


def _unary(name: str, fn: Callable, derivative: Callable = None, reads: str = "x", floating: bool = True,
           out_dtype=None, fused_grad: Callable = None, lower_out: Callable = None, unsigned: str = "bits"):
    """Defines a unary primitive; ``derivative(v)`` (torch) gives its gradient rule from ``v``, which
    ``reads`` names: the input ``"x"``, the output ``"y"``, or ``"dy"`` where only its shape matters.
    ``fused_grad(dy, x)`` optionally gives the same ``dy * f'(x)`` as one kernel, and
    ``lower_out(op, runtime)`` optionally the primitive's ``lower_out``; ``unsigned`` is
    ``Primitive.unsigned``."""
    attrs = {
        "name": name,
        "unsigned": unsigned,
        "infer": staticmethod(lambda t: _unary_infer(t, name, floating, out_dtype)),
        "kernel": staticmethod(fn),
    }
    if lower_out is not None:
        attrs["lower_out"] = classmethod(lambda cls, op, runtime: lower_out(op, runtime))
    if derivative is not None:
        attrs["derivative"] = staticmethod(derivative)
        attrs["derivative_reads"] = reads
        attrs["grad"] = staticmethod(_unary_grad)
    if fused_grad is not None:
        attrs["fused_grad"] = staticmethod(fused_grad)
    return type(name.title().replace("_", ""), (Primitive,), attrs)


def _unary_infer(t, name, floating, out_dtype):
    if floating:
        check_float(t, name)
    return spec(t.shape, out_dtype or t.dtype)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# Fewest float32 elements from which the runtime's C++ kernels beat torch's (measured, 2 threads: 6.0 against
# 4.8 us at 1024 elements, 13 against 44 us at 16384).
_NATIVE_GELU_FROM = 1 << 11


def _gelu_tanh(x):
    """``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))``: the runtime's one-pass C++ kernel for float32,
    torch's for small tensors and other dtypes."""
    if x.dtype != torch.float32 or x.numel() < _NATIVE_GELU_FROM:
        return torch.nn.functional.gelu(x, approximate="tanh")
    return kernels.gelu_tanh(x)


def _gelu_tanh_lower_out(op, runtime):
    """The C++ kernel, which writes into given memory, where it is the one ``_gelu_tanh`` would run."""
    x = op.inputs[0]
    if x.dtype != dtypes.float32 or runtime.replicas * math.prod(x.shape) < _NATIVE_GELU_FROM:
        return None
    return kernels.gelu_tanh


def _gelu_tanh_grad(dy, x):
    """``dy * gelu_tanh'(x)`` of float32 values in one kernel: the runtime's, or torch's for small tensors."""
    if x.numel() < _NATIVE_GELU_FROM:
        return torch.ops.aten.gelu_backward(dy, x, approximate="tanh")
    return kernels.gelu_tanh_grad(dy, x)


def _gelu_tanh_derivative(x):
    x = x.float()
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
    th = torch.tanh(inner)
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)


def _gelu_erf_derivative(x):
    x = x.float()
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _swish_derivative(x):
    s = torch.sigmoid(x.float())
    return s * (1 + x.float() * (1 - s))


Negate = _unary("negate", torch.neg, lambda dy: torch.full_like(dy, -1), reads="dy", floating=False)
Sqrt = _unary("sqrt", torch.sqrt, lambda y: 0.5 / y, reads="y")
Exp = _unary("exp", torch.exp, lambda y: y, reads="y")
Log = _unary("log", torch.log, lambda x: 1 / x)
Log2 = _unary("log2", torch.log2, lambda x: 1 / (x * math.log(2.0)))
Tanh = _unary("tanh", torch.tanh, lambda y: 1 - y * y, reads="y")
Sin = _unary("sin", torch.sin, torch.cos)
Cos = _unary("cos", torch.cos, lambda x: -torch.sin(x))
_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def _sign(x):
    # torch has no sign of uint16/32/64 (the runtime hands them over as they are: unsigned="torch").
    return (x != 0).to(x.dtype) if x.dtype in _UNSIGNED else torch.sign(x)


def _as_is_when_unsigned(fn):
    """``fn``, for a function that leaves non-negative values as they are (abs, relu)."""
    return lambda x: x.clone() if x.dtype in _UNSIGNED else fn(x)


Abs = _unary("abs", _as_is_when_unsigned(torch.abs), torch.sign, floating=False, unsigned="torch")
# From the output: a relu's output is what the next op reads anyway, so autodiff keeps one value, not two.
Relu = _unary("relu", _as_is_when_unsigned(torch.relu), lambda y: (y > 0).to(y.dtype), reads="y", floating=False,
              unsigned="torch")
Gelu = _unary("gelu", _gelu_tanh, _gelu_tanh_derivative, fused_grad=_gelu_tanh_grad,
              lower_out=_gelu_tanh_lower_out)
Geluerf = _unary("geluerf", torch.nn.functional.gelu, _gelu_erf_derivative,
                 fused_grad=lambda dy, x: torch.ops.aten.gelu_backward(dy, x, approximate="none"))
Swish = _unary("swish", torch.nn.functional.silu, _swish_derivative, fused_grad=torch.ops.aten.silu_backward)
Sign = _unary("sign", _sign, torch.zeros_like, reads="dy", floating=False, unsigned="torch")
Floor = _unary("floor", torch.floor, torch.zeros_like, reads="dy")
Ceil = _unary("ceil", torch.ceil, torch.zeros_like, reads="dy")
LogicalNot = _unary("logical_not", torch.logical_not, floating=False, out_dtype=dtypes.bool_)
Isnan = _unary("isnan", torch.isnan, floating=False, out_dtype=dtypes.bool_)
Isinf = _unary("isinf", torch.isinf, floating=False, out_dtype=dtypes.bool_)
Isfinite = _unary("isfinite", torch.isfinite, floating=False, out_dtype=dtypes.bool_)


def _inplace(prim):
    """The in-place twin of a unary primitive: writes its input (never given memory of its own)."""
    return type(prim.__name__ + "Inplace", (prim,), {
        "name": prim.name + "_", "modifies": (0,), "grad": None,
        "kernel": staticmethod(lambda x, _f=prim.kernel: x.copy_(_f(x))),
        "lower_out": classmethod(lambda cls, op, runtime: None),
    })


ExpInplace, ReluInplace, GeluInplace, GeluerfInplace, SwishInplace = map(_inplace, (Exp, Relu, Gelu, Geluerf, Swish))


def negate(t: Tensor) -> Tensor:
    return Negate.create(t)


def sqrt(t: Tensor) -> Tensor:
    return Sqrt.create(t)


def exp(t: Tensor) -> Tensor:
    return Exp.create(t)


def exp_(t: Tensor) -> Tensor:
    return ExpInplace.create(t)


def log(t: Tensor) -> Tensor:
    return Log.create(t)


def log2(t: Tensor) -> Tensor:
    return Log2.create(t)


def tanh(t: Tensor) -> Tensor:
    return Tanh.create(t)


def sin(t: Tensor) -> Tensor:
    return Sin.create(t)


def cos(t: Tensor) -> Tensor:
    return Cos.create(t)


def abs(t: Tensor) -> Tensor:  # noqa: A001 - popxl's name
    return Abs.create(t)


def relu(t: Tensor) -> Tensor:
    return Relu.create(t)


def relu_(t: Tensor) -> Tensor:
    return ReluInplace.create(t)


def gelu(t: Tensor) -> Tensor:
    """GELU with the tanh approximation, as popxl's ``gelu``."""
    return Gelu.create(t)


def gelu_(t: Tensor) -> Tensor:
    return GeluInplace.create(t)


def geluerf(t: Tensor) -> Tensor:
    """Exact GELU, ``x * Phi(x)``."""
    return Geluerf.create(t)


def geluerf_(t: Tensor) -> Tensor:
    return GeluerfInplace.create(t)


def swish(t: Tensor) -> Tensor:
    return Swish.create(t)


def swish_(t: Tensor) -> Tensor:
    return SwishInplace.create(t)


def sign(t: Tensor) -> Tensor:
    return Sign.create(t)


def floor(t: Tensor) -> Tensor:
    return Floor.create(t)


def ceil(t: Tensor) -> Tensor:
    return Ceil.create(t)


def logical_not(t: Tensor) -> Tensor:
    """Elementwise ``not t``; the input is cast to bool."""
    return LogicalNot.create(as_bool(t))


def isnan(t: Tensor) -> Tensor:
    return Isnan.create(t)


def isinf(t: Tensor) -> Tensor:
    return Isinf.create(t)


def isfinite(t: Tensor) -> Tensor:
    return Isfinite.create(t)


# ---------------------------------------------------------------- binary

class Binary(Primitive):
    """Broadcasting binary op; subclasses set ``fn`` (torch) and a gradient rule, and ``uint64_fn`` where
    ``fn`` would read uint64 values from 2**63 up, given as int64 bits, as negative."""
    fn = None
    uint64_fn = None
    out_dtype = None

    @classmethod
    def infer(cls, a, b):
        check_same_dtype(a, b)
        return spec(broadcast_shape(a.shape, b.shape), cls.out_dtype or a.dtype)

    @classmethod
    def lower(cls, op, runtime):
        a, b = op.inputs
        rank, fn = op.outputs[0].rank, cls.fn
        if a.dtype == dtypes.uint64 and cls.uint64_fn is not None:
            fn = cls.uint64_fn
        sa = broadcast_view(a.shape, rank, runtime.replicas)
        sb = broadcast_view(b.shape, rank, runtime.replicas)
        if sa is None and sb is None:
            return fn
        if sa is None:  # only the operand that needs a view takes one (a reshape per run is not free)
            return lambda x, y: fn(x, y.reshape(sb))
        if sb is None:
            return lambda x, y: fn(x.reshape(sa), y)
        return lambda x, y: fn(x.reshape(sa), y.reshape(sb))


def _binary(name, fn, grad=None, out_dtype=None, unsigned="bits", uint64_fn=None):
    return type(name.title().replace("_", ""), (Binary,), {
        "name": name, "fn": staticmethod(fn), "out_dtype": out_dtype, "unsigned": unsigned,
        "uint64_fn": staticmethod(uint64_fn) if uint64_fn else None,
        "grad": staticmethod(grad) if grad else None})


def _grads(g, da, db):
    """Reduces broadcast gradients back to each input's shape, skipping unwanted ones."""
    return [unbroadcast(da(), g.in_spec(0).shape) if g.needs(0) else None,
            unbroadcast(db(), g.in_spec(1).shape) if g.needs(1) else None]


Add = _binary("add", torch.add, lambda g: _grads(g, lambda: g.dy, lambda: g.dy))
Sub = _binary("sub", torch.sub, lambda g: _grads(g, lambda: g.dy, lambda: negate(g.dy)))
Mul = _binary("mul", torch.mul, lambda g: _grads(g, lambda: mul(g.dy, g.x(1)), lambda: mul(g.dy, g.x(0))))
Div = _binary("div", lambda a, b: torch.div(a, b) if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
              lambda g: _grads(g, lambda: div(g.dy, g.x(1)), lambda: negate(div(mul(g.dy, g.y(0)), g.x(1)))),
              uint64_fn=uint64_trunc_div)
Pow = _binary("pow", torch.pow, lambda g: _grads(
    g, lambda: mul(g.dy, mul(g.x(1), pow(g.x(0), sub(g.x(1), scalar_like(1, g.x(1)))))),
    lambda: mul(g.dy, mul(g.y(0), log(g.x(0))))))
Fmod = _binary("fmod", torch.fmod, lambda g: _grads(
    g, lambda: g.dy, lambda: negate(mul(g.dy, _trunc_div(g.x(0), g.x(1))))), uint64_fn=uint64_remainder)
Maximum = _binary("maximum", torch.maximum, lambda g: _grads(
    g, lambda: where_result(g.dy, g.x(0), g.y(0)), lambda: where_result(g.dy, g.x(1), g.y(0))), unsigned="order")
Equal = _binary("equal", torch.eq, out_dtype=dtypes.bool_)
Greater = _binary("greater", torch.gt, out_dtype=dtypes.bool_, unsigned="order")
LogicalAnd = _binary("logical_and", torch.logical_and, out_dtype=dtypes.bool_)
LogicalOr = _binary("logical_or", torch.logical_or, out_dtype=dtypes.bool_)
TruncDiv = _binary("trunc_div", lambda a, b: torch.trunc(a / b))


def where_result(dy: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``dy`` where ``x`` equals the result ``y`` of a max or min, else 0: as PopART, every tied input
    gets the whole gradient."""
    return mul(dy, cast(equal(x, y), dy.dtype))


def _trunc_div(a, b):
    return TruncDiv.create(a, b)


class AddInplace(Binary):
    name = "add_"
    modifies = (0,)
    grad = staticmethod(Add.grad)  # reads no forward value, so the write loses it nothing

    @classmethod
    def infer(cls, a, b):
        check_same_dtype(a, b)
        if broadcast_shape(a.shape, b.shape) != a.shape:
            raise ValueError(f"add_ writes its lhs, so rhs {b.shape} must broadcast to lhs {a.shape}")
        return a.spec

    @classmethod
    def lower(cls, op, runtime):
        a, b = op.inputs
        sb = broadcast_view(b.shape, a.rank, runtime.replicas)

        def add_inplace(x, y):
            y = y if sb is None else y.reshape(sb)
            # y may be x's memory seen another way (x a transpose of y): torch refuses to read what it writes.
            return x.add_(y.clone() if shares_memory(x, y) else y)
        return add_inplace


def _pair(lhs, rhs):
    if not isinstance(lhs, Tensor) and isinstance(rhs, Tensor):
        lhs = scalar_like(lhs, rhs)
    return lhs, scalar_like(rhs, lhs)


def add(lhs: Tensor, rhs: Tensor) -> Tensor:
    return Add.create(*_pair(lhs, rhs))


def add_(lhs: Tensor, rhs: Tensor) -> Tensor:
    return AddInplace.create(*_pair(lhs, rhs))


def sub(lhs: Tensor, rhs: Tensor) -> Tensor:
    return Sub.create(*_pair(lhs, rhs))


def mul(lhs: Tensor, rhs: Tensor) -> Tensor:
    return Mul.create(*_pair(lhs, rhs))


def div(lhs: Tensor, rhs: Tensor) -> Tensor:
    return Div.create(*_pair(lhs, rhs))


def pow(t: Tensor, e) -> Tensor:  # noqa: A001 - popxl's name
    return Pow.create(*_pair(t, e))


def fmod(lhs: Tensor, rhs: Tensor) -> Tensor:
    return Fmod.create(*_pair(lhs, rhs))


def maximum(*ts: Tensor) -> Tensor:
    """Elementwise maximum of one or more tensors (of one: a copy)."""
    if not ts:
        raise ValueError("maximum needs at least one tensor")
    if len(ts) == 1:
        return identity(ts[0])
    out = ts[0]
    for t in ts[1:]:
        out = Maximum.create(*_pair(out, t))
    return out


def equal(lhs: Tensor, rhs: Tensor) -> Tensor:
    return Equal.create(*_pair(lhs, rhs))


def greater(input: Tensor, other: Tensor) -> Tensor:  # noqa: A002 - popxl's name
    return Greater.create(*_pair(input, other))


def as_bool(t: Tensor) -> Tensor:
    """``t`` cast to bool unless it is bool already (as popxl's logical ops and ``where`` do)."""
    return t if t.dtype == dtypes.bool_ else cast(t, dtypes.bool_)


def logical_and(lhs: Tensor, rhs: Tensor) -> Tensor:
    """Elementwise ``lhs and rhs``; inputs are cast to bool."""
    return LogicalAnd.create(*map(as_bool, _pair(lhs, rhs)))


def logical_or(lhs: Tensor, rhs: Tensor) -> Tensor:
    """Elementwise ``lhs or rhs``; inputs are cast to bool."""
    return LogicalOr.create(*map(as_bool, _pair(lhs, rhs)))


# ---------------------------------------------------------------- casts and identities

class Cast(Primitive):
    name = "cast"
    unsigned = "torch"  # torch converts unsigned values exactly

    @staticmethod
    def infer(t, data_type):
        return spec(t.shape, data_type)

    @staticmethod
    def kernel(t, data_type):
        # A copy even to the same dtype: the output must never be the input itself.
        return t.to(data_type.as_torch(), copy=True)

    @staticmethod
    def grad(g):
        if not g.in_spec(0).dtype.is_floating_point:
            return [None]
        return [cast(g.dy, g.in_spec(0).dtype)]


def cast(t: Tensor, data_type) -> Tensor:
    data_type = dtypes.dtype.as_dtype(data_type)
    if not isinstance(t, Tensor):
        raise TypeError(f"cast expects a Tensor, got {type(t).__name__}")
    return Cast.create(t, data_type=data_type)


class Identity(Primitive):
    name = "identity"
    view = True

    @staticmethod
    def infer(t):
        return t.spec

    @staticmethod
    def kernel(t):
        return t

    @staticmethod
    def grad(g):
        return [g.dy]


class Detach(Identity):
    name = "detach"

    @staticmethod
    def grad(g):
        return [None]


class DetachInplace(Detach):
    name = "detach_"
    view = False
    alias = True


def identity(t: Tensor, output_name=None) -> Tensor:
    return Identity.create(t, name=output_name)


def detach(t: Tensor) -> Tensor:
    """``t`` with no gradient flowing back through it."""
    return Detach.create(t)


def detach_(t: Tensor) -> Tensor:
    return DetachInplace.create(t)
