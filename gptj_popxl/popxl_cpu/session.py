"""Session: runs an IR's main graph on the CPU, all replicas at once."""
import numbers
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import products
from .dtypes import float32
from .executor import Plan, storage_with_copying_views
from .ops._util import shares_memory
from .replica_layout import GroupIndex, merger, splitter
from .streams import DeviceToHostStream, HostToDeviceStream
from .tensor import Constant, Tensor, Variable, same_memory
from .utils import to_numpy

_DEVICES = ("cpu", "ipu_model", "ipu_hw")


class Runtime:
    """Device state of one session: variables, remote buffers, stream data and lowered plans."""

    def __init__(self, ir):
        self.ir = ir
        self.replicas = ir.replication_factor
        self.plans: Dict[object, Plan] = {}
        self._lowering = []
        self.variables: Dict[str, torch.Tensor] = {}
        # The float32 matrices among them that the program never writes, by address (``products``).
        self.read_only: Dict[int, torch.Tensor] = {}
        # Each buffer is (R, entries, *tensor_shape); kernels and variables write it in place, never rebind it.
        self.remote: Dict[int, torch.Tensor] = {b.remote_buffer_id: self._remote_storage(b) for b in ir._remote_buffers}
        # The run's input values, one (R, *shape) tensor per host transfer.
        self.stream_in: Dict[HostToDeviceStream, Sequence[torch.Tensor]] = {}
        self.stream_in_next: Dict[HostToDeviceStream, int] = {}
        # The run's host arrays, viewed (transfers, R, *shape): host_store copies straight into them.
        # A stream mapped to None keeps the stored value itself (one transfer, outputs made by the run).
        self.stream_out: Dict[DeviceToHostStream, Optional[np.ndarray]] = {}
        self.stream_kept: Dict[DeviceToHostStream, torch.Tensor] = {}
        self.stream_out_next: Dict[DeviceToHostStream, int] = {}

    def _remote_storage(self, buffer) -> torch.Tensor:
        if buffer._storage is None:
            return torch.zeros((self.replicas, buffer.entries) + buffer.tensor_shape,
                               dtype=buffer.tensor_dtype.as_torch())
        blocks = torch.from_numpy(buffer._storage).reshape((buffer.entries, self.replicas) + buffer.tensor_shape)
        return blocks.transpose(0, 1)

    def plan(self, graph) -> Plan:
        """The plan of ``graph``, lowered on first use."""
        plan = self.plans.get(graph)
        if plan is None:
            if graph in self._lowering:
                raise RecursionError(f"graph '{graph.name}' calls itself; popxl graphs cannot recurse")
            self._lowering.append(graph)
            try:
                plan = self.plans[graph] = Plan(graph, self)
            finally:
                self._lowering.pop()
        return plan

    def remote_entry(self, buffer, entry: int) -> torch.Tensor:
        """The ``(R, *tensor_shape)`` storage of one entry of a remote buffer (a view: writes go through)."""
        return self.remote[buffer.remote_buffer_id][:, entry]

    def persistent_value(self, t: Tensor, writable: bool) -> torch.Tensor:
        if isinstance(t, Variable):
            if t._remote is not None:
                raise ValueError(f"remote variable '{t.name}' is used directly by an op in graph '{t._graph.name}'; "
                                 f"load it first with ops.remote_load")
            return self.variables[t.id]
        if isinstance(t, Constant):
            value = torch.from_numpy(t._data).unsqueeze(0).expand((self.replicas,) + t.shape)
            return value.clone() if writable else value
        if t._rts_entry is not None:
            return self.remote_entry(*t._rts_entry)
        raise ValueError(f"tensor '{t.name}' of graph '{t._graph.name}' has no producer and is not an input")

    # --- host streams, used by host_load / host_store kernels
    def load_stream(self, stream: HostToDeviceStream) -> torch.Tensor:
        data = self.stream_in[stream]
        k = self.stream_in_next[stream]
        if k >= len(data):
            raise ValueError(f"host stream '{stream._name}' was loaded more than ir.num_host_transfers="
                             f"{len(data)} times in one run")
        self.stream_in_next[stream] = k + 1
        return data[k]

    def store_stream(self, stream: DeviceToHostStream, value: torch.Tensor) -> None:
        """Sends ``value`` to the host: copied into the run's host array, or kept as it is (lowering
        hands over a copy unless nothing can change the value later)."""
        target = self.stream_out[stream]
        k = self.stream_out_next[stream]
        transfers = 1 if target is None else target.shape[0]
        if k >= transfers:
            raise ValueError(f"host stream '{stream._name}' was stored more than ir.num_host_transfers="
                             f"{transfers} times in one run")
        self.stream_out_next[stream] = k + 1
        if target is None:
            # A view (a transpose, a broadcast) would hand the host odd strides, even repeated elements;
            # memory another stream of this run holds would make two host arrays one.
            shared = self.stream_kept and any(shares_memory(kept, value) for kept in self.stream_kept.values())
            self.stream_kept[stream] = (value.clone(memory_format=torch.contiguous_format) if shared
                                        else value.contiguous())
        else:
            target[k] = value.numpy()  # numpy's copy: torch's would wake its thread pool, slow on a busy host


class _VariableLayout:
    """How a variable's host data maps to its per-replica device value, and back.

    Host data is ``(num_groups, *shape)`` (one value per group) or, for 'all_replicas' retrieval,
    ``(R, *shape)``. Device values are ``(R, *shape)``, ``(R, *entry_shape)`` for a remote variable
    whose buffer entry has another shape of as many elements, or ``(R, shard)`` flat shards for
    replica-sharded variables. An ``np.memmap`` given as the variable's data stays its host array; a
    variable backed by a storage (``back_variable``) has it as host and device value both.
    """

    def __init__(self, v: Variable, replicas: int):
        grouping = v.replica_grouping
        self.per_replica = v.retrieval_mode == "all_replicas"
        self.assignment = torch.as_tensor(grouping.assignment)
        self.rows = torch.arange(replicas) if self.per_replica else self.assignment
        self.num_groups = grouping.num_groups
        self.firsts = torch.as_tensor(grouping._member_matrix()[:, 0])
        self.dtype = v.dtype.as_torch()
        self.sharded = v._shard_over is not None
        self.storage = v._storage  # back_variable: host and device value in this memory
        self.shape = (replicas,) + v.shape
        self.device_shape = (replicas,) + (v._remote[0].tensor_shape if v._remote and not self.sharded else v.shape)
        if self.sharded:
            self.index = GroupIndex(grouping, v._shard_over)
            self.split = splitter("flat", 0, v._shard_over, v.shape, replicas)
            self.merge = merger("flat", 0, v._shard_over, v.shape, replicas)

    def initial_host(self, per_group: np.ndarray) -> np.ndarray:
        """The host array of a variable made with ``per_group`` data ``(num_groups, *shape)``."""
        if self.storage is not None:  # back_variable made the data this very memory
            return self.storage[None]
        if self.per_replica:
            return per_group[self.assignment.numpy()]
        return per_group if isinstance(per_group, np.memmap) else per_group.copy()

    def to_device(self, host: np.ndarray) -> torch.Tensor:
        full = torch.from_numpy(np.array(host, copy=True)).to(self.dtype)[self.rows]
        return self.index.own(self.split(full)) if self.sharded else full.reshape(self.device_shape)

    def to_host(self, device: torch.Tensor) -> np.ndarray:
        full = self.merge(self.index.peer_values(device)) if self.sharded else device.reshape(self.shape)
        return (full if self.per_replica else full[self.firsts]).numpy().copy()

    def store(self, host: np.ndarray, value: np.ndarray) -> np.ndarray:
        """The host array after writing ``value``: a memmap is written into and flushed, as popxl's
        weights_to_host does, and a variable's storage written into; other arrays are replaced."""
        if isinstance(host, np.memmap) or self.storage is not None:
            host[...] = value
            if isinstance(host, np.memmap):
                host.flush()
            return host
        return value

    def host_data(self, data: np.ndarray) -> np.ndarray:
        """``data`` shaped as the variable's ``shape_on_host`` -> this layout's host array (a view of
        ``data`` for a variable in its storage, which ``store`` copies it into)."""
        shaped = data[None] if self.num_groups == 1 else data
        return shaped if self.storage is not None else shaped.copy()

    def user_data(self, host: np.ndarray) -> np.ndarray:
        """This layout's host array -> what ``get_tensor_data`` returns (no axis of one group/replica)."""
        return host[0].copy() if host.shape[0] == 1 else host.copy()


class Session:
    """Runs ``ir`` (popxl's Session): lowers it once, then ``run`` executes the main graph.

    Use it as a context manager: entering attaches (and copies the variables' host values to the
    device), leaving copies them back (``weights_to_host_on_exit``) and detaches.
    """

    def __init__(self, ir, device_desc: str = "cpu", weights_to_host_on_exit: bool = True):
        if device_desc not in _DEVICES:
            raise ValueError(f"device_desc must be one of {_DEVICES}, got {device_desc!r}")
        if device_desc != "cpu":
            warnings.warn(f"Session(device_desc={device_desc!r}): gptj_popxl.popxl_cpu runs the program on the CPU",
                          stacklevel=2)
        self._ir = ir
        self._device_desc = device_desc
        self._weights_to_host_on_exit = weights_to_host_on_exit
        self._attached = False
        self._was_attached: List[bool] = []
        self._rt = Runtime(ir)
        self._layouts = {v: _VariableLayout(v, self._rt.replicas) for v in ir._variables}
        self._host: Dict[Variable, np.ndarray] = {v: layout.initial_host(v._data)
                                                  for v, layout in self._layouts.items()}
        backed = sorted((layout.storage.ctypes.data, layout.storage.nbytes, v.name)
                        for v, layout in self._layouts.items() if layout.storage is not None)
        for (start, size, name), (other_start, _, other) in zip(backed, backed[1:]):
            if other_start < start + size:  # the executor takes variables never to alias each other
                raise ValueError(f"variables {name!r} and {other!r} are backed by overlapping storage "
                                 f"(back_variable): one IR's variables must not share memory")
        for v, layout in self._layouts.items():
            if layout.storage is not None:
                self._rt.variables[v.id] = torch.from_numpy(self._host[v])
        self._copy_to_device(self._host)
        self._main = self._rt.plan(ir.main_graph)
        # As popxl: the IR's streams some host_load reads and some host_store writes, in creation order.
        loaded, stored = ir.get_all_h2d_streams(), ir.get_all_d2h_streams()
        self._expected_inputs = [s for s in ir._streams if s in loaded]
        # Per input stream: the dtype and exact host shape that need no further checks, and the
        # (transfers, R, *shape) view the runtime loads from.
        n = ir.num_host_transfers
        self._input_layouts = {s: (np.dtype(s.dtype.as_numpy()), self._extra_dims() + s.shape,
                                   (n, self._rt.replicas) + s.shape) for s in self._expected_inputs}
        self._written_variables = _written_variables(ir)
        # A run writing variables kept in host memory changes what other sessions may read as theirs.
        self._writes_shared = any(v._storage is not None for v in self._written_variables)
        if self._rt.replicas == 1:
            written = set(self._written_variables)
            for v in ir._variables:
                if v._remote is None and v.dtype == float32 and len(v.shape) == 2 and v not in written:
                    value = self._rt.variables[v.id]
                    self._rt.read_only[value.data_ptr()] = value
        self._d2h_streams = [s for s in ir._streams if s in stored]
        # Per-run state a run copies rather than builds: each stream's transfer count, and run()'s
        # targets (every output kept as the program stored it).
        self._no_loads = dict.fromkeys(self._expected_inputs, 0)
        self._no_stores = dict.fromkeys(self._d2h_streams, 0)
        self._all_kept = dict.fromkeys(self._d2h_streams)

    # --- attachment
    @property
    def ir(self):
        return self._ir

    @property
    def is_attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Session":
        self._was_attached.append(self._attached)
        if not self._attached:
            self._attached = True
            self.weights_from_host()
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        if self._was_attached.pop():
            return
        if exc_type is None and self._weights_to_host_on_exit:
            self.weights_to_host()
        self._attached = False

    def _require_attached(self, what: str) -> None:
        if not self._attached:
            raise ValueError(f"Must be attached to device before calling a runtime function. Put the call "
                             f"(Session.{what}) inside a `Session` context, for example `with session: session.run()`.")

    # --- running
    def expected_inputs(self) -> List[HostToDeviceStream]:
        """The host-to-device streams the program loads: ``run`` needs data for each of them."""
        return list(self._expected_inputs)

    def _outputs(self) -> List[DeviceToHostStream]:
        """The IR's d2h streams some host_store writes (as popxl's: a stream nothing stores to is no output)."""
        return self._d2h_streams

    def _extra_dims(self):
        """``(num_host_transfers, replicas)`` less the ones equal to 1: what host arrays add to a stream shape."""
        return tuple(d for d in (self._ir.num_host_transfers, self._rt.replicas) if d > 1)

    def create_host_outputs(self) -> Dict[DeviceToHostStream, np.ndarray]:
        """An array for every d2h stream, shaped ``(num_host_transfers, replicas, *stream.shape)``
        without the leading dims that are 1."""
        return {s: np.zeros(self._extra_dims() + s.shape, s.dtype.as_numpy()) for s in self._outputs()}

    def run(self, inputs: Optional[Mapping[HostToDeviceStream, np.ndarray]] = None,
            downcast_inputs: bool = True) -> Dict[DeviceToHostStream, np.ndarray]:
        """Runs the main graph once; returns ``{d2h_stream: array}`` (see ``create_host_outputs``).

        ``inputs`` maps each of ``expected_inputs()`` to its data, shaped the same way.
        """
        self._require_attached("run")
        if self._ir.num_host_transfers > 1:
            outputs = self.create_host_outputs()
            self.run_with_outputs(inputs, outputs, downcast_inputs)
            return outputs
        # One transfer per stream: hand over the stored values themselves instead of copying them.
        kept = self._execute(inputs, downcast_inputs, self._all_kept)
        squeeze = self._rt.replicas == 1
        return {s: (kept[s].numpy()[0, ...] if squeeze else kept[s].numpy()) if s in kept
                else np.zeros(self._extra_dims() + s.shape, s.dtype.as_numpy()) for s in self._d2h_streams}

    def run_with_outputs(self, inputs: Optional[Mapping[HostToDeviceStream, np.ndarray]] = None,
                         outputs: Optional[Mapping[DeviceToHostStream, np.ndarray]] = None,
                         downcast_inputs: bool = True) -> None:
        """Runs the main graph once, writing every d2h stream into the given ``outputs`` arrays."""
        self._require_attached("run_with_outputs")
        outputs = dict(outputs or {})
        self._check_streams(outputs, self._outputs(), "output")
        for s, a in outputs.items():
            if np.asarray(a).dtype != s.dtype.as_numpy():
                raise TypeError(f"the array for output stream '{s._name}' has dtype {np.asarray(a).dtype}; it must be "
                                f"{np.dtype(s.dtype.as_numpy()).name}")
        views = {s: self._output_view(s, a) for s, a in outputs.items()}
        self._execute(inputs, downcast_inputs, {s: view for s, (view, _) in views.items()}, outputs.values())
        for view, copy_back in views.values():
            if copy_back is not None:
                copy_back[...] = view.reshape(copy_back.shape)

    def _execute(self, inputs, downcast: bool, targets, host_outputs=()) -> Dict[DeviceToHostStream, torch.Tensor]:
        """Runs the main plan; d2h streams store into their ``targets`` view, or are kept (None); the
        caller's ``host_outputs`` arrays take stores during the run. Returns the kept values."""
        rt = self._rt
        rt.stream_in = self._stream_values(inputs or {}, downcast, host_outputs)
        rt.stream_in_next = self._no_loads.copy()  # the inputs are checked to be exactly the expected ones
        rt.stream_out = targets  # read only
        rt.stream_out_next = self._no_stores.copy()  # and the targets exactly the outputs
        rt.stream_kept = {}
        try:
            self._main.run(())
            for v in self._written_variables:
                v._in_sync = False
            return rt.stream_kept
        finally:
            if self._writes_shared:  # a run that stops part way may have written some of them too
                products.variables_written()
            rt.stream_in = {}
            rt.stream_out = {}
            rt.stream_kept = {}

    def _stream_values(self, inputs: Mapping, downcast: bool,
                       host_outputs=()) -> Dict[HostToDeviceStream, Sequence[torch.Tensor]]:
        """The run's checked copies of ``inputs``, each a ``(replicas, *shape)`` tensor per transfer. Arrays of
        exactly their stream's dtype and host shape need no conversion or shape check: they are only
        copied (decoding runs pay this every step), or not even that where the program neither writes
        nor keeps what it loads from the stream (``Plan.borrowing_streams``) and the array is writable,
        contiguous and shares no memory with ``host_outputs`` (stores to those land during the run)."""
        layouts, borrowing = self._input_layouts, self._main.borrowing_streams
        if len(inputs) == len(layouts):
            copies = {}
            for s, a in inputs.items():
                layout = layouts.get(s)
                if layout is None or type(a) is not np.ndarray or a.dtype != layout[0] or a.shape != layout[1]:
                    break
                lent = (s in borrowing and a.flags.c_contiguous and a.flags.writeable
                        and not (host_outputs and any(np.may_share_memory(a, out) for out in host_outputs)))
                copies[s] = _per_transfer(a if lent else a.copy(), layout[2])
            else:
                return copies
        inputs = {s: self._host_input(s, a, downcast) for s, a in inputs.items()}
        self._check_streams(inputs, self._expected_inputs, "input")
        n = self._ir.num_host_transfers
        return {s: _per_transfer(np.ascontiguousarray(a[:n] if n > 1 else a), layouts[s][2]) for s, a in inputs.items()}

    def _host_input(self, stream, array, downcast: bool) -> np.ndarray:
        """The run's own copy of an input (as popxl): in-place ops on a loaded value never reach the
        caller's array."""
        if not isinstance(stream, HostToDeviceStream):
            raise TypeError(f"session inputs must be keyed by h2d streams, got {stream!r}")
        arr = to_numpy(array, downcast=downcast, copy=True)
        if arr.dtype != stream.dtype.as_numpy():
            raise TypeError(f"input for stream '{stream._name}' {stream.shape} {stream.dtype.name} has dtype "
                            f"{arr.dtype}; convert it to {np.dtype(stream.dtype.as_numpy()).name}")
        return arr

    def _check_streams(self, given: Mapping, expected: List, kind: str) -> None:
        missing = [s for s in expected if s not in given]
        unexpected = [s for s in given if s not in expected]
        if missing or unexpected:
            def describe(streams):
                return ", ".join(f"'{s._name}' {self._extra_dims() + s.shape}" for s in streams) or "none"
            raise ValueError(f"Unexpected/Missing {kind}.\n  Unexpected: {describe(unexpected)}\n  "
                             f"Missing: {describe(missing)}")
        for s, arr in given.items():
            self._check_host_shape(s, np.asarray(arr), kind)

    def _check_host_shape(self, stream, arr: np.ndarray, kind: str) -> None:
        """popxl's checks: at least N transfers, exactly R replicas, then the stream shape."""
        n, r = self._ir.num_host_transfers, self._rt.replicas
        expected = self._extra_dims() + stream.shape
        where = f"for the array provided for {kind} stream '{stream._name}' (shape {arr.shape}, expected {expected})"
        data_index = 0
        if n > 1:
            data_index += 1
            if arr.ndim < 1 or arr.shape[0] < n:
                raise ValueError(f"Dimension 0 ({arr.shape[0] if arr.ndim else None}) {where} is not large "
                                 f"enough. It should be at least of size num_host_transfers = {n}")
        if r > 1:
            if arr.ndim <= data_index or arr.shape[data_index] != r:
                size = arr.shape[data_index] if arr.ndim > data_index else None
                raise ValueError(f"Dimension {data_index} ({size}) {where} is the wrong size. It should be of "
                                 f"size replication_factor = {r}")
            data_index += 1
        # As popxl, arrays whose data dims are all ones pass the shape check (sizes must still agree).
        ones = arr.squeeze().shape[data_index:] == () and int(np.prod(stream.shape, dtype=np.int64)) == 1
        if not ones and arr.shape[data_index:] != stream.shape:
            raise ValueError(f"Shape mismatch for {kind} stream '{stream._name}': stream shape = {stream.shape}, "
                             f"therefore expected full global batch shape {expected}. Got array shape = {arr.shape}")

    def _output_view(self, stream, target: np.ndarray):
        """``(view, copy_back)``: ``target`` seen as ``(transfers, R, *shape)`` and None, or, when its
        strides allow no such view, a new array and the part of ``target`` to copy it to after the run."""
        n, r = self._ir.num_host_transfers, self._rt.replicas
        shape = (n, r) + stream.shape
        target = target[:n] if n > 1 else target
        try:
            return np.reshape(target, shape, copy=False), None
        except ValueError:
            return np.empty(shape, target.dtype), target

    # --- variables
    def _device_tensor(self, v: Variable) -> torch.Tensor:
        if v._remote is not None:
            return self._rt.remote_entry(*v._remote)
        return self._rt.variables[v.id]

    def _in_device_memory(self, v: Variable, host: np.ndarray) -> bool:
        """Whether ``host`` is the very memory of ``v``'s device value (a variable in its storage,
        ``back_variable``, or a remote variable in a buffer backed by its host data,
        ``back_remote_buffer``): then there is nothing to copy either way."""
        storage = self._layouts[v].storage
        if storage is not None:
            return same_memory(host, storage[None])
        if v._remote is None or v._remote[0]._storage is None:
            return False
        device = self._device_tensor(v)
        layout = self._layouts[v]
        return (device.is_contiguous() and host.ctypes.data == device.data_ptr() and host.nbytes == device.nbytes
                and not layout.sharded and torch.equal(layout.rows, torch.arange(self._rt.replicas)))

    def _copy_to_device(self, host: Mapping[Variable, np.ndarray]) -> None:
        products.variables_written()
        for v, data in host.items():
            if self._in_device_memory(v, data):
                continue
            value = self._layouts[v].to_device(data)
            if v._remote is None and v.id not in self._rt.variables:
                self._rt.variables[v.id] = value
            else:
                self._device_tensor(v).copy_(value)

    def weights_from_host(self) -> None:
        """Copies every variable's host value to the device (the session must be attached)."""
        self._require_attached("weights_from_host")
        self._copy_to_device(self._host)
        self._mark_in_sync(self._host)

    def weights_to_host(self) -> None:
        """Copies every variable's device value to the host (the session must be attached)."""
        self._require_attached("weights_to_host")
        for v, layout in self._layouts.items():
            if self._in_device_memory(v, self._host[v]):
                if isinstance(layout.storage, np.memmap):
                    layout.storage.flush()
                continue
            self._host[v] = layout.store(self._host[v], layout.to_host(self._device_tensor(v)))
        self._mark_in_sync(self._layouts)

    @staticmethod
    def _mark_in_sync(variables: Iterable[Variable]) -> None:
        for v in variables:
            v._in_sync = True

    def get_tensor_data(self, tensor) -> np.ndarray:
        """The value of a variable (read from the device when attached) or a constant.

        Shaped as ``tensor.shape_on_host`` (one value per group); for variables with
        ``retrieval_mode='all_replicas'``, one value per replica ``(R, *shape)``.
        """
        return self.get_tensors_data([tensor])[tensor]

    def get_tensors_data(self, tensors: Iterable) -> Dict:
        """:meth:`get_tensor_data` of several tensors, reading the device once."""
        tensors = list(tensors)
        for t in tensors:
            if not isinstance(t, (Variable, Constant)):
                raise TypeError(f"{t} is not of type Constant or Variable. get_tensor_data is not supported for "
                                f"this type.")
            if isinstance(t, Variable) and t not in self._host:
                raise ValueError(f"variable '{t.name}' belongs to another IR")
        if self._attached and any(isinstance(t, Variable) for t in tensors):
            self.weights_to_host()
        return {t: self._layouts[t].user_data(self._host[t]) if isinstance(t, Variable) else t._data.copy()
                for t in tensors}

    def write_variable_data(self, tensor: Variable, data) -> None:
        """Sets a variable's value from host ``data`` shaped ``tensor.shape_on_host`` with its exact dtype.

        Attached, the device is updated at once; otherwise at the next ``weights_from_host``.
        """
        self.write_variables_data({tensor: data})

    def write_variables_data(self, tensors: Mapping) -> None:
        """:meth:`write_variable_data` of several variables, updating the device once."""
        # First: a variable in host memory changes as it is stored, even when a later entry is refused.
        products.variables_written()
        written = {}
        for v, data in tensors.items():
            if not isinstance(v, Variable):
                raise TypeError(f"Tensor {getattr(v, 'id', v)} is not of type Variable. write_variable_data is not "
                                f"supported for this type.")
            if v not in self._host:
                raise ValueError(f"variable '{v.name}' belongs to another IR")
            want = v.dtype.as_numpy()
            arr = np.array(data, dtype=want) if isinstance(data, numbers.Number) else np.asarray(data)
            if arr.dtype != want:
                raise TypeError(f"The dtype of the input array {arr.dtype} must match the equivalent type of the "
                                f"tensor {v.id} : {v.dtype.name}")
            if arr.shape != v.shape_on_host:
                raise ValueError(f"The shape of the input array {arr.shape} must match the shape of the tensor "
                                 f"{v.id} : {v.shape_on_host}")
            if v.retrieval_mode == "all_replicas" and v.replica_grouping.group_size > 1:
                raise NotImplementedError(f'Copying to tensor {v.id} with "all_replicas" retrieval mode and '
                                          f"replica groups of {v.replica_grouping.group_size} is not supported")
            layout = self._layouts[v]
            written[v] = self._host[v] = layout.store(self._host[v], layout.host_data(arr))
        if self._attached:
            self._copy_to_device(written)
            self._mark_in_sync(written)


def _written_variables(ir) -> List[Variable]:
    """The variables a run of ``ir``'s main graph may change: written in place (in any graph it calls), or
    held in a remote buffer something stores to."""
    classes, written, _ = storage_with_copying_views(ir.main_graph)
    stored_buffers = {id(op.attrs["buffer"]) for graph in [ir.main_graph] + ir.main_graph._all_called_graphs()
                      for op in graph._ops if op.prim.writes_remote}
    return [v for v in ir._variables
            if classes.find(v.id) in written or (v._remote is not None and id(v._remote[0]) in stored_buffers)]


def _per_transfer(array: np.ndarray, shape: Tuple[int, ...]) -> Sequence[torch.Tensor]:
    """``array`` viewed ``shape`` (transfers, replicas, *stream shape): a tensor per transfer, indexed in
    numpy (a torch index costs a microsecond, which a decode step pays per input)."""
    if shape[0] == 1:
        return (torch.from_numpy(array.reshape(shape[1:])),)
    return tuple(torch.from_numpy(array.reshape(shape)).unbind(0))
