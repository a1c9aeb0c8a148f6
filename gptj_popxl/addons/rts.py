"""Replicated tensor sharding (RTS): gather shards before use, reduce and scatter gradients after.

A replica-sharded tensor is the flat, zero-padded value cut into ``group_size`` equal 1-D pieces;
replica k of a shard group holds piece k, and the tensor's ``meta_shape`` is the full shape.
There is one instance here (no poprun), so a group never crosses an instance or an IPU-link
domain and every reduction is a single stage.
"""
import contextlib
from typing import List, Mapping, Optional, Tuple

from ..backend import ops, popxl
from .dot_tree import DotTree
from .graph import GraphWithNamedArgs
from .named_tensors import NamedTensors

__all__ = ["all_gather_replica_sharded_graph", "reduce_replica_sharded_graph", "reduce_replica_sharded_tensor",
           "gather_replica_sharded_tensor", "replica_sharded_spec"]


def replica_sharded_spec(t: popxl.Tensor, shard_over: popxl.ReplicaGrouping) -> popxl.TensorSpec:
    """The spec of ``t``'s shard when sharded over the replicas of ``shard_over``'s groups.

    ``t``'s own spec when it is already a shard (has a meta shape), when the group has one replica,
    or when its element count does not divide by the group size (such tensors stay whole).
    """
    size = shard_over.group_size
    if t.meta_shape or size == 1 or t.nelms % size:
        return t.spec
    return popxl.TensorSpec((t.nelms // size,), t.dtype, tuple(t.shape))


def _on_io_tiles(use_io_tiles: bool):
    return popxl.io_tiles() if use_io_tiles else contextlib.nullcontext()


def gather_replica_sharded_tensor(t: popxl.Tensor, use_io_tiles: bool = False,
                                  replica_group: Optional[popxl.ReplicaGrouping] = None) -> popxl.Tensor:
    """The full tensor of the shard ``t``, all-gathered over ``replica_group`` (default: all replicas).

    A tensor without a meta shape is not a shard and is returned as is. With ``use_io_tiles`` the
    gather runs on the IO tiles and the result is copied to the compute tiles.
    """
    group = replica_group or popxl.gcg().ir.replica_grouping()
    if t.meta_shape:
        with _on_io_tiles(use_io_tiles):
            t = ops.collectives.replicated_all_gather(t, group=group)
    if use_io_tiles:
        t = ops.io_tile_copy(t)
    return t


def reduce_replica_sharded_tensor(t: popxl.Tensor, op: str = "add",
                                  replica_group: Optional[popxl.ReplicaGrouping] = None,
                                  shard_group: Optional[popxl.ReplicaGrouping] = None) -> popxl.Tensor:
    """``t`` reduced with ``op`` over ``replica_group``, then sharded over ``shard_group``.

    ``replica_group`` (default: all replicas) is the data-parallel group to reduce over;
    ``shard_group`` (default: ``replica_group``) the group whose replicas each keep one flat shard.
    When both are the same group the two steps are one reduce-scatter; otherwise an all-reduce then
    each replica's slice. A tensor that does not divide evenly over the shard group is all-reduced
    and kept whole.
    """
    ir = popxl.gcg().ir
    replica_group = replica_group or ir.replica_grouping()
    shard_group = shard_group or replica_group
    C = ops.collectives
    if shard_group.group_size == 1 or t.nelms % shard_group.group_size:
        return C.replicated_all_reduce(t, op=op, group=replica_group)
    if replica_group == shard_group:
        return C.replicated_reduce_scatter(t, op=op, group=replica_group,
                                           configure_output_for_replicated_tensor_sharding=True)
    if replica_group.group_size > 1:
        t = C.replicated_all_reduce(t, op=op, group=replica_group)
    return C.replica_sharded_slice(t, group=shard_group)


def _groups_by_name(groups, names) -> Mapping[str, Optional[popxl.ReplicaGrouping]]:
    """``{name: grouping or None}`` from a NamedReplicaGrouping / DotTree / mapping (None: none given)."""
    if groups is None:
        return {name: None for name in names}
    flat = groups.to_dict() if isinstance(groups, DotTree) else dict(groups)
    missing = [n for n in names if n not in flat]
    if missing:
        raise KeyError(f"replica groupings are missing for tensors {missing}; given for {sorted(flat)}")
    return flat


def all_gather_replica_sharded_graph(tensors: NamedTensors, use_io_tiles: bool = False,
                                     replica_groups=None) -> Tuple[GraphWithNamedArgs, List[str]]:
    """A graph that all-gathers every shard of ``tensors`` (each a named arg of the graph).

    ``replica_groups``: a NamedReplicaGrouping naming the group each tensor is sharded over
    (default: all replicas). Tensors without a meta shape pass through unchanged. Use it as
    ``NamedTensors.pack(names, graph.bind(shards).call())``; returns ``(graph, names)``.
    """
    graph = popxl.gcg().ir.create_empty_graph("all_gather")
    names, ts = tensors.unpack()
    groups = _groups_by_name(replica_groups, names)
    args = {}
    with graph, popxl.in_sequence(False):
        for name, t in zip(names, ts):
            args[name] = x = popxl.graph_input(t.shape, t.dtype, t.name, meta_shape=t.meta_shape or None)
            popxl.graph_output(gather_replica_sharded_tensor(x, use_io_tiles, groups[name]))
    return GraphWithNamedArgs(graph, NamedTensors.from_dict(args)), list(names)


def reduce_replica_sharded_graph(tensors: NamedTensors, op: str = "add", use_io_tiles: bool = False,
                                 shard_groups=None,
                                 replica_group: Optional[popxl.ReplicaGrouping] = None
                                 ) -> Tuple[GraphWithNamedArgs, List[str]]:
    """A graph that reduces every tensor of ``tensors`` over ``replica_group`` and shards it.

    Each tensor goes through :func:`reduce_replica_sharded_tensor` with its own shard group from
    ``shard_groups`` (a NamedReplicaGrouping; default: all replicas; a None entry: ``replica_group``). Use it as
    ``NamedTensors.pack(names, graph.bind(grads).call())``; returns ``(graph, names)``.
    """
    ir = popxl.gcg().ir
    graph = ir.create_empty_graph("replica_reduce")
    names, ts = tensors.unpack()
    groups = (_groups_by_name(shard_groups, names) if shard_groups is not None
              else {name: ir.replica_grouping() for name in names})
    args = {}
    with graph, popxl.in_sequence(False), _on_io_tiles(use_io_tiles):
        for name, t in zip(names, ts):
            args[name] = x = popxl.graph_input(t.shape, t.dtype, t.name, meta_shape=t.meta_shape or None)
            if use_io_tiles:
                x = ops.io_tile_copy(x)
            popxl.graph_output(reduce_replica_sharded_tensor(x, op, replica_group, groups[name]))
    return GraphWithNamedArgs(graph, NamedTensors.from_dict(args)), list(names)
