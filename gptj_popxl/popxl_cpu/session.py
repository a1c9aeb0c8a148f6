"""Session: runs an IR's main graph on the CPU, all replicas at once."""
import warnings
from typing import Dict, Iterable, Mapping, Optional

import numpy as np
import torch

from .executor import Plan, host_to_replicas
from .streams import DeviceToHostStream, HostToDeviceStream
from .tensor import Constant, Tensor, Variable

_DEVICES = ("cpu", "ipu_model", "ipu_hw")


class Runtime:
    """Device state of one session: variables, remote buffers, stream data and lowered plans."""

    def __init__(self, ir):
        self.ir = ir
        self.replicas = ir.replication_factor
        self.plans: Dict[object, Plan] = {}
        self._lowering = []
        self.variables: Dict[str, torch.Tensor] = {}
        self.remote: Dict[int, torch.Tensor] = {
            b.remote_buffer_id: torch.zeros((self.replicas, b.entries) + b.tensor_shape, dtype=b.tensor_dtype.as_torch())
            for b in ir._remote_buffers}
        self.stream_in: Dict[HostToDeviceStream, torch.Tensor] = {}
        self.stream_in_next: Dict[HostToDeviceStream, int] = {}
        self.stream_out: Dict[DeviceToHostStream, list] = {}

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

    def persistent_value(self, t: Tensor, writable: bool) -> torch.Tensor:
        if isinstance(t, Variable):
            if t._remote is not None:
                raise ValueError(f"remote variable '{t.name}' is used directly by an op in graph '{t._graph.name}'; "
                                 f"load it first with ops.remote_load")
            return self.variables[t.id]
        if isinstance(t, Constant):
            value = torch.from_numpy(t._data).unsqueeze(0).expand((self.replicas,) + t.shape)
            return value.clone() if writable else value
        raise ValueError(f"tensor '{t.name}' of graph '{t._graph.name}' has no producer and is not an input")

    # --- host streams, used by host_load / host_store kernels
    def load_stream(self, stream: HostToDeviceStream) -> torch.Tensor:
        data = self.stream_in.get(stream)
        if data is None:
            raise ValueError(f"no data given for host stream '{stream._name}' {stream.shape} {stream.dtype.name}; "
                             f"pass it in session.run(inputs)")
        k = self.stream_in_next[stream]
        if k >= data.shape[0]:
            raise ValueError(f"host stream '{stream._name}' was loaded more than ir.num_host_transfers="
                             f"{data.shape[0]} times in one run")
        self.stream_in_next[stream] = k + 1
        return data[k]

    def store_stream(self, stream: DeviceToHostStream, value: torch.Tensor) -> None:
        self.stream_out.setdefault(stream, []).append(value.clone())


def _shard_members(v: Variable, replica: int):
    group = v._shard_group
    members = group.groups()[group.assignment[replica]]
    return members.index(replica), len(members)


class Session:
    """Runs ``ir`` (popxl's Session): lowers it once, then ``run`` executes the main graph."""

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
        self._rt = Runtime(ir)
        # Host copies of every variable: (groups, *full shape), or (replicas, *full shape) for 'all_replicas'.
        self._host: Dict[Variable, np.ndarray] = {v: self._initial_host(v) for v in ir._variables}
        self._weights_from_host(self._host)
        self._main = self._rt.plan(ir.main_graph)
        self._h2d = [s for s in ir._streams if isinstance(s, HostToDeviceStream)]
        self._d2h = [s for s in ir._streams if isinstance(s, DeviceToHostStream)]
        self._loaded = self._streams_used(ir.main_graph, "host_load")

    # --- attachment
    @property
    def ir(self):
        return self._ir

    @property
    def is_attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Session":
        self._attached = True
        self.weights_from_host()
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        if self._weights_to_host_on_exit:
            self.weights_to_host()
        self._attached = False

    def _require_attached(self, what: str) -> None:
        if not self._attached:
            raise RuntimeError(f"Session.{what} needs an attached session: use `with session:`")

    # --- running
    def expected_inputs(self):
        """The host-to-device streams the program loads, which ``run`` needs data for."""
        return [s for s in self._h2d if s in self._loaded]

    def create_host_outputs(self) -> Dict[DeviceToHostStream, np.ndarray]:
        return {s: np.zeros(self._host_stream_shape(s), s.dtype.as_numpy()) for s in self._d2h}

    def run(self, inputs: Optional[Mapping[HostToDeviceStream, np.ndarray]] = None, downcast_inputs: bool = True):
        """Runs the main graph once; returns ``{d2h_stream: array}`` shaped ``(N, R, *shape)`` less axes of 1."""
        outputs = self.create_host_outputs()
        self.run_with_outputs(inputs, outputs, downcast_inputs)
        return outputs

    def run_with_outputs(self, inputs=None, outputs=None, downcast_inputs: bool = True) -> None:
        """Runs the main graph once, writing stream outputs into the given arrays."""
        self._require_attached("run")
        rt = self._rt
        rt.stream_in = self._stream_inputs(inputs or {}, downcast_inputs)
        rt.stream_in_next = {s: 0 for s in rt.stream_in}
        rt.stream_out = {}
        self._main.run(())
        for stream, values in rt.stream_out.items():
            if outputs is None or stream not in outputs:
                continue
            n = self._ir.num_host_transfers
            if len(values) > n:
                raise ValueError(f"host stream '{stream._name}' was stored {len(values)} times, more than "
                                 f"ir.num_host_transfers={n}")
            stacked = torch.stack(values).numpy()
            target = outputs[stream]
            full = stacked.reshape((len(values), self._rt.replicas) + stream.shape)
            view = target.reshape((n, self._rt.replicas) + stream.shape)
            view[:len(values)] = full
        rt.stream_in = {}

    def _host_stream_shape(self, stream):
        lead = tuple(d for d in (self._ir.num_host_transfers, self._rt.replicas) if d > 1)
        return lead + stream.shape

    def _stream_inputs(self, inputs, downcast: bool):
        data = {}
        for stream, array in inputs.items():
            if not isinstance(stream, HostToDeviceStream):
                raise TypeError(f"session.run inputs must be keyed by h2d streams, got {stream!r}")
            arr = np.asarray(array)
            expected = self._host_stream_shape(stream)
            if arr.shape != expected:
                raise ValueError(f"host data for stream '{stream._name}' has shape {arr.shape}; expected {expected} "
                                 f"(num_host_transfers={self._ir.num_host_transfers}, replicas={self._rt.replicas}, "
                                 f"stream shape {stream.shape})")
            want = stream.dtype.as_numpy()
            if arr.dtype != want:
                if not downcast and np.dtype(arr.dtype).itemsize > want.itemsize:
                    raise TypeError(f"host data for stream '{stream._name}' is {arr.dtype}, stream is {want}")
                arr = arr.astype(want)
            full = (self._ir.num_host_transfers, self._rt.replicas) + stream.shape
            data[stream] = torch.from_numpy(np.ascontiguousarray(arr)).reshape(full)
        for stream in self.expected_inputs():
            if stream not in data:
                raise ValueError(f"session.run: no data for host stream '{stream._name}' {stream.shape} "
                                 f"{stream.dtype.name}, which the program loads")
        return data

    def _streams_used(self, graph, kind, seen=None):
        seen = set() if seen is None else seen
        used = set()
        if graph in seen:
            return used
        seen.add(graph)
        for op in graph._ops:
            if op.prim.name == kind:
                used.add(op.attrs["stream"])
            for g in op.called_graphs:
                used |= self._streams_used(g, kind, seen)
        return used

    # --- variables
    @staticmethod
    def _initial_host(v: Variable) -> np.ndarray:
        if v.retrieval_mode == "all_replicas":
            return v._data[v.replica_grouping.assignment]
        return v._data.copy()

    def _device_value(self, v: Variable, host: np.ndarray) -> torch.Tensor:
        dtype = v.dtype.as_torch()
        rows = range(self._rt.replicas) if v.retrieval_mode == "all_replicas" else v.replica_grouping.assignment
        full = host_to_replicas(host, rows, dtype)
        if v._shard_group is None:
            return full
        flat = full.reshape(self._rt.replicas, -1)
        shard = v.shape[0]
        shards = []
        for r in range(self._rt.replicas):
            k, n = _shard_members(v, r)
            padded = torch.nn.functional.pad(flat[r], (0, shard * n - flat.shape[1]))
            shards.append(padded[k * shard:(k + 1) * shard])
        return torch.stack(shards)

    def _host_value(self, v: Variable, device: torch.Tensor) -> np.ndarray:
        """Per-replica device values -> popxl's host layout for ``v``."""
        if v._shard_group is not None:
            nelms = int(np.prod(v._full_shape, dtype=np.int64))
            full = []
            for r in range(self._rt.replicas):
                members = v._shard_group.groups()[v._shard_group.assignment[r]]
                full.append(torch.cat([device[m] for m in members])[:nelms].reshape(v._full_shape))
            device = torch.stack(full)
        if v.retrieval_mode == "all_replicas":
            return device.numpy().copy()
        firsts = [members[0] for members in v.replica_grouping.groups()]
        return device[firsts].numpy().copy()

    def _device_tensor(self, v: Variable) -> torch.Tensor:
        if v._remote is not None:
            buffer, entry = v._remote
            return self._rt.remote[buffer.remote_buffer_id][:, entry]
        return self._rt.variables[v.id]

    def _weights_from_host(self, host: Mapping[Variable, np.ndarray]) -> None:
        for v, data in host.items():
            value = self._device_value(v, data)
            if v._remote is None and v.id not in self._rt.variables:
                self._rt.variables[v.id] = value
            else:
                self._device_tensor(v).copy_(value)

    def weights_from_host(self) -> None:
        """Copies every variable's host value to the device."""
        self._weights_from_host(self._host)

    def weights_to_host(self) -> None:
        """Copies every variable's device value to the host."""
        for v in self._host:
            self._host[v] = self._host_value(v, self._device_tensor(v))

    def _check_variable(self, tensor) -> Variable:
        if not isinstance(tensor, Variable) and not isinstance(tensor, Constant):
            raise TypeError(f"tensor '{getattr(tensor, 'name', tensor)}' is not a variable or constant")
        if isinstance(tensor, Variable) and tensor not in self._host:
            raise ValueError(f"variable '{tensor.name}' belongs to another IR")
        return tensor

    def get_tensor_data(self, tensor) -> np.ndarray:
        """The host value of a variable (synced from the device when attached) or constant."""
        return self.get_tensors_data([tensor])[tensor]

    def get_tensors_data(self, tensors: Iterable) -> Dict:
        tensors = [self._check_variable(t) for t in tensors]
        if self._attached:
            self.weights_to_host()
        out = {}
        for t in tensors:
            if isinstance(t, Constant):
                out[t] = t._data.copy()
            else:
                data = self._host[t]
                grouped = t.retrieval_mode == "all_replicas" or t.replica_grouping.num_groups > 1
                out[t] = data.copy() if grouped else data[0].copy()
        return out

    def write_variable_data(self, tensor, data) -> None:
        """Sets a variable's value (host layout, as ``variable`` takes); the device too when attached."""
        self.write_variables_data({tensor: data})

    def write_variables_data(self, tensors: Mapping) -> None:
        written = {}
        for t, data in tensors.items():
            v = self._check_variable(t)
            if isinstance(v, Constant):
                raise TypeError(f"constant '{v.name}' cannot be written")
            arr = np.asarray(data, dtype=v.dtype.as_numpy())
            expected = v.shape_on_host
            if arr.shape != expected:
                raise ValueError(f"data for variable '{v.name}' has shape {arr.shape}; expected {expected}")
            if v.retrieval_mode != "all_replicas" and v.replica_grouping.num_groups == 1:
                arr = arr[None]
            self._host[v] = arr.copy()
            written[v] = self._host[v]
        if self._attached:
            self._weights_from_host(written)
