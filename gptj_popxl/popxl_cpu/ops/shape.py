"""Shape ops: reshape, transpose, slicing, squeezing, concatenation and splitting."""
from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from ..primitive import Primitive, alias_root, spec
from ..tensor import Tensor
from ._util import norm_axis


def _resolve_shape(t: Tensor, shape: Sequence[int]) -> tuple:
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"reshape of '{t.name}' to {tuple(shape)}: at most one -1")
    known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
    if -1 in shape:
        if known == 0 or t.nelms % known:
            raise ValueError(f"cannot reshape '{t.name}' {t.shape} to {tuple(shape)}")
        shape[shape.index(-1)] = t.nelms // known
    if int(np.prod(shape, dtype=np.int64)) != t.nelms:
        raise ValueError(f"cannot reshape '{t.name}' {t.shape} ({t.nelms} elements) to {tuple(shape)}")
    return tuple(shape)


class Reshape(Primitive):
    name = "reshape"
    view = True

    @staticmethod
    def infer(t, shape):
        return spec(shape, t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        shape = (runtime.replicas,) + op.attrs["shape"]
        return lambda x: x.reshape(shape)

    @staticmethod
    def grad(g):
        return [reshape(g.dy, g.in_spec(0).shape)]


class ReshapeInplace(Reshape):
    name = "reshape_"
    view = False
    alias = True


def reshape(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t`` with a new shape (one entry may be -1)."""
    return Reshape.create(t, shape=_resolve_shape(t, shape))


def reshape_(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Reshape aliasing ``t``: in-place ops on the result change ``t``."""
    return ReshapeInplace.create(t, shape=_resolve_shape(t, shape))


def flatten(t: Tensor) -> Tensor:
    return reshape(t, (t.nelms,))


def flatten_(t: Tensor) -> Tensor:
    return reshape_(t, (t.nelms,))


class Transpose(Primitive):
    name = "transpose"
    view = True

    @staticmethod
    def infer(t, permutation):
        return spec([t.shape[p] for p in permutation], t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        perm = (0,) + tuple(p + 1 for p in op.attrs["permutation"])
        return lambda x: x.permute(perm)

    @staticmethod
    def grad(g):
        inverse = tuple(int(i) for i in np.argsort(g.attrs["permutation"]))
        return [transpose(g.dy, inverse)]


class TransposeInplace(Transpose):
    name = "transpose_"
    view = False
    alias = True


def _permutation(t: Tensor, permutation) -> tuple:
    if permutation is None:
        return tuple(reversed(range(t.rank)))
    perm = tuple(norm_axis(int(p), t, "permutation axis") for p in permutation)
    if sorted(perm) != list(range(t.rank)):
        raise ValueError(f"permutation {tuple(permutation)} is not a permutation of the {t.rank} axes of '{t.name}'")
    return perm


def transpose(t: Tensor, permutation: Optional[Iterable[int]] = None) -> Tensor:
    """Permutes axes (reverses them when ``permutation`` is None)."""
    return Transpose.create(t, permutation=_permutation(t, permutation))


def transpose_(t: Tensor, permutation: Optional[Iterable[int]] = None) -> Tensor:
    return TransposeInplace.create(t, permutation=_permutation(t, permutation))


class Slice(Primitive):
    """Static slice: ``(start, stop, step)`` per axis (normalised, one entry per axis)."""
    name = "slice"
    view = True

    @staticmethod
    def infer(t, slices):
        return spec([len(range(*s)) for s in slices], t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        slices = op.attrs["slices"]
        if all(s[2] > 0 for s in slices):
            key = (builtin_slice(None),) + tuple(builtin_slice(*s) for s in slices)
            return lambda x: x[key]
        # Positive steps slice as usual; negative ones pick their positions with index_select.
        key = (builtin_slice(None),) + tuple(builtin_slice(*s) if s[2] > 0 else builtin_slice(None) for s in slices)
        index = [(axis + 1, torch.arange(*s)) for axis, s in enumerate(slices) if s[2] < 0]

        def negative_step(x):
            x = x[key]
            for axis, idx in index:
                x = x.index_select(axis, idx)
            return x
        return negative_step

    @staticmethod
    def grad(g):
        return [SliceGrad.create(g.dy, in_shape=g.in_spec(0).shape, slices=g.attrs["slices"])]


class SliceGrad(Primitive):
    """Scatters a slice's gradient into zeros of the sliced tensor's shape."""
    name = "slice_grad"

    @staticmethod
    def infer(dy, in_shape, slices):
        return spec(in_shape, dy.dtype)

    @classmethod
    def lower(cls, op, runtime):
        shape = (runtime.replicas,) + op.attrs["in_shape"]
        key = (builtin_slice(None),) + tuple(
            builtin_slice(*s) if s[2] > 0 else torch.arange(*s) for s in op.attrs["slices"])
        if any(isinstance(k, torch.Tensor) for k in key):
            key = (key[0],) + torch.meshgrid(*[k if isinstance(k, torch.Tensor) else torch.arange(n)[k]
                                               for k, n in zip(key[1:], shape[1:])], indexing="ij")

        def scatter(dy):
            out = dy.new_zeros(shape)
            out[key] = dy
            return out
        return scatter


class SliceInplace(Slice):
    name = "slice_"
    view = False
    alias = True


def _slices(t: Tensor, start, stop, step, axis):
    def as_list(v):
        return None if v is None else ([v] if isinstance(v, int) else list(v))
    start, stop, step, axis = as_list(start), as_list(stop), as_list(step), as_list(axis)
    given = {name: v for name, v in (("start", start), ("stop", stop), ("step", step), ("axis", axis)) if v is not None}
    if len({len(v) for v in given.values()}) > 1:
        raise ValueError(f"slice of '{t.name}' {t.shape}: "
                         + ", ".join(f"{name} {v}" for name, v in given.items()) + " must have one length")
    n = len(next(iter(given.values()), [0]))
    axis = axis if axis is not None else list(range(n))
    if n > t.rank and "axis" not in given:
        raise ValueError(f"slice of '{t.name}' {t.shape}: {n} entries for {t.rank} axes")
    normed = [norm_axis(a, t) for a in axis]
    if len(set(normed)) != len(normed):
        raise ValueError(f"slice of '{t.name}' {t.shape}: axis {axis} names an axis twice")
    slices = [(0, s, 1) for s in t.shape]
    for i, a in enumerate(normed):
        py = builtin_slice(start[i] if start else None, stop[i] if stop else None, step[i] if step else None)
        slices[a] = py.indices(t.shape[a])
    return tuple(slices)


def slice(t: Tensor, start=None, stop=None, step=None, axis=None) -> Tensor:  # noqa: A001 - popxl's name
    """Numpy-style slice of ``t`` along ``axis`` (all axes in order when None)."""
    return Slice.create(t, slices=_slices(t, start, stop, step, axis))


def slice_(t: Tensor, start=None, stop=None, step=None, axis=None) -> Tensor:
    return SliceInplace.create(t, slices=_slices(t, start, stop, step, axis))


def squeeze(t: Tensor, axes: Optional[Union[int, List[int]]] = None) -> Tensor:
    """Removes size-1 axes (all of them when ``axes`` is None)."""
    if axes is None:
        drop = {i for i, s in enumerate(t.shape) if s == 1}
    else:
        axes = [axes] if isinstance(axes, int) else list(axes)
        normed = [norm_axis(a, t) for a in axes]
        drop = set(normed)
        if len(drop) != len(normed):
            raise ValueError(f"squeeze of '{t.name}': repeated axes {axes}")
        for a in normed:
            if t.shape[a] != 1:
                raise ValueError(f"squeeze of '{t.name}' {t.shape}: axis {a} has size {t.shape[a]}, not 1")
    return reshape(t, [s for i, s in enumerate(t.shape) if i not in drop])


def index(t: Tensor, key) -> Tensor:
    """``t[key]`` for ints, slices, Ellipsis, int tensors (gather) and bool tensors (mask)."""
    from .gather import gather
    from .where import where
    if isinstance(key, Tensor):
        if key.dtype.name == "bool":
            from ..tensor import constant
            return where(key, t, constant(0, t.dtype))
        return gather(t, key)
    key = key if isinstance(key, tuple) else (key,)
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (builtin_slice(None),) * (t.rank - len(key) + 1) + key[i + 1:]
    if len(key) > t.rank:
        raise IndexError(f"too many indices {key} for '{t.name}' {t.shape}")
    slices, drop = [], []
    for a, k in enumerate(key):
        if isinstance(k, (int, np.integer)):
            k = int(k)
            if not -t.shape[a] <= k < t.shape[a]:
                raise IndexError(f"index {k} is out of range for axis {a} of '{t.name}' {t.shape}")
            k %= t.shape[a]
            slices.append((k, k + 1, 1))
            drop.append(a)
        elif isinstance(k, builtin_slice):
            slices.append(k.indices(t.shape[a]))
        else:
            raise TypeError(f"unsupported index {k!r} for '{t.name}'")
    slices += [(0, s, 1) for s in t.shape[len(key):]]
    out = Slice.create(t, slices=tuple(slices))
    return squeeze(out, drop) if drop else out


builtin_slice = __builtins__["slice"] if isinstance(__builtins__, dict) else __builtins__.slice


class Concat(Primitive):
    name = "concat"

    @staticmethod
    def infer(*ts, axis):
        first = ts[0]
        for t in ts[1:]:
            if t.dtype != first.dtype or t.rank != first.rank or any(
                    a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != axis):
                raise ValueError(f"cannot concat '{t.name}' {t.shape} {t.dtype.name} with '{first.name}' "
                                 f"{first.shape} {first.dtype.name} along axis {axis}")
        shape = list(first.shape)
        shape[axis] = sum(t.shape[axis] for t in ts)
        return spec(shape, first.dtype)

    @classmethod
    def lower(cls, op, runtime):
        axis = op.attrs["axis"] + 1
        return lambda *xs: torch.cat(xs, axis)

    @staticmethod
    def grad(g):
        axis = g.attrs["axis"]
        sizes = [t.shape[axis] for t in g.op.inputs]
        return list(split(g.dy, sizes, axis))


def concat(ts: Iterable[Tensor], axis: int = 0) -> Tensor:
    ts = list(ts)
    if not ts:
        raise ValueError("concat needs at least one tensor")
    return Concat.create(*ts, axis=norm_axis(axis, ts[0]))


def concat_(ts: Iterable[Tensor], axis: int = 0) -> Tensor:
    """:func:`concat` whose result, in popxl, aliases its inputs. Here it is a copy, so building a graph
    that would show the difference (writing the result, or reading it after writing an input) is an
    error (``primitive.check_concat_aliases``)."""
    out = concat(ts, axis)
    aliases = out._graph._concat_aliases
    for root_id in {alias_root(t).id for t in out._producer.inputs + [out]}:  # the inputs as this graph has them
        aliases.setdefault(root_id, []).append(out)
    return out


def split(t: Tensor, splits: Union[int, List[int]], axis: int = 0) -> List[Tensor]:
    """Splits ``t`` along ``axis`` into ``splits`` equal parts, or parts of the listed sizes."""
    axis = norm_axis(axis, t)
    n = t.shape[axis]
    if isinstance(splits, int):
        if splits < 1 or n % splits:
            raise ValueError(f"cannot split axis {axis} of '{t.name}' {t.shape} into {splits} equal parts")
        sizes = [n // splits] * splits
    else:
        sizes = [int(s) for s in splits]
        if sum(sizes) != n or min(sizes, default=0) < 0:
            raise ValueError(f"split sizes {sizes} are not sizes adding up to {n}, axis {axis} of '{t.name}' "
                             f"{t.shape}")
    out, start = [], 0
    for s in sizes:
        out.append(slice(t, start, start + s, 1, axis))
        start += s
    return out
