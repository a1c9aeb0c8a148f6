"""Lowering: each graph becomes a flat plan of kernel calls over numbered value slots, once per session.

Values are torch tensors with a leading replica axis. A plan step is ``(fn, input slots, output
slots, slots to free)``; running a plan walks no graph and infers no shapes: it is one generated
Python function, each slot a local variable, each step a call, dropping each value after its last
use. Lowering also settles aliasing statically: out-of-place view kernels are made to copy where an
in-place op of the same storage would otherwise show through them, a subgraph's inputs are copied at
a call site when the subgraph writes them but the call does not pass them by reference, and subgraph
outputs that share storage with an input are copied on return. A remote load's value is a view of
the buffer's memory unless the graph returns it, may store to that buffer while it is in use, or
writes it (except to store it back where it came from); then it is a copy (``_remote_loads_to_copy``).

Lowering applies pattern rewrites (``ops.nn.lowering_fusions``): a matmul whose only use is a bias add
has no step of its own, the add's step computes both (``addmm``) from the matmul's inputs; the
attention's ``softmax(scores / c + mask)`` is one step of a C++ kernel.

Memory plan: a step whose op can write into given memory (``Primitive.lower_out``) and whose output
is ``allocation.PLANNED_BYTES`` or more is handed that memory. A value that never outlives a run (its
storage class holds no graph output, nothing the host keeps, no variable, constant, input or remote
memory) gets memory the plan allocates on its first run and keeps, as Poplar allocates tensors
statically: no run pays for fresh pages again, and values whose lifetimes within a run do not
overlap share one block. Any other such value gets memory that nothing else references (huge pages
when large): fresh, or an earlier run's once its user has dropped it (``allocation.Recycler``).
"""
import math
from typing import Dict, List

import torch

from . import allocation
from .ops._util import INT64_SIGN_BIT
from .ops.io import HostLoad
from .ops.nn import lowering_fusions
from .remote_buffer import RemoteBuffer
from .tensor import Constant, Tensor


class _Storage:
    """Union-find over tensor ids: which tensors may share storage at run time."""

    def __init__(self):
        self.parent: Dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _storage_classes(graph, copied_views):
    classes = _Storage()
    written_ids = []
    for op in graph._ops:
        mods = op.modified_inputs  # for a call, an analysis of its graph: read once
        written_ids += [op.inputs[i].id for i in mods]
        if not op.outputs or not op.inputs:
            continue
        if op.called_graphs:
            continue  # a call's outputs are fresh: its plan copies any that share an input's storage
        if mods:
            classes.union(op.outputs[0].id, op.inputs[mods[0]].id)
        elif op.prim.alias or (op.prim.view and op not in copied_views):
            classes.union(op.outputs[0].id, op.inputs[0].id)
    return classes, {classes.find(t_id) for t_id in written_ids}


def storage_with_copying_views(graph):
    """``(classes, written, copied)``: the storage classes and the written ones once the view kernels
    in ``copied`` (views of storage something writes) are made to copy."""
    classes, written = _storage_classes(graph, set())
    copied = {op for op in graph._ops
              if op.prim.view and op.inputs and classes.find(op.outputs[0].id) in written}
    return _storage_classes(graph, copied) + (copied,)


def written_input_indices(graph, classes, written) -> frozenset:
    """Indices of ``graph``'s inputs whose storage the graph writes."""
    return frozenset(i for i, t in enumerate(graph._inputs) if classes.find(t.id) in written)


class Plan:
    """A graph lowered for one session; ``run(args)`` gives its outputs for its inputs ``args``."""

    def __init__(self, graph, runtime):
        self.graph = graph
        classes, written, copied = storage_with_copying_views(graph)
        fused, absorbed = lowering_fusions(graph, runtime, classes, written)
        copied_loads = _remote_loads_to_copy(graph, classes, written, fused, absorbed)
        copied |= copied_loads
        remote_views = {classes.find(op.outputs[0].id) for op in graph._ops
                        if op.prim.views_remote and op not in copied_loads}
        input_classes = {classes.find(t.id) for t in graph._inputs}

        # Storage that nothing changes once computed: main-graph activations no op writes that share
        # no storage with a variable, constant or input. A host may keep such values as they are.
        changing = written | remote_views | {classes.find(t.id) for t in graph._tensors.values()
                                             if t._producer is None}
        unchanging = set() if graph is not graph.ir.main_graph else {
            classes.find(t.id) for t in graph._tensors.values() if t._producer is not None} - changing
        # Storage a value of which may outlive a run: the plan cannot keep memory for it.
        outliving = (remote_views | {classes.find(t.id) for t in graph._tensors.values() if t._producer is None}
                     | {classes.find(t.id) for t in graph._outputs}
                     | {classes.find(op.inputs[i].id) for op in graph._ops for i in op.prim.retains})
        self.borrowing_streams = _borrowing_streams(graph, classes, written | outliving)

        kept_steps = []  # (step, storage class, _KeptValue) of the values written into kept memory

        def with_memory(fn, t: Tensor):
            shape, dtype = (runtime.replicas,) + t.shape, t.dtype.as_torch()
            if allocation.nbytes(shape, dtype) < allocation.PLANNED_BYTES:
                return fn
            if classes.find(t.id) in outliving:
                recycled = allocation.Recycler(shape, dtype)
                return lambda *xs: fn(*xs, out=recycled())
            kept = _KeptValue(shape, dtype)  # its memory is chosen once every lifetime is known
            kept_steps.append((len(steps), classes.find(t.id), kept))
            return lambda *xs: fn(*xs, out=kept.memory())

        slot: Dict[str, int] = {}

        def slot_of(t: Tensor) -> int:
            if t.id not in slot:
                slot[t.id] = len(slot)
            return slot[t.id]

        self.in_slots = tuple(slot_of(t) for t in graph._inputs)
        init: Dict[int, torch.Tensor] = {}
        steps = []
        for op in graph._ops:
            if op in absorbed:
                continue
            fn, inputs = fused.get(op, (None, op.inputs))
            ins = []
            for t in inputs:
                if t.id not in slot and t._producer is None and t not in graph._inputs:
                    value = runtime.persistent_value(t, writable=False)
                    if isinstance(t, Constant) and classes.find(t.id) in written:
                        # A constant written in place starts from its value again on every run.
                        steps.append([value.clone, (), slot_of(t), ()])
                    else:
                        init[slot_of(t)] = value
                ins.append(slot_of(t))
            if fn is not None:
                outs = tuple(slot_of(t) for t in op.outputs)
                steps.append([with_memory(fn, op.outputs[0]), tuple(ins), outs[0], ()])
                continue
            # Values of wide unsigned types are computed on in int64: memory of their own dtype would not do.
            wide = _computes_on_wide_unsigned(op)
            fn = op.prim.lower_out(op, runtime) if op.single and not wide else None
            fn = op.prim.lower(op, runtime) if fn is None else with_memory(fn, op.outputs[0])
            if wide:
                fn = _in_int64(fn, op, ordered=op.prim.unsigned_of(op) == "order")
            if op in copied:
                fn = _copying(fn)
            shared = tuple(i for i in op.prim.retains if classes.find(op.inputs[i].id) not in unchanging)
            if shared:
                fn = _copying_inputs(fn, shared)
            outs = tuple(slot_of(t) for t in op.outputs)
            steps.append([fn, tuple(ins), outs[0] if op.single else outs, ()])
        for t in graph._outputs:
            if t.id not in slot:
                init[slot_of(t)] = runtime.persistent_value(t, writable=False)
        self.out_slots = tuple(slot[t.id] for t in graph._outputs)
        # Outputs sharing storage with an input, a constant or an earlier output (a value returned twice,
        # or with a view of it) are copied: callers get fresh values, so writing to one never changes
        # the input, the constant's later value or another output.
        shared = input_classes | {classes.find(t.id) for t in graph._tensors.values() if isinstance(t, Constant)}
        copy_out = []
        for t in graph._outputs:
            copy_out.append(classes.find(t.id) in shared)
            shared.add(classes.find(t.id))
        self.copy_out = tuple(copy_out)
        self.num_slots = len(slot)
        self.init = [init.get(i) for i in range(self.num_slots)]
        last_use = self._add_frees(steps, set(init) | set(self.out_slots))
        class_end: Dict[str, int] = {}
        for t_id, s in slot.items():
            c = classes.find(t_id)
            class_end[c] = max(class_end.get(c, -1), last_use.get(s, -1))
        _share_kept_memory([(k, class_end[c], kept) for k, c, kept in kept_steps])
        self.steps = [tuple(s) for s in steps]
        # run(args) -> the graph's outputs for its inputs ``args``, the steps in order.
        self.run = self._straight_line()

    @staticmethod
    def _add_frees(steps, keep):
        last_use: Dict[int, int] = {}
        for k, (_, ins, outs, _) in enumerate(steps):
            for s in ins + ((outs,) if isinstance(outs, int) else outs):
                last_use[s] = k
        frees: Dict[int, List[int]] = {}
        for s, k in last_use.items():
            if s not in keep:
                frees.setdefault(k, []).append(s)
        for k, step in enumerate(steps):
            step[3] = tuple(frees.get(k, ()))
        return last_use

    def _straight_line(self):
        """The plan as one generated Python function of ``args``: each slot a local variable, each step
        one call. Interpreting the steps (a list of slots indexed for every input and output, a loop
        over the frees) cost about a microsecond a step, which a decode step pays a hundred times."""
        names = {"init": self.init}
        lines = ["def run(args):"]
        for i, s in enumerate(self.in_slots):
            lines.append(f"    v{s} = args[{i}]")
        lines += [f"    v{s} = init[{s}]" for s, value in enumerate(self.init) if value is not None]
        for k, (fn, ins, outs, frees) in enumerate(self.steps):
            names[f"f{k}"] = fn
            call = f"f{k}({', '.join(f'v{i}' for i in ins)})"
            if type(outs) is int:
                lines.append(f"    v{outs} = {call}")
            elif outs:
                lines.append(f"    {', '.join(f'v{s}' for s in outs)}, *_ = {call}")
            else:
                lines.append(f"    {call}")
            if frees:
                lines.append(f"    {' = '.join(f'v{s}' for s in frees)} = None")
        results = ", ".join(f"v{s}.clone()" if c else f"v{s}" for s, c in zip(self.out_slots, self.copy_out))
        lines.append(f"    return [{results}]")
        exec(compile("\n".join(lines), f"<plan of graph {self.graph.name!r}>", "exec"), names)
        return names["run"]


def _graph_buffers(graph, memo, writes: bool) -> frozenset:
    """Ids of the remote buffers that ``graph``, or a graph it calls, writes (``writes``) or uses."""
    key = (graph, writes)
    if key not in memo:
        memo[key] = frozenset()  # graphs cannot recurse; this only stops a loop before lowering says so
        memo[key] = frozenset().union(*(_op_buffers(op, memo, writes) for op in graph._ops))
    return memo[key]


def _op_buffers(op, memo, writes: bool) -> frozenset:
    """Ids of the remote buffers that ``op``, or a graph it calls, writes (``writes``) or uses."""
    buffer = op.attrs.get("buffer")
    ids = set()
    if isinstance(buffer, RemoteBuffer) and (op.prim.writes_remote or not writes):
        ids.add(buffer.remote_buffer_id)
    for called in op.called_graphs:
        ids |= _graph_buffers(called, memo, writes)
    return frozenset(ids)


def _remote_loads_to_copy(graph, classes, written, fused, absorbed) -> set:
    """The remote loads of ``graph`` whose value must be a copy rather than the buffer's memory: it is a
    graph output (the caller may hold it across stores), it is in use when an op may store to its
    buffer (a store that is the value's last use reads it before it writes), or it is written in place
    and not then stored back to the same entry (the same offset tensor) by the next op that uses the
    buffer, after its last use. A value stored back may as well be updated in the buffer itself: the
    store finds it already there."""
    ops = [op for op in graph._ops if op not in absorbed]
    last_use: Dict[str, int] = {}
    for k, op in enumerate(ops):
        for t in fused.get(op, (None, op.inputs))[1]:
            last_use[classes.find(t.id)] = k
    outputs = {classes.find(t.id) for t in graph._outputs}
    memo = {}
    copied = set()
    read_only = []  # (op, position, last use, buffer) of the loads no op writes
    for k, op in enumerate(ops):
        if not op.prim.views_remote:
            continue
        c, buffer = classes.find(op.outputs[0].id), op.attrs["buffer"].remote_buffer_id
        end = last_use.get(c, k)
        if c in outputs:
            copied.add(op)
        elif c in written:
            offset = op.inputs[0]
            back = next((j for j in range(k + 1, len(ops)) if buffer in _op_buffers(ops[j], memo, False)), None)
            if not (back is not None and back >= end and ops[back].prim.writes_remote
                    and ops[back].inputs[0] is offset and classes.find(offset.id) not in written
                    and classes.find(ops[back].inputs[1].id) == c):
                copied.add(op)
        elif any(buffer in _op_buffers(ops[j], memo, True) and (j < end or not ops[j].prim.writes_remote)
                 for j in range(k + 1, end + 1)):
            copied.add(op)
        else:
            read_only.append((op, k, end, buffer))
    # A written load left in the buffer's memory writes the buffer from its load on: a load read after
    # that must hold the value it loaded.
    writing_views = [(k, op.attrs["buffer"].remote_buffer_id) for k, op in enumerate(ops)
                     if op.prim.views_remote and op not in copied and classes.find(op.outputs[0].id) in written]
    copied.update(op for op, k, end, buffer in read_only
                  if any(b == buffer and k < j < end for j, b in writing_views))
    return copied


class _KeptMemory:
    """One block of memory a plan keeps across runs, allocated on first use at its largest user's size."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.numel, self.flat, self.free_from = dtype, 0, None, -1

    def view(self, shape) -> torch.Tensor:
        if self.flat is None:
            self.flat = allocation.empty((self.numel,), self.dtype)
        return self.flat[:math.prod(shape)].view(shape)


class _KeptValue:
    """A value that never outlives a run, written into a block of kept memory."""

    def __init__(self, shape, dtype: torch.dtype):
        self.shape, self.dtype, self.block = shape, dtype, None

    def memory(self) -> torch.Tensor:
        return self.block.view(self.shape)


def _share_kept_memory(values) -> None:
    """Gives each ``(step, last step using its storage, value)`` a block of kept memory, shared with
    values whose lifetimes within the run end before it starts (a greedy interval allocation)."""
    blocks: List[_KeptMemory] = []
    for k, end, value in sorted(values, key=lambda v: v[0]):
        block = next((b for b in blocks if b.dtype == value.dtype and b.free_from < k), None)
        if block is None:
            block = _KeptMemory(value.dtype)
            blocks.append(block)
        block.numel, block.free_from = max(block.numel, math.prod(value.shape)), max(end, k)
        value.block = block


def _borrowing_streams(graph, classes, kept_or_written) -> frozenset:
    """The h2d streams whose loads may be the caller's own array for the run: loaded only by the main
    graph, where no op writes the loaded value or anything sharing its storage, and nothing keeps it
    past the run."""
    if graph is not graph.ir.main_graph:
        return frozenset()
    loads = [op for op in graph._ops if op.prim is HostLoad]
    lent = {op.attrs["stream"] for op in loads if classes.find(op.outputs[0].id) in kept_or_written}
    lent |= {op.attrs["stream"] for other in graph.ir._graphs if other is not graph
             for op in other._ops if op.prim is HostLoad}
    return frozenset(op.attrs["stream"] for op in loads) - lent


def _copying_inputs(fn, indices):
    def copy_then_run(*xs):
        return fn(*[x.clone() if i in indices else x for i, x in enumerate(xs)])
    return copy_then_run


def _copying(fn):
    return lambda *xs: fn(*xs).clone()


# torch implements little arithmetic for these types; kernels compute on int64 and results wrap around.
_WIDE_UNSIGNED = {torch.uint16: 0xFFFF, torch.uint32: 0xFFFFFFFF, torch.uint64: None}


def _computes_on_wide_unsigned(op) -> bool:
    prim = op.prim
    if prim.view or prim.alias or prim.unsigned_of(op) == "torch":
        return False
    return any(t.dtype.as_torch() in _WIDE_UNSIGNED for t in op.inputs + op.outputs)


def _widen(x, ordered: bool):
    """``x`` as int64: uint16/32 values as they are; uint64 ones with their bits, which two's complement
    sums and products wrap as uint64's, or, ``ordered``, with the top bit flipped, which maps [0, 2**64)
    onto [-2**63, 2**63) in the same order for kernels that compare values."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _WIDE_UNSIGNED:
        return x
    if x.dtype != torch.uint64:
        return x.to(torch.int64)
    bits = x.view(torch.int64)
    return bits ^ INT64_SIGN_BIT if ordered else bits


def _narrow(y, dtype: torch.dtype, ordered: bool):
    """The inverse of ``_widen`` for an int64 result of unsigned ``dtype``, wrapping around."""
    if dtype not in _WIDE_UNSIGNED or y.dtype == dtype:
        return y
    y = y.to(torch.int64)
    if dtype == torch.uint64:
        return (y ^ INT64_SIGN_BIT if ordered else y).view(torch.uint64)
    return (y & _WIDE_UNSIGNED[dtype]).to(dtype)


def _in_int64(fn, op, ordered: bool):
    """``fn`` run on int64 copies of its uint16/32/64 values (``_widen``), results narrowed back with
    wrap-around; inputs it modifies get the narrowed result written back."""
    modified = op.modified_inputs
    out_dtypes = [t.dtype.as_torch() for t in op.outputs]
    single = op.single

    def run_in_int64(*xs):
        wide = [_widen(x, ordered) for x in xs]
        result = fn(*wide)
        for i in modified:
            xs[i].copy_(_narrow(wide[i], xs[i].dtype, ordered))
        results = [result] if single else list(result)
        results = [_narrow(y, d, ordered) for y, d in zip(results, out_dtypes)]
        if modified and results:
            results[0] = xs[modified[0]]
        return results[0] if single else tuple(results)
    return run_in_int64
