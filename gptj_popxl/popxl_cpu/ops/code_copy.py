"""Loading a graph's code into executable memory: recorded in the graph, with nothing to do on the CPU."""
from ..graph import Graph
from ..primitive import Primitive

__all__ = ["remote_code_load"]

_DESTINATIONS = ("executable",)


class RemoteCodeLoad(Primitive):
    """Marks where a graph's code is loaded from streaming memory; the CPU keeps all code resident."""
    name = "remote_code_load"

    @staticmethod
    def infer(graph, destination):
        return ()

    @staticmethod
    def kernel(graph, destination):
        return ()


def remote_code_load(graph: Graph, destination: str) -> None:
    """Loads the code of ``graph`` from streaming memory to ``destination`` ('executable').

    The op is recorded where it is called, as on the IPU; on the CPU every graph's code is always
    loaded, so it does nothing at run time.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"remote_code_load: expected a Graph, got {type(graph).__name__}")
    if destination not in _DESTINATIONS:
        raise NotImplementedError(f"remote_code_load: destination {destination!r} is not supported; "
                                  f"use one of {_DESTINATIONS}")
    RemoteCodeLoad.create(graph=graph, destination=destination)
