"""Data movement: filled tensors, host streams and remote buffers."""
from typing import Optional, Union

import numpy as np
import torch

from .. import dtypes
from ..primitive import Primitive, spec
from ..remote_buffer import RemoteBuffer
from ..streams import DeviceToHostStream, HostToDeviceStream
from ..tensor import Tensor, constant


class Fill(Primitive):
    """A new tensor filled with ``value``."""
    name = "init"

    @staticmethod
    def infer(shape, dtype, value):
        return spec(shape, dtype)

    @classmethod
    def lower(cls, op, runtime):
        return cls.lower_out(op, runtime)

    @classmethod
    def lower_out(cls, op, runtime):
        shape = (runtime.replicas,) + tuple(op.attrs["shape"])
        dtype, value = op.attrs["dtype"].as_torch(), op.attrs["value"]
        return lambda out=None: torch.full(shape, value, dtype=dtype) if out is None else out.fill_(value)


def init_value(shape, dtype, value: float, name: Optional[str] = None) -> Tensor:
    """A tensor of ``shape`` filled with ``value`` (made at run time, so it may be written in place)."""
    return Fill.create(shape=tuple(shape), dtype=dtypes.dtype.as_dtype(dtype), value=value, name=name)


def init(shape, dtype, name: Optional[str] = None, init_type: str = "zero", meta_shape=None) -> Tensor:
    """A new tensor; ``init_type`` 'zero' fills zeros, 'undef' leaves it unspecified (zeros here)."""
    if init_type not in ("zero", "undef"):
        raise ValueError(f"init_type must be 'zero' or 'undef', got {init_type!r}")
    return init_value(shape, dtype, 0, name)


# ---------------------------------------------------------------- host streams

class HostLoad(Primitive):
    name = "host_load"
    unsigned = "torch"

    @staticmethod
    def infer(stream):
        return stream.spec

    @classmethod
    def lower(cls, op, runtime):
        stream = op.attrs["stream"]
        return lambda: runtime.load_stream(stream)


class HostStore(Primitive):
    name = "host_store"
    unsigned = "torch"
    retains = (0,)

    @staticmethod
    def infer(t, stream):
        if t.shape != stream.shape or t.dtype != stream.dtype:
            raise ValueError(f"tensor '{t.name}' {t.shape} {t.dtype.name} does not match d2h stream "
                             f"'{stream._name}' {stream.shape} {stream.dtype.name}")
        return ()

    @classmethod
    def lower(cls, op, runtime):
        stream = op.attrs["stream"]
        return lambda x: runtime.store_stream(stream, x)


def host_load(h2d_stream: HostToDeviceStream, name: Optional[str] = None) -> Tensor:
    """The next host transfer of ``h2d_stream``."""
    if not isinstance(h2d_stream, HostToDeviceStream):
        raise TypeError(f"host_load needs an h2d stream, got {h2d_stream!r}")
    return HostLoad.create(stream=h2d_stream, name=name or h2d_stream._name)


def host_store(d2h_stream: DeviceToHostStream, t: Tensor) -> None:
    """Sends ``t`` to the host through ``d2h_stream``."""
    if not isinstance(d2h_stream, DeviceToHostStream):
        raise TypeError(f"host_store needs a d2h stream, got {d2h_stream!r}")
    HostStore.create(t, stream=d2h_stream)


# ---------------------------------------------------------------- remote buffers

def _entry_lookup(buffer: RemoteBuffer, what: str):
    """The entry an offset value names, checked against the buffer at run time: an int when every
    replica names the same one, else per-replica indices. The offset's few values are read as python
    ints at once: checking them with torch ops cost some 10 us a load."""
    entries = buffer.entries

    def entry(offset: torch.Tensor):
        values = offset.reshape(offset.shape[0]).tolist()
        for replica, value in enumerate(values):
            if not 0 <= value < entries:
                raise IndexError(f"{what}: entry {value} (on replica {replica}) is out of range for {buffer!r}")
        first = values[0]
        return first if values.count(first) == len(values) else torch.tensor(values, dtype=torch.long)
    return entry


class RemoteLoad(Primitive):
    """Reads one entry. The value is a view of the buffer's memory (lowering copies it where a later
    write could show through, ``executor``); the memory report still counts it as a tensor on the
    device, which is where an IPU holds it."""
    name = "remote_load"
    unsigned = "torch"
    views_remote = True

    @staticmethod
    def infer(offset, buffer):
        return spec(buffer.tensor_shape, buffer.tensor_dtype, buffer.meta_shape)

    @classmethod
    def lower(cls, op, runtime):
        buffer = op.attrs["buffer"]
        store, entry = runtime.remote[buffer.remote_buffer_id], _entry_lookup(buffer, "remote_load")
        replicas = torch.arange(runtime.replicas)

        def remote_load(offset):
            index = entry(offset)
            return store[:, index] if isinstance(index, int) else store[replicas, index]
        return remote_load


class RemoteLoadInplace(RemoteLoad):
    name = "remote_load_"
    modifies = (1,)
    views_remote = False

    @staticmethod
    def infer(offset, t, buffer):
        buffer.validate_tensor_matches_buffer(t)
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        load = RemoteLoad.lower(op, runtime)
        return lambda offset, t: t.copy_(load(offset))


class RemoteStore(Primitive):
    name = "remote_store"
    unsigned = "torch"
    writes_remote = True

    @staticmethod
    def infer(offset, t, buffer):
        buffer.validate_tensor_matches_buffer(t)
        return ()

    @classmethod
    def lower(cls, op, runtime):
        buffer = op.attrs["buffer"]
        store, entry = runtime.remote[buffer.remote_buffer_id], _entry_lookup(buffer, "remote_store")
        replicas = torch.arange(runtime.replicas)

        def remote_store(offset, t):
            index = entry(offset)
            if not isinstance(index, int):
                store[replicas, index] = t
                return
            slot = store[:, index]
            # A value loaded from this very entry (a view of it) is already there.
            if not (slot.data_ptr() == t.data_ptr() and slot.stride() == t.stride()):
                slot.copy_(t)
        return remote_store


def _offset(remote_buffer: RemoteBuffer, offset, what: str) -> Tensor:
    """The entry offset as a tensor: ints are checked now, tensors at run time."""
    if not isinstance(remote_buffer, RemoteBuffer):
        raise TypeError(f"{what}: expected a RemoteBuffer, got {type(remote_buffer).__name__}")
    if isinstance(offset, Tensor):
        if offset.nelms != 1 or not offset.dtype.is_int:
            raise ValueError(f"{what}: offset must be a scalar integer tensor, got '{offset.name}' {offset.shape} "
                             f"{offset.dtype.name}")
        return offset
    remote_buffer._check_entry(int(offset), what)
    return constant(np.uint32(offset), dtypes.uint32, name="offset")


def remote_load(remote_buffer: RemoteBuffer, offset: Union[int, Tensor], name: Optional[str] = None) -> Tensor:
    """Entry ``offset`` of ``remote_buffer`` (each replica reads its own copy)."""
    return RemoteLoad.create(_offset(remote_buffer, offset, "remote_load"), buffer=remote_buffer,
                             name=name or f"remote{remote_buffer.remote_buffer_id}_loaded")


def remote_load_(remote_buffer: RemoteBuffer, offset: Union[int, Tensor], t: Tensor) -> Tensor:
    """Loads entry ``offset`` of ``remote_buffer`` into ``t`` in place."""
    return RemoteLoadInplace.create(_offset(remote_buffer, offset, "remote_load_"), t, buffer=remote_buffer)


def remote_store(remote_buffer: RemoteBuffer, offset: Union[int, Tensor], t: Tensor) -> None:
    """Writes ``t`` to entry ``offset`` of ``remote_buffer``."""
    RemoteStore.create(_offset(remote_buffer, offset, "remote_store"), t, buffer=remote_buffer)
