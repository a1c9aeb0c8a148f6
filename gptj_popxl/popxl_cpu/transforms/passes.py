"""Scheduling transforms of the SDK that change no results; on the CPU they only validate their use."""
import contextlib

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


@contextlib.contextmanager
def io_tile_exchange(verify_overlap: bool = True):
    """Exchanges inside would run on IO tiles overlapped with compute on the IPU; same results here."""
    yield
