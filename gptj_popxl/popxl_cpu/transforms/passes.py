"""Scheduling transforms of the SDK that change no results; on the CPU they only validate their use."""
import contextlib

from ..context import get_current_context, io_tiles
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
    """Exchanges inside run on IO tiles (``Tensor.tile_set`` is ``'io'``), overlapped with compute on the
    IPU; same results here. As popxl, with ``verify_overlap`` the block may hold host and remote loads and
    stores, which merge into one exchange, and at most one other op: more would not overlap."""
    context = get_current_context()
    created = []
    hook = context.register_op_created_hook(created.append)
    try:
        with io_tiles():
            yield
    finally:
        context.remove_op_created_hook(hook)
    exchanges = [op for op in created if op.prim.name in _EXCHANGES]
    remaining = len(created) - len(exchanges) + (1 if exchanges else 0)
    if verify_overlap and remaining > 1:
        others = ", ".join(op.prim.name for op in created if op.prim.name not in _EXCHANGES)
        raise RuntimeError(f"More than one Op remained after io_tile_exchange: {others} beside the exchanges; "
                           f"make only host and remote loads and stores inside")
