"""Dynamic slicing: regions of a tensor chosen by a runtime index tensor.

Offsets follow the poplibs codelets: an offset outside ``[0, size)`` (including a negative int32
one, which poplibs reads as a huge unsigned value) starts the region at 0, and a region running
past the end of its axis wraps around to the start. Each replica uses its own index values.
"""
from typing import Sequence

import torch

from ..primitive import Primitive, spec
from ..tensor import Tensor
from ._util import norm_axis, shares_memory
from .io import init_value

__all__ = ["dynamic_slice", "dynamic_update", "dynamic_update_"]


def _region(shape, axes, sizes, replicas: int):
    """``key(index)``: the indexing key selecting each replica's region of a ``(R, *shape)`` value.

    Everything but the offsets is fixed at lowering; a run only turns its index values into positions.
    """
    rank = len(shape) + 1

    def along(dim, positions):
        """``positions`` (replicas or 1, n) as a key for ``dim``, broadcasting against the other keys."""
        view = [positions.shape[0]] + [1] * (rank - 1)
        view[dim] = positions.shape[1]
        return positions.reshape(view)
    static = [torch.arange(replicas).reshape((replicas,) + (1,) * (rank - 1))]
    static += [along(a + 1, torch.arange(n).unsqueeze(0)) for a, n in enumerate(shape)]
    windows = [(axes.index(a) if a in axes else None, n) for a, n in enumerate(shape)]
    steps = {i: torch.arange(s) for i, s in enumerate(sizes)}

    def _one_block(index: torch.Tensor):
        """Basic slices for a region every replica shares and that does not wrap (None otherwise):
        indexing with them copies a block instead of gathering element by element."""
        starts = index.tolist()
        if any(row != starts[0] for row in starts[1:]):
            return None
        out = [slice(None)]
        for i, n in windows:
            if i is None:
                out.append(slice(None))
                continue
            start = starts[0][i] if 0 <= starts[0][i] < n else 0
            if start + sizes[i] > n:
                return None
            out.append(slice(start, start + sizes[i]))
        return tuple(out)

    def key(index: torch.Tensor):
        index = index.reshape(replicas, -1).long()
        block = _one_block(index)
        if block is not None:
            return block
        out = static[:1]
        for a, (i, n) in enumerate(windows):
            if i is None:
                out.append(static[a + 1])
                continue
            start = index[:, i:i + 1]
            start = torch.where((start >= 0) & (start < n), start, 0)
            out.append(along(a + 1, (start + steps[i]) % n))
        return tuple(out)
    return key


def _sliced_shape(shape, axes, sizes):
    out = list(shape)
    for a, s in zip(axes, sizes):
        out[a] = s
    return tuple(out)


class DynamicSlice(Primitive):
    name = "dynamic_slice"

    @staticmethod
    def infer(t, index, axes, sizes):
        return spec(_sliced_shape(t.shape, axes, sizes), t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        region = _region(op.inputs[0].shape, op.attrs["axes"], op.attrs["sizes"], runtime.replicas)

        def take(x, index):
            out = x[region(index)]
            # A block of basic slices is a view: the result must not change with later writes to x.
            return out.clone() if out._is_view() else out
        return take

    @staticmethod
    def grad(g):
        t = g.in_spec(0)
        zeros = init_value(t.shape, t.dtype, 0.0)
        return [DynamicUpdate.create(zeros, g.x(1), g.dy, **g.attrs), None]


class DynamicUpdate(Primitive):
    """A copy of ``t`` with the indexed region replaced by ``t_update``."""
    name = "dynamic_update"

    @staticmethod
    def infer(t, index, t_update, axes, sizes):
        expected = _sliced_shape(t.shape, axes, sizes)
        if t_update.shape != expected or t_update.dtype != t.dtype:
            raise ValueError(f"t_update '{t_update.name}' {t_update.shape} {t_update.dtype.name} must be "
                             f"{expected} {t.dtype.name}, the region of '{t.name}' {t.shape} it replaces")
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        region = _region(op.inputs[0].shape, op.attrs["axes"], op.attrs["sizes"], runtime.replicas)
        inplace = bool(cls.modifies)

        def update(x, index, upd):
            out = x if inplace else x.clone()
            if inplace and shares_memory(upd, x):
                upd = upd.clone()  # an update viewing the target is its value before the write
            out[region(index)] = upd
            return out
        return update

    @staticmethod
    def grad(g):
        # Only the index is read here, which in-place updates leave untouched, so both variants share this.
        u = g.in_spec(2)
        dt = DynamicUpdate.create(g.dy, g.x(1), init_value(u.shape, u.dtype, 0.0), **g.attrs) if g.needs(0) else None
        du = DynamicSlice.create(g.dy, g.x(1), **g.attrs) if g.needs(2) else None
        return [dt, None, du]


class DynamicUpdateInplace(DynamicUpdate):
    name = "dynamic_update_"
    modifies = (0,)


def _attrs(t: Tensor, index: Tensor, axes: Sequence[int], sizes: Sequence[int], what: str) -> dict:
    if not isinstance(index, Tensor):
        raise TypeError(f"{what}: index must be a Tensor, got {type(index).__name__}")
    axes = [norm_axis(int(a), t) for a in axes]
    sizes = [int(s) for s in sizes]
    if len(set(axes)) != len(axes):
        raise ValueError(f"{what}: repeated axes {axes}")
    if len(sizes) != len(axes):
        raise ValueError(f"{what}: {len(axes)} axes but {len(sizes)} sizes")
    if not index.dtype.is_int or index.shape != (len(axes),):
        raise ValueError(f"{what}: index '{index.name}' must be a 1-D integer tensor of {len(axes)} offsets (one per "
                         f"axis), got {index.shape} {index.dtype.name}")
    for a, s in zip(axes, sizes):
        if not 0 < s <= t.shape[a]:
            raise ValueError(f"{what}: size {s} for axis {a} of '{t.name}' {t.shape} must be in [1, {t.shape[a]}]")
    return {"axes": tuple(axes), "sizes": tuple(sizes)}


def dynamic_slice(t: Tensor, index: Tensor, axes: Sequence[int], sizes: Sequence[int], no_overlap: bool) -> Tensor:
    """``t[index[i] : index[i] + sizes[i]]`` along each ``axes[i]``, with a runtime ``index``."""
    return DynamicSlice.create(t, index, **_attrs(t, index, axes, sizes, "dynamic_slice"))


def dynamic_update(t: Tensor, index: Tensor, t_update: Tensor, axes: Sequence[int], sizes: Sequence[int],
                   no_overlap: bool) -> Tensor:
    """A copy of ``t`` whose region at runtime offsets ``index`` is replaced by ``t_update``."""
    return DynamicUpdate.create(t, index, t_update, **_attrs(t, index, axes, sizes, "dynamic_update"))


def dynamic_update_(t: Tensor, index: Tensor, t_update: Tensor, axes: Sequence[int], sizes: Sequence[int],
                    no_overlap: bool) -> Tensor:
    """:func:`dynamic_update` writing ``t`` in place."""
    return DynamicUpdateInplace.create(t, index, t_update, **_attrs(t, index, axes, sizes, "dynamic_update_"))
