"""Host streams: how data enters (h2d) and leaves (d2h) the device."""
from typing import Iterable, Optional

from . import dtypes
from .context import get_current_graph, get_main_graph
from .tensor import TensorSpec


class Stream:
    """A host stream of per-replica ``shape`` tensors."""

    def __init__(self):
        raise TypeError("use popxl.h2d_stream or popxl.d2h_stream")

    @classmethod
    def _create(cls, ir, shape, dtype, name):
        self = object.__new__(cls)
        self._ir = ir
        self._spec = TensorSpec(shape, dtype)
        self._name = name or ("h2d" if cls is HostToDeviceStream else "d2h")
        self._tensor_id = f"{self._name}__stream{len(ir._streams)}"
        ir._streams.append(self)
        return self

    @property
    def shape(self):
        return self._spec.shape

    @property
    def dtype(self):
        return self._spec.dtype

    @property
    def spec(self) -> TensorSpec:
        return self._spec

    @property
    def tensor_id(self) -> str:
        return self._tensor_id

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__  # identity, at C speed: streams key the host data of every run

    def __repr__(self):
        return f"{type(self).__name__}[{self._name} {self._spec.dtype.name} {self._spec.shape}]"


class HostToDeviceStream(Stream):
    """Host to device; read in the program with ``ops.host_load``."""


class DeviceToHostStream(Stream):
    """Device to host; written in the program with ``ops.host_store``."""


def _main_graph_ir(what: str):
    """The IR being built, whose main graph is the current graph: as popxl, streams belong to it alone."""
    graph = get_current_graph()
    if graph is not get_main_graph():
        raise ValueError(f"Can only call `{what}` in context of main graph. You are in context of graph "
                         f"'{graph.name}'.")
    return graph.ir


def h2d_stream(shape: Iterable[int], dtype: dtypes.dtype, name: Optional[str] = None) -> HostToDeviceStream:
    return HostToDeviceStream._create(_main_graph_ir("h2d_stream"), tuple(shape), dtype, name)


def d2h_stream(shape: Iterable[int], dtype: dtypes.dtype, name: Optional[str] = None) -> DeviceToHostStream:
    return DeviceToHostStream._create(_main_graph_ir("d2h_stream"), tuple(shape), dtype, name)
