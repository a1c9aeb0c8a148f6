"""Tensors of the IR: activations, variables, constants, and the functions that make them."""
import itertools
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Tuple, Union

import numpy as np
import torch

from . import dtypes
from .context import get_current_context, get_current_graph, get_main_graph
from .utils import to_numpy

_ids = itertools.count()

HostTensor = Union[np.ndarray, Iterable, torch.Tensor]
"""Host data that popxl turns into a tensor: numpy arrays, torch tensors and (nested) sequences."""
_HOST_TENSOR_TYPES = (np.ndarray, torch.Tensor, list)


class TensorSpec(Mapping):
    """Shape, dtype and meta shape of a tensor, without the tensor."""

    def __init__(self, shape: Tuple[int, ...], dtype: dtypes.dtype, meta_shape: Tuple[int, ...] = ()):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtypes.dtype.as_dtype(dtype)
        self.meta_shape = tuple(meta_shape or ())

    def to_dict(self):
        return {"shape": self.shape, "dtype": self.dtype, "meta_shape": self.meta_shape}

    def to_tuple(self):
        return self.shape, self.dtype, self.meta_shape

    def __getitem__(self, key):
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self):
        return 3

    def __eq__(self, other):
        return isinstance(other, TensorSpec) and self.to_tuple() == other.to_tuple()

    def __hash__(self):
        return hash(self.to_tuple())

    def __repr__(self):
        return f"TensorSpec(shape={self.shape}, dtype={self.dtype})"


def _describe(t) -> str:
    return f"'{t.name}' {t.shape} {t.dtype.name}"


class Tensor:
    """A value in one graph: the output of an op, a graph input, a variable or a constant."""

    # (RemoteBuffer, entry) holding the value of a replica-sharded variable's shard (`var_shard`).
    _rts_entry: Optional[Tuple[Any, int]] = None
    # Whether the host value is the device's (see ``in_sync_with_ipu``): sessions clear it on variables.
    _in_sync: bool = True
    # Iterating a tensor or testing membership would fall back to __getitem__: refuse, as popxl.
    __iter__ = None
    __contains__ = None
    # numpy defers to the reflected operators (`array + tensor` is `tensor.__radd__(array)`).
    __array_ufunc__ = None

    def __init__(self):
        raise TypeError("tensors are made by ops, popxl.variable, popxl.constant or popxl.graph_input")

    @classmethod
    def _create(cls, graph, shape, dtype, name: Optional[str] = None, producer=None, meta_shape=()) -> "Tensor":
        self = object.__new__(cls)
        self._graph = graph
        self._shape = tuple(int(s) for s in shape)
        self._dtype = dtypes.dtype.as_dtype(dtype)
        self._meta_shape = tuple(meta_shape or ())
        self._producer = producer
        scopes = get_current_context().name_scopes
        base = name or "t"
        self._name = "/".join(scopes + [base]) if scopes else base
        self._id = f"{self._name}__{next(_ids)}"
        graph._tensors[self._id] = self
        return self

    # --- description
    @property
    def shape(self) -> Tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> dtypes.dtype:
        return self._dtype

    @property
    def rank(self) -> int:
        return len(self._shape)

    @property
    def nelms(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def meta_shape(self) -> Tuple[int, ...]:
        return self._meta_shape

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self._shape, self._dtype, self._meta_shape)

    @property
    def name(self) -> str:
        return self._name

    @property
    def id(self) -> str:
        return self._id

    @property
    def scope(self) -> str:
        return self._name.rpartition("/")[0]

    @property
    def ir(self):
        return self._graph.ir

    @property
    def ipu(self) -> int:
        return self._producer.ipu if self._producer is not None else 0

    @property
    def tile_set(self) -> str:
        io = self._producer is not None and self._producer.io_tiles
        return "io" if io else "compute"

    @property
    def in_sync_with_ipu(self) -> bool:
        """Whether the host holds the device's value: False for a variable a run has changed since the last
        ``weights_to_host`` (always True for other tensors)."""
        return self._in_sync

    @property
    def location_info(self):
        return None

    def strides(self, shape=None) -> Tuple[int, ...]:
        shape = self._shape if shape is None else tuple(shape)
        itemsize = self._dtype.as_numpy().itemsize
        return tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * itemsize for i in range(len(shape)))

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError(f"len() of the scalar tensor {_describe(self)}")
        return self._shape[0]

    def __repr__(self) -> str:
        return f"Tensor[{self._name} {self._dtype.name} {self._shape}]"

    def __hash__(self):
        return hash(self._id)

    def __bool__(self):
        raise TypeError(f"the truth value of tensor {_describe(self)} is only known when the program runs")

    # --- methods that build ops
    def reshape(self, shape):
        from . import ops
        return ops.reshape(self, shape)

    def reshape_(self, shape):
        from . import ops
        return ops.reshape_(self, shape)

    def flatten(self):
        from . import ops
        return ops.flatten(self)

    def flatten_(self):
        from . import ops
        return ops.flatten_(self)

    def transpose(self, permutation=None):
        from . import ops
        return ops.transpose(self, permutation)

    def transpose_(self, permutation=None):
        from . import ops
        return ops.transpose_(self, permutation)

    @property
    def T(self):
        return self.transpose()

    @property
    def T_(self):
        return self.transpose_()

    def detach(self):
        from . import ops
        return ops.detach(self)

    def detach_(self):
        from . import ops
        return ops.detach_(self)

    def diag(self):
        from . import ops
        if self.rank != 2 or self._shape[0] != self._shape[1]:
            raise ValueError(f"diag needs a square matrix, got {_describe(self)}")
        n = self._shape[0]
        eye = constant(np.eye(n, dtype=self._dtype.as_numpy()), name="eye")
        return ops.sum(self * eye, axis=1)

    def copy_to_ipu(self, destination: int, source: Optional[int] = None):
        from . import ops
        return ops.ipu_copy(self, destination, source)

    def _ensure(self, other) -> "Tensor":
        return other if isinstance(other, Tensor) else constant(other, self._dtype, name="scalar")

    def __add__(self, other):
        from . import ops
        return ops.add(self, self._ensure(other))

    def __iadd__(self, other):
        """``t += x`` adds in place (``ops.add_``) and keeps ``t``, as popxl. The other augmented
        operators (``-=``, ``*=``, ...) are Python's default: a new tensor bound to the name."""
        from . import ops
        ops.add_(self, self._ensure(other))
        return self

    def __radd__(self, other):
        from . import ops
        return ops.add(self._ensure(other), self)

    def __sub__(self, other):
        from . import ops
        return ops.sub(self, self._ensure(other))

    def __rsub__(self, other):
        from . import ops
        return ops.sub(self._ensure(other), self)

    def __mul__(self, other):
        from . import ops
        return ops.mul(self, self._ensure(other))

    def __rmul__(self, other):
        from . import ops
        return ops.mul(self._ensure(other), self)

    def __truediv__(self, other):
        from . import ops
        return ops.div(self, self._ensure(other))

    def __rtruediv__(self, other):
        from . import ops
        return ops.div(self._ensure(other), self)

    def __mod__(self, other):
        from . import ops
        return ops.fmod(self, self._ensure(other))

    def __rmod__(self, other):
        from . import ops
        return ops.fmod(self._ensure(other), self)

    def __pow__(self, other):
        from . import ops
        return ops.pow(self, self._ensure(other))

    def __rpow__(self, other):
        from . import ops
        return ops.pow(self._ensure(other), self)

    def __neg__(self):
        from . import ops
        return ops.negate(self)

    def __matmul__(self, other):
        from . import ops
        return ops.matmul(self, self._ensure(other))

    def __rmatmul__(self, other):
        from . import ops
        return ops.matmul(self._ensure(other), self)

    def __eq__(self, other):
        # Identity, as popxl: tensors are dict keys and list members everywhere. Use ops.equal for values.
        return self is other

    def __gt__(self, other):
        from . import ops
        return ops.greater(self, self._ensure(other))

    def __lt__(self, other):
        from . import ops
        return ops.greater(self._ensure(other), self)

    def __and__(self, other):
        from . import ops
        return ops.logical_and(self, self._ensure(other))

    def __rand__(self, other):
        from . import ops
        return ops.logical_and(self._ensure(other), self)

    def __or__(self, other):
        from . import ops
        return ops.logical_or(self, self._ensure(other))

    def __ror__(self, other):
        from . import ops
        return ops.logical_or(self._ensure(other), self)

    def __invert__(self):
        from . import ops
        return ops.logical_not(self)

    def __getitem__(self, key):
        """Slicing (ints, slices, Ellipsis), integer indexing (an int tensor or host array: a gather)
        or boolean masking (a bool tensor or host array: masked elements become 0)."""
        from . import ops
        if isinstance(key, _HOST_TENSOR_TYPES):
            key = constant(key, name="index")
        return ops.index(self, key)


class Variable(Tensor):
    """A tensor of the main graph whose value persists between runs and is read/written by the host."""

    # (RemoteBuffer, entry) for variables stored in remote buffers.
    _remote: Optional[Tuple[Any, int]] = None
    # Replicas each group's value is sharded over, for replica-sharded variables.
    _shard_over: Optional[int] = None
    # Memory that sessions keep the value in instead of their own (``back_variable``).
    _storage: Optional[np.ndarray] = None

    @property
    def replica_grouping(self):
        return self._replica_grouping

    @property
    def retrieval_mode(self) -> str:
        return self._retrieval_mode

    @property
    def shape_on_replica(self) -> Tuple[int, ...]:
        return self._shape

    @property
    def shape_on_host(self) -> Tuple[int, ...]:
        """The host data shape: ``(num_groups, *shape)`` with several groups, else ``shape``."""
        groups = self._replica_grouping.num_groups
        return ((groups,) if groups > 1 else ()) + self._shape

    def copy_to_ipu(self, dst: int, src: int):
        raise TypeError(f"variable {_describe(self)} cannot be copied between IPUs; copy an activation")


def back_variable(variable: Variable, storage: np.ndarray) -> None:
    """``popxl_cpu`` only: ``variable``'s value lives in ``storage`` itself, its data and, in sessions
    made afterwards, its host and device values alike, rather than in memory of their own.

    Variables of several programs backed by one storage are one memory: a program finds in the
    processor's caches what another has just read, and there is one copy of the data however many
    programs. ``storage`` is C-contiguous, writeable, of the variable's dtype and shape (a memmap
    too); the variable has one replica and is neither remote nor replica-sharded, and no other
    variable of its IR may overlap it. The variable's data is copied into ``storage`` now.

    Unlike popxl, where each session's device value is its own: writing the variable's data
    (``write_variable_data``, attached or not) or a program that writes the variable changes it for
    every session backed by ``storage`` at once, and ``get_tensor_data`` shows such writes;
    ``weights_from_host`` cannot restore an earlier value, and leaving a session copies nothing back
    (a memmap storage is flushed). Run the programs of one storage from one thread at a time. Write
    ``storage`` through a session, not directly: a product may read a copy of a weight that only a
    session's write marks out of date (``products.read_only_copy``).
    """
    what = f"back_variable: {_describe(variable)}"
    if not isinstance(variable, Variable) or variable._remote is not None or variable._shard_over is not None:
        raise ValueError(f"{what} must be a variable neither remote nor replica-sharded")
    if variable._graph.ir.replication_factor != 1:
        raise ValueError(f"{what} has {variable._graph.ir.replication_factor} replicas; only a variable of one "
                         f"replica keeps its value in one storage")
    try:
        want = np.dtype(variable.dtype.as_numpy())
    except TypeError:
        raise ValueError(f"{what} has no numpy dtype to keep it in") from None
    if (storage.shape != variable.shape or storage.dtype != want or not storage.flags.c_contiguous
            or not storage.flags.writeable):
        raise ValueError(f"back_variable: storage for {_describe(variable)} must be a writeable C-contiguous "
                         f"{variable.dtype.name} array of shape {variable.shape}, got {storage.shape} {storage.dtype}")
    held = storage[None]
    if not same_memory(held, variable._data):
        held[...] = variable._data
    variable._data, variable._storage = held, storage


def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the very same memory: the same first byte, shape, dtype and strides."""
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.shape == b.shape
            and a.dtype == b.dtype and a.strides == b.strides)


class TensorByRef(Tensor):
    """Type hint of a ``create_graph`` function parameter: its graph input is passed by reference."""


class Constant(Tensor):
    """A tensor whose value is fixed when the graph is built."""

    def copy_to_ipu(self, dst: int, src: int):
        from . import ops
        return ops.ipu_copy(self, dst, src)


def _to_host_array(data, dtype, what: str, downcast: bool = True, log2_scale=None, nan_on_overflow=None,
                   keep_memmap: bool = False) -> Tuple[np.ndarray, dtypes.dtype]:
    """User data as a numpy array of the requested popxl dtype, copied now (as popxl) so later changes
    to ``data`` do not reach the tensor; with ``keep_memmap``, an ``np.memmap`` already of that dtype
    is kept itself, as the storage the tensor's value lives in."""
    if isinstance(data, Tensor):
        raise TypeError(f"{what}: expected host data, got the tensor {_describe(data)}")
    if dtype is not None:
        dtype = dtypes.dtype.as_dtype(dtype)
    if isinstance(data, np.ndarray) and data.size > 1 and not any(data.strides):
        # One value broadcast (``np.broadcast_to``): copy the value, keep the broadcast, so a shape-only
        # program (``gptj_popxl.plan``) never materialises its variables; a session copies them when made.
        one = to_numpy(data[(slice(0, 1),) * data.ndim], dtype, downcast, copy=True, log2_scale=log2_scale,
                       nan_on_overflow=nan_on_overflow)
        return np.broadcast_to(one, data.shape), dtypes.dtype.as_dtype(one.dtype)
    if keep_memmap and isinstance(data, np.memmap) and data.flags.c_contiguous:
        # Checked (options included) on an empty slice: the memmap itself is kept only if no conversion is due.
        kept = to_numpy(data.reshape(-1)[:0], dtype, downcast, copy=False, log2_scale=log2_scale, nan_on_overflow=nan_on_overflow)
        if kept.dtype == data.dtype:
            return data, dtypes.dtype.as_dtype(data.dtype)
    arr = to_numpy(data, dtype, downcast, copy=True, log2_scale=log2_scale, nan_on_overflow=nan_on_overflow)
    return arr, dtypes.dtype.as_dtype(arr.dtype)


def constant(data, dtype=None, name=None, downcast=True, log2_scale=None, nan_on_overflow=None) -> Constant:
    """A constant tensor in the current graph holding a copy of ``data``."""
    arr, dtype = _to_host_array(data, dtype, f"constant {name or ''}".strip(), downcast, log2_scale, nan_on_overflow)
    t = Constant._create(get_current_graph(), arr.shape, dtype, name or "constant")
    t._data = arr
    return t


def _check_grouping(replica_grouping, what: str):
    ir = get_main_graph().ir
    if replica_grouping is None:
        return ir.replica_grouping()
    if replica_grouping._replication != ir.replication_factor:
        raise ValueError(f"{what}: replica grouping made for {replica_grouping._replication} replicas used in an IR "
                         f"with replication factor {ir.replication_factor}")
    return replica_grouping


def _host_variable_data(data, dtype, name, downcast, replica_grouping, retrieval_mode, log2_scale=None,
                        nan_on_overflow=None):
    """Host data as ``(num_groups, *shape)`` per-group values, checked against the grouping."""
    what = f"variable {name!r}" if name else "variable"
    grouping = _check_grouping(replica_grouping, what)
    arr, dtype = _to_host_array(data, dtype, what, downcast, log2_scale, nan_on_overflow, keep_memmap=True)
    if retrieval_mode not in (None, "one_per_group", "all_replicas"):
        raise ValueError(f"{what}: retrieval_mode must be 'one_per_group' or 'all_replicas', "
                         f"got {retrieval_mode!r}")
    groups = grouping.num_groups
    if groups > 1:
        if arr.ndim == 0 or arr.shape[0] != groups:
            raise ValueError(f"{what}: its replica grouping has {groups} groups, so its data must be "
                             f"shaped ({groups}, *shape); got {arr.shape}")
        per_group = arr
    else:
        per_group = arr[None]
    return per_group, dtype, grouping, retrieval_mode or "one_per_group"


def _make_variable(per_group, dtype, name, grouping, retrieval_mode) -> Variable:
    main = get_main_graph()
    with main:
        v = Variable._create(main, per_group.shape[1:], dtype, name or "variable")
    v._data = per_group
    v._replica_grouping = grouping
    v._retrieval_mode = retrieval_mode
    main.ir._variables.append(v)
    return v


def _check_in_main_graph(what: str) -> None:
    if get_current_graph() is not get_main_graph():
        raise ValueError(f"You cannot initialise a variable tensor within a graph. It can only be initialised "
                         f"within the main graph ({what}, made in '{get_current_graph().name}'); pass the value "
                         f"into the graph as an input (popxl.graph_input) or use a constant")


def variable(data, dtype=None, name=None, downcast=True, replica_grouping=None, retrieval_mode=None,
             log2_scale=None, nan_on_overflow=None) -> Variable:
    """A variable of the main graph initialised with ``data`` (``(num_groups, *shape)`` with >1 group).

    ``data`` is copied now, except an ``np.memmap`` of the variable's dtype: that stays the variable's
    host storage, which ``Session.weights_to_host`` writes back into and flushes (for weights too large
    to copy). ``retrieval_mode``: 'one_per_group' (default) reads back one value per group,
    'all_replicas' every replica's value.
    """
    _check_in_main_graph(f"variable {name!r}")
    per_group, dtype, grouping, mode = _host_variable_data(data, dtype, name, downcast, replica_grouping,
                                                           retrieval_mode, log2_scale, nan_on_overflow)
    return _make_variable(per_group, dtype, name, grouping, mode)


def flat_shard_shape(shape, shards: int) -> Tuple[int]:
    """The shape of one of ``shards`` equal 1-D pieces of a ``shape`` tensor flattened and zero-padded."""
    nelms = int(np.prod(tuple(shape), dtype=np.int64))
    return (-(-nelms // shards),)


def remote_variable(data, remote_buffer, offset=0, dtype=None, name=None, downcast=True, replica_grouping=None,
                    retrieval_mode="one_per_group", log2_scale=None, nan_on_overflow=None) -> Variable:
    """A variable stored in entry ``offset`` of ``remote_buffer`` on every replica.

    Read and write it with the session like any variable; in programs use ``ops.remote_load``.
    """
    what = f"remote variable {name!r}"
    _check_in_main_graph(what)
    per_group, dtype, grouping, mode = _host_variable_data(data, dtype, name, downcast, replica_grouping,
                                                           retrieval_mode, log2_scale, nan_on_overflow)
    remote_buffer._check_entry(offset, what)
    # As popxl, the variable keeps its data's shape; a buffer entry holds its elements in its own shape
    # (such as data with a leading axis of one group in a buffer of the unbatched shape).
    nelms = int(np.prod(per_group.shape[1:], dtype=np.int64))
    if nelms != int(np.prod(remote_buffer.tensor_shape, dtype=np.int64)) or dtype != remote_buffer.tensor_dtype:
        raise ValueError(f"Tensor does not match buffer. {what}: data {per_group.shape[1:]} {dtype.name} has not the "
                         f"elements of one entry of {remote_buffer!r}")
    v = _make_variable(per_group, dtype, name, grouping, mode)
    v._remote = (remote_buffer, int(offset))
    return v


def remote_replica_sharded_variable(data, remote_buffer, offset=0, dtype=None, name=None, downcast=True,
                                    replica_grouping=None, retrieval_mode="one_per_group", log2_scale=None,
                                    nan_on_overflow=None) -> Variable:
    """A variable whose value is sharded over replicas, each storing its shard in ``remote_buffer``.

    The host data is the full value (``(num_groups, *shape)`` with several groups). Each group's
    value is flattened, zero-padded and cut into ``shard_over`` shards (the buffer's, by default
    the group size); the k-th replica of a block of ``shard_over`` group members stores shard k at
    entry ``offset``. ``ops.replicated_all_gather`` of a loaded shard gives back the full value.
    """
    what = f"remote replica-sharded variable {name!r}"
    _check_in_main_graph(what)
    replicas = get_main_graph().ir.replication_factor
    if replicas <= 1:
        raise ValueError(f"{what}: the IR's replication factor is {replicas}; replica-sharded variables need "
                         f"more than one replica")
    per_group, dtype, grouping, mode = _host_variable_data(data, dtype, name, downcast, replica_grouping,
                                                           retrieval_mode, log2_scale, nan_on_overflow)
    shape = per_group.shape[1:]
    if not remote_buffer.meta_shape:
        remote_buffer.meta_shape = shape
    elif remote_buffer.meta_shape != shape:
        raise ValueError(f"{what}: cannot use {remote_buffer!r} for a variable of shape {shape}: the buffer's "
                         f"meta_shape is {remote_buffer.meta_shape}")
    shard_over = remote_buffer._shard_over or grouping.group_size
    if grouping.group_size % shard_over:
        raise ValueError(f"{what}: {remote_buffer!r} shards over {shard_over} replicas, which does not divide the "
                         f"replica group size {grouping.group_size}")
    remote_buffer._check_entry(offset, what)
    remote_buffer.validate_tensor_matches_buffer(TensorSpec(shape, dtype), shard_over)
    v = _make_variable(per_group, dtype, name, grouping, mode)
    v._remote = (remote_buffer, int(offset))
    v._shard_over = shard_over
    return v


def replica_sharded_buffer(shape, dtype, replica_grouping=None, shard_over=None, entries=1):
    """A remote buffer for flat shards of a ``shape`` variable sharded over ``shard_over`` replicas.

    ``shape`` is the variable's host shape (with the group axis when ``replica_grouping`` has
    several groups). ``shard_over`` defaults to the replica group size and must divide it.
    """
    from .remote_buffer import remote_buffer
    replicas = get_current_graph().ir.replication_factor
    if replica_grouping is not None:
        _check_grouping(replica_grouping, "replica_sharded_buffer")
    group_size = replica_grouping.group_size if replica_grouping is not None else replicas
    shard_over = group_size if shard_over is None else int(shard_over)
    if not 0 < shard_over <= group_size or group_size % shard_over:
        raise ValueError(f"replica_sharded_buffer: shard_over={shard_over} must divide the replica group size "
                         f"{group_size}")
    grouped = replica_grouping is not None and replica_grouping.num_groups > 1
    tensor_shape = tuple(int(s) for s in shape)[1 if grouped else 0:]
    buffer = remote_buffer(flat_shard_shape(tensor_shape, shard_over), dtype, entries)
    buffer.meta_shape = tensor_shape
    buffer._shard_over = shard_over
    return buffer


def replica_sharded_variable(data, dtype=None, name=None, downcast=True, replica_grouping=None, shard_over=None,
                             retrieval_mode="one_per_group", log2_scale=None,
                             nan_on_overflow=None) -> Tuple[Variable, Tensor]:
    """A variable sharded over replicas: returns ``(var, var_shard)``.

    ``var`` is the full variable (a :func:`remote_replica_sharded_variable` in a one-entry buffer)
    for the session's ``get_tensor_data``/``write_variable_data``; do not use it in programs.
    ``var_shard`` is this replica's flat shard (``meta_shape`` = the full shape), a main-graph tensor
    that programs read and update in place; its value persists between runs and is what the
    session reads back into ``var``.
    """
    per_group, dtype, _, _ = _host_variable_data(data, dtype, name, downcast, replica_grouping, retrieval_mode)
    host = per_group if replica_grouping is not None and replica_grouping.num_groups > 1 else per_group[0]
    buffer = replica_sharded_buffer(host.shape, dtype, replica_grouping, shard_over)
    var = remote_replica_sharded_variable(host, buffer, 0, dtype, name, downcast, replica_grouping, retrieval_mode)
    main = get_main_graph()
    with main:
        var_shard = Tensor._create(main, buffer.tensor_shape, dtype, var.name.rpartition("/")[2] + "_rts",
                                   meta_shape=buffer.meta_shape)
    var_shard._rts_entry = (buffer, 0)  # the runtime keeps the shard in the buffer entry itself
    return var, var_shard


def graph_input(shape: Iterable[int], dtype, name: Optional[str] = None, by_ref: bool = False,
                meta_shape=None) -> Tensor:
    """Adds an input to the graph being built (inside ``ir.create_graph``)."""
    graph = get_current_graph()
    if graph is graph.ir.main_graph:
        raise ValueError(f"graph_input {name!r}: the main graph has no inputs; use popxl.h2d_stream")
    t = Tensor._create(graph, tuple(shape), dtype, name or "input", meta_shape=meta_shape or ())
    graph._inputs.append(t)
    if by_ref:
        graph._by_ref_inputs.add(t)
    return t


def graph_output(t: Tensor) -> None:
    """Marks ``t`` as an output of the graph being built."""
    graph = get_current_graph()
    if not isinstance(t, Tensor):
        raise TypeError(f"graph_output expects a Tensor, got {type(t).__name__}")
    if t._graph is not graph:
        raise ValueError(f"graph_output: tensor {_describe(t)} is in graph '{t._graph.name}', not in the graph "
                         f"being built '{graph.name}'")
    graph._add_output(t)


TensorLike = Any
