"""The IR: one main graph, the subgraphs, variables, streams and remote buffers of a program."""
import inspect
import itertools
from typing import Any, Callable, List, Optional, Tuple, Union

from .graph import Graph
from .replica_grouping import ReplicaGrouping
from .tensor import Tensor, TensorByRef, TensorSpec, graph_input

_ir_ids = itertools.count()


class Ir:
    """A popxl program. ``replication`` replicas of the main graph run SPMD."""

    def __init__(self, replication: Union[int, str] = 1):
        if replication == "popdist":
            replication = 1
        if not isinstance(replication, int) or replication < 1:
            raise ValueError(f"replication must be a positive int, got {replication!r}")
        self._id = next(_ir_ids)
        self._replication = replication
        self._num_host_transfers = 1
        self._graphs: List[Graph] = []
        self._variables: List = []
        self._streams: List = []
        self._remote_buffers: List = []
        # Each random op takes the next, so ops fed one seed draw apart (PopART's seed modifiers).
        self._seed_modifiers = itertools.count(1)
        self._main = Graph._create(self, "main_graph")

    @property
    def id(self) -> int:
        return self._id

    @property
    def main_graph(self) -> Graph:
        return self._main

    @property
    def replication_factor(self) -> int:
        return self._replication

    @replication_factor.setter
    def replication_factor(self, value: int) -> None:
        if self._variables:
            raise ValueError("set ir.replication_factor before creating variables")
        # A collective's replica grouping is fixed when the op is built.
        for graph in self._graphs:
            for op in graph._ops:
                if any(isinstance(v, ReplicaGrouping) for v in op.attrs.values()):
                    raise ValueError(f"set ir.replication_factor before building ops over replica groups: "
                                     f"{op.prim.name} ('{op.name}') in graph '{graph.name}' was built for "
                                     f"{self._replication} replicas")
        self._replication = int(value)

    @property
    def instance_replication_factor(self) -> int:
        return self._replication

    @property
    def num_host_transfers(self) -> int:
        return self._num_host_transfers

    @num_host_transfers.setter
    def num_host_transfers(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"num_host_transfers must be >= 1, got {value}")
        self._num_host_transfers = int(value)

    def replica_grouping(self, stride: int = 1, group_size: Optional[int] = None) -> ReplicaGrouping:
        """Groups of ``group_size`` replicas ``stride`` apart (default: all replicas in one group)."""
        return ReplicaGrouping._create(self._replication, stride, group_size)

    def replica_grouping_from_assignments(self, assignment: List[int]) -> ReplicaGrouping:
        """The grouping putting replica r in group ``assignment[r]`` (groups numbered in order of appearance)."""
        return ReplicaGrouping._from_assignment(self._replication, assignment)

    def get_all_d2h_streams(self):
        """The device-to-host streams a ``host_store`` writes (as popxl: a stream never stored is no output)."""
        from .ops.io import HostStore
        return self._streams_used_by(HostStore)

    def get_all_h2d_streams(self):
        """The host-to-device streams a ``host_load`` reads."""
        from .ops.io import HostLoad
        return self._streams_used_by(HostLoad)

    def _streams_used_by(self, prim) -> set:
        return {op.attrs["stream"] for graph in self._graphs for op in graph._ops if issubclass(op.prim, prim)}

    def create_empty_graph(self, name: Optional[str] = None) -> Graph:
        return Graph._create(self, name or "graph")

    def create_graph(self, fn: Callable[..., Any], *args, **kwargs) -> Graph:
        """Builds a subgraph by calling ``fn``; ``TensorSpec``/``Tensor`` arguments become graph inputs.

        ``fn`` may be a function or a ``popxl.Module`` (its ``build`` is traced). Returned tensors
        become the graph's outputs, in order.
        """
        build = fn.build if hasattr(fn, "build") and not inspect.isfunction(fn) else fn
        name = getattr(fn, "__name__", None) or type(fn).__name__
        try:
            signature = inspect.signature(build)
        except (TypeError, ValueError):
            signature = None
        graph = Graph._create(self, name)
        with graph:
            if signature is None:
                in_args = [_as_graph_input(a, f"arg{i}") for i, a in enumerate(args)]
                in_kwargs = {k: _as_graph_input(v, k) for k, v in kwargs.items()}
            else:
                # As popxl: graph inputs in the signature's order, whatever the order of the keywords given,
                # defaults included (a TensorSpec default is an input too).
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                for param_name, value in bound.arguments.items():
                    bound.arguments[param_name] = _bound_graph_input(signature.parameters[param_name], value)
                in_args, in_kwargs = bound.args, bound.kwargs
            outputs = build(*in_args, **in_kwargs)
            for t in _flatten_outputs(outputs, name):
                graph._add_output(_own(graph, t))
        return graph

    def dot_checkpoint(self, check: str, save_dir: Optional[str] = None) -> None:
        """Graph visualisation hook of the SDK; nothing to write on the CPU."""

    def __eq__(self, value) -> bool:
        return self is value

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"Ir[{self._id}: replication {self._replication}, {len(self._graphs)} graphs]"


def _bound_graph_input(param: inspect.Parameter, value):
    """The graph input(s) for ``value`` bound to ``param``: by reference when annotated ``TensorByRef``
    (for ``*args``/``**kwargs``, each of them; ``List``/``Tuple[TensorByRef]`` for a sequence), as popxl."""
    hint = param.annotation
    if param.kind is inspect.Parameter.VAR_POSITIONAL:
        return tuple(_as_graph_input(a, f"{param.name}_{i}", hint is TensorByRef) for i, a in enumerate(value))
    if param.kind is inspect.Parameter.VAR_KEYWORD:
        return {k: _as_graph_input(v, k, hint is TensorByRef) for k, v in value.items()}
    sequence = isinstance(value, (list, tuple))
    return _as_graph_input(value, param.name,
                           hint in (List[TensorByRef], Tuple[TensorByRef]) if sequence else hint is TensorByRef)


def _as_graph_input(arg, name: str, by_ref: bool = False):
    if isinstance(arg, (TensorSpec, Tensor)):
        spec = arg.spec if isinstance(arg, Tensor) else arg
        return graph_input(spec.shape, spec.dtype, name, by_ref=by_ref, meta_shape=spec.meta_shape)
    if isinstance(arg, (list, tuple)) and any(isinstance(a, (TensorSpec, Tensor)) for a in arg):
        if not all(isinstance(a, (TensorSpec, Tensor)) for a in arg):
            raise TypeError(f"create_graph: argument {name!r} mixes tensors and other values: {arg!r}")
        return type(arg)(_as_graph_input(a, f"{name}_{i}", by_ref) for i, a in enumerate(arg))
    return arg


def _flatten_outputs(outputs, name: str):
    if outputs is None:
        return []
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)):
        flat = []
        for o in outputs:
            flat.extend(_flatten_outputs(o, name))
        return flat
    raise TypeError(f"graph {name!r}: the function must return tensors, a tuple/list of tensors or None; "
                    f"got {type(outputs).__name__}")


def _own(graph: Graph, t: Tensor) -> Tensor:
    from .graph import resolve_in_graph
    return resolve_in_graph(t, graph, f"output of graph '{graph.name}'")
