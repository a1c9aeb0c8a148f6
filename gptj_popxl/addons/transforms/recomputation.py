"""Recomputation: a gradient graph that recomputes the forward pass from the forward graph's inputs
instead of taking the forward intermediates, so that only a layer's inputs need keeping between the
forward and backward phases."""
from typing import Dict, List, Tuple

from ...backend import ops, popxl
from ..graph import GraphWithNamedArgs
from ._named import graph_input_like, remap
from .autodiff import ExpectedConnection, RemappedGradGraphInfo

__all__ = ["recompute_graph", "recompute_graph_with_forward_outputs", "add_recompute_inputs"]


def add_recompute_inputs(grad_info) -> Tuple[Dict[popxl.Tensor, popxl.Tensor], Dict[popxl.Tensor, popxl.Tensor],
                                              List[ExpectedConnection]]:
    """Adds to the current graph an input for every value a recomputing gradient graph takes.

    In ``grad_info.expected_inputs`` order: the output gradients, and the forward graph's inputs the
    gradient graph reads; then the forward graph's other inputs, by name. Returns
    ``({forward input: new input}, {gradient-graph input: new input}, expected connections of the
    new inputs, in order)``.
    """
    connection = popxl.transforms.ExpectedConnectionType
    fwd_inputs = grad_info.forward_graph.inputs
    grad_inputs = grad_info.graph.inputs
    fwd_map: Dict[popxl.Tensor, popxl.Tensor] = {}
    grad_map: Dict[popxl.Tensor, popxl.Tensor] = {}
    expected: List[ExpectedConnection] = []
    for i, c in enumerate(grad_info.expected_inputs):
        if c.connection_type == connection.FwdGrad:
            grad_map[grad_inputs[i]] = graph_input_like(grad_inputs[i])
        elif c.fwd_tensor in fwd_inputs:
            fwd_map[c.fwd_tensor] = graph_input_like(c.fwd_tensor)
        else:
            continue
        expected.append(ExpectedConnection(c.fwd_tensor, c.connection_type))
    for t in sorted((t for t in fwd_inputs if t not in fwd_map), key=lambda t: t.name):
        fwd_map[t] = graph_input_like(t)
        expected.append(ExpectedConnection(t, connection.Fwd))
    return fwd_map, grad_map, expected


def recompute_graph(grad_graph: GraphWithNamedArgs) -> GraphWithNamedArgs:
    """A gradient graph equivalent to ``grad_graph`` that first recomputes the forward graph.

    Its expected inputs are the output gradients and forward *inputs* only (see
    :func:`add_recompute_inputs`), followed by ``grad_graph``'s other inputs (such as accumulators,
    passed by reference) with its named args remapped to them. Its ``grad_graph_info`` tells how
    to connect it, as autodiff's does.
    """
    return _recomputing(grad_graph, forward_outputs=False)


def recompute_graph_with_forward_outputs(grad_graph: GraphWithNamedArgs) -> GraphWithNamedArgs:
    """``recompute_graph``, its graph also returning the recomputed forward's outputs after the
    gradients (not a popxl-addons function): a phase running a forward and then its gradient need
    not run the forward twice."""
    return _recomputing(grad_graph, forward_outputs=True)


def _recomputing(grad_graph: GraphWithNamedArgs, forward_outputs: bool) -> GraphWithNamedArgs:
    info = grad_graph.grad_graph_info
    graph = grad_graph.graph.ir.create_empty_graph(grad_graph.graph.name + "_recomp")
    with graph:
        fwd_map, grad_map, expected = add_recompute_inputs(info)
        forward = ops.call_with_info(info.forward_graph, inputs_dict=fwd_map)
        outputs = list(forward.outputs)
        grad_map.update(info.inputs_dict(forward))
        # The remaining inputs are not the forward's (accumulators and the like); by reference so
        # that the gradient graph's own call decides which of them it writes.
        others = sorted((t for t in grad_graph.graph.inputs if t not in grad_map), key=lambda t: t.name)
        grad_map.update((t, graph_input_like(t, by_ref=True)) for t in others)
        for t in ops.call(grad_graph.graph, inputs_dict=grad_map) + (tuple(outputs) if forward_outputs else ()):
            popxl.graph_output(t)
    grad_info = RemappedGradGraphInfo(graph, info.forward_graph, expected, info.expected_outputs)
    return GraphWithNamedArgs(graph, remap(grad_graph.args, grad_map), grad_info)
