"""Collectives over replica groups of any stride (popxl-addons' "strided" variants).

popxl_cpu's collectives already take any ``ReplicaGrouping``, so these are the plain collectives
under popxl-addons' names and signatures (default group: all replicas).
"""
from typing import List, Optional, Tuple

from ...backend import ops, popxl
from ..graph import GraphWithNamedArgs
from ..named_tensors import NamedTensors
from ..utils import null_context
from .replicated_all_reduce_TP import (replicated_all_reduce_identical_grad_inputs,
                                       replicated_all_reduce_identical_inputs)


def replicated_all_gather_strided(t: popxl.Tensor, group: Optional[object] = None) -> popxl.Tensor:
    """``t`` of every replica of the group, flattened and concatenated in replica order; a
    replica-sharded ``t`` (with a meta shape) is reassembled to its meta shape."""
    if t.meta_shape:
        return ops.collectives.replicated_all_gather(t, 0, group, "meta_shape")
    return ops.collectives.replicated_all_gather(t.reshape((-1,)), 0, group, "concat")


def replicated_all_reduce_strided(t: popxl.Tensor, op: str = "add", group: Optional[object] = None) -> popxl.Tensor:
    """All-reduce over the group; its gradient is all-reduced too."""
    return ops.collectives.replicated_all_reduce(t, op, group)


def replicated_all_reduce_strided_identical_inputs(t: popxl.Tensor, op: str = "add",
                                                   group: Optional[object] = None) -> popxl.Tensor:
    """Identity forward (inputs equal over the group), all-reduced gradient."""
    return replicated_all_reduce_identical_inputs(t, op, group)


def replicated_all_reduce_strided_identical_grad_inputs(t: popxl.Tensor, op: str = "add",
                                                        group: Optional[object] = None) -> popxl.Tensor:
    """All-reduce forward, gradient passed through unchanged (it is equal over the group)."""
    return replicated_all_reduce_identical_grad_inputs(t, op, group)


def replicated_reduce_scatter_strided(t: popxl.Tensor, op: str = "add", group: Optional[object] = None,
                                      configure_output_for_replicated_tensor_sharding: bool = False) -> popxl.Tensor:
    """Reduce over the group, each replica keeping its flat shard (meta shape = ``t``'s shape)."""
    return ops.collectives.replicated_reduce_scatter(t, op, group, configure_output_for_replicated_tensor_sharding)


def replicated_all_reduce_strided_graph(tensors: NamedTensors, op: str = "add", group: Optional[object] = None,
                                        use_io_tiles: bool = False) -> Tuple[GraphWithNamedArgs, List[str]]:
    """A graph all-reducing each tensor of ``tensors`` (one named input each, same names).

    Returns the graph and the names of its outputs in order:
    ``NamedTensors.pack(names, graph.bind(tensors).call())``.
    """
    graph = popxl.gcg().ir.create_empty_graph("replica_reduce")
    names, args = [], {}
    with graph, popxl.in_sequence(False), (popxl.io_tiles() if use_io_tiles else null_context()):
        for name, tensor in zip(*tensors.unpack()):
            x = popxl.graph_input(tensor.shape, tensor.dtype, tensor.name, meta_shape=tensor.meta_shape)
            args[name] = x
            names.append(name)
            if use_io_tiles:
                x = ops.io_tile_copy(x)
            popxl.graph_output(replicated_all_reduce_strided(x, op, group))
    return GraphWithNamedArgs(graph, NamedTensors.from_dict(args)), names
