"""Subgraph calls: ``call`` runs a graph once, ``repeat`` runs it in a loop."""
import weakref
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..context import get_current_graph
from ..graph import Graph, resolve_in_graph
from ..primitive import Op, Primitive
from ..tensor import Tensor, constant


class Call(Primitive):
    """Runs ``graph`` on the inputs; inputs are passed by value unless marked modified (by reference)."""
    name = "call"
    unsigned = "torch"  # the called graph's own ops compute

    @staticmethod
    def infer(*inputs, graph, modified):
        return tuple(t.spec for t in graph._outputs)

    @classmethod
    def called_graphs(cls, op):
        return (op.attrs["graph"],)

    @classmethod
    def modified_inputs(cls, op):
        # By-reference inputs that the graph writes: one it only reads may share the caller's storage
        # (a remote load passed in stays a view of its buffer).
        written = _written_inputs(op.attrs["graph"])
        return tuple(sorted(i for i in op.attrs["modified"] if i in written))

    @classmethod
    def graph_output_added(cls, op, t):
        out = Tensor._create(op.graph, t.shape, t.dtype, t.name.rpartition("/")[2], producer=op,
                             meta_shape=t.meta_shape)
        op.outputs.append(out)

    @classmethod
    def lower(cls, op, runtime):
        plan = runtime.plan(op.attrs["graph"])
        copy_in = _copy_in(op)
        run = plan.run
        if not copy_in:
            return lambda *xs: run(xs)
        return lambda *xs: run([x.clone() if c else x for x, c in zip(xs, copy_in)])

    @staticmethod
    def grad(g):
        from ..transforms.autodiff import call_grad
        return call_grad(g)


# graph -> ((op count, input count) when computed, indices of the inputs it writes)
_WRITTEN_INPUTS = weakref.WeakKeyDictionary()


def _written_inputs(graph: Graph) -> frozenset:
    """Indices of ``graph``'s inputs that its ops (or graphs they call) write in place, through any alias."""
    from ..executor import storage_with_copying_views, written_input_indices
    key = (len(graph._ops), len(graph._inputs))
    cached = _WRITTEN_INPUTS.get(graph)
    if cached is None or cached[0] != key:
        classes, written, _ = storage_with_copying_views(graph)
        cached = _WRITTEN_INPUTS[graph] = (key, written_input_indices(graph, classes, written))
    return cached[1]


def copied_inputs(op: Op) -> Tuple[int, ...]:
    """Indices of the inputs of call or repeat ``op`` that its graph writes but that the op does not pass
    by reference: each run of the graph gets a copy of them."""
    modified = op.attrs["modified"]
    return tuple(sorted(i for i in _written_inputs(op.attrs["graph"]) if i not in modified))


def _copy_in(op) -> Tuple[bool, ...]:
    """Per input of ``op``, whether a run copies it in (empty when none is)."""
    copied = copied_inputs(op)
    return tuple(i in copied for i in range(len(op.inputs))) if copied else ()


class Repeat(Call):
    """Runs ``graph`` ``repeat_count`` times; output i feeds input i of the next iteration."""
    name = "repeat"

    @staticmethod
    def infer(*inputs, graph, modified, repeat_count, num_outputs):
        return tuple(t.spec for t in graph._outputs[:num_outputs])

    @classmethod
    def graph_output_added(cls, op, t):
        pass  # a loop's outputs are fixed when it is built

    @classmethod
    def lower(cls, op, runtime):
        plan = runtime.plan(op.attrs["graph"])
        count, k = op.attrs["repeat_count"], op.attrs["num_outputs"]
        copy_in = _copy_in(op)

        def repeat(*xs):
            if count == 0:
                return tuple(x.clone() for x in xs[:k])
            carried, rest = list(xs[:k]), list(xs[k:])
            for _ in range(count):
                ins = carried + rest
                if copy_in:
                    # Every iteration receives by-value inputs unchanged, as a fresh call would.
                    ins = [x.clone() if c else x for x, c in zip(ins, copy_in)]
                carried = plan.run(ins)[:k]
            return tuple(carried)
        return repeat

    @staticmethod
    def grad(g):
        from ..transforms.autodiff import repeat_grad
        return repeat_grad(g)


class CallSiteInfo:
    """How a call or repeat op connects its parent graph's tensors to the called graph."""

    def __init__(self, subgraph_op: Op):
        self._op = subgraph_op

    @property
    def called_graph(self) -> Graph:
        return self._op.attrs["graph"]

    @property
    def inputs(self) -> Tuple[Tensor, ...]:
        return tuple(self._op.inputs)

    @property
    def outputs(self) -> Tuple[Tensor, ...]:
        return tuple(self._op.outputs)

    def parent_input(self, idx: int) -> Tensor:
        return self._op.inputs[idx]

    def parent_output(self, idx: int) -> Tensor:
        return self._op.outputs[idx]

    def graph_to_parent(self, graph_tensor: Tensor) -> Tensor:
        g = self.called_graph
        if graph_tensor in g._inputs:
            return self._op.inputs[g._inputs.index(graph_tensor)]
        for i, t in enumerate(g._outputs[:len(self._op.outputs)]):
            if t is graph_tensor:
                return self._op.outputs[i]
        raise ValueError(f"tensor '{graph_tensor.name}' is neither an input nor an output of graph '{g.name}'")

    def parent_to_graph(self, parent_tensor: Tensor) -> Tensor:
        for i, t in enumerate(self._op.inputs):
            if t is parent_tensor:
                return self.called_graph._inputs[i]
        raise ValueError(f"tensor '{parent_tensor.name}' is not an input of this call of '{self.called_graph.name}'")

    def graph_to_parent_input_index(self, idx: int) -> int:
        return idx

    def parent_to_graph_input_index(self, idx: int) -> int:
        return idx

    def graph_to_parent_output_index(self, idx: int) -> int:
        return idx

    def parent_to_graph_output_index(self, idx: int) -> int:
        return idx

    def set_parent_input_modified(self, parent_tensor: Tensor, infer_modified_regions: bool = False) -> None:
        """Marks ``parent_tensor`` as passed by reference: in-place changes in the graph reach it."""
        self.parent_to_graph(parent_tensor)
        self._op.attrs["modified"] = self._op.attrs["modified"] | {
            i for i, t in enumerate(self._op.inputs) if t is parent_tensor}


def _connect(graph: Graph, inputs, inputs_dict, what: str) -> List[Tensor]:
    """Parent tensors for every input of ``graph``: positional, then by dict, then captured."""
    parent = get_current_graph()
    flat = []
    for t in inputs:
        flat.extend(t if isinstance(t, (list, tuple)) else [t])
    if len(flat) > len(graph._inputs):
        raise ValueError(f"{what} '{graph.name}': {len(flat)} inputs given, the graph has {len(graph._inputs)}")
    connected: Dict[int, Tensor] = dict(enumerate(flat))
    for sub, par in (inputs_dict or {}).items():
        if sub not in graph._inputs:
            raise ValueError(f"{what} '{graph.name}': inputs_dict key '{getattr(sub, 'name', sub)}' is not an input "
                             f"of the graph")
        index = graph._inputs.index(sub)
        if index in connected:
            raise ValueError(f"{what} '{graph.name}': graph input '{sub.name}' is given twice, positionally and in "
                             f"inputs_dict")
        connected[index] = par
    for par, sub in graph._captured.values():
        connected.setdefault(graph._inputs.index(sub), par)
    out = []
    for i, sub in enumerate(graph._inputs):
        if i not in connected:
            raise ValueError(f"{what} '{graph.name}': no tensor given for graph input '{sub.name}' {sub.shape} "
                             f"{sub.dtype.name}")
        par = connected[i]
        if not isinstance(par, Tensor):
            par = constant(np.asarray(par), sub.dtype, name=sub.name.rpartition("/")[2])
        par = resolve_in_graph(par, parent, f"{what} '{graph.name}'")
        if par.shape != sub.shape or par.dtype != sub.dtype:
            raise ValueError(f"{what} '{graph.name}': input '{sub.name}' expects {sub.shape} {sub.dtype.name}, got "
                             f"'{par.name}' {par.shape} {par.dtype.name}")
        out.append(par)
    return out


def _call_site(prim, graph: Graph, ins: List[Tensor], **attrs) -> CallSiteInfo:
    """Adds a call/repeat op of ``graph`` and registers it as one of the graph's call sites."""
    parent = get_current_graph()
    at = len(parent._ops)  # op-created hooks may add ops after this one
    prim.create(*ins, graph=graph, modified=frozenset(i for i, t in enumerate(graph._inputs)
                                                     if t in graph._by_ref_inputs), **attrs)
    op = parent._ops[at]
    graph._call_sites.append(op)
    return CallSiteInfo(op)


def call_with_info(graph: Graph, *inputs, inputs_dict: Optional[Mapping[Tensor, Tensor]] = None,
                   check_inputs: bool = True) -> CallSiteInfo:
    """Calls ``graph`` and returns the call site's :class:`CallSiteInfo`."""
    return _call_site(Call, graph, _connect(graph, inputs, inputs_dict, "call"))


def call(graph: Graph, *inputs, inputs_dict: Optional[Mapping[Tensor, Tensor]] = None) -> Tuple[Tensor, ...]:
    """Calls ``graph`` once; returns its outputs as a tuple."""
    return call_with_info(graph, *inputs, inputs_dict=inputs_dict).outputs


def repeat_with_info(graph: Graph, repeat_count: int, *inputs, inputs_dict=None, check_inputs: bool = True):
    """Runs ``graph`` ``repeat_count`` times, feeding output i to input i; returns the CallSiteInfo."""
    if repeat_count < 0:
        raise ValueError(f"repeat of '{graph.name}': repeat_count must be >= 0, got {repeat_count}")
    if len(graph._outputs) > len(graph._inputs):
        raise ValueError(f"repeat of '{graph.name}': the graph has {len(graph._outputs)} outputs but only "
                         f"{len(graph._inputs)} inputs to carry them")
    ins = _connect(graph, inputs, inputs_dict, "repeat")
    k = len(graph._outputs)
    for i, (sub_in, sub_out) in enumerate(zip(graph._inputs, graph._outputs)):
        if sub_in.shape != sub_out.shape or sub_in.dtype != sub_out.dtype:
            raise ValueError(f"repeat of '{graph.name}': output {i} '{sub_out.name}' {sub_out.shape} "
                             f"{sub_out.dtype.name} cannot feed input {i} '{sub_in.name}' {sub_in.shape} "
                             f"{sub_in.dtype.name}")
    return _call_site(Repeat, graph, ins, repeat_count=int(repeat_count), num_outputs=k)


def repeat(graph: Graph, repeat_count: int, *inputs, inputs_dict=None) -> Tuple[Tensor, ...]:
    """Runs ``graph`` ``repeat_count`` times; returns the last iteration's outputs."""
    return repeat_with_info(graph, repeat_count, *inputs, inputs_dict=inputs_dict).outputs
