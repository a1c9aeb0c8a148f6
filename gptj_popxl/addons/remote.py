"""Remote buffers by name: one buffer per variable, with graphs that load/store them all at an entry.

Typical phased use: ``buffers = named_variable_buffers(layer_facts, entries=n_layers)``, one
``layer_facts.init_remote(buffers, i)`` per layer, then ``load_remote_graph(buffers)`` /
``store_remote_graph(buffers)`` called with the layer index.
"""
from typing import List, Mapping, Optional, Tuple, Union

import numpy as np

from ..backend import ops, popxl
from .dot_tree import DotTree
from .graph import GraphWithNamedArgs
from .named_tensors import NamedTensors
from .variable_factory import NamedVariableFactories


class NamedRemoteBuffers(DotTree[popxl.RemoteBuffer]):
    """Remote buffers by dotted name."""


def create_remote_buffer(spec, entries: int = 1, replica_group=None, shard_over: Optional[int] = None):
    """A remote buffer of ``entries`` slots for tensors of ``spec``.

    ``spec.meta_shape`` set: a buffer of ``spec.shape`` with that meta shape (already a shard).
    Else ``shard_over > 1`` (default: the replica group size): a replica-sharded buffer, the tensor
    split over ``shard_over`` replicas of ``replica_group`` (its element count must divide evenly).
    Else a plain buffer of ``spec.shape``.
    """
    ir = popxl.gcg().ir
    group = replica_group or ir.replica_grouping()
    shard_over = shard_over or group.group_size
    if spec.meta_shape:
        buffer = popxl.remote_buffer(spec.shape, spec.dtype, entries)
        buffer.meta_shape = spec.meta_shape
        return buffer
    if shard_over > 1:
        nelms = int(np.prod(spec.shape, dtype=np.int64))
        if nelms % shard_over:
            raise ValueError(f"create_remote_buffer: a tensor of shape {tuple(spec.shape)} ({nelms} elements) cannot "
                             f"be sharded evenly over {shard_over} replicas")
        shape = ((group.num_groups,) if group.num_groups > 1 else ()) + tuple(spec.shape)
        return popxl.replica_sharded_buffer(shape, spec.dtype, group, shard_over, entries)
    return popxl.remote_buffer(spec.shape, spec.dtype, entries)


def _shard_over(shard_over_dict, name: str, factory) -> int:
    group = factory.replica_grouping
    if isinstance(shard_over_dict, bool):
        return group.group_size if shard_over_dict else 1
    if isinstance(shard_over_dict, int):
        if not 1 <= shard_over_dict <= group.group_size:
            raise ValueError(f"named_variable_buffers: shard_over_dict={shard_over_dict} must be in "
                             f"[1, {group.group_size}] (the replica group size of {name!r})")
        return shard_over_dict
    if isinstance(shard_over_dict, Mapping):
        return shard_over_dict.get(name) or 1
    raise TypeError(f"named_variable_buffers: shard_over_dict must be a bool, int or mapping, got "
                    f"{type(shard_over_dict).__name__}")


def named_variable_buffers(factories: NamedVariableFactories, entries: int = 1,
                           shard_over_dict: Union[Mapping[str, int], int, bool] = True) -> NamedRemoteBuffers:
    """A remote buffer of ``entries`` slots per factory, named like the factories.

    ``shard_over_dict``: replicas to shard each variable over within its replica group — True: the
    whole group (replica-sharded buffers wherever the group has >1 replica), False or 1: no
    sharding, an int: that many, a mapping: per flat name (missing names: 1).
    """
    buffers = {}
    for name, f in factories.to_dict().items():
        buffers[name] = create_remote_buffer(f.spec, entries, f.replica_grouping,
                                             _shard_over(shard_over_dict, name, f))
    return NamedRemoteBuffers.from_dict(buffers)


def named_buffers(tensors: NamedTensors, entries: int = 1) -> NamedRemoteBuffers:
    """A plain remote buffer per tensor (its shape, dtype and meta shape), named like the tensors."""
    buffers = {}
    for name, t in tensors.to_dict().items():
        buffer = popxl.remote_buffer(t.shape, t.dtype, entries)
        buffer.meta_shape = t.meta_shape or ()
        buffers[name] = buffer
    return NamedRemoteBuffers.from_dict(buffers)


def load_remote_graph(buffers: NamedRemoteBuffers, entries: int = 1,
                      use_io_tiles: bool = False) -> Tuple[GraphWithNamedArgs, List[str]]:
    """A graph taking an int32 scalar entry index and returning every buffer's tensor at that entry.

    Outputs are in sorted-name order; returns the graph and those names
    (``NamedTensors.pack(names, graph.call(i))``). Buffers grow to at least ``entries``.
    """
    graph = popxl.gcg().ir.create_empty_graph("load_remote")
    names, bufs = buffers.unpack()
    with graph, popxl.transforms.merge_exchange(), popxl.in_sequence(False):
        index = popxl.graph_input((), popxl.int32, "load_index")
        for name, buffer in zip(names, bufs):
            buffer.entries = max(buffer.entries, entries)
            popxl.graph_output(_on_io_tiles(use_io_tiles, lambda: ops.remote_load(buffer, index, name)))
    return GraphWithNamedArgs(graph), list(names)


def store_remote_graph(buffers: NamedRemoteBuffers, entries: int = 1, use_io_tiles: bool = False) -> GraphWithNamedArgs:
    """A graph taking an int32 scalar entry index and, as named args (the buffers' names), the
    tensors to store at that entry: ``graph.bind(tensors).call(i)``. Buffers grow to ``entries``."""
    graph = popxl.gcg().ir.create_empty_graph("store_remote")
    args = {}
    with graph, popxl.transforms.merge_exchange(), popxl.in_sequence(False):
        index = popxl.graph_input((), popxl.int32, "store_index")
        for name, buffer in zip(*buffers.unpack()):
            buffer.entries = max(buffer.entries, entries)
            t = popxl.graph_input(buffer.tensor_shape, buffer.tensor_dtype, name, meta_shape=buffer.meta_shape or None)
            _on_io_tiles(use_io_tiles, lambda: ops.remote_store(buffer, index, t))
            args[name] = t
    return GraphWithNamedArgs(graph, NamedTensors.from_dict(args))


def load_remote(buffers: NamedRemoteBuffers, entry: Union[int, popxl.Tensor] = 0,
                use_io_tiles: bool = False) -> NamedTensors:
    """Every buffer's tensor at ``entry``, loaded in the current graph, by name."""
    with popxl.transforms.merge_exchange(), popxl.in_sequence(False):
        return NamedTensors.from_dict({name: _on_io_tiles(use_io_tiles, lambda: ops.remote_load(b, entry, name))
                                       for name, b in buffers.to_dict().items()})


def store_remote(buffers: NamedRemoteBuffers, tensors: NamedTensors, entry: Union[int, popxl.Tensor] = 0,
                 use_io_tiles: bool = False) -> None:
    """Stores each tensor of ``tensors`` into the same-named buffer at ``entry``."""
    with popxl.transforms.merge_exchange(), popxl.in_sequence(False):
        for buffer, t in buffers.to_mapping(tensors).items():
            _on_io_tiles(use_io_tiles, lambda: ops.remote_store(buffer, entry, t))


def _on_io_tiles(use_io_tiles: bool, make):
    if not use_io_tiles:
        return make()
    with popxl.io_tiles():
        return make()
