"""Static device-memory analysis of a program, per replica, from its graphs' ops in program order.

Liveness follows the lowering (``executor.Plan``): ops run in graph order, a value is allocated
by the op producing it and freed after its last use (graph outputs live to the graph's end), and
values that share storage (in-place ops, views, aliases; the lowering's storage classes, with the
views it copies) count once. A graph's inputs belong to its caller, and what shares storage with a
variable or constant is resident. At a call, the callee's own peak is added to what is live in the
caller, less the call's outputs: they are the callee's values, counted in its peak, until it
returns them all as fresh values (copies of those that share an input's, a constant's or another
output's storage). The copies of inputs a callee writes but is handed by value are counted beside.
Variables (not remote) and constants are resident for the whole program; remote buffers are not
device memory and are reported apart. Not counted: the copies of read-only weights that products
take on some processors (``products.read_only_copy``): a program that writes its weights, as a
training step does, makes none.

Everything is per replica: replicas run the same program on same-shaped values.
"""
import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .executor import storage_with_copying_views
from .ops.control import copied_inputs
from .tensor import Constant, Tensor, Variable


def tensor_bytes(t) -> int:
    """Bytes of one replica's value of ``t``."""
    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype.as_numpy()).itemsize


@dataclasses.dataclass
class PhaseMemory:
    """One top-level call of the main graph (a phase), or the main graph's own ops.

    Attributes:
        name: the called graph's name.
        peak_bytes: device bytes live at the phase's peak, resident variables included.
        by_kind: bytes the phase holds of each kind the caller's ``kind_of`` names (e.g. weights,
            gradients, optimizer state loaded from remote buffers); ``activations`` is the rest of
            its peak above the resident variables.
    """

    name: str
    peak_bytes: int
    by_kind: Dict[str, int]


@dataclasses.dataclass
class MemoryReport:
    """Device memory of a program, per replica (see the module docstring).

    Attributes:
        replicas: replicas of the program (each has these numbers).
        peak_device_bytes: the program's peak, resident variables included, remote buffers not.
        resident_bytes: bytes of variables and constants (resident for the whole program), by kind.
        remote_bytes: remote-buffer bytes by kind.
        phases: per phase, in program order (consecutive calls of the same graph merged).
        main_peak_bytes: the peak of the main graph's own ops (between phases), resident included.
    """

    replicas: int
    peak_device_bytes: int
    resident_bytes: Dict[str, int]
    remote_bytes: Dict[str, int]
    phases: List[PhaseMemory]
    main_peak_bytes: int = 0

    def phase(self, name: str) -> PhaseMemory:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(f"no phase {name!r}; phases are {[p.name for p in self.phases]}")


KindOf = Callable[[Tensor], Optional[str]]


class _Analysis:
    def __init__(self, kind_of: KindOf):
        self.kind_of = kind_of
        self.peaks: Dict[object, int] = {}

    def live_steps(self, graph) -> Tuple[List[int], List[int]]:
        """Bytes the graph allocates that are live at each of its ops (callees excluded), and of those
        the bytes each op allocates."""
        classes, _, _ = storage_with_copying_views(graph)
        # Inputs, variables and constants, and what shares their storage: not this graph's allocations.
        owned_elsewhere = {classes.find(t.id) for t in graph._tensors.values() if t._producer is None}
        size: Dict[str, int] = {}
        first: Dict[str, int] = {}
        last: Dict[str, int] = {}
        ops = graph._ops
        for k, op in enumerate(ops):
            for t in op.inputs + op.outputs:
                c = classes.find(t.id)
                if c in owned_elsewhere:
                    continue
                size[c] = max(size.get(c, 0), tensor_bytes(t))
                first.setdefault(c, k)
                last[c] = k
        for t in graph._outputs:
            c = classes.find(t.id)
            if c in last:
                last[c] = len(ops) - 1
        live = [0] * (len(ops) + 1)
        new = [0] * len(ops)
        for c, n in size.items():
            live[first[c]] += n
            live[last[c] + 1] -= n
            new[first[c]] += n
        return ([int(n) for n in np.cumsum(live[:-1])] if ops else []), new

    def peak(self, graph) -> int:
        """The graph's own peak allocation, callees included, inputs excluded."""
        if graph not in self.peaks:
            live, new = self.live_steps(graph)
            best = 0
            for k, op in enumerate(graph._ops):
                best = max(best, live[k])
                for g in op.called_graphs:
                    best = max(best, self.at_call(op, g, live[k], new[k]))
            self.peaks[graph] = best
        return self.peaks[graph]

    def at_call(self, op, graph, live: int, new: int) -> int:
        """Bytes live while ``op`` runs ``graph``, with ``live`` live in the caller at ``op`` (``new`` of them
        its outputs), and the copies of inputs the graph writes but is handed by value. The outputs are
        the graph's own values, in its peak, until it returns them: then they are all fresh (some
        copied), beside the copied inputs and, in a loop, the previous iteration's outputs. A loop run
        no times only copies its inputs out."""
        count = op.attrs.get("repeat_count", 1)
        if count == 0:
            return live
        copied_in = sum(tensor_bytes(op.inputs[i]) for i in copied_inputs(op))
        previous = new if count > 1 else 0
        return max(live - new + previous + self.peak(graph), live + previous) + copied_in

    def kinds(self, graph) -> Dict[str, int]:
        """Bytes of the values of ``graph`` (not its callees) of each named kind."""
        out: Dict[str, int] = {}
        for op in graph._ops:
            for t in op.outputs:
                kind = self.kind_of(t)
                if kind is not None:
                    out[kind] = out.get(kind, 0) + tensor_bytes(t)
        return out


def memory_report(ir, kind_of: KindOf = lambda t: None, variable_kind: Callable[[Variable], str] = lambda v: "weights",
                  buffer_kind: Callable[[object], str] = lambda b: "other") -> MemoryReport:
    """The ``MemoryReport`` of ``ir``'s main graph.

    ``kind_of(tensor)``: the kind of a value a phase holds (e.g. by the remote buffer it is loaded
    from), or None for activations. ``variable_kind(variable)`` and ``buffer_kind(buffer)``: kinds of
    resident variables and of remote buffers.
    """
    analysis = _Analysis(kind_of)
    main = ir.main_graph
    resident: Dict[str, int] = {}
    for v in ir._variables:
        if v._remote is None:
            kind = variable_kind(v)
            resident[kind] = resident.get(kind, 0) + tensor_bytes(v)
    constants = {t.id: tensor_bytes(t) for g in [main] + main._all_called_graphs() for t in g._tensors.values()
                 if isinstance(t, Constant)}
    resident["constants"] = sum(constants.values())
    base = sum(resident.values())
    remote: Dict[str, int] = {}
    for b in ir._remote_buffers:
        kind = buffer_kind(b)
        remote[kind] = remote.get(kind, 0) + b.entries * int(np.prod(b.tensor_shape, dtype=np.int64)) * \
            np.dtype(b.tensor_dtype.as_numpy()).itemsize

    live, new = analysis.live_steps(main)
    phases: List[PhaseMemory] = []
    main_peak = 0
    for k, op in enumerate(main._ops):
        for g in op.called_graphs:
            peak = base + analysis.at_call(op, g, live[k], new[k])
            kinds = analysis.kinds(g)
            kinds["activations"] = max(0, peak - base - sum(kinds.values()))
            if phases and phases[-1].name == g.name:
                previous = phases[-1]
                if peak > previous.peak_bytes:
                    previous.peak_bytes, previous.by_kind = peak, kinds
            else:
                phases.append(PhaseMemory(g.name, peak, kinds))
        main_peak = max(main_peak, live[k])
    peak = max([base + main_peak] + [p.peak_bytes for p in phases])
    return MemoryReport(ir.replication_factor, peak, resident, remote, phases, base + main_peak)
