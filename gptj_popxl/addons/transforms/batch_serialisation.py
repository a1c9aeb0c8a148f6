"""Batch serialisation: run a graph over ``steps`` micro-batches in a loop, streaming its inputs in
and its outputs out, so that whatever stays on device (weights, accumulators) is used ``steps`` times.

A remote buffer used here is a matrix of ``rows`` x ``steps`` tensors: the tensor of micro-batch
``step`` in row ``row`` (a layer, say) is entry ``row * steps + step``. The transformed graph takes
the row as its first input; a handle's ``row_offset`` shifts every access by that many rows, and
``row_offset=None`` always reads row 0 (entry ``step``).

Each iteration loads the inputs named in ``load_handles`` (from a host stream or a remote buffer,
all-gathering replica-sharded ones), calls the graph, and stores the tensors named in
``store_streams`` / ``store_buffers`` (slicing those stored replica-sharded). Inputs without a
load handle become inputs of the transformed graph, passed to every iteration by reference, so
in-place updates (gradient accumulators) accumulate over the loop.

``io_mode``: 'compute' moves data on the compute tiles, 'io' on the IO tiles, 'io_overlapped'
builds the loop so that loading step i+1 and storing step i-1 overlap computing step i. All three
give the same values.
"""
import contextlib
import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ...backend import ops, popxl
from ..graph import GraphWithNamedArgs
from ..named_tensors import NamedTensors
from ..remote import create_remote_buffer
from ..rts import gather_replica_sharded_tensor
from ._named import graph_input_like, remap
from .autodiff import remap_grad_info

__all__ = ["batch_serialise", "batch_serialise_fwd_and_grad", "batch_serial_buffer", "RemoteHandle"]


@contextlib.contextmanager
def null_context():
    """A context that changes nothing (the tile placement when IO tiles are not used)."""
    yield

_IO_MODES = ("compute", "io", "io_overlapped")


@dataclass
class RemoteHandle:
    """Where a tensor lives between phases: a remote ``buffer``, the ``row_offset`` added to the row
    of each access (None: always row 0), and the ``shard_group`` the tensor is replica-sharded over
    in the buffer (None: stored whole)."""
    buffer: popxl.RemoteBuffer
    row_offset: Optional[int] = 0
    shard_group: Optional[popxl.ReplicaGrouping] = None


Handle = Union[popxl.HostToDeviceStream, RemoteHandle]


@dataclass
class BatchSerialResult:
    """A batch-serialised graph and where its stored tensors went.

    ``graph``: the transformed graph; call it with the row index, then its named args bound.
    ``stored_buffers``: ``{tensor of the original graph: RemoteHandle}`` of every tensor the loop
    stored to (or, for loaded inputs, already found in) a remote buffer.
    """
    graph: GraphWithNamedArgs
    stored_buffers: Dict[popxl.Tensor, RemoteHandle]

    _remap_dict: Dict[popxl.Tensor, popxl.Tensor]

    def remap_tensors(self, ts: NamedTensors) -> NamedTensors:
        """``ts``'s tensors of the original graph replaced by the transformed graph's inputs standing
        for them (tensors the transform loads itself have none and are left out)."""
        return remap(ts, self._remap_dict)


def batch_serial_buffer(t: popxl.Tensor, steps: int = 1, rows: int = 1,
                        shard_group: Optional[popxl.ReplicaGrouping] = None) -> popxl.RemoteBuffer:
    """A remote buffer of ``rows * steps`` entries for tensors like ``t``.

    With a ``shard_group`` of more than one replica, each entry holds ``t`` replica-sharded over
    that group's replicas (pass the same group in the ``RemoteHandle``).
    """
    if steps < 1 or rows < 1:
        raise ValueError(f"batch_serial_buffer for '{t.name}': steps={steps} and rows={rows} must be >= 1")
    shard_over = shard_group.group_size if shard_group is not None else 1
    return create_remote_buffer(t.spec, entries=steps * rows, replica_group=shard_group, shard_over=shard_over)


def _as_handles(handles: Mapping, what: str, streams_allowed: bool = True) -> Dict[popxl.Tensor, Handle]:
    """RemoteHandles for the older ``(buffer, row_offset)`` form; streams (where allowed) and handles as they are."""
    converted = {}
    for t, h in handles.items():
        if (isinstance(h, tuple) and len(h) == 2 and isinstance(h[0], popxl.RemoteBuffer)
                and (h[1] is None or isinstance(h[1], int))):
            h = RemoteHandle(*h)
        if not (isinstance(h, RemoteHandle) or streams_allowed and isinstance(h, popxl.HostToDeviceStream)):
            kinds = "a HostToDeviceStream, a RemoteHandle" if streams_allowed else "a RemoteHandle"
            raise TypeError(f"{what}: the handle of tensor '{t.name}' must be {kinds} or a (RemoteBuffer, row_offset) "
                            f"pair, got {h!r}")
        converted[t] = h
    return converted


def _io_context(use_io_tiles: bool):
    return popxl.io_tiles() if use_io_tiles else null_context()


class _Plan:
    """What one iteration of the loop loads, stores and passes through, and how."""

    def __init__(self, graph: GraphWithNamedArgs, steps: int, load_handles: Mapping, store_streams: Mapping,
                 store_buffers: Mapping, seed_input: Optional[popxl.Tensor], rows: int):
        what = f"batch_serialise of '{graph.graph.name}'"
        if steps < 1:
            raise ValueError(f"{what}: steps must be >= 1, got {steps}")
        if rows < 1:
            raise ValueError(f"{what}: rows must be >= 1, got {rows}")
        inputs, outputs = graph.graph.inputs, graph.graph.outputs
        if seed_input is not None and seed_input not in inputs:
            raise ValueError(f"{what}: seed_input '{seed_input.name}' is not an input of the graph")
        load_handles = _as_handles(load_handles, what)
        store_buffers = _as_handles(store_buffers, what, streams_allowed=False)
        self.graph = graph
        self.steps = steps
        self.rows = rows
        self.seed_input = seed_input
        self.load_handles = load_handles
        self.store_streams = dict(store_streams)
        self.store_buffers = store_buffers
        self.loaded = [t for t in inputs if t in load_handles]
        self.stored = [t for t in inputs + outputs
                       if not self._in_buffer(t) and (t in self.store_streams or t in store_buffers)]
        self.passed_through = [t for t in inputs if t is not seed_input and t not in load_handles]

    def _in_buffer(self, t: popxl.Tensor) -> bool:
        return isinstance(self.load_handles.get(t), RemoteHandle)

    def entry(self, index: popxl.Tensor, handle: RemoteHandle) -> popxl.Tensor:
        """The buffer entry for loop index ``index`` (= row * steps + step), growing the buffer to fit."""
        steps, offset = self.steps, handle.row_offset
        if offset is None:
            handle.buffer.entries = max(handle.buffer.entries, steps)
            return index % steps
        handle.buffer.entries = max(handle.buffer.entries, steps * (offset + self.rows))
        return index + offset * steps if offset else index

    def load(self, index: popxl.Tensor, use_io_tiles: bool) -> List[popxl.Tensor]:
        """Loads (and all-gathers) every loaded input for loop index ``index``; on the compute tiles."""
        with _io_context(use_io_tiles):
            sources = [h if isinstance(h, popxl.HostToDeviceStream) else (h, self.entry(index, h))
                       for h in (self.load_handles[t] for t in self.loaded)]
        with _io_context(use_io_tiles), popxl.transforms.merge_exchange(), popxl.in_sequence(False):
            values = [ops.host_load(s, t.name) if isinstance(s, popxl.HostToDeviceStream)
                      else ops.remote_load(s[0].buffer, s[1], t.name) for t, s in zip(self.loaded, sources)]
        with _io_context(use_io_tiles):
            values = [gather_replica_sharded_tensor(v, replica_group=s[0].shard_group)
                      if _sharded(s) else v for v, s in zip(values, sources)]
        return [ops.io_tile_copy(v) for v in values] if use_io_tiles else values

    def compute(self, loaded: Sequence[popxl.Tensor], passed_through: Sequence[popxl.Tensor],
                seed: Optional[popxl.Tensor]) -> List[popxl.Tensor]:
        """Calls the graph; returns the values to store (sliced where stored replica-sharded)."""
        args = dict(zip(self.loaded, loaded))
        args.update(zip(self.passed_through, passed_through))
        if self.seed_input is not None:
            args[self.seed_input] = seed
        info = self.graph.call_with_info(args=args)
        values = [info.graph_to_parent(t) for t in self.stored]
        sliced = []
        for t, v in zip(self.stored, values):
            handle = self.store_buffers.get(t)
            if handle is not None and _group_size(handle.shard_group) > 1:
                v = ops.collectives.replica_sharded_slice(v, group=handle.shard_group)
            sliced.append(v)
        return sliced

    def store(self, index: popxl.Tensor, values: Sequence[popxl.Tensor], use_io_tiles: bool) -> None:
        """Stores ``values`` (from :meth:`compute`) for loop index ``index``."""
        if use_io_tiles:
            values = [ops.io_tile_copy(v) for v in values]
        with _io_context(use_io_tiles):
            entries = {t: self.entry(index, self.store_buffers[t]) for t in self.stored if t in self.store_buffers}
        with _io_context(use_io_tiles), popxl.transforms.merge_exchange(), popxl.in_sequence(False):
            for t, v in zip(self.stored, values):
                if t in self.store_streams:
                    ops.host_store(self.store_streams[t], v)
                if t in entries:
                    ops.remote_store(self.store_buffers[t].buffer, entries[t], v)

    def seed_graph_input(self) -> Optional[popxl.Tensor]:
        """A seed input of the graph being built, when the graph takes a seed."""
        if self.seed_input is None:
            return None
        return popxl.graph_input((2,), popxl.uint32, "batch_serial_random_seed")

    def passed_graph_inputs(self) -> List[popxl.Tensor]:
        """Inputs of the graph being built for the passed-through inputs.

        By reference: the compute graph's own call decides which of them it writes.
        """
        return [graph_input_like(t, by_ref=True) for t in self.passed_through]

    def stored_buffers(self) -> Dict[popxl.Tensor, RemoteHandle]:
        ts = self.graph.graph.inputs + self.graph.graph.outputs
        return {t: (self.load_handles[t] if self._in_buffer(t) else h)
                for t, h in self.store_buffers.items() if t in ts}

    def result(self, graph: popxl.Graph, passed: Sequence[popxl.Tensor]) -> BatchSerialResult:
        mapping = dict(zip(self.passed_through, passed))
        return BatchSerialResult(GraphWithNamedArgs(graph, remap(self.graph.args, mapping)), self.stored_buffers(),
                                 mapping)


def _group_size(group: Optional[popxl.ReplicaGrouping]) -> int:
    return group.group_size if group is not None else 1


def _sharded(source) -> bool:
    return not isinstance(source, popxl.HostToDeviceStream) and _group_size(source[0].shard_group) > 1


def _split_seed(seed: Optional[popxl.Tensor]):
    return ops.split_random_seed(seed) if seed is not None else (None, None)


def _start_index(use_io_tiles: bool, steps: int) -> popxl.Tensor:
    """The graph's row input, turned into the loop index of the row's first micro-batch."""
    row = popxl.graph_input((), popxl.int32, "batch_serial_loop_index")
    with _io_context(use_io_tiles):
        if use_io_tiles:
            row = ops.io_tile_copy(row)
        return row * steps


def _next(index: popxl.Tensor, use_io_tiles: bool) -> popxl.Tensor:
    with _io_context(use_io_tiles):
        return index + 1


def batch_serialise_non_overlapped(graph: GraphWithNamedArgs, steps: int, load_handles: Mapping,
                                   store_streams: Mapping, store_buffers: Mapping,
                                   seed_input: Optional[popxl.Tensor] = None, rows: int = 1,
                                   use_io_tiles: bool = False) -> BatchSerialResult:
    """:func:`batch_serialise` where each iteration loads, computes and stores in turn."""
    plan = _Plan(graph, steps, load_handles, store_streams, store_buffers, seed_input, rows)
    ir = graph.graph.ir

    body = ir.create_empty_graph(graph.graph.name + "_batch_serial_step")
    with body, popxl.in_sequence(True):
        index = popxl.graph_input((), popxl.int32, "batch_serial_index")
        seed = plan.seed_graph_input()
        passed = plan.passed_graph_inputs()
        seed, next_seed = _split_seed(seed)
        loaded = plan.load(index, use_io_tiles)
        plan.store(index, plan.compute(loaded, passed, seed), use_io_tiles)
        popxl.graph_output(_next(index, use_io_tiles))
        if next_seed is not None:
            popxl.graph_output(next_seed)

    outer = ir.create_empty_graph(graph.graph.name + "_repeat_graph")
    with outer, popxl.in_sequence(True):
        index = _start_index(use_io_tiles, steps)
        seed = plan.seed_graph_input()
        passed = plan.passed_graph_inputs()
        ops.repeat(body, steps, index, *([seed] if seed is not None else []), *passed)
    return plan.result(outer, passed)


def batch_serialise_overlapped(graph: GraphWithNamedArgs, steps: int, load_handles: Mapping, store_streams: Mapping,
                               store_buffers: Mapping, seed_input: Optional[popxl.Tensor] = None,
                               rows: int = 1) -> BatchSerialResult:
    """:func:`batch_serialise` with IO overlapping compute (on the IO tiles); needs ``steps >= 2``.

    The loop is software-pipelined: load 0; load 1 while computing 0; then ``steps - 2`` times
    store i-2, load i and compute i-1 together; store n-2 while computing n-1; store n-1.
    """
    if steps < 2:
        raise ValueError(f"batch_serialise of '{graph.graph.name}': overlapped IO needs steps >= 2, got {steps}")
    plan = _Plan(graph, steps, load_handles, store_streams, store_buffers, seed_input, rows)
    ir = graph.graph.ir

    def compute(loaded, passed, seed):
        step_seed, seed = _split_seed(seed)
        return plan.compute(loaded, passed, step_seed), seed

    outer = ir.create_empty_graph(graph.graph.name + "_repeat_graph")
    with outer, popxl.in_sequence(True):
        index = _start_index(True, steps)
        seed = plan.seed_graph_input()
        passed = plan.passed_graph_inputs()
        loaded = plan.load(index, True)
        index = _next(index, True)
        next_loaded = plan.load(index, True)
        stored, seed = compute(loaded, passed, seed)
        index = _next(index, True)
        loaded = next_loaded
        if steps > 2:
            body = ir.create_empty_graph(graph.graph.name + "_batch_serial_step")
            with body, popxl.in_sequence(True):
                # Carried values first (index, seed, loaded, stored), as the loop feeds outputs back.
                b_index = popxl.graph_input((), popxl.int32, "batch_serial_index")
                b_seed = plan.seed_graph_input()
                b_loaded = [graph_input_like(t) for t in loaded]
                b_stored = [graph_input_like(t) for t in stored]
                b_passed = plan.passed_graph_inputs()
                with popxl.io_tiles():
                    store_index = b_index - 2
                plan.store(store_index, b_stored, True)
                b_next_loaded = plan.load(b_index, True)
                b_next_stored, b_seed = compute(b_loaded, b_passed, b_seed)
                carried = [_next(b_index, True)] + ([b_seed] if b_seed is not None else [])
                for t in carried + b_next_loaded + b_next_stored:
                    popxl.graph_output(t)
            k = 1 + (seed is not None)
            outs = ops.repeat(body, steps - 2, index, *([seed] if seed is not None else []), *loaded, *stored,
                              inputs_dict=dict(zip(b_passed, passed)))
            index, seed = outs[0], (outs[1] if seed is not None else None)
            loaded, stored = list(outs[k:k + len(loaded)]), list(outs[k + len(loaded):])
        with popxl.io_tiles():
            store_index = index - 2
        plan.store(store_index, stored, True)
        stored, seed = compute(loaded, passed, seed)
        plan.store(_next(store_index, True), stored, True)
    return plan.result(outer, passed)


def batch_serialise(graph: GraphWithNamedArgs, steps: int, load_handles: Mapping, store_streams: Mapping,
                    store_buffers: Mapping, seed_input: Optional[popxl.Tensor] = None, rows: int = 1,
                    io_mode: str = "io") -> BatchSerialResult:
    """``graph`` run over ``steps`` micro-batches in a loop (see the module docstring).

    ``load_handles``: ``{input: HostToDeviceStream | RemoteHandle}``; ``store_streams``:
    ``{input or output: DeviceToHostStream}``; ``store_buffers``: ``{input or output: RemoteHandle}``
    (an input loaded from a buffer is not stored again). ``seed_input``: a (2,) uint32 seed input of
    ``graph``; the transformed graph then takes a seed, split into one per micro-batch. ``rows``:
    rows the buffers need (entries grow to ``steps * (row_offset + rows)``). ``io_mode``: 'compute',
    'io' or 'io_overlapped' ('io' when steps < 2).

    The transformed graph's inputs: the row index (int32 scalar), then the seed when ``seed_input``
    is given, then every input of ``graph`` not loaded, with ``graph``'s named args remapped to them.
    Tensors stored to neither a stream nor a buffer are not kept.
    """
    if io_mode not in _IO_MODES:
        raise ValueError(f"batch_serialise of '{graph.graph.name}': io_mode must be one of {_IO_MODES}, got "
                         f"{io_mode!r}")
    if io_mode == "io_overlapped" and steps < 2:
        logging.warning("batch_serialise of '%s': io_mode='io_overlapped' needs steps >= 2, using 'io'",
                        graph.graph.name)
        io_mode = "io"
    if io_mode == "io_overlapped":
        return batch_serialise_overlapped(graph, steps, load_handles, store_streams, store_buffers, seed_input, rows)
    return batch_serialise_non_overlapped(graph, steps, load_handles, store_streams, store_buffers, seed_input, rows,
                                          use_io_tiles=io_mode == "io")


def batch_serialise_fwd_and_grad(forward_graph: GraphWithNamedArgs, gradient_graph: GraphWithNamedArgs,
                                 named_inputs_for_grad_graph: NamedTensors, steps: int, load_handles: Mapping,
                                 store_streams: Mapping, store_buffers: Mapping,
                                 seed_input: Optional[popxl.Tensor] = None, rows: int = 1,
                                 io_mode: str = "io") -> Tuple[BatchSerialResult, BatchSerialResult]:
    """Batch-serialises a forward graph and its gradient graph together.

    Every forward value the gradient graph needs is stored by the forward loop (in a new
    ``batch_serial_buffer`` unless ``store_buffers`` or a remote ``load_handles`` entry already
    places it) and loaded by the gradient loop at the same entry. Values in
    ``named_inputs_for_grad_graph`` (typically the forward's weights, ``forward_graph.args``) are
    not stored: they become named args of the gradient graph under the same names (this updates
    ``gradient_graph.args``). ``store_buffers`` may map an activation to a ReplicaGrouping to store
    it replica-sharded over that group. Gradients of forward outputs the gradient graph takes
    must have a load handle (keyed by the gradient graph's input).

    Returns ``(forward result, gradient result)``; the gradient result's graph keeps
    ``grad_graph_info``.
    """
    what = f"batch_serialise_fwd_and_grad of '{forward_graph.graph.name}'"
    load_handles = _as_handles(load_handles, what)
    shard_groups = {t: g for t, g in store_buffers.items() if isinstance(g, popxl.ReplicaGrouping)}
    buffers = _as_handles({t: h for t, h in store_buffers.items() if t not in shard_groups}, what,
                          streams_allowed=False)
    info = gradient_graph.grad_graph_info
    grad_inputs = gradient_graph.graph.inputs
    kept_names = {t: name for name, t in named_inputs_for_grad_graph.to_dict().items()}
    Fwd = popxl.transforms.ExpectedConnectionType.Fwd
    activations = [(i, c.fwd_tensor) for i, c in enumerate(info.expected_inputs) if c.connection_type == Fwd]

    for _, t in activations:
        if t in buffers or t in kept_names:
            continue
        if isinstance(load_handles.get(t), RemoteHandle):
            buffers[t] = load_handles[t]
        else:
            group = shard_groups.get(t)
            buffers[t] = RemoteHandle(batch_serial_buffer(t, steps, rows, group), 0, group)
    forward = batch_serialise(forward_graph, steps, load_handles, store_streams, buffers, seed_input, rows, io_mode)

    grad_loads: Dict[popxl.Tensor, Handle] = {}
    named: Dict[str, popxl.Tensor] = {}
    for i, t in activations:
        if t in kept_names:
            named[kept_names[t]] = grad_inputs[i]
        elif t in forward.stored_buffers:
            grad_loads[grad_inputs[i]] = forward.stored_buffers[t]
        else:
            raise RuntimeError(f"{what}: the gradient graph needs forward tensor '{t.name}', which is neither stored "
                               f"by the forward loop nor in named_inputs_for_grad_graph")
    FwdGrad = popxl.transforms.ExpectedConnectionType.FwdGrad
    for i, c in enumerate(info.expected_inputs):
        if c.connection_type == FwdGrad:
            if grad_inputs[i] not in load_handles:
                raise ValueError(f"{what}: gradient input {i} '{grad_inputs[i].name}' (the gradient of "
                                 f"'{c.fwd_tensor.name}') needs a load handle")
            grad_loads[grad_inputs[i]] = load_handles[grad_inputs[i]]
    named.update(gradient_graph.args.to_dict())
    gradient_graph.args = NamedTensors.from_dict(named)

    gradient = batch_serialise(gradient_graph, steps, grad_loads, store_streams, buffers, None, rows, io_mode)
    gradient.graph.grad_graph_info = remap_grad_info(info, forward_graph.graph, gradient_graph.graph)
    return forward, gradient
