"""All-reduce across the IPUs of one replica: tensors of one replica combined elementwise."""
from typing import List, Optional

import torch

from ...primitive import Primitive
from ...tensor import Tensor
from ...replica_layout import REDUCE
from .replicated import check_op, unsigned_of_reduction


class AllReduce(Primitive):
    """Every output is the reduction (``op``) of all inputs."""
    name = "all_reduce"
    unsigned_of = classmethod(lambda cls, op: unsigned_of_reduction(op))

    @staticmethod
    def infer(*ts, op):
        first = ts[0]
        for i, t in enumerate(ts[1:], 1):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"all_reduce: tensor {i} '{t.name}' {t.shape} {t.dtype.name} differs from tensor 0 "
                                 f"'{first.name}' {first.shape} {first.dtype.name}")
        return tuple(t.spec for t in ts)

    @classmethod
    def lower(cls, op, runtime):
        return cls._forward(op.attrs["op"])

    @staticmethod
    def _forward(reduce_op):
        def all_reduce(*xs):
            total = REDUCE[reduce_op](torch.stack(xs), 0)
            return tuple(total.clone() for _ in xs)
        return all_reduce

    @staticmethod
    def grad(g):
        op = g.attrs["op"]
        if op != "add":
            raise NotImplementedError(f"autodiff: all_reduce with op={op!r} has no gradient rule; only 'add' does")
        return list(AllReduce.create(*g.dys, op="add"))


class AllReduceIdenticalInputs(AllReduce):
    """Identity forward (the inputs are equal), all-reduce of the gradients backward."""
    name = "all_reduce_identical_inputs"

    @staticmethod
    def _forward(reduce_op):
        return lambda *xs: tuple(x.clone() for x in xs)


class AllReduceIdenticalGradInputs(AllReduce):
    """All-reduce forward, identity backward (the output gradients are equal)."""
    name = "all_reduce_identical_grad_inputs"

    @staticmethod
    def grad(g):
        return list(g.dys)


def _all_reduce(prim, ts: List[Tensor], ipus: Optional[List[int]], op: str) -> List[Tensor]:
    ts = list(ts)
    if not ts:
        raise ValueError(f"{prim.name}: needs at least one tensor")
    if ipus is not None and len(ipus) != len(ts):
        raise ValueError(f"{prim.name}: {len(ts)} tensors but {len(ipus)} ipus {list(ipus)}")
    return list(prim.create(*ts, op=check_op(op, prim.name)))


def all_reduce(ts: List[Tensor], ipus: Optional[List[int]] = None, op: str = "add") -> List[Tensor]:
    """Reduces the tensors ``ts`` (one per IPU of a replica); each output holds the reduction."""
    return _all_reduce(AllReduce, ts, ipus, op)


def all_reduce_identical_inputs(ts: List[Tensor], ipus: Optional[List[int]] = None, op: str = "add") -> List[Tensor]:
    """:func:`all_reduce` of inputs known to be equal: the identity, whose gradient is an all-reduce."""
    return _all_reduce(AllReduceIdenticalInputs, ts, ipus, op)


def all_reduce_identical_grad_inputs(ts: List[Tensor], ipus: Optional[List[int]] = None,
                                     op: str = "add") -> List[Tensor]:
    """:func:`all_reduce` whose output gradients are known to be equal: its gradient is the identity."""
    return _all_reduce(AllReduceIdenticalGradInputs, ts, ipus, op)
