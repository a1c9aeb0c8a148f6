"""Variable factories: how to make the variables that a graph's named inputs are bound to.

A :class:`VariableFactory` remembers the shape, dtype, replica grouping and an initial-data source of
one graph input. Building a module records one factory per variable input; ``init()`` later turns
them into ``popxl.variable`` (or remote variable) tensors of the main graph, as many times as needed.

A plain callable ``data_iter`` is called once when the factory is made, to learn its shape and dtype
(as popxl-addons does). A :class:`DeferredData` states them instead, so building a graph draws no
data: programs that load their weights from a checkpoint never pay for the random initial values.
"""
import dataclasses
import os
import weakref
from typing import Callable, Iterable, Optional, Tuple, Union

import numpy as np

from ..backend import ops, popxl
from .dot_tree import DotTree
from .named_replica_grouping import NamedReplicaGrouping
from .named_tensors import NamedTensors

DataIter = Union[Callable[[], object], Iterable[object]]


@dataclasses.dataclass(frozen=True)
class DeferredData:
    """A ``data_iter`` whose host data has a stated ``shape`` and (numpy) ``dtype`` and is made by
    ``make()`` only when a variable is made, never to build a graph. Calling it calls ``make``, so
    any popxl-addons ``VariableFactory`` takes it as a plain callable."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], object]

    def __call__(self):
        return self.make()

# Variables created from a memory-mapped file -> that file's array (TaskSession writes them back there).
MEMMAPPED_VARIABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _host_array_info(data) -> Tuple[Tuple[int, ...], object]:
    """(shape, element dtype) of host data: numpy array, torch tensor or python/numpy scalar."""
    if isinstance(data, (np.ndarray, np.generic)):
        return tuple(data.shape), data.dtype
    try:
        import torch
        if isinstance(data, torch.Tensor):
            return tuple(data.shape), data.dtype
    except ImportError:  # pragma: no cover - torch is installed with the CPU runtime
        pass
    if isinstance(data, (bool, int, float)):
        arr = np.asarray(data)
        return arr.shape, arr.dtype
    raise TypeError(f"variable data must be a numpy array, torch tensor or scalar; got {type(data).__name__}")


def _current_ir():
    return popxl.gcg().ir


def _data_source(data_iter: DataIter, name: Optional[str]) -> Tuple[Callable[[], object], object]:
    """``(next, first)``: a function giving one instance's data per call, and one instance's data to learn
    shape and dtype from (an iterable's first item, which ``next`` still gives first)."""
    if callable(data_iter):
        try:
            first = data_iter()
        except Exception as e:
            raise ValueError(f"variable {name!r}: calling data_iter failed: {e}") from e
        return data_iter, first
    try:
        it = iter(data_iter)
    except TypeError:
        raise TypeError(f"variable {name!r}: data_iter must be a callable or an iterable of host arrays "
                        f"(use `lambda: data` for one array shared by all instances)") from None
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"variable {name!r}: data_iter yielded no data") from None
    pending = [first]

    def next_from_iterable():
        if pending:
            return pending.pop()
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"variable {name!r}: data_iter ran out of data") from None
    return next_from_iterable, first


class VariableFactory:
    """Makes variables (or graph inputs) of one named input.

    ``data_iter``: a callable returning the host data of one instance (called once now, to learn
    shape and dtype, unless it is a :class:`DeferredData`, then once per instance, per replica
    group), or an iterable yielding it.
    ``replica_grouping``: replicas sharing a value; with ``num_groups > 1`` each instance gets
    ``num_groups`` draws of the data, stacked as ``(num_groups, *shape)``.
    ``shard_over > 1``: the graph input is a flat replica-sharded shard of ``ceil(nelms/shard_over)``
    elements with ``meta_shape`` = full shape (use with remote buffers: ``init_remote``).
    """

    def __init__(self, data_iter: DataIter, dtype=None, name: Optional[str] = None, by_ref: bool = False,
                 replica_grouping=None, shard_over: int = 1):
        if isinstance(data_iter, DeferredData):
            self._next = data_iter
            shape, data_dtype = tuple(data_iter.shape), np.dtype(data_iter.dtype)
        else:
            self._next, first = _data_source(data_iter, name)
            shape, data_dtype = _host_array_info(first)
        self.name = name
        self.by_ref = by_ref
        self.dtype = popxl.dtypes.dtype.as_dtype(dtype if dtype is not None else data_dtype)
        self._replica_grouping = replica_grouping
        self.shard_over = int(shard_over)
        self.replica_sharded = self.shard_over > 1
        if self.replica_sharded:
            group = self.replica_grouping
            if group is not None and self.shard_over > group.group_size:
                raise ValueError(f"variable {name!r}: shard_over={shard_over} exceeds the replica group size "
                                 f"{group.group_size}")
            self.meta_shape = shape
            self.shape = (-(-int(np.prod(shape, dtype=np.int64)) // self.shard_over),)
        else:
            self.meta_shape = None
            self.shape = shape

    @property
    def replica_grouping(self):
        """The variable's replica grouping (default: all replicas of the IR being built share it)."""
        if self._replica_grouping is not None:
            return self._replica_grouping
        try:
            return _current_ir().replica_grouping()
        except RuntimeError:
            return None

    @replica_grouping.setter
    def replica_grouping(self, value) -> None:
        self._replica_grouping = value

    @property
    def spec(self):
        """The graph input's ``TensorSpec`` (shape, dtype and, when replica sharded, meta shape)."""
        return popxl.TensorSpec(self.shape, self.dtype, self.meta_shape or ())

    def create_input(self, prefix: Optional[str] = None) -> popxl.Tensor:
        """A graph input of the current graph for this variable."""
        name = self.name if prefix is None else f"{prefix}.{self.name}"
        return popxl.graph_input(self.shape, self.dtype, name, by_ref=self.by_ref, meta_shape=self.meta_shape)

    def next_data(self, empty: bool = False) -> np.ndarray:
        """Host data of one instance: ``(num_groups, *shape)`` when the grouping has several groups."""
        full_shape = self.meta_shape or self.shape

        def one():
            if empty:
                return np.zeros(full_shape, self.dtype.as_numpy())
            data = self._next()
            shape, _ = _host_array_info(data)
            if shape != tuple(full_shape):
                raise ValueError(f"variable {self.name!r}: data_iter gave shape {shape}, expected {tuple(full_shape)}")
            return data
        group = self.replica_grouping
        if group is None or group.num_groups == 1:
            return one()
        return np.stack([np.asarray(one()) for _ in range(group.num_groups)])

    def next_memmap(self, memmap_dir: str, name: str, empty: bool = False,
                    read_only_if_exists: bool = False) -> np.memmap:
        """The host data of one instance in the raw memory-mapped file ``<memmap_dir>/<name>.npy``.

        A new file is filled with :meth:`next_data` (left zero if ``empty``); an existing file is
        used as it is (``data_iter`` not called), read-only if ``read_only_if_exists``.
        """
        os.makedirs(memmap_dir, exist_ok=True)
        path = os.path.join(memmap_dir, f"{name}.npy")
        shape = tuple(self.meta_shape or self.shape)
        group = self.replica_grouping
        if group is not None and group.num_groups > 1:
            shape = (group.num_groups,) + shape
        np_dtype = self.dtype.as_numpy()
        if os.path.exists(path):
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
            if os.path.getsize(path) != expected:
                raise ValueError(f"variable {name!r}: memmap file {path} has {os.path.getsize(path)} bytes, "
                                 f"expected {expected} for {shape} {self.dtype.name}")
            return np.memmap(path, dtype=np_dtype, shape=shape, mode="r" if read_only_if_exists else "r+")
        data = np.memmap(path, dtype=np_dtype, shape=shape, mode="w+")
        if not empty:
            data[...] = np.asarray(self.next_data(empty))
            data.flush()
        return data

    def _initial_data(self, name: str, empty: bool, memmap_dir, read_only_if_exists: bool):
        if memmap_dir is None:
            return self.next_data(empty)
        return self.next_memmap(memmap_dir, name, empty, read_only_if_exists)

    @staticmethod
    def _record(var: popxl.Variable, data) -> popxl.Variable:
        if isinstance(data, np.memmap):
            MEMMAPPED_VARIABLES[var] = data
        return var

    def create_tensor(self, name: Optional[str] = None, empty: bool = False, memmap_dir=None,
                      read_only_if_exists: bool = False) -> popxl.Variable:
        """A new variable in the main graph holding the next data (``empty``: zeros, data_iter not called).

        With ``memmap_dir`` its host data lives in a memory-mapped file (see :meth:`next_memmap`).
        """
        name = name or self.name
        data = self._initial_data(name, empty, memmap_dir, read_only_if_exists)
        return self._record(popxl.variable(data, self.dtype, name, replica_grouping=self._replica_grouping), data)

    def create_remote_tensor(self, buffer, entry: int, name: Optional[str] = None, empty: bool = False,
                             memmap_dir=None, read_only_if_exists: bool = False) -> popxl.Variable:
        """A new variable stored in entry ``entry`` of remote ``buffer`` (replica sharded if the buffer is)."""
        name = name or self.name
        data = self._initial_data(name, empty, memmap_dir, read_only_if_exists)
        if buffer.meta_shape:
            var = popxl.remote_replica_sharded_variable(data, buffer, entry, self.dtype, name,
                                                        replica_grouping=self._replica_grouping)
        else:
            var = popxl.remote_variable(data, buffer, entry, self.dtype, name, replica_grouping=self._replica_grouping)
        return self._record(var, data)

    def __repr__(self):
        return f"VariableFactory({self.name!r}, {self.shape}, {self.dtype.name})"


class NamedVariableFactories(DotTree[VariableFactory]):
    """VariableFactories by dotted name; ``init*`` make a NamedTensors with the same names."""

    def init(self, prefix: Optional[str] = None, empty: bool = False, memmap_dir=None,
             read_only_if_exists: bool = False) -> NamedTensors:
        """A main-graph variable per factory, made in sorted name order (so data draws are reproducible).

        Variable names are ``prefix.name`` when ``prefix`` is given.
        """
        made = {}
        for name, f in sorted(self.to_dict().items()):
            made[name] = f.create_tensor(f"{prefix}.{name}" if prefix else name, empty, memmap_dir,
                                         read_only_if_exists)
        return NamedTensors.from_dict(made)

    def init_remote(self, buffers, entry: int = 0, prefix: Optional[str] = None, empty: bool = False,
                    memmap_dir=None, read_only_if_exists: bool = False) -> NamedTensors:
        """A remote variable per factory in entry ``entry`` of the same-named buffer of ``buffers``."""
        by_name = buffers.to_dict()
        made = {}
        for name, f in sorted(self.to_dict().items()):
            if name not in by_name:
                raise KeyError(f"init_remote: no remote buffer named {name!r}; buffers: {sorted(by_name)}")
            made[name] = f.create_remote_tensor(by_name[name], entry, f"{prefix}.{name}" if prefix else name,
                                                empty, memmap_dir, read_only_if_exists)
        return NamedTensors.from_dict(made)

    def _init(self, init_type: str) -> NamedTensors:
        return NamedTensors.from_dict({name: ops.init(f.shape, f.dtype, name, init_type)
                                       for name, f in self.to_dict().items()})

    def init_zero(self) -> NamedTensors:
        """A zero tensor per factory, made with ``ops.init`` in the current graph (any graph)."""
        return self._init("zero")

    def init_undef(self) -> NamedTensors:
        """An uninitialised tensor per factory, made with ``ops.init`` in the current graph."""
        return self._init("undef")

    @property
    def replica_groupings(self) -> NamedReplicaGrouping:
        return NamedReplicaGrouping.from_dict({n: f.replica_grouping for n, f in self.to_dict().items()})


def add_variable_input(name: str, data_iter: DataIter, dtype=None, by_ref: bool = False,
                       replica_grouping=None) -> Tuple[popxl.Tensor, VariableFactory]:
    """A VariableFactory and its graph input in the current graph."""
    f = VariableFactory(data_iter, dtype, name, by_ref, replica_grouping)
    return f.create_input(), f


def add_replica_sharded_variable_input(name: str, data_iter: DataIter, dtype=None, by_ref: bool = False,
                                       replica_grouping=None,
                                       shard_over: Optional[int] = None) -> Tuple[popxl.Tensor, VariableFactory]:
    """As :func:`add_variable_input`, the input being a replica-sharded shard (default: over the whole group)."""
    group = replica_grouping or _current_ir().replica_grouping()
    f = VariableFactory(data_iter, dtype, name, by_ref, replica_grouping, shard_over or group.group_size)
    return f.create_input(), f
