"""repeat_graph: run everything a graph does ``repeat_count`` times, as a loop in that graph."""
from ...backend import IS_CPU, ops, popxl

__all__ = ["repeat_graph"]


def repeat_graph(graph: popxl.Graph, repeat_count: int) -> popxl.Graph:
    """Moves every op of ``graph`` (often the main graph) into a new graph and calls that ``repeat_count`` times.

    The ops are moved in place, in order; tensors they read but do not make (variables, constants,
    ``graph``'s inputs) stay in ``graph`` and are passed to the loop by reference, so variable
    updates carry from one iteration to the next. Host streams read and written inside are used
    once per iteration (set ``ir.num_host_transfers`` to match). Returns the new graph, or
    ``graph`` itself when ``repeat_count <= 1`` (nothing to do).
    """
    if repeat_count <= 1:
        return graph
    if not IS_CPU:
        # Moving ops between graphs needs popart's internal IR, which public popxl does not expose.
        raise NotImplementedError("repeat_graph on the Poplar SDK: use popxl_addons.transforms.repeat_graph")
    body = graph.ir.create_empty_graph("repeat_graph")
    sources = graph._move_ops_into(body)
    with graph:
        ops.repeat(body, repeat_count, inputs_dict=sources)
    return body
