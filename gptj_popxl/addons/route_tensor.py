"""Make a tensor of an enclosing graph usable inside a graph that is already called (popxl-addons'
``route_tensor``): a new input is added to each graph on the call paths between them and connected
at their existing call sites.

On the CPU runtime graphs are ``popxl_cpu`` graphs and paths are tuples of them; with the Poplar SDK
popxl-addons' own implementation (on popart's IR) is used.
"""
from typing import Dict, Set, Tuple

from ..backend import IS_CPU, popxl


def _sites(parent, graph) -> list:
    """The call / repeat ops in ``parent`` that call ``graph``."""
    return [op for op in graph._call_sites if op.graph is parent]


def is_subgraph(parent, subgraph) -> bool:
    """Whether ``subgraph`` is ``parent`` or is called, directly or not, from it."""
    todo, seen = [parent], set()
    while todo:
        g = todo.pop()
        if g is subgraph:
            return True
        if g not in seen:
            seen.add(g)
            todo.extend(g.called_graphs)
    return False


def called_graph_paths(parent_graph, subgraph) -> Set[Tuple]:
    """Every chain of graphs ``(parent_graph, ..., subgraph)`` along which each graph calls the next."""
    paths, todo = set(), [(parent_graph, ())]
    while todo:
        g, path = todo.pop()
        path = path + (g,)
        if g is subgraph:
            paths.add(path)
        todo.extend((sub, path) for sub in g.called_graphs if sub not in path)
    return paths


def connect_call_op(op, tensor: popxl.Tensor, input_tensors: Dict, modified: bool) -> None:
    """Passes ``tensor`` (of ``op``'s graph) into the graph ``op`` calls, recording the called graph's
    input for it in ``input_tensors[graph]``. An input already fed by ``tensor`` is reused."""
    (graph,) = op.called_graphs
    if graph not in input_tensors:
        if tensor in op.inputs:
            input_tensors[graph] = graph.inputs[op.inputs.index(tensor)]
        else:
            input_tensors[graph] = graph._route_from_parent(tensor, bool(modified))


def connect_loop_op(op, tensor: popxl.Tensor, input_tensors: Dict, modified: bool) -> None:
    """As :func:`connect_call_op` for a repeat (loop) op: the routed input is loop-invariant."""
    connect_call_op(op, tensor, input_tensors, modified)


def connect_tensor_to_ops_on_path(path: Tuple, from_tensor: popxl.Tensor, input_tensors: Dict, modified: bool) -> None:
    """Routes ``from_tensor`` through each graph of ``path`` (the graphs below ``from_tensor``'s own)."""
    parent_tensor = from_tensor
    for graph in path:
        for op in _sites(parent_tensor._graph, graph):
            connect_call_op(op, parent_tensor, input_tensors, modified)
        parent_tensor = input_tensors.get(graph)
        if parent_tensor is None:
            raise RuntimeError(f"could not route '{from_tensor.name}' into graph '{graph.name}': no call site")


def route_tensor_into_graph(tensor: popxl.Tensor, graph=None, modified: bool = False) -> popxl.Tensor:
    """``tensor`` as seen inside ``graph`` (default: the graph being built), which its own graph calls
    (directly or through other graphs). ``modified``: in-place changes inside reach ``tensor``."""
    graph = graph if graph is not None else popxl.gcg()
    home = tensor._graph
    if home is graph:
        return tensor
    if not is_subgraph(home, graph):
        raise ValueError(f"tensor '{tensor.name}' is not in graph '{graph.name}' nor in a graph that calls it")
    routed: Dict = {}
    for path in called_graph_paths(home, graph):
        connect_tensor_to_ops_on_path(path[1:], tensor, routed, modified)
    return routed[graph]


if not IS_CPU:  # the SDK: popxl-addons' implementation on popart's IR
    from popxl_addons.route_tensor import (called_graph_paths, connect_call_op, connect_loop_op,  # noqa: F401,F811
                                           connect_tensor_to_ops_on_path, is_subgraph, route_tensor_into_graph)
