"""Reductions over axes."""
import builtins

import torch

from .. import dtypes
from ..primitive import Primitive, spec
from ..tensor import Tensor
from ._util import norm_axes, norm_axis, unbroadcast


def _reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


class Reduce(Primitive):
    """Reduction over ``axes`` (already normalised); values carry the replica axis, hence ``+1``.
    ``of_each`` is the reduction of a single element (over no axes: a rank-0 input, or ``axis=[]``)."""
    fn = None
    of_each = staticmethod(torch.clone)

    @classmethod
    def infer(cls, t, axes, keepdims):
        return spec(_reduced_shape(t.shape, axes, keepdims), t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        axes, keepdims, fn = tuple(a + 1 for a in op.attrs["axes"]), op.attrs["keepdims"], cls.fn
        if not axes:
            return lambda x: cls.of_each(x).to(x.dtype)
        # torch sums and multiplies integers in int64; the result keeps the input's dtype, wrapping
        # around on overflow as the IPU does.
        return lambda x: fn(x, axes, keepdims).to(x.dtype)


class Expand(Primitive):
    """``t`` broadcast to ``shape`` as a view (no copy; the runtime copies if something writes it).
    Gradient rules use it to spread a reduced value back over the reduced axes."""
    name = "expand"
    view = True

    @staticmethod
    def infer(t, shape):
        return spec(shape, t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        shape = (runtime.replicas,) + tuple(op.attrs["shape"])
        return lambda x: x.expand(shape)

    @staticmethod
    def grad(g):
        return [unbroadcast(g.dy, g.in_spec(0).shape)]


def _expand_back(g, v):
    """A reduced value (the gradient or a forward output), reshaped with kept axes and broadcast to the
    input shape."""
    from .shape import reshape
    shape = g.in_spec(0).shape
    kept = _reduced_shape(shape, g.attrs["axes"], True)
    v = reshape(v, kept) if v.shape != kept else v
    return Expand.create(v, shape=shape) if kept != shape else v


class ReduceSum(Reduce):
    name = "sum"
    fn = staticmethod(lambda x, axes, keepdims: torch.sum(x, axes, keepdim=keepdims))

    @staticmethod
    def grad(g):
        return [_expand_back(g, g.dy)]


class ReduceMean(Reduce):
    name = "mean"
    fn = staticmethod(lambda x, axes, keepdims: torch.mean(x, axes, keepdim=keepdims))

    @classmethod
    def infer(cls, t, axes, keepdims):
        if not t.dtype.is_floating_point:  # how PopART rounds an integer mean is not documented
            raise TypeError(f"mean of '{t.name}' {t.dtype.name}: needs a floating point tensor; cast it first")
        return super().infer(t, axes, keepdims)

    @staticmethod
    def grad(g):
        from .elementwise import mul
        from ..tensor import constant
        count = 1
        for a in g.attrs["axes"]:
            count *= g.in_spec(0).shape[a]
        # An empty reduction has an empty gradient: any scale does, but not a division by zero.
        return [_expand_back(g, mul(g.dy, constant(1.0 / builtins.max(count, 1), g.dy.dtype)))]


class ReduceMax(Reduce):
    name = "max"
    unsigned = "order"
    fn = staticmethod(lambda x, axes, keepdims: torch.amax(x, axes, keepdim=keepdims))

    @staticmethod
    def grad(g):
        from .elementwise import where_result
        return [where_result(_expand_back(g, g.dy), g.x(0), _expand_back(g, g.y(0)))]


class ReduceMin(ReduceMax):
    name = "min"
    fn = staticmethod(lambda x, axes, keepdims: torch.amin(x, axes, keepdim=keepdims))


class ReduceProd(Reduce):
    name = "prod"

    @staticmethod
    def fn(x, axes, keepdims):
        for a in sorted(axes, reverse=True):
            x = torch.prod(x, a, keepdim=keepdims)
        return x

    @staticmethod
    def grad(g):
        dy = _expand_back(g, g.dy)
        return [ProdGrad.create(dy, g.x(0), axes=g.attrs["axes"])]


class ProdGrad(Primitive):
    """``dy`` times the product of the other elements of each element's reduction: exact where the
    input holds zeros, where ``dy * prod / x`` gives NaN."""
    name = "prod_grad"

    @staticmethod
    def infer(dy, x, axes):
        return x.spec

    @classmethod
    def lower(cls, op, runtime):
        axes = tuple(a + 1 for a in op.attrs["axes"])

        def prod_grad(dy, x):
            # torch's product gradient treats zeros exactly (by products of the elements before and after).
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                product = ReduceProd.fn(leaf, axes, True)
                (dx,) = torch.autograd.grad(product, leaf, product.new_ones(product.shape))
            return dy * dx
        return prod_grad


def _squares(x):
    """``x * x``, half-precision values squared in float32: squares of small float16 values (a gradient's
    1e-4s) would round to 0 before the sum; the reduction's result is rounded once."""
    return torch.square(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)


class ReduceSumSquare(Reduce):
    name = "sumsquare"
    of_each = staticmethod(lambda x: x * x)

    @staticmethod
    def fn(x, axes, keepdims):
        if keepdims or sorted(axes) != list(range(1, x.dim())) or x.dtype not in (torch.float32, torch.float64):
            return torch.sum(_squares(x), axes, keepdim=keepdims)
        # A whole replica's tensor (e.g. a gradient, for its norm): a dot product with itself makes no
        # tensor of all the squares (and sums more accurately than the norm kernel).
        return torch.stack([torch.dot(row, row) for row in x.reshape(x.shape[0], -1)])

    @staticmethod
    def grad(g):
        from .elementwise import mul
        from ..tensor import constant
        return [mul(_expand_back(g, g.dy), mul(g.x(0), constant(2.0, g.dy.dtype)))]


class ReduceLogSumExp(Reduce):
    name = "logsumexp"
    fn = staticmethod(lambda x, axes, keepdims: torch.logsumexp(x, axes, keepdim=keepdims))

    @staticmethod
    def grad(g):
        from .elementwise import exp, mul, sub
        return [mul(_expand_back(g, g.dy), exp(sub(g.x(0), _expand_back(g, g.y(0)))))]


class ReduceL1(Reduce):
    name = "l1"
    of_each = staticmethod(torch.abs)
    fn = staticmethod(lambda x, axes, keepdims: torch.sum(torch.abs(x), axes, keepdim=keepdims))

    @staticmethod
    def grad(g):
        from .elementwise import mul, sign
        return [mul(_expand_back(g, g.dy), sign(g.x(0)))]


class ReduceL2(Reduce):
    name = "l2"
    of_each = staticmethod(torch.abs)
    fn = staticmethod(lambda x, axes, keepdims: torch.sqrt(torch.sum(_squares(x), axes, keepdim=keepdims)))

    @staticmethod
    def grad(g):
        from .elementwise import div, mul
        return [div(mul(_expand_back(g, g.dy), g.x(0)), _expand_back(g, g.y(0)))]


class ReduceLogSum(Reduce):
    name = "logsum"
    of_each = staticmethod(torch.log)
    fn = staticmethod(lambda x, axes, keepdims: torch.log(torch.sum(x, axes, keepdim=keepdims)))

    @staticmethod
    def grad(g):
        from .elementwise import exp, div
        return [div(_expand_back(g, g.dy), _expand_back(g, exp(g.y(0))))]


def _reduce(prim, t: Tensor, axis, keepdims) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{prim.name} expects a Tensor, got {type(t).__name__}")
    return prim.create(t, axes=norm_axes(axis, t), keepdims=bool(keepdims))


def sum(t: Tensor, axis=None, keepdims=False) -> Tensor:  # noqa: A001 - popxl's name
    """Sum over ``axis`` (an int, a list of ints, or None for all axes)."""
    return _reduce(ReduceSum, t, axis, keepdims)


def mean(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceMean, t, axis, keepdims)


def max(t: Tensor, axis=None, keepdims=False) -> Tensor:  # noqa: A001 - popxl's name
    return _reduce(ReduceMax, t, axis, keepdims)


def min(t: Tensor, axis=None, keepdims=False) -> Tensor:  # noqa: A001 - popxl's name
    return _reduce(ReduceMin, t, axis, keepdims)


def prod(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceProd, t, axis, keepdims)


def sumsquare(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceSumSquare, t, axis, keepdims)


def logsumexp(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceLogSumExp, t, axis, keepdims)


def logsum(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceLogSum, t, axis, keepdims)


def l1(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceL1, t, axis, keepdims)


def l2(t: Tensor, axis=None, keepdims=False) -> Tensor:
    return _reduce(ReduceL2, t, axis, keepdims)


class ArgMax(Primitive):
    name = "argmax"
    unsigned = "order"
    fn = staticmethod(torch.argmax)

    @staticmethod
    def infer(t, dim, keepdim):
        shape = list(t.shape)
        if keepdim:
            shape[dim] = 1
        else:
            del shape[dim]
        return spec(shape, dtypes.int32)

    @classmethod
    def lower(cls, op, runtime):
        dim, keepdim, fn = op.attrs["dim"] + 1, op.attrs["keepdim"], cls.fn
        return lambda x: fn(x, dim, keepdim).to(torch.int32)


class ArgMin(ArgMax):
    name = "argmin"
    fn = staticmethod(torch.argmin)


def argmax(t: Tensor, dim: int = 0, keepdim: bool = False) -> Tensor:
    """Index (int32) of the largest value along ``dim``."""
    return ArgMax.create(t, dim=norm_axis(dim, t, "dim"), keepdim=bool(keepdim))


def argmin(t: Tensor, dim: int = 0, keepdim: bool = False) -> Tensor:
    return ArgMin.create(t, dim=norm_axis(dim, t, "dim"), keepdim=bool(keepdim))
