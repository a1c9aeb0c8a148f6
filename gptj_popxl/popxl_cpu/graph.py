"""Graphs: ordered ops over tensors, with inputs and outputs."""
from typing import Dict, List

from .context import get_current_context
from .tensor import Constant, Tensor, Variable


class Graph:
    """A list of ops in creation order (the order they run in), with graph inputs and outputs."""

    def __init__(self):
        raise TypeError("graphs are made by ir.create_graph or ir.create_empty_graph")

    @classmethod
    def _create(cls, ir, name: str) -> "Graph":
        self = object.__new__(cls)
        self._ir = ir
        self._name = name
        self._id = f"{name}_{len(ir._graphs)}"
        self._ops: List = []
        self._inputs: List[Tensor] = []
        self._outputs: List[Tensor] = []
        self._tensors: Dict[str, Tensor] = {}
        self._by_ref_inputs = set()
        # parent tensor id -> (parent tensor, graph input) for tensors captured from enclosing graphs
        self._captured: Dict[str, tuple] = {}
        self._call_sites: List = []
        # Outputs that autodiff appended so gradient graphs can read forward values.
        self._stitched: set = set()
        # concat_ outputs (which popxl aliases to the inputs, and this runtime copies) by the alias root
        # of each of them and of their inputs; and those whose inputs were written since (see
        # ``primitive.check_concat_aliases``).
        self._concat_aliases: Dict[str, List[Tensor]] = {}
        self._stale_concats: set = set()
        ir._graphs.append(self)
        return self

    @property
    def ir(self):
        return self._ir

    @property
    def name(self) -> str:
        return self._name

    @property
    def id(self) -> str:
        return self._id

    @property
    def main_graph(self) -> "Graph":
        return self._ir.main_graph

    @property
    def inputs(self):
        return tuple(self._inputs)

    @property
    def outputs(self):
        return tuple(self._outputs)

    @property
    def inputs_by_name(self) -> Dict[str, Tensor]:
        return {t.name: t for t in self._inputs}

    @property
    def tensors(self):
        return tuple(self._tensors.values())

    @property
    def variables(self):
        return tuple(t for t in self._tensors.values() if isinstance(t, Variable))

    @property
    def constants(self):
        return tuple(t for t in self._tensors.values() if isinstance(t, Constant))

    @property
    def called_graphs(self):
        seen = []
        for op in self._ops:
            for g in op.called_graphs:
                if g not in seen:
                    seen.append(g)
        return tuple(seen)

    def _all_called_graphs(self, seen=None) -> list:
        """The graphs this graph calls, directly or not, each once, in first-call order."""
        seen = [] if seen is None else seen
        for op in self._ops:
            for g in op.called_graphs:
                if g not in seen:
                    seen.append(g)
                    g._all_called_graphs(seen)
        return seen

    def get_tensor(self, tensor_id: str) -> Tensor:
        try:
            return self._tensors[tensor_id]
        except KeyError:
            raise KeyError(f"graph '{self._name}' has no tensor with id {tensor_id!r}") from None

    def register_op_created_hook(self, fn) -> int:
        return get_current_context().register_op_created_hook(
            lambda op: fn(op) if op.graph is self else None)

    def remove_op_created_hook(self, handle: int) -> None:
        get_current_context().remove_op_created_hook(handle)

    def _add_output(self, t: Tensor) -> None:
        """Appends an output; every op calling this graph gains the matching output."""
        self._outputs.append(t)
        for op in self._call_sites:
            op._graph_output_added(t)

    def _capture(self, t: Tensor) -> Tensor:
        """The input of this graph standing for ``t`` of an enclosing graph (added on first use).

        It is passed by reference: in-place ops on it inside the graph change ``t``, as they would
        if the ops had been written in the enclosing graph.
        """
        entry = self._captured.get(t.id)
        if entry is not None:
            return entry[1]
        t_in = Tensor._create(self, t.shape, t.dtype, t.name.rpartition("/")[2], meta_shape=t.meta_shape)
        self._inputs.append(t_in)
        self._by_ref_inputs.add(t_in)
        self._captured[t.id] = (t, t_in)
        return t_in

    def _move_ops_into(self, target: "Graph") -> Dict[Tensor, Tensor]:
        """Moves every op of this graph, in order, into the empty graph ``target``.

        For transforms that wrap a graph's ops in a loop (popxl-addons' ``repeat_graph``). Tensors
        the ops read that no moved op makes (inputs, variables, constants) become by-reference
        inputs of ``target``; returns ``{target input: the tensor of this graph it stands for}``.
        """
        if self._outputs:
            raise ValueError(f"cannot move the ops of graph '{self._name}': it has outputs")
        if target._ops or target._inputs:
            raise ValueError(f"cannot move ops into graph '{target._name}': it is not empty")
        stand_ins: Dict[str, Tensor] = {}
        sources: Dict[Tensor, Tensor] = {}
        for op in self._ops:
            for i, t in enumerate(op.inputs):
                if t._graph is target:
                    continue
                if t.id not in stand_ins:
                    stand_in = Tensor._create(target, t.shape, t.dtype, t.name.rpartition("/")[2],
                                              meta_shape=t.meta_shape)
                    target._inputs.append(stand_in)
                    target._by_ref_inputs.add(stand_in)
                    stand_ins[t.id] = stand_in
                    sources[stand_in] = t
                op.inputs[i] = stand_ins[t.id]
            for t in op.outputs:
                del self._tensors[t.id]
                t._graph = target
                target._tensors[t.id] = t
            op.graph = target
        target._ops, self._ops = self._ops, []
        return sources

    def _route_from_parent(self, t: Tensor, modified: bool) -> Tensor:
        """The input of this graph receiving ``t`` from the graph that calls it (for popxl-addons'
        ``route_tensor_into_graph``): made on first use and connected at every existing call site,
        all of which must be in ``t``'s graph; later call sites connect it too. ``modified``: in-place
        changes inside reach ``t``."""
        entry = self._captured.get(t.id)
        if entry is None:
            elsewhere = [op.graph.name for op in self._call_sites if op.graph is not t._graph]
            if elsewhere:
                raise ValueError(f"cannot route '{t.name}' into graph '{self._name}': it is also called from graphs "
                                 f"{elsewhere}, which do not hold '{t.name}'")
            t_in = self._capture(t)
            if not modified:
                self._by_ref_inputs.discard(t_in)
            for op in self._call_sites:
                op.inputs.append(t)
        else:
            t_in = entry[1]
        if modified:
            self._by_ref_inputs.add(t_in)
            index = self._inputs.index(t_in)
            for op in self._call_sites:
                op.attrs["modified"] = frozenset(op.attrs["modified"]) | {index}
        return t_in

    def __enter__(self) -> "Graph":
        get_current_context().push_graph(self)
        return self

    def __exit__(self, *exc):
        get_current_context().pop_graph()

    def __eq__(self, value) -> bool:
        return self is value

    def __hash__(self):
        return id(self)

    def __repr__(self) -> str:
        return f"Graph[{self._name}: {len(self._inputs)} inputs, {len(self._ops)} ops, {len(self._outputs)} outputs]"


def resolve_in_graph(t: Tensor, graph: Graph, what: str) -> Tensor:
    """``t`` itself if it is in ``graph``, else its capture from an enclosing graph being built."""
    if t._graph is graph:
        return t
    stack = get_current_context()._graphs
    if t._graph in stack and graph in stack and stack.index(t._graph) < stack.index(graph):
        chain = stack[stack.index(t._graph) + 1: stack.index(graph) + 1]
        for g in chain:
            t = g._capture(t)
        return t
    raise ValueError(f"{what}: tensor '{t.name}' {t.shape} belongs to graph '{t._graph.name}', which is neither "
                     f"the graph being built ('{graph.name}') nor one enclosing it")
