"""Index ops: ``gather`` (numpy.take), ``scatter`` (ONNX ScatterElements), ``onehot`` and ``topk``.

Out-of-range gather indices: with ``zero_OOR=True`` they give zeros (popxl's contract); with
``zero_OOR=False`` popxl leaves the result undefined, and here they are clamped into
``[0, size - 1]`` so results are deterministic (negative indices therefore read row 0, not the
last row as numpy would). Gradients follow the same rule: clamped indices receive their rows'
gradient, zeroed ones receive nothing. Scatter and onehot read indices as PopART does, as unsigned: one
outside ``[0, size)``, negative ones included, writes nothing (ONNX would count negatives from the end).
"""
import torch

from .. import allocation, dtypes
from ..primitive import Primitive, spec
from ..tensor import Constant, Tensor
from ._util import norm_axis

__all__ = ["gather", "tied_gather", "scatter", "onehot", "topk"]


def _check_indices(indices: Tensor, what: str) -> None:
    if not indices.dtype.is_int:
        raise TypeError(f"{what} indices '{indices.name}' must have an integer dtype, got {indices.dtype.name}")


class _Take:
    """numpy.take along ``axis`` for runtime values with a leading replica axis.

    The gathered axis is moved next to the replica axis, rows are picked per replica, and the
    index axes are moved back to where ``axis`` was.
    """

    def __init__(self, in_shape, index_shape, axis: int, zero_oor: bool):
        self.size = in_shape[axis]
        self.axis = axis
        self.zero_oor = zero_oor
        self.index_shape = tuple(index_shape)
        self.rest = tuple(in_shape[:axis]) + tuple(in_shape[axis + 1:])
        k, pre = len(index_shape), axis
        # (R, *index, *pre, *post) -> (R, *pre, *index, *post)
        self.perm = ((0,) + tuple(1 + k + i for i in range(pre)) + tuple(1 + i for i in range(k))
                     + tuple(1 + k + pre + i for i in range(len(self.rest) - pre)))
        self.inverse = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))

    def rows(self, indices: torch.Tensor):
        """Per-replica row numbers ``(R, n)`` (int32 or int64) and, with zero_OOR, which of them are in
        range."""
        idx = indices.reshape(indices.shape[0], -1)
        if idx.dtype != torch.int32:  # index_select takes int32 or int64; the lookup runs every decode step
            idx = idx.long()
        valid = (idx >= 0) & (idx < self.size) if self.zero_oor else None
        return idx.clamp(0, self.size - 1), valid

    def _mask(self, values, valid):
        if valid is None:
            return values
        keep = valid.reshape(valid.shape + (1,) * (values.dim() - 2))
        return torch.where(keep, values, 0)

    def take(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        r = x.shape[0]
        idx, valid = self.rows(indices)
        source = x.movedim(self.axis + 1, 1)
        if r == 1:  # index_select is several times faster than advanced indexing on large tables
            picked = torch.index_select(source[0], 0, idx[0]).unsqueeze(0)
        else:
            picked = source[torch.arange(r).unsqueeze(1), idx.long()]
        picked = self._mask(picked, valid)
        return picked.reshape((r,) + self.index_shape + self.rest).permute(self.perm)

    def scatter_add(self, dy: torch.Tensor, indices: torch.Tensor, out=None) -> torch.Tensor:
        """``out``, when given, is written: (R, size, *rest) of dy's dtype (float32 or wider)."""
        r = dy.shape[0]
        idx, valid = self.rows(indices)
        acc = torch.float32 if dy.dtype == torch.float16 else dy.dtype
        rows = dy.permute(self.inverse).reshape((r, idx.shape[1]) + self.rest).to(acc)
        out = allocation.zeros((r, self.size) + self.rest, acc) if out is None else out.zero_()
        idx = idx.long()
        out.index_put_((torch.arange(r).unsqueeze(1).expand_as(idx), idx), self._mask(rows, valid), accumulate=True)
        return out.movedim(1, self.axis + 1).to(dy.dtype)


class Gather(Primitive):
    name = "gather"

    @staticmethod
    def infer(t, indices, axis, zero_OOR):
        return spec(t.shape[:axis] + indices.shape + t.shape[axis + 1:], t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        t, indices = op.inputs
        return _Take(t.shape, indices.shape, op.attrs["axis"], op.attrs["zero_OOR"]).take

    @staticmethod
    def grad(g):
        return [GatherGrad.create(g.dy, g.x(1), in_shape=g.in_spec(0).shape, axis=g.attrs["axis"],
                                  zero_OOR=g.attrs["zero_OOR"]), None]


class TiedGather(Gather):
    name = "tied_gather"


class GatherGrad(Primitive):
    """Scatter-adds a gather's output gradient into zeros shaped like the gathered tensor."""
    name = "gather_grad"

    @staticmethod
    def infer(dy, indices, in_shape, axis, zero_OOR):
        return spec(in_shape, dy.dtype)

    @classmethod
    def lower(cls, op, runtime):
        a = op.attrs
        return _Take(a["in_shape"], op.inputs[1].shape, a["axis"], a["zero_OOR"]).scatter_add

    @classmethod
    def lower_out(cls, op, runtime):
        # Zeroing memory written before (a table's gradient, run after run) is far cheaper than
        # faulting fresh pages in.
        if op.attrs["axis"] != 0 or op.inputs[0].dtype == dtypes.float16:
            return None
        return cls.lower(op, runtime)


def _gather(prim, t: Tensor, indices: Tensor, axis: int, zero_OOR: bool) -> Tensor:
    _check_indices(indices, prim.name)
    if t.rank == 0:
        raise ValueError(f"{prim.name} of the scalar '{t.name}': needs a tensor of rank >= 1")
    axis = norm_axis(axis, t)
    if t.shape[axis] == 0:
        raise ValueError(f"{prim.name} along axis {axis} of '{t.name}' {t.shape}: the axis is empty")
    return prim.create(t, indices, axis=axis, zero_OOR=bool(zero_OOR))


def gather(t: Tensor, indices: Tensor, axis: int = 0, available_memory_proportion=None,
           zero_OOR: bool = False) -> Tensor:
    """``numpy.take(t, indices, axis)``: shape ``t.shape[:axis] + indices.shape + t.shape[axis+1:]``.

    Out-of-range indices give zeros with ``zero_OOR``, else are clamped into range (see module doc).
    """
    return _gather(Gather, t, indices, axis, zero_OOR)


def tied_gather(t: Tensor, indices: Tensor, axis: int = 0, available_memory_proportion=None,
                zero_OOR: bool = False) -> Tensor:
    """Numerically :func:`gather` (popxl's variant differs only in tile layout)."""
    return _gather(TiedGather, t, indices, axis, zero_OOR)


# ---------------------------------------------------------------- scatter

def _with_spare_slot(x: torch.Tensor, axis: int, indices: torch.Tensor):
    """``x`` with one zero slot appended along ``axis``, and ``indices`` with out-of-range ones sent there."""
    n = x.shape[axis]
    idx = indices.long()
    idx = torch.where((idx >= 0) & (idx < n), idx, n)
    return torch.cat([x, torch.zeros_like(x.narrow(axis, 0, 1))], axis), idx


class Scatter(Primitive):
    """ONNX ScatterElements: a copy of ``t`` with ``t[..., indices[p], ...] = values[p]`` along ``axis``."""
    name = "scatter"

    @staticmethod
    def infer(t, indices, values, axis):
        _check_indices(indices, "scatter")
        if not (t.rank == indices.rank and indices.shape == values.shape) or values.dtype != t.dtype:
            raise ValueError(f"indices '{indices.name}' {indices.shape} and values '{values.name}' {values.shape} "
                             f"{values.dtype.name} must share one shape of rank {t.rank}, values of dtype "
                             f"{t.dtype.name}")
        if any(n > size for d, (n, size) in enumerate(zip(indices.shape, t.shape)) if d != axis):
            raise ValueError(f"indices '{indices.name}' {indices.shape} may not be larger than '{t.name}' {t.shape} "
                             f"off the scatter axis {axis}")
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        axis = op.attrs["axis"] + 1

        def scatter(x, indices, values):
            idx = indices.long()
            if bool(((idx >= 0) & (idx < x.shape[axis])).all()):  # no spare slot needed: one copy, contiguous
                return x.clone().scatter_(axis, idx, values)
            padded, idx = _with_spare_slot(x, axis, indices)
            return padded.scatter_(axis, idx, values).narrow(axis, 0, x.shape[axis])
        return scatter

    @staticmethod
    def grad(g):
        return [ScatterGrad.create(g.dy, g.x(1), axis=g.attrs["axis"]), None,
                GatherElements.create(g.dy, g.x(1), axis=g.attrs["axis"])]


class ScatterGrad(Primitive):
    """The gradient for ``t``: ``dy`` with the overwritten positions zeroed."""
    name = "scatter_grad"

    @staticmethod
    def infer(dy, indices, axis):
        return dy.spec

    @classmethod
    def lower(cls, op, runtime):
        scatter = Scatter.lower(op, runtime)
        return lambda dy, indices: scatter(dy, indices, torch.zeros((), dtype=dy.dtype).expand(indices.shape))


class GatherElements(Primitive):
    """``t[..., indices[p], ...]`` along ``axis`` at every position ``p`` of ``indices`` (0 where out of range)."""
    name = "gather_elements"

    @staticmethod
    def infer(t, indices, axis):
        return spec(indices.shape, t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        axis = op.attrs["axis"] + 1

        def gather_elements(x, indices):
            padded, idx = _with_spare_slot(x, axis, indices)
            return torch.gather(padded, axis, idx)
        return gather_elements


def scatter(t: Tensor, indices: Tensor, values: Tensor, axis: int = 0, available_memory_proportion=None) -> Tensor:
    """A copy of ``t`` with ``values`` written at ``indices`` along ``axis`` (ONNX ScatterElements);
    ``indices``, ``values`` and ``t`` have the same rank, ``indices`` and ``values`` the same shape."""
    return Scatter.create(t, indices, values, axis=norm_axis(axis, t))


# ---------------------------------------------------------------- onehot

def _hot(indices: torch.Tensor, depth: int, axis: int) -> torch.Tensor:
    """Boolean one-hot of ``indices``; one outside ``[0, depth)``, negative ones included, is all off (as
    popops' encodeOneHot, which reads indices as unsigned; ONNX would count negatives from the end)."""
    hot = indices.long().unsqueeze(-1) == torch.arange(depth)
    return hot.movedim(-1, axis + 1)


class OneHot(Primitive):
    """ONNX OneHot: ``values[1]`` at each index's class, ``values[0]`` elsewhere, new axis at ``axis``."""
    name = "onehot"

    @staticmethod
    def infer(t, values, num_classes, axis):
        shape = list(t.shape)
        shape.insert(axis, num_classes)
        return spec(shape, values.dtype)

    @classmethod
    def lower(cls, op, runtime):
        depth, axis = op.attrs["num_classes"], op.attrs["axis"]
        rank = op.outputs[0].rank

        def onehot(indices, values):
            off, on = (v.reshape((-1,) + (1,) * rank) for v in values.unbind(1))
            return torch.where(_hot(indices, depth, axis), on, off)
        return onehot

    @staticmethod
    def grad(g):
        return [None, OneHotGrad.create(g.dy, g.x(0), num_classes=g.attrs["num_classes"], axis=g.attrs["axis"])]


class OneHotGrad(Primitive):
    """Gradient for ``values``: the output gradient summed over off positions and over on positions."""
    name = "onehot_grad"

    @staticmethod
    def infer(dy, indices, num_classes, axis):
        return spec((2,), dy.dtype)

    @classmethod
    def lower(cls, op, runtime):
        depth, axis = op.attrs["num_classes"], op.attrs["axis"]

        def onehot_grad(dy, indices):
            hot = _hot(indices, depth, axis)
            flat_dy, flat_hot = dy.reshape(dy.shape[0], -1).float(), hot.reshape(dy.shape[0], -1)
            on = (flat_dy * flat_hot).sum(1)
            return torch.stack([flat_dy.sum(1) - on, on], 1).to(dy.dtype)
        return onehot_grad


def _num_classes(num_classes) -> int:
    """popxl takes the class count as a tensor whose value must be known when the graph is built."""
    if isinstance(num_classes, Tensor):
        if not isinstance(num_classes, Constant) or num_classes.nelms != 1:
            raise ValueError(f"onehot: num_classes '{num_classes.name}' must be a scalar constant: the output shape "
                             f"depends on its value")
        num_classes = num_classes._data.reshape(()).item()
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"onehot: num_classes must be a positive integer, got {num_classes}")
    return int(num_classes)


def onehot(t: Tensor, num_classes, values: Tensor, axis: int) -> Tensor:
    """One-hot encoding of the integer tensor ``t``; ``values`` is ``[off_value, on_value]``."""
    _check_indices(t, "onehot")
    if values.shape != (2,):
        raise ValueError(f"onehot: values '{values.name}' must have shape (2,) [off, on], got {values.shape}")
    depth = _num_classes(num_classes)
    axis = norm_axis(axis, t.rank + 1)
    return OneHot.create(t, values, num_classes=depth, axis=axis)


# ---------------------------------------------------------------- topk

class TopK(Primitive):
    name = "topk"
    unsigned = "order"

    @staticmethod
    def infer(t, k, axis, largest, sorted):  # noqa: A002 - popxl's name
        shape = list(t.shape)
        shape[axis] = k
        return spec(shape, t.dtype), spec(shape, dtypes.int32)

    @classmethod
    def lower(cls, op, runtime):
        k, axis, largest, ordered = op.attrs["k"], op.attrs["axis"] + 1, op.attrs["largest"], op.attrs["sorted"]

        def topk(x):
            values, indices = torch.topk(x, k, axis, largest, ordered)
            return values, indices.to(torch.int32)
        return topk

    @staticmethod
    def grad(g):
        return [TopKGrad.create(g.dys[0], g.y(1), in_shape=g.in_spec(0).shape, axis=g.attrs["axis"])]


class TopKGrad(Primitive):
    """Scatters the gradient of the top-k values back to where they were taken from."""
    name = "topk_grad"

    @staticmethod
    def infer(dy, indices, in_shape, axis):
        return spec(in_shape, dy.dtype)

    @classmethod
    def lower(cls, op, runtime):
        shape, axis = (runtime.replicas,) + op.attrs["in_shape"], op.attrs["axis"] + 1
        return lambda dy, indices: dy.new_zeros(shape).scatter_(axis, indices.long(), dy)


def topk(t: Tensor, k: int, axis: int, largest: bool, sorted: bool,  # noqa: A002 - popxl's name
         available_memory_proportion=None):
    """The ``k`` largest (or smallest) values along ``axis`` and their int32 indices."""
    if t.rank == 0:
        raise ValueError(f"topk of the scalar '{t.name}': needs a tensor of rank >= 1")
    axis = norm_axis(axis, t)
    if isinstance(k, Tensor) or int(k) != k or not 1 <= k <= t.shape[axis]:
        raise ValueError(f"topk of '{t.name}' {t.shape}: k must be an int in [1, {t.shape[axis]}] (axis {axis}), "
                         f"got {k!r}")
    return TopK.create(t, k=int(k), axis=axis, largest=bool(largest), sorted=bool(sorted))
