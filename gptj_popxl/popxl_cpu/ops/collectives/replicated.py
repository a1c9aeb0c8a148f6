"""Collectives across replicas: all-reduce, all-gather, reduce-scatter and replica slices.

Gathered and scattered data follow a layout of :mod:`..replica_layout`; replica ``r`` owns the chunk
at its position in its group (groups ordered by replica index).

Gradient rules, as PopART's, per input of replica r: ``all_reduce`` 'add'/'mean' -> the same
all-reduce of the output gradients; ``all_gather`` -> replica r's own chunk of its output gradient
(a reduce-scatter with the local operator: no sum over replicas); reduce-scatter 'add'/'mean' ->
all-gather (scaled by 1/group_size for 'mean'); the replica slices (no reduction) -> all-gather.
"""
import warnings
from typing import Optional


from ...context import get_current_graph
from ...primitive import Primitive, spec
from ...replica_grouping import ReplicaGrouping
from ...replica_layout import REDUCE, GroupIndex, chunk_shape_of, gathered_shape, merger, reduces_into, splitter
from ...tensor import Tensor
from .._util import norm_axis, scalar_like
from ..elementwise import div
from ..shape import reshape

LOCAL = "local"  # a reduce-scatter that reduces nothing: each replica slices its own value


_warned_mul = False


def check_op(op: str, what: str) -> str:
    """The reduction run for ``op``: popxl maps 'mul' to a mean (warned once), so programs give its numbers."""
    global _warned_mul
    if op == "mul":
        if not _warned_mul:
            warnings.warn(f"{what}: popxl computes a mean for op='mul', not a product; so does this runtime",
                          stacklevel=3)
            _warned_mul = True
        return "mean"
    if op not in REDUCE:
        raise ValueError(f"{what}: op {op!r} is not a collective op; choose from {', '.join(REDUCE)}, mul")
    return op


def resolve_group(group: Optional[ReplicaGrouping], what: str) -> ReplicaGrouping:
    """``group`` checked against the IR being built (default: all replicas in one group)."""
    ir = get_current_graph().ir
    if group is None:
        return ir.replica_grouping()
    if not isinstance(group, ReplicaGrouping):
        raise TypeError(f"{what}: group must be a ReplicaGrouping, got {type(group).__name__}")
    if group._replication != ir.replication_factor:
        raise ValueError(f"{what}: {group!r} was made for {group._replication} replicas, the IR has "
                         f"{ir.replication_factor}")
    if not group.is_const:
        raise ValueError(f"{what}: collectives need a grouping made by ir.replica_grouping(stride, group_size); "
                         f"got {group!r}")
    return group


def unsigned_of_reduction(op) -> str:
    """How a collective's kernel sees unsigned values (``Primitive.unsigned``): 'min' and 'max' compare them."""
    return "order" if op.attrs["op"] in ("min", "max") else "bits"


# ---------------------------------------------------------------- primitives

class ReplicatedAllReduce(Primitive):
    """Each replica gets the reduction (``op``) of the values of the replicas in its group."""
    name = "replicated_all_reduce"
    unsigned_of = classmethod(lambda cls, op: unsigned_of_reduction(op))

    @staticmethod
    def infer(t, op, group):
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        index, reduce_op = GroupIndex(op.attrs["group"]), op.attrs["op"]
        return lambda x: index.reduce(x, reduce_op)

    @staticmethod
    def grad(g):
        op, group = g.attrs["op"], g.attrs["group"]
        if op not in ("add", "mean"):
            raise NotImplementedError(f"autodiff: replicated_all_reduce with op={op!r} has no gradient rule; "
                                      f"only 'add' and 'mean' do")
        return [ReplicatedAllReduce.create(g.dy, op=op, group=group)]


class ReplicatedAllReduceInplace(ReplicatedAllReduce):
    name = "replicated_all_reduce_"
    modifies = (0,)

    @classmethod
    def lower(cls, op, runtime):
        reduce = ReplicatedAllReduce.lower(op, runtime)
        return lambda x: x.copy_(reduce(x))


class ReplicatedAllGather(Primitive):
    """Each replica gets the chunks of all replicas of its group, assembled under ``layout``."""
    name = "replicated_all_gather"

    @staticmethod
    def infer(t, group, layout, axis, meta_shape=()):
        return spec(gathered_shape(t.shape, layout, axis, group.group_size, meta_shape), t.dtype)

    @classmethod
    def lower(cls, op, runtime):
        a = op.attrs
        index = GroupIndex(a["group"])
        merge = merger(a["layout"], a["axis"], a["group"].group_size, op.outputs[0].shape, runtime.replicas)
        return lambda x: merge(index.peer_values(x))

    @classmethod
    def lower_out(cls, op, runtime):
        a = op.attrs
        # Where the peers' chunks, in group order, are the output's elements in order (no padding
        # to drop, no axis to move), the gather writes the output's memory itself.
        if not (a["layout"] == "new_axis" or (a["layout"] == "concat" and a["axis"] == 0)
                or (a["layout"] == "flat" and op.outputs[0].nelms == op.inputs[0].nelms * a["group"].group_size)):
            return None
        index, gather = GroupIndex(a["group"]), cls.lower(op, runtime)

        def gather_into(x, out=None):
            if out is None:
                return gather(x)
            index.peer_values(x, out=out)
            return out
        return gather_into

    @staticmethod
    def grad(g):
        a = g.attrs
        return [ReplicatedReduceScatter.create(g.dy, op=LOCAL, group=a["group"], layout=a["layout"], axis=a["axis"],
                                               sharded=a["layout"] == "flat")]


class ReplicatedReduceScatter(Primitive):
    """Reduces (``op``) over each group, then each replica keeps its own chunk under ``layout``; a
    ``sharded`` flat chunk is a replica-sharded tensor, whose meta shape is ``t``'s shape."""
    name = "replicated_reduce_scatter"
    unsigned_of = classmethod(lambda cls, op: unsigned_of_reduction(op))

    @staticmethod
    def infer(t, op, group, layout, axis, sharded):
        shape = chunk_shape_of(t.shape, layout, axis, group.group_size)
        return spec(shape, t.dtype, t.shape if sharded else ())

    @classmethod
    def lower(cls, op, runtime):
        a = op.attrs
        index, reduce_op = GroupIndex(a["group"]), a["op"]
        split = splitter(a["layout"], a["axis"], a["group"].group_size, op.inputs[0].shape, runtime.replicas)
        if reduce_op == LOCAL:
            return lambda x: index.own(split(x))
        return lambda x: index.reduce_scatter(split(x), reduce_op)

    @classmethod
    def lower_out(cls, op, runtime):
        a = op.attrs
        index = GroupIndex(a["group"])
        if a["op"] == LOCAL or not index.scatters_into or not reduces_into(a["op"], op.outputs[0].dtype.as_torch()):
            return None
        split = splitter(a["layout"], a["axis"], a["group"].group_size, op.inputs[0].shape, runtime.replicas)
        return lambda x, out=None: index.reduce_scatter(split(x), a["op"], out)

    @staticmethod
    def grad(g):
        a = g.attrs
        op, group = a["op"], a["group"]
        if op not in ("add", "mean", LOCAL):
            raise NotImplementedError(f"autodiff: replicated_reduce_scatter with op={op!r} has no gradient rule; "
                                      f"only 'add' and 'mean' do")
        dx = ReplicatedAllGather.create(g.dy, group=group, layout=a["layout"], axis=a["axis"],
                                        meta_shape=g.in_spec(0).shape)
        if op == "mean":
            dx = div(dx, scalar_like(group.group_size, dx))
        return [dx]


# ---------------------------------------------------------------- public functions

def replicated_all_reduce(t: Tensor, op: str = "add", group: Optional[ReplicaGrouping] = None) -> Tensor:
    """Reduces ``t`` over the replicas of each group of ``group`` (default: all replicas).

    ``op``: 'add', 'mean', 'mul', 'min', 'max', 'and', 'or' or 'square_add'.
    """
    return ReplicatedAllReduce.create(t, op=check_op(op, "replicated_all_reduce"),
                                      group=resolve_group(group, "replicated_all_reduce"),
                                      name=t.name + "_all_reduced")


def replicated_all_reduce_(t: Tensor, op: str = "add", group: Optional[ReplicaGrouping] = None) -> Tensor:
    """In-place :func:`replicated_all_reduce`: ``t`` is overwritten with the reduction."""
    return ReplicatedAllReduceInplace.create(t, op=check_op(op, "replicated_all_reduce_"),
                                             group=resolve_group(group, "replicated_all_reduce_"))


_OUTPUT_SHAPES = ("auto", "new_axis", "concat", "meta_shape")


def replicated_all_gather(t: Tensor, axis: int = 0, group: Optional[ReplicaGrouping] = None,
                          output_shape: str = "auto") -> Tensor:
    """Gathers ``t`` from the replicas of each group, in replica order.

    ``output_shape``: 'new_axis' -> ``(group_size, *t.shape)``; 'concat' -> concatenated along
    ``axis``; 'meta_shape' -> a replica-sharded ``t`` reassembled to ``t.meta_shape`` (padding
    dropped); 'auto' -> 'meta_shape' when ``t`` has a meta shape, else 'concat'.
    """
    what = "replicated_all_gather"
    if output_shape not in _OUTPUT_SHAPES:
        raise ValueError(f"{what}: output_shape must be one of {_OUTPUT_SHAPES}, got {output_shape!r}")
    if output_shape == "auto":
        output_shape = "meta_shape" if t.meta_shape else "concat"
    layout = {"new_axis": "new_axis", "concat": "concat", "meta_shape": "flat"}[output_shape]
    if layout == "flat" and not t.meta_shape:
        raise ValueError(f"{what}: output_shape='meta_shape' needs a tensor with a meta shape; "
                         f"'{t.name}' {t.shape} has none")
    axis = norm_axis(int(axis), t) if layout == "concat" and t.rank else 0
    return ReplicatedAllGather.create(t, group=resolve_group(group, what), layout=layout, axis=axis,
                                      meta_shape=t.meta_shape if layout == "flat" else (),
                                      name=t.name + "_all_gathered")


def replicated_reduce_scatter(t: Tensor, op: str = "add", group: Optional[ReplicaGrouping] = None,
                              configure_output_for_replicated_tensor_sharding: bool = False) -> Tensor:
    """Reduces ``t`` over each group; replica k of a group keeps the k-th flat shard of the result.

    The output is 1-D with ``ceil(t.nelms / group_size)`` elements. With
    ``configure_output_for_replicated_tensor_sharding`` it is a replica-sharded tensor, whose
    ``meta_shape`` is ``t.shape`` (so ``replicated_all_gather`` reassembles ``t``'s shape); without, it
    has no meta shape, as in popxl.
    """
    what = "replicated_reduce_scatter"
    return ReplicatedReduceScatter.create(t, op=check_op(op, what), group=resolve_group(group, what),
                                          layout="flat", axis=0,
                                          sharded=bool(configure_output_for_replicated_tensor_sharding),
                                          name=t.name + "_reduce_scattered")


def replica_sharded_slice(t: Tensor, group: Optional[ReplicaGrouping] = None) -> Tensor:
    """Each replica's own flat shard of its value of ``t`` (no communication)."""
    return ReplicatedReduceScatter.create(t, op=LOCAL, group=resolve_group(group, "replica_sharded_slice"),
                                          layout="flat", axis=0, sharded=True, name=t.name + "_sharded_slice")


def replicated_slice(t: Tensor, axis: int = 0, group: Optional[ReplicaGrouping] = None) -> Tensor:
    """Replica k of a group takes the k-th of ``group_size`` equal slices of ``t`` along ``axis``.

    As popxl, the axis is removed when each slice has length 1.
    """
    what = "replicated_slice"
    group = resolve_group(group, what)
    if not t.rank:
        raise ValueError(f"{what}: cannot slice the scalar '{t.name}'")
    axis = norm_axis(int(axis), t)
    out = ReplicatedReduceScatter.create(t, op=LOCAL, group=group, layout="concat", axis=axis, sharded=False,
                                         name=t.name + "_replicated_slice")
    if t.shape[axis] == group.group_size:
        out = reshape(out, out.shape[:axis] + out.shape[axis + 1:])
    return out
