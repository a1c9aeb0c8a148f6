"""Graphs with named inputs: bind named tensors to a graph's inputs, then call it."""
from typing import Iterable, Mapping, Optional, Tuple

from ..backend import ops, popxl
from .dot_tree import to_mapping
from .named_tensors import NamedTensors, TensorMap


class BoundGraph:
    """A graph plus tensors already chosen for some of its inputs (``{graph input: parent tensor}``)."""

    def __init__(self, graph, args: Optional[TensorMap] = None):
        self.graph = graph
        self.args = dict(args or {})

    def call(self, *targs, args: Optional[TensorMap] = None) -> Tuple[popxl.Tensor, ...]:
        """Calls the graph: ``targs`` fill its first inputs in order, ``args`` override bound inputs."""
        return self.call_with_info(*targs, args=args).outputs

    def call_with_info(self, *targs, args: Optional[TensorMap] = None):
        """As :meth:`call`, returning the ``CallSiteInfo``."""
        return ops.call_with_info(self.graph, *targs, inputs_dict={**self.args, **(args or {})})

    def bind(self, args: TensorMap) -> "BoundGraph":
        """A new BoundGraph with ``args`` bound as well (replacing earlier bindings of the same inputs)."""
        return BoundGraph(self.graph, {**self.args, **args})

    def subgraph_io_map(self, *targs, args: Optional[TensorMap] = None, outs: Optional[Iterable] = None) -> TensorMap:
        """``{graph input: call input}`` and ``{graph output: call output}`` for a call made with these values."""
        io = {**self.args, **(args or {})}
        io.update(zip(self.graph.inputs, targs))
        io.update(zip(self.graph.outputs, outs or ()))
        return io


def _normalise_grad_infos(called_graphs_grad_info) -> dict:
    """``{popxl.Graph: GradGraphInfo}`` from a mapping whose keys/values may be addons graph wrappers."""
    out = {}
    for fwd, grad in (called_graphs_grad_info or {}).items():
        fwd = getattr(fwd, "graph", fwd)
        grad = grad.grad_graph_info if isinstance(grad, GraphWithNamedArgs) else grad
        out[fwd] = grad
    return out


class GraphWithNamedArgs:
    """A ``popxl.Graph`` and NamedTensors naming some of its inputs (``args``).

    ``bind(named)`` matches ``named`` to ``args`` by name; ``call`` passes the remaining inputs
    positionally. Gradient graphs made by :func:`autodiff` carry ``grad_graph_info``.
    """

    def __init__(self, graph, args: Optional[NamedTensors] = None, grad_graph_info=None, from_module=None,
                 aux=None, called_graphs_grad_info: Optional[Mapping] = None):
        self.graph = graph
        self.args = args if args is not None else NamedTensors()
        self._grad_graph_info = grad_graph_info
        self._from_module = from_module
        self._aux = aux
        self.called_graphs_grad_info = _normalise_grad_infos(called_graphs_grad_info)
        self.autodiff_applied = False

    @classmethod
    def from_grad_graph(cls, grad_graph_info, args: Optional[NamedTensors] = None) -> "GraphWithNamedArgs":
        return cls(grad_graph_info.graph, args, grad_graph_info)

    @property
    def grad_graph_info(self):
        """The GradGraphInfo of a gradient graph; AttributeError for a forward graph."""
        if self._grad_graph_info is None:
            raise AttributeError(f"graph '{self.graph.name}' is not a gradient graph: it has no grad_graph_info")
        return self._grad_graph_info

    @grad_graph_info.setter
    def grad_graph_info(self, grad_graph_info) -> None:
        self._grad_graph_info = grad_graph_info

    def bind(self, args: Optional[NamedTensors] = None) -> BoundGraph:
        """A BoundGraph with each named input bound to the same-named tensor of ``args``."""
        return BoundGraph(self.graph, to_mapping(self.args, args) if args else {})

    def call(self, *targs, args: Optional[TensorMap] = None) -> Tuple[popxl.Tensor, ...]:
        """Calls the graph with no named inputs bound (give them in ``args``)."""
        return self.bind().call(*targs, args=args)

    def call_with_info(self, *targs, args: Optional[TensorMap] = None):
        return self.bind().call_with_info(*targs, args=args)

    def autodiff(self, grads_provided=None, grads_required=None, called_graphs_grad_info=None, method: str = "auto",
                 force: bool = False) -> "GraphWithNamedArgs":
        """The gradient graph of this graph, with its ``grad_graph_info``.

        ``method``: 'build_grad' traces the module's ``build_grad`` (``Module.create_grad_graph``),
        'autodiff' differentiates the graph (:func:`gptj_popxl.addons.autodiff`), 'auto' picks
        'build_grad' when the module that made this graph defines it. Both add forward outputs to
        this graph, so a second call raises unless ``force``.
        """
        from .transforms.autodiff import autodiff
        if method not in ("auto", "build_grad", "autodiff"):
            raise ValueError(f"method must be 'auto', 'build_grad' or 'autodiff', got {method!r}")
        if self.autodiff_applied and not force:
            raise RuntimeError(f"graph '{self.graph.name}' was already differentiated; autodiff changes the forward "
                               f"graph, pass force=True to differentiate it again")
        module = self._from_module
        if method == "auto":
            method = "build_grad" if module is not None and module.implements_grad_graph else "autodiff"
        if method == "build_grad":
            if module is None:
                raise ValueError(f"graph '{self.graph.name}' was not made by a Module: it has no build_grad")
            grad = module.create_grad_graph(self, grads_provided, grads_required)
        else:
            grad = autodiff(self, grads_provided, grads_required, called_graphs_grad_info)
        self.autodiff_applied = True
        return grad

    def copy(self) -> "GraphWithNamedArgs":
        return GraphWithNamedArgs(self.graph, self.args.copy(), self._grad_graph_info, self._from_module, self._aux,
                                  self.called_graphs_grad_info)

    def print_schedule(self) -> str:
        """A readable listing of the graph's inputs (with their names in ``args``)."""
        names = {t: n for n, t in self.args.to_dict().items()}
        ins = ", ".join(f"{names[t]}={t.name}" if t in names else t.name for t in self.graph.inputs)
        return f"Graph {self.graph.name}({ins}) -> ({', '.join(t.name for t in self.graph.outputs)})"

    def __repr__(self):
        return f"GraphWithNamedArgs({self.graph.name}, args={self.args.keys_flat()})"
