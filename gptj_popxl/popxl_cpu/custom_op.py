"""The public hook for custom ops on this runtime, in the spirit of popxl's custom-op support (a
PopART op class plus its Python binding): here a custom op is one :class:`CustomOp` subclass holding
its shape rule, kernel and gradient rule, and nothing needs registering.

Subclass :class:`CustomOp` and define

* ``infer(*inputs, **attrs)`` -> :func:`spec` (or a tuple of them): shapes and dtypes of the outputs,
  raising ValueError/TypeError naming the tensor at fault;
* ``kernel(*values, **attrs)`` -> torch tensor(s). Every value carries a leading replica axis: a
  tensor of shape ``(a, b)`` arrives as ``(replication_factor, a, b)``;
* ``grad(g)`` (optional) -> one gradient tensor (or None) per input, built with popxl ops; ``g``
  gives ``g.dy`` (output gradients), ``g.x(i)`` / ``g.y(i)`` (forward values) and ``g.attrs``;
* optionally ``lower(op, runtime)`` to prepare once per session (load a compiled extension, build
  index tensors) and return the callable run for each execution, and ``view = True`` for kernels
  that may return their first input itself;
* optionally ``lower_out(op, runtime)``: the callable also taking ``out=``, memory to write its one
  output into, which the runtime hands large outputs (see ``Primitive.lower_out``).

Add the op to the graph being built with ``MyOp.create(*tensors, **attrs)``. Collective kernels use
:func:`group_reducer` for the reductions over replica groups.
"""
from typing import Callable, Optional

import torch

from .ops.collectives.replicated import check_op, resolve_group
from .primitive import GradOp, Primitive, spec
from .replica_grouping import ReplicaGrouping
from .replica_layout import GroupIndex

__all__ = ["CustomOp", "GradOp", "spec", "collective_args", "group_reducer"]


class CustomOp(Primitive):
    """Base class of custom ops: see the module documentation for what a subclass defines."""
    name = "custom_op"


def collective_args(op: str, group: Optional[ReplicaGrouping], what: str):
    """``(op, group)`` checked as popxl's collectives check them (default group: all replicas)."""
    return check_op(op, what), resolve_group(group, what)


def group_reducer(op: str, group: ReplicaGrouping) -> Callable[[torch.Tensor], torch.Tensor]:
    """A kernel giving each replica the ``op`` reduction of the values of the replicas in its group."""
    index = GroupIndex(group)
    return lambda x: index.reduce(x, op)
