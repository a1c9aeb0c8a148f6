"""Pieces every program builder shares: variables from the host weights, the vocabulary shard
offset, host streams, and the compiled ``Program`` with its attached session."""
import dataclasses
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from gptj_popxl import addons
from gptj_popxl.backend import IS_CPU, ops, popxl
from gptj_popxl.model.config import GPTJConfig, tp_layout
from gptj_popxl.model.hf_mapping import popxl_param_shapes


def variable_data(name: str, weights: Mapping[str, np.ndarray], groups: int, shape) -> np.ndarray:
    """``weights[name]`` (our layout) as the host data of a variable of ``groups`` replica groups
    of ``shape`` each: ``(groups, *shape)``, or ``shape`` for one group.

    Raises:
        KeyError: ``weights`` has no ``name``.
        ValueError: its shape fits neither layout.
    """
    if name not in weights:
        raise KeyError(f"no weights for variable {name!r}")
    data = np.asanyarray(weights[name])  # an np.memmap stays one: variables keep it without a copy
    expected = ((groups,) if groups > 1 else ()) + tuple(shape)
    if data.shape == expected:
        return data
    if data.shape == (1,) + expected:
        return data[0]
    raise ValueError(f"weights {name!r} have shape {data.shape}; variable needs {expected} "
                     f"({groups} replica group(s) of {tuple(shape)})")


def shape_only_weights(config: GPTJConfig, tensor_parallel: int) -> Dict[str, np.ndarray]:
    """Stand-in weights (our layout, float32) holding no data: one zero broadcast to each parameter's
    shape, which the runtime keeps as it is, so a program built from them (``attach=False``) can be
    analysed at any size without a byte of weights."""
    zero = np.zeros((), np.float32)
    return {name: np.broadcast_to(zero, shape) for name, shape in popxl_param_shapes(config, tensor_parallel).items()}


def create_variables(factories: addons.NamedVariableFactories, weights: Mapping[str, np.ndarray],
                     prefix: str = "", make=popxl.variable) -> addons.NamedTensors:
    """A main-graph variable per factory, holding ``weights[prefix + name]``.

    ``make(data, dtype, name, replica_grouping=...)`` creates each variable (default
    ``popxl.variable``; e.g. a ``popxl.remote_variable`` partial for offloaded weights).

    ``weights`` are in our layout (``hf_to_popxl``): sharded tensors carry a leading axis of
    one entry per shard, which is the variable's host data when its replica grouping has
    several groups and is dropped when it has one (``tp == 1``).

    Raises:
        KeyError: a factory has no entry in ``weights``.
        ValueError: an entry's shape fits neither layout.
    """
    made = {}
    for name, f in factories.to_dict().items():
        key = prefix + name
        groups = f.replica_grouping.num_groups if f.replica_grouping is not None else 1
        made[name] = make(variable_data(key, weights, groups, f.shape), f.dtype, key,
                          replica_grouping=f.replica_grouping)
    return addons.NamedTensors.from_dict(made)


def shard_offset(config: GPTJConfig, tensor_parallel: int, groups) -> popxl.Tensor:
    """Scalar int32 variable: the first vocabulary id of each replica's shard."""
    vps = tp_layout(config, tensor_parallel).vocab_per_shard
    offsets = np.arange(tensor_parallel, dtype=np.int32) * vps
    return popxl.variable(offsets if tensor_parallel > 1 else offsets[0], popxl.int32, "vocab_shard_offset",
                          replica_grouping=groups.sharded)


def input_streams(shape, names, dtype=popxl.int32):
    """Host-to-device streams of ``shape`` by name, and one ``host_load`` of each (in order)."""
    streams = {name: popxl.h2d_stream(shape, dtype, name) for name in names}
    return streams, [ops.host_load(s, name) for name, s in streams.items()]


def output_stream(name: str, t: popxl.Tensor) -> popxl.DeviceToHostStream:
    """A device-to-host stream ``name`` that ``t`` is stored to."""
    stream = popxl.d2h_stream(t.shape, t.dtype, name)
    ops.host_store(stream, t)
    return stream


def attached_session(ir, attach: bool = True):
    """A session of ``ir``, attached for the program's lifetime (weights move with ``weights_to_host``
    and ``Program.load_weights``, never by detaching); None without ``attach`` (a program built to be
    analysed from its shapes alone)."""
    if not attach:
        return None
    session = popxl.Session(ir, "cpu" if IS_CPU else "ipu_hw")
    session.__enter__()
    return session


# Where a program keeps a weight variable of (name, shape, numpy dtype), shared with other programs.
WeightMemory = Callable[[str, Tuple[int, ...], np.dtype], np.ndarray]


def share_weight_memory(variables: addons.NamedTensors, weight_memory: Optional[WeightMemory],
                        tensor_parallel: int, attach: bool) -> Tuple[str, ...]:
    """On the CPU runtime with one replica, ``variables`` (a program's resident weights, read and never
    written by it) live in the memory ``weight_memory`` gives for their name, shape and dtype
    (``popxl_cpu.back_variable``): one copy of a model's weights however many programs of however
    many shapes hold them, and a program finds in the processor's caches what another has just read
    (a prefill after a decode run took 8.6 ms with weights of its own, 6.1 ms with them in cache).
    Elsewhere (the SDK, tensor parallel, a program not attached) each program keeps its own.
    Returns the names of the variables now in shared memory (none elsewhere)."""
    if weight_memory is None or not (IS_CPU and attach and tensor_parallel == 1):
        return ()
    backed = tuple(variables.to_dict().values())
    for v in backed:
        popxl.back_variable(v, weight_memory(v.name, v.shape, v.dtype.as_numpy()))
    return tuple(v.name for v in backed)


@dataclasses.dataclass
class Program:
    """A compiled popxl program of the model.

    Attributes:
        ir, session: the program and its (attached) session.
        variables: the model's variables by our parameter name (whose host copy is the model's
            ``weights``).
        inputs: host-to-device streams by name (``input_ids``, and ``labels`` for a loss).
        outputs: device-to-host streams by name (``logits``; or ``loss`` and one per parameter gradient).
        weights_version: version of the host weights the device copy was loaded from.
        shared_weights: names of the variables kept in memory shared with the model's other programs
            (``share_weight_memory``).
    """

    ir: object
    session: object
    variables: addons.NamedTensors
    inputs: Dict[str, object]
    outputs: Dict[str, object]
    weights_version: Optional[int] = 0
    shared_weights: Tuple[str, ...] = ()

    def run(self, **host_inputs: np.ndarray) -> Dict[str, np.ndarray]:
        """Run once; ``host_inputs`` by stream name: an input of shape ``(replicas, *stream_shape)``
        holds each replica's data, any other is the same on every replica.

        Returns host arrays by output name, each ``(replicas, *shape)`` when replicated.
        """
        replicas = self.ir.replication_factor
        feed = {}
        for name, stream in self.inputs.items():
            data = np.asarray(host_inputs[name], dtype=stream.dtype.as_numpy())
            if data.shape == (replicas,) + tuple(stream.shape):
                feed[stream] = data if replicas > 1 else data[0]
            else:
                feed[stream] = np.broadcast_to(data, (replicas,) + data.shape) if replicas > 1 else data
        results = self.session.run(feed)
        return {name: results[stream] for name, stream in self.outputs.items()}

    def load_weights(self, weights: Mapping[str, np.ndarray], version: int, loaded: frozenset = frozenset()) -> None:
        """Write host ``weights`` (our layout) into the device variables, except those named in
        ``loaded`` (shared memory another program has already loaded ``version`` into)."""
        data = {}
        for name, v in self.variables.to_dict().items():
            if v.name in loaded:
                continue
            arr = variable_data(name, weights, v.replica_grouping.num_groups, v.shape)
            data[v] = arr.astype(v.dtype.as_numpy(), copy=False)
        self.session.write_variables_data(data)
        self.weights_version = version
