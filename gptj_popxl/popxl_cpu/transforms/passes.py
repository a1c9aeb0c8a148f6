"""Scheduling transforms of the SDK that change no results; on the CPU they only validate their use."""
import contextlib

from ..context import get_current_graph, in_sequence, io_tiles
from ..graph import Graph


def decompose_sum(graph: Graph) -> Graph:
    """On the IPU this splits gradient sums to lower liveness; sums here are already evaluated eagerly."""
    if not isinstance(graph, Graph):
        raise TypeError(f"decompose_sum expects a Graph, got {type(graph).__name__}")
    return graph


@contextlib.contextmanager
def merge_exchange():
    """Ops created inside would have their host/remote exchanges merged on the IPU; same results here."""
    yield


# The ops the IPU merges into one exchange.
_EXCHANGES = frozenset({"host_load", "host_store", "remote_load", "remote_load_", "remote_store"})


@contextlib.contextmanager
def io_tile_exchange(verify_overlap: bool = True):
    """Exchanges inside run on IO tiles (``Tensor.tile_set`` is ``'io'``), merged and unordered, overlapped
    with compute on the IPU; same results here. As popxl, with ``verify_overlap`` the block may make, in
    the current graph, host and remote loads and stores (which merge into one exchange) and ``init`` ops,
    or one other op and inits: what remains must be one op to overlap."""
    graph = get_current_graph()
    created = []
    hook = graph.register_op_created_hook(created.append)
    try:
        with io_tiles(), merge_exchange(), in_sequence(False):
            yield
    finally:
        graph.remove_op_created_hook(hook)
    counted = [op for op in created if op.prim.name != "init"]
    others = [op for op in counted if op.prim.name not in _EXCHANGES]
    remaining = len(others) + (1 if len(others) < len(counted) else 0)
    if verify_overlap and remaining > 1:
        names = ", ".join(op.prim.name for op in others)
        raise RuntimeError(f"More than one Op remained after io_tile_exchange: {names} beside the exchanges; "
                           f"make only host and remote loads and stores inside")
