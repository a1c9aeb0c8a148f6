"""Remote buffers: per-replica streaming-memory arrays of ``entries`` equally shaped tensors."""
from typing import Tuple

import numpy as np

from . import dtypes
from .context import get_current_context
from .tensor import TensorSpec, flat_shard_shape


class RemoteBuffer:
    """``entries`` slots of ``tensor_shape``/``tensor_dtype`` tensors in each replica's streaming memory."""

    def __init__(self, tensor_shape: Tuple[int, ...], tensor_dtype: dtypes.dtype, entries: int):
        if int(entries) < 1:
            raise ValueError(f"Entries must be a non-zero, positive integer. Got {entries}")
        ir = get_current_context().graph.ir
        self._ir = ir
        self._shape = tuple(int(s) for s in tensor_shape)
        self._dtype = dtypes.dtype.as_dtype(tensor_dtype)
        self._entries = int(entries)
        self._meta_shape = ()
        self._shard_over = None
        self._storage = None
        self._id = len(ir._remote_buffers) + 1
        ir._remote_buffers.append(self)

    @property
    def remote_buffer_id(self) -> int:
        return self._id

    @property
    def tensor_shape(self) -> Tuple[int, ...]:
        return self._shape

    @property
    def tensor_dtype(self) -> dtypes.dtype:
        return self._dtype

    @property
    def entries(self) -> int:
        return self._entries

    @entries.setter
    def entries(self, _entries: int) -> None:
        if int(_entries) < 1:
            raise ValueError(f"Entries must be a non-zero, positive integer. Got {_entries}")
        self._entries = int(_entries)

    @property
    def meta_shape(self) -> Tuple[int, ...]:
        return self._meta_shape

    @meta_shape.setter
    def meta_shape(self, shape) -> None:
        self._meta_shape = tuple(shape)

    def set_remote_buffer_info(self, tensor_dtype, tensor_shape, entries) -> None:
        self._dtype = dtypes.dtype.as_dtype(tensor_dtype)
        self._shape = tuple(tensor_shape)
        self._entries = int(entries)

    def validate_tensor_matches_buffer(self, t, num_shards: int = 1) -> None:
        """ValueError unless ``t`` (split into ``num_shards`` flat shards if > 1) fits one entry."""
        shape = tuple(t.shape)
        if num_shards > 1:
            shape = flat_shard_shape(shape, num_shards)
        if shape != self._shape or dtypes.dtype.as_dtype(t.dtype) != self._dtype:
            name = getattr(t, "name", None)
            what = f"tensor '{name}'" if name else "a tensor"
            sharded = f" (as {num_shards} shards of {tuple(t.shape)})" if num_shards > 1 else ""
            raise ValueError(f"Tensor does not match buffer. {what} {shape}{sharded} {t.dtype.name} does not match "
                             f"{self!r}")

    def _check_entry(self, entry: int, what: str) -> None:
        if not 0 <= int(entry) < self._entries:
            raise ValueError(f"{what}: entry {entry} is out of range for {self!r}")

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self._shape, self._dtype)

    def __repr__(self):
        return f"RemoteBuffer[id={self._id}: {self._entries} entries of {self._shape} {self._dtype.name}]"


def remote_buffer(tensor_shape: Tuple[int, ...], tensor_dtype: dtypes.dtype, entries: int = 1) -> RemoteBuffer:
    """A new remote buffer of ``entries`` slots."""
    return RemoteBuffer(tensor_shape, tensor_dtype, entries)


def back_remote_buffer(buffer: RemoteBuffer, storage: np.ndarray) -> None:
    """``popxl_cpu`` only: keep ``buffer``'s entries in ``storage`` (typically an ``np.memmap``) rather
    than in memory a session allocates, so a model larger than memory can live in a file.

    ``storage`` holds ``entries`` blocks, each one entry's tensor for every replica in turn: it has
    ``entries * replicas * prod(tensor_shape)`` elements of the buffer's dtype, C-contiguous. Sessions
    made afterwards read and write it in place; a remote variable whose data is its own entry's
    block is not copied at all.
    """
    replicas = buffer._ir.replication_factor
    want = buffer.entries * replicas * int(np.prod(buffer.tensor_shape, dtype=np.int64))
    if storage.size != want or storage.dtype != buffer.tensor_dtype.as_numpy() or not storage.flags.c_contiguous:
        raise ValueError(f"storage for {buffer!r} must be C-contiguous {buffer.tensor_dtype.name} with "
                         f"{buffer.entries} entries x {replicas} replicas x {buffer.tensor_shape} elements; got "
                         f"{storage.shape} {storage.dtype}")
    buffer._storage = storage
