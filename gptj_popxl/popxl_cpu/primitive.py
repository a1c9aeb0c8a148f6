"""Ops as primitives: each primitive keeps its shape rule, kernel and gradient rule in one class.

A primitive subclasses :class:`Primitive` and defines

* ``infer(*inputs, **attrs)`` -> ``TensorSpec`` or a tuple of them: the shape/dtype rule, run at build
  time on the input tensors. Raise ``ValueError``/``TypeError`` naming what is wrong.
* ``kernel(*values, **attrs)`` -> torch tensor(s): the computation. Every runtime value carries a
  leading replica axis, so a tensor of IR shape ``(a, b)`` arrives as ``(R, a, b)``.
* ``grad(g)`` (optional) -> one gradient tensor (or ``None``) per input, built with popxl ops in the
  gradient graph; ``g`` is a :class:`GradOp` giving the output gradients and forward values.

and optionally ``modifies`` (input indices written in place; output 0 aliases the first), ``view``
(an out-of-place op whose kernel may return a view of input 0; the runtime copies where a later
in-place op would otherwise be visible through it), ``retains`` (inputs the kernel keeps a reference
to after it returns, as ``host_store`` hands its value to the host; the runtime passes a copy unless
nothing can change the value later), ``alias`` (output 0 deliberately aliases input 0,
as ``reshape_``) or ``unsigned`` (how the kernel sees uint16/32/64 values, on which torch computes little:
``"bits"``, the default, as int64 with the same low bits, for kernels whose results wrap around as on the
IPU (sums, products, moves); ``"order"`` as int64 in the same order, for kernels that compare values
(uint64 ones from 2**63 up would read negative as bits); ``"torch"`` as they are, for kernels that only
move or convert them, which torch can do; see ``executor``). ``unsigned_of(op)`` gives it per op, for
primitives whose kernel depends on an attribute. Ops that need runtime state (streams, remote buffers,
subgraphs, replicas) override ``lower(op, runtime)`` to return the callable run for each execution. An
op that can write its one output into given memory also defines ``lower_out(op, runtime)``: lowering
hands large outputs memory it keeps across runs, or huge-page memory (see ``executor``).

Kernels of ops not flagged ``view``, ``alias`` or ``modifies`` return fresh tensors, never an
input or a view of one: lowering's storage analysis relies on it.

Custom ops are primitives defined outside this package; nothing needs registering beyond the class.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .context import get_current_context, get_current_graph
from .graph import resolve_in_graph
from .tensor import Tensor, TensorSpec


class Op:
    """One application of a primitive in a graph."""

    __slots__ = ("prim", "inputs", "outputs", "single", "attrs", "graph", "ipu", "io_tiles", "in_sequence", "name")

    def __init__(self, prim, inputs, attrs, graph, name, single=True):
        ctx = get_current_context()
        self.prim = prim
        self.inputs: List[Tensor] = list(inputs)
        self.outputs: List[Tensor] = []
        # True when the kernel returns one value; False when it returns a sequence (even of one).
        self.single = single
        self.attrs: Dict[str, Any] = attrs
        self.graph = graph
        self.ipu = ctx.ipu_id
        self.io_tiles = ctx.io_tile_set
        self.in_sequence = ctx.in_sequence()
        self.name = name

    @property
    def called_graphs(self):
        return self.prim.called_graphs(self)

    @property
    def modified_inputs(self) -> Tuple[int, ...]:
        return self.prim.modified_inputs(self)

    def _graph_output_added(self, t: Tensor) -> None:
        self.prim.graph_output_added(self, t)

    def __repr__(self):
        return f"Op[{self.prim.name} {self.name}]"


class Primitive:
    name: str = "primitive"
    modifies: Tuple[int, ...] = ()
    view: bool = False
    retains: Tuple[int, ...] = ()
    alias: bool = False
    unsigned: str = "bits"
    # Remote buffer access (``op.attrs["buffer"]``): the output may be a view of the buffer's memory
    # (lowering copies it where that could show a later change), or the op writes the buffer.
    views_remote: bool = False
    writes_remote: bool = False
    grad = None

    @staticmethod
    def infer(*inputs, **attrs):
        raise NotImplementedError

    @staticmethod
    def kernel(*values, **attrs):
        raise NotImplementedError

    @classmethod
    def lower(cls, op: Op, runtime):
        """The callable run at each execution: values in, output value(s) out."""
        kernel, attrs = cls.kernel, op.attrs
        if not attrs:
            return kernel
        return lambda *xs: kernel(*xs, **attrs)

    @classmethod
    def lower_out(cls, op: Op, runtime):
        """A callable as ``lower``'s that also takes ``out=``, a contiguous tensor of output 0's runtime
        shape and dtype to write and return (None: fresh memory); None when the op cannot write into
        given memory."""
        return None

    @classmethod
    def unsigned_of(cls, op: Op) -> str:
        """How this op's kernel sees uint16/32/64 values: ``"bits"``, ``"order"`` or ``"torch"``."""
        return cls.unsigned

    @classmethod
    def called_graphs(cls, op: Op):
        return ()

    @classmethod
    def modified_inputs(cls, op: Op) -> Tuple[int, ...]:
        return cls.modifies

    @classmethod
    def graph_output_added(cls, op: Op, t: Tensor) -> None:
        pass

    @classmethod
    def create(cls, *inputs: Tensor, name: Optional[str] = None, **attrs):
        """Adds this op to the current graph; returns its output tensor (or tuple when several)."""
        graph = get_current_graph()
        ins = []
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor):
                raise TypeError(f"ops.{cls.name}: input {i} must be a popxl Tensor, got {type(t).__name__}")
            ins.append(resolve_in_graph(t, graph, f"ops.{cls.name}"))
        try:
            specs = cls.infer(*ins, **attrs)
        except (ValueError, TypeError) as e:
            described = ", ".join(f"'{t.name}' {t.shape} {t.dtype.name}" for t in ins)
            raise type(e)(f"ops.{cls.name}: {e} [inputs: {described}]") from None
        single = isinstance(specs, TensorSpec)
        op = Op(cls, ins, attrs, graph, name or cls.name, single)
        op.outputs = [Tensor._create(graph, s.shape, s.dtype, name or cls.name, producer=op, meta_shape=s.meta_shape)
                      for s in ([specs] if single else specs)]
        if graph._concat_aliases:
            check_concat_aliases(op)
        graph._ops.append(op)
        get_current_context()._op_created(op)
        return op.outputs[0] if single else tuple(op.outputs)


def alias_root(t: Tensor) -> Tensor:
    """The tensor whose memory ``t`` is, through aliasing views (``reshape_``...) and in-place ops."""
    while t._producer is not None:
        op = t._producer
        if op.prim.alias:
            t = op.inputs[0]
        elif op.modified_inputs and t is op.outputs[0]:
            t = op.inputs[op.modified_inputs[0]]
        else:
            break
    return t


def check_concat_aliases(op: Op) -> None:
    """Refuse what would show that ``concat_`` copies here: popxl's result aliases its inputs, so a write
    to the result changes them, and a write to them changes it. Both are errors at build time: writing
    an alias of a concat_ result, and reading one after one of its inputs was written."""
    graph = op.graph
    for t in op.inputs:
        root = alias_root(t)  # a concat_ result is its own root
        if root.id in graph._stale_concats:
            raise NotImplementedError(
                f"ops.{op.prim.name} reads '{t.name}', the result of concat_ '{root.name}' after one of its inputs "
                f"was written: in popxl it would show that write, here concat_ copied its inputs; concatenate "
                f"after the write")
    for i in op.modified_inputs:
        root = alias_root(op.inputs[i])
        for c in graph._concat_aliases.get(root.id, ()):
            if c is root:
                raise NotImplementedError(
                    f"ops.{op.prim.name} writes '{op.inputs[i].name}', the result of concat_ '{c.name}': in popxl "
                    f"that writes its inputs, here concat_ copied them; write the inputs, then concatenate")
            graph._stale_concats.add(c.id)


class GradOp:
    """What a gradient rule sees: output gradients and forward values, as tensors of the gradient graph."""

    def __init__(self, op: Op, dys: Sequence[Tensor], fwd_value, needs: Sequence[bool], grad_infos=None):
        self.op = op
        self._dys = list(dys)
        self.attrs = op.attrs
        self._fwd_value = fwd_value
        self._needs = needs
        # {called graph: GradGraphInfo} of the autodiff run, shared so each subgraph is differentiated once.
        self.grad_infos = {} if grad_infos is None else grad_infos

    @property
    def dys(self) -> List[Tensor]:
        """The gradient of every output; zeros (made on first use) for outputs no gradient reached."""
        from .ops.io import init_value
        for i, (dy, t) in enumerate(zip(self._dys, self.op.outputs)):
            if dy is None:
                self._dys[i] = init_value(t.shape, t.dtype, 0.0)
        return list(self._dys)

    @property
    def dy(self) -> Tensor:
        return self.dys[0]

    def dy_or_none(self, i: int) -> Optional[Tensor]:
        """The gradient of output ``i``, or None when no gradient reached it (or the output is newer than
        this rule, as outputs autodiff appends to a called graph)."""
        return self._dys[i] if i < len(self._dys) else None

    def x(self, i: int) -> Tensor:
        """Forward input ``i``, available in the gradient graph."""
        return self._fwd_value(self.op.inputs[i])

    def y(self, i: int = 0) -> Tensor:
        """Forward output ``i``, available in the gradient graph."""
        return self._fwd_value(self.op.outputs[i])

    def value(self, t: Tensor) -> Tensor:
        """Any tensor of the forward graph, available in the gradient graph."""
        return self._fwd_value(t)

    def in_spec(self, i: int) -> TensorSpec:
        return self.op.inputs[i].spec

    def needs(self, i: int) -> bool:
        """Whether the gradient of input ``i`` is wanted (rules may skip the work when not)."""
        return self._needs[i]


def spec(shape, dtype, meta_shape=()) -> TensorSpec:
    """An op's output spec; every op's shape passes through here, so a negative size is refused once."""
    if any(int(s) < 0 for s in shape):
        raise ValueError(f"shape {tuple(shape)} has a negative size")
    return TensorSpec(shape, dtype, meta_shape)
