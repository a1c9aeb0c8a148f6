"""Reverse-mode autodiff as a graph-to-graph transform (popxl.transforms.autodiff).

The gradient graph takes the gradients of the forward outputs first (in forward output order),
then the forward values its rules need. Forward intermediates that are needed are appended to the
forward graph's outputs, and every op calling the forward graph gains the matching output, so a
caller can pass them on with ``GradGraphInfo.inputs_dict``.
"""
import enum
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from ..executor import storage_with_copying_views
from ..graph import Graph
from ..ops.control import CallSiteInfo, call, call_with_info
from ..ops.elementwise import add, identity
from ..ops.io import init_value
from ..primitive import GradOp
from ..tensor import Constant, Tensor, constant, graph_input, graph_output


class ExpectedConnectionType(enum.Enum):
    Fwd = "Fwd"
    FwdGrad = "FwdGrad"


class ExpectedConnection:
    """A gradient-graph input or output: a forward tensor, or the gradient of one."""

    def __init__(self):
        raise TypeError("ExpectedConnections are made by autodiff")

    @classmethod
    def _create(cls, fwd_tensor: Tensor, connection_type: ExpectedConnectionType) -> "ExpectedConnection":
        self = object.__new__(cls)
        self._fwd_tensor = fwd_tensor
        self._type = connection_type
        return self

    @property
    def fwd_tensor(self) -> Tensor:
        return self._fwd_tensor

    @property
    def connection_type(self) -> ExpectedConnectionType:
        return self._type

    def __repr__(self):
        return f"({self._type}, {self._fwd_tensor})"


class GradGraphInfo:
    """The result of autodiff: the gradient graph and how to connect it."""

    def __init__(self):
        raise TypeError("GradGraphInfo is made by autodiff")

    @classmethod
    def _create(cls, graph, forward_graph, expected_inputs, expected_outputs) -> "GradGraphInfo":
        self = object.__new__(cls)
        self._graph = graph
        self._forward_graph = forward_graph
        self._expected_inputs = tuple(expected_inputs)
        self._expected_outputs = tuple(expected_outputs)
        return self

    @property
    def graph(self) -> Graph:
        return self._graph

    @property
    def forward_graph(self) -> Graph:
        return self._forward_graph

    @property
    def expected_inputs(self) -> Tuple[ExpectedConnection, ...]:
        return self._expected_inputs

    @property
    def expected_outputs(self) -> Tuple[ExpectedConnection, ...]:
        return self._expected_outputs

    @property
    def inputs(self) -> Tuple[Tensor, ...]:
        return tuple(c.fwd_tensor for c in self._expected_inputs)

    @property
    def outputs(self) -> Tuple[Tensor, ...]:
        return tuple(c.fwd_tensor for c in self._expected_outputs)

    def inputs_dict(self, fwd_call_info: CallSiteInfo) -> Dict[Tensor, Tensor]:
        """Gradient-graph inputs of forward values -> the tensors at ``fwd_call_info``'s call site."""
        if fwd_call_info.called_graph is not self._forward_graph:
            raise TypeError(f"the call site calls '{fwd_call_info.called_graph.name}', not the forward graph "
                            f"'{self._forward_graph.name}'")
        return {self._graph._inputs[i]: fwd_call_info.graph_to_parent(c.fwd_tensor)
                for i, c in enumerate(self._expected_inputs) if c.connection_type is ExpectedConnectionType.Fwd}

    def fwd_graph_ins_to_grad_parent_outs(self, grad_call_info: CallSiteInfo) -> Dict[Tensor, Tensor]:
        return {c.fwd_tensor: grad_call_info.graph_to_parent(self._graph._outputs[i])
                for i, c in enumerate(self._expected_outputs)}

    def fwd_parent_ins_to_grad_parent_outs(self, fwd_call_info: CallSiteInfo,
                                           grad_call_info: CallSiteInfo) -> Dict[Tensor, Tensor]:
        return {fwd_call_info.graph_to_parent(c.fwd_tensor): grad_call_info.graph_to_parent(self._graph._outputs[i])
                for i, c in enumerate(self._expected_outputs)}


class _Builder:
    """State of one autodiff run over one forward graph.

    In-place writes: a tensor read after an in-place op wrote its memory holds the written value, so a
    read is taken as a read of the tensor's version there, the output of the in-place op that last wrote
    it (``y += b; tanh(y)`` reads add_'s output), and gradients follow versions. A forward value that a
    gradient rule reads and a later in-place op overwrites reaches the gradient graph as a copy made just
    before that write. Memory last written through another view of it (or inside a called graph) has no
    version to follow: reading it on the gradient path is refused.
    """

    def __init__(self, graph: Graph, grads_provided, grads_required, grad_infos: Dict[Graph, GradGraphInfo]):
        self.fwd = graph
        self.grad_infos = grad_infos
        self.grad_graph = graph.ir.create_empty_graph(graph.name + "_grad")
        self.expected_inputs: List[ExpectedConnection] = []
        self.values: Dict[str, Tensor] = {}  # forward tensor id -> its value in the gradient graph
        self.grads: Dict[str, Tensor] = {}   # forward tensor id -> accumulated gradient
        self._reading_for = -1  # forward position of the op whose gradient rule runs
        # In the order given, as popxl guarantees: the gradient graph's inputs follow it. A tensor the
        # graph returns in several places takes a gradient input for each, summed.
        self.provided = list(grads_provided)
        self.required = list(grads_required)
        self._order = {op: k for k, op in enumerate(graph._ops)}
        self._classes, _, _ = storage_with_copying_views(graph)
        # Storage class -> [(position, in-place op, the input it writes)], in forward order.
        self._writes: Dict[str, List[Tuple[int, object, Tensor]]] = {}
        for k, op in enumerate(graph._ops):
            for i in op.modified_inputs:
                self._writes.setdefault(self._classes.find(op.inputs[i].id), []).append((k, op, op.inputs[i]))
        # What each op reads and the graph returns: versions, or the tensor itself where it has none.
        self._reads = {op: [self._followed(t, k) for t in op.inputs] for op, k in self._order.items()}
        self._returned = [self._followed(t, len(graph._ops)) for t in self.provided]

    def _made_at(self, t: Tensor) -> int:
        """The forward position of ``t``'s producer (-1: an input, constant or variable)."""
        return self._order.get(t._producer, -1)

    def _last_write(self, t: Tensor, position: int):
        """``(position, op, written input)`` of the last in-place write to ``t``'s memory after ``t`` was made
        and before forward position ``position``; None when there is none."""
        made = self._made_at(t)
        earlier = [w for w in self._writes.get(self._classes.find(t.id), ()) if made < w[0] < position]
        return earlier[-1] if earlier else None

    def _version(self, t: Tensor, position: int) -> Optional[Tensor]:
        """The tensor whose value a read of ``t`` at forward position ``position`` gets: ``t`` when nothing
        wrote its memory since it was made, else the output of the in-place op that last wrote it, if that
        op wrote ``t``'s own version; None if the write went through another view or a called graph."""
        write = self._last_write(t, position)
        if write is None:
            return t
        k, op, written = write
        if op.called_graphs or written is not op.inputs[op.modified_inputs[0]]:
            return None
        before = self._version(t, k)
        return op.outputs[0] if before is not None and before is self._version(written, k) else None

    def _followed(self, t: Tensor, position: int) -> Tensor:
        version = self._version(t, position)
        return t if version is None else version

    def fwd_value(self, t: Tensor) -> Tensor:
        """The value of forward tensor ``t`` inside the gradient graph, as the op whose rule runs reads it."""
        if t._graph is self.fwd:
            t = self._read_version(t, self._reading_for, "a gradient rule reads")
        value = self.values.get(t.id)
        if value is not None:
            return value
        if isinstance(t, Constant):
            value = constant(t._data, t.dtype, name=t.name.rpartition("/")[2])
        else:
            if t._graph is not self.fwd:
                raise ValueError(f"autodiff of '{self.fwd.name}': tensor '{t.name}' belongs to graph "
                                 f"'{t._graph.name}'")
            value = graph_input(t.shape, t.dtype, t.name.rpartition("/")[2])
            self.expected_inputs.append(ExpectedConnection._create(t, ExpectedConnectionType.Fwd))
        self.values[t.id] = value
        return value

    def _read_version(self, t: Tensor, position: int, reader: str) -> Tensor:
        version = self._version(t, position)
        if version is None:
            _, op, written = self._last_write(t, position)
            raise NotImplementedError(
                f"autodiff of '{self.fwd.name}': {reader} '{t.name}' after op {op.prim.name} ('{op.name}') "
                f"wrote its memory in place through '{written.name}'; gradients follow a write only from the "
                f"tensor written to the in-place op's output: read that output, or write a copy")
        return version

    def accumulate(self, t: Tensor, g: Optional[Tensor]) -> None:
        if g is None:
            return
        if g.shape != t.shape or g.dtype != t.dtype:
            raise ValueError(f"gradient for '{t.name}' {t.shape} {t.dtype.name} has shape {g.shape} {g.dtype.name}")
        prev = self.grads.get(t.id)
        self.grads[t.id] = g if prev is None else add(prev, g)

    def run(self) -> GradGraphInfo:
        fwd = self.fwd
        with self.grad_graph:
            # FwdGrad inputs come first, in grads_provided order; Fwd inputs follow as rules ask for them.
            for t, version in zip(self.provided, self._returned):
                self.accumulate(version, graph_input(t.shape, t.dtype, "grad_" + t.name.rpartition("/")[2]))
                self.expected_inputs.append(ExpectedConnection._create(t, ExpectedConnectionType.FwdGrad))
            needed = self._needed_ops()
            self._refuse_unversioned_reads()
            for op in reversed(fwd._ops):
                if op not in needed or not any(t.id in self.grads for t in op.outputs):
                    continue
                if op.prim.grad is None:
                    raise NotImplementedError(f"autodiff of '{fwd.name}': op {op.prim.name} ('{op.name}') has no "
                                              f"gradient rule, but a required gradient flows through it")
                dys = [self.grads.get(t.id) for t in op.outputs]
                reads = self._reads[op]
                wants = [self._wants(t) for t in reads]
                self._reading_for = self._order[op]
                dxs = op.prim.grad(GradOp(op, dys, self.fwd_value, wants, self.grad_infos))
                for t, dx, want in zip(reads, dxs, wants):
                    if want:
                        self.accumulate(t, dx)
            outputs = []
            for t in self.required:
                g = self.grads.get(t.id)
                if g is None:
                    g = init_value(t.shape, t.dtype, 0.0)
                elif g in self.grad_graph._outputs or g in self.grad_graph._inputs:
                    g = identity(g)
                graph_output(g)
                outputs.append(ExpectedConnection._create(t, ExpectedConnectionType.FwdGrad))
        self._stitch_read_values()
        return GradGraphInfo._create(self.grad_graph, fwd, self.expected_inputs, outputs)

    def _needed_ops(self):
        """Ops on a path from a required input to a provided output."""
        reach = {t.id for t in self.required}
        forward = set()
        for op in self.fwd._ops:
            if any(t.id in reach for t in self._reads[op]):
                forward.add(op)
                reach.update(t.id for t in op.outputs)
        # Ops whose outputs lead to a provided output. An op reading a reached tensor is itself in
        # ``forward``, so the ones in ``forward`` are exactly those on a path from a required input.
        back = {t.id for t in self._returned}
        self._towards_outputs = set()
        for op in reversed(self.fwd._ops):
            if any(t.id in back for t in op.outputs):
                self._towards_outputs.add(op)
                back.update(t.id for t in self._reads[op])
        self._forward = forward
        self._reach = reach & back
        return self._towards_outputs & forward

    def _refuse_unversioned_reads(self) -> None:
        # Gradients follow versions; a read of memory written through another view would send the
        # gradient of the written value to the tensor as it was, and none through the write. Refused
        # where the write is on a path from a required input, the read on the way to a provided output.
        def check(t, position, reader):
            write = self._last_write(t, position)
            if write is not None and write[1] in self._forward:
                self._read_version(t, position, reader)

        for op in self._towards_outputs:
            for t in op.inputs:
                check(t, self._order[op], f"op {op.prim.name} ('{op.name}') reads")
        for t in self.provided:
            check(t, len(self.fwd._ops), "the graph returns")

    def _stitch_read_values(self) -> None:
        """Appends the forward values the gradient graph reads to the forward outputs (every call site gains
        them); one that a later in-place op overwrites is copied just before that write."""
        fwd = self.fwd
        copies: Dict[int, List] = {}  # forward position -> copies to make just before the op there
        for n, c in enumerate(self.expected_inputs):
            t = c.fwd_tensor
            # Inputs too: one passed by reference is the caller's tensor, which the call writes.
            if c.connection_type is not ExpectedConnectionType.Fwd:
                continue
            overwrite = self._next_write(t)
            if overwrite is not None:
                copies.setdefault(overwrite, []).append(n)
        for position in sorted(copies, reverse=True):
            for n in copies[position]:
                t = self.expected_inputs[n].fwd_tensor
                with fwd:
                    copy = identity(t, t.name.rpartition("/")[2] + "_before_write")
                fwd._ops.insert(position, fwd._ops.pop())
                self.expected_inputs[n] = ExpectedConnection._create(copy, ExpectedConnectionType.Fwd)
        for c in self.expected_inputs:
            t = c.fwd_tensor
            if c.connection_type is ExpectedConnectionType.Fwd and t not in fwd._inputs and t not in fwd._outputs:
                fwd._stitched.add(t)
                fwd._add_output(t)

    def _next_write(self, t: Tensor) -> Optional[int]:
        """The forward position of the first in-place write to ``t``'s memory after ``t`` was made."""
        made = self._made_at(t)
        later = [k for k, _, _ in self._writes.get(self._classes.find(t.id), ()) if k > made]
        return later[0] if later else None

    def _wants(self, t: Tensor) -> bool:
        return t.id in self._reach and t.dtype.is_floating_point


def autodiff(graph: Graph, grads_provided: Optional[Iterable[Tensor]] = None,
             grads_required: Optional[Iterable[Tensor]] = None,
             called_graphs_grad_info: Optional[Mapping[Graph, GradGraphInfo]] = None,
             return_all_grad_graphs: bool = False):
    """Builds the gradient graph of ``graph``.

    ``grads_provided``: forward outputs whose gradients the gradient graph takes, as its leading
    inputs in this order (default: all outputs, in output order).
    ``grads_required``: forward inputs whose gradients it returns, in order (default: every floating
    point input). A required input no gradient reaches gets zeros.
    ``called_graphs_grad_info``: gradient graphs to reuse for graphs that ``graph`` calls.
    Returns a :class:`GradGraphInfo`, or ``{graph: GradGraphInfo}`` for ``graph`` and every graph
    differentiated on the way when ``return_all_grad_graphs``.

    Forward values the gradient graph needs are appended to ``graph``'s outputs (every call site
    gains them); connect them with :meth:`GradGraphInfo.inputs_dict`.
    """
    if not isinstance(graph, Graph):
        raise TypeError(f"autodiff expects a Graph, got {type(graph).__name__}")
    provided = list(graph._outputs if grads_provided is None else grads_provided)
    if grads_required is None:
        required = [t for t in graph._inputs if t.dtype.is_floating_point]
    else:
        required = list(grads_required)
    for t in provided:
        if t not in graph._outputs:
            raise ValueError(f"autodiff of '{graph.name}': grads_provided tensor '{t.name}' is not an output of "
                             f"the graph")
    for t in required:
        if t not in graph._inputs:
            raise ValueError(f"autodiff of '{graph.name}': grads_required tensor '{t.name}' is not an input of "
                             f"the graph")
        if not t.dtype.is_floating_point:
            raise TypeError(f"autodiff of '{graph.name}': cannot differentiate with respect to '{t.name}' of dtype "
                            f"{t.dtype.name}")
    infos = dict(called_graphs_grad_info or {})
    # Differentiating a called graph adds its gradient graph and the forward outputs its rules read (at
    # every call site) before the rest is done: a refused autodiff undoes all of it.
    before = _IrState(graph.ir)
    try:
        info = _differentiate(graph, provided, required, infos)
    except BaseException:
        before.restore()
        raise
    return infos if return_all_grad_graphs else info


class _IrState:
    """What autodiff may change in an IR: its graphs, and each graph's ops, outputs, call sites and tensors
    (call sites gain outputs when a called graph does)."""

    def __init__(self, ir):
        self.ir = ir
        self.graphs = list(ir._graphs)
        self.per_graph = [(list(g._ops), list(g._outputs), set(g._stitched), list(g._call_sites), dict(g._tensors))
                          for g in self.graphs]
        self.op_outputs = [(op, list(op.outputs)) for g in self.graphs for op in g._ops]

    def restore(self) -> None:
        self.ir._graphs[:] = self.graphs
        for g, (ops, outputs, stitched, call_sites, tensors) in zip(self.graphs, self.per_graph):
            g._ops[:], g._outputs[:], g._call_sites[:] = ops, outputs, call_sites
            g._stitched, g._tensors = stitched, tensors
        for op, outputs in self.op_outputs:
            op.outputs[:] = outputs


def _differentiate(graph: Graph, provided, required, infos: Dict[Graph, GradGraphInfo]) -> GradGraphInfo:
    """Builds and records ``graph``'s gradient graph; ``infos`` is shared by every graph of one run."""
    info = _Builder(graph, provided, required, infos).run()
    infos[graph] = info
    return info


def _sub_grad_info(infos: Dict[Graph, GradGraphInfo], graph: Graph) -> GradGraphInfo:
    """The gradient graph of a called graph: reused when made before, else made for all its own outputs."""
    info = infos.get(graph)
    if info is None:
        # One gradient input per tensor: a call site sums the gradients of a tensor returned twice.
        provided = list(dict.fromkeys(t for t in graph._outputs if t not in graph._stitched))
        required = [t for t in graph._inputs if t.dtype.is_floating_point]
        info = _differentiate(graph, provided, required, infos)
    return info


def _grad_call_inputs(info: GradGraphInfo, fwd_grads: Mapping[str, Optional[Tensor]], fwd_value) -> List[Tensor]:
    """Gradient-graph inputs: output gradients by forward output id (zeros when absent), forward values via
    ``fwd_value``."""
    ins = []
    for c in info.expected_inputs:
        t = c.fwd_tensor
        if c.connection_type is ExpectedConnectionType.FwdGrad:
            g = fwd_grads.get(t.id)
            ins.append(g if g is not None else init_value(t.shape, t.dtype, 0.0))
        else:
            ins.append(fwd_value(t))
    return ins


def _grads_by_output(outputs, dys) -> Dict[str, Optional[Tensor]]:
    """Gradients by forward output id; a tensor a graph returns in several places gets their sum."""
    grads: Dict[str, Optional[Tensor]] = {}
    for t, dy in zip(outputs, dys):
        prev = grads.get(t.id)
        grads[t.id] = dy if prev is None else (prev if dy is None else add(prev, dy))
    return grads


def _grads_by_input(info: GradGraphInfo, graph: Graph, outs) -> Dict[int, Tensor]:
    return {graph._inputs.index(c.fwd_tensor): dx for c, dx in zip(info.expected_outputs, outs)}


def call_grad(g: GradOp):
    """Gradient rule of ``call``: call the called graph's gradient graph."""
    op = g.op
    graph = op.attrs["graph"]
    info = _sub_grad_info(g.grad_infos, graph)
    site = CallSiteInfo(op)
    grads = _grads_by_output(graph._outputs, [g.dy_or_none(i) for i in range(len(graph._outputs))])
    outs = call(info.graph, *_grad_call_inputs(info, grads, lambda sub: g.value(site.graph_to_parent(sub))))
    by_input = _grads_by_input(info, graph, outs)
    return [by_input.get(i) for i in range(len(op.inputs))]


def repeat_grad(g: GradOp):
    """Gradient rule of ``repeat``: recompute each iteration's inputs, then run the body's gradient backwards.

    Carried gradients flow from each iteration to the one before; gradients of the inputs that stay
    constant across iterations are summed over iterations.
    """
    op = g.op
    body = op.attrs["graph"]
    k, count = op.attrs["num_outputs"], op.attrs["repeat_count"]
    info = _sub_grad_info(g.grad_infos, body)
    inputs = [g.x(i) for i in range(len(op.inputs))]
    sites = []
    carried = inputs[:k]
    for _ in range(count):
        site = call_with_info(body, *(carried + inputs[k:]))
        sites.append(site)
        carried = list(site.outputs[:k])
    carried_grads = [g.dy_or_none(i) for i in range(k)]
    const_grads: List[Optional[Tensor]] = [None] * (len(op.inputs) - k)
    for site in reversed(sites):
        grads = _grads_by_output(body._outputs[:k], carried_grads)
        by_input = _grads_by_input(info, body, call(info.graph, *_grad_call_inputs(info, grads, site.graph_to_parent)))
        carried_grads = [by_input.get(i) for i in range(k)]
        for j in range(len(const_grads)):
            dx = by_input.get(k + j)
            if dx is not None:
                const_grads[j] = dx if const_grads[j] is None else add(const_grads[j], dx)
    return carried_grads + const_grads
