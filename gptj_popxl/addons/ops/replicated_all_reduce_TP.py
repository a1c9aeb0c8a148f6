"""The tensor-parallel all-reduce pair, with gradients chosen for sharded layers.

* ``replicated_all_reduce_identical_inputs``: forward identity (the input is already equal on the
  group), backward all-reduce of the gradient. Put before column-sharded layers.
* ``replicated_all_reduce_identical_grad_inputs``: forward all-reduce (of partial results),
  backward identity (the output gradient is equal on the group). Put after row-sharded layers.

On the CPU runtime these are the collectives' primitives of the same names; with the Poplar SDK
they are popxl-addons' custom ops (popxl itself has no such ops).
"""
from typing import Optional

from ...backend import IS_CPU, ops, popxl

if IS_CPU:
    from ...popxl_cpu.ops.collectives.replicated import (ReplicatedAllReduceIdenticalGradInputs,
                                                          ReplicatedAllReduceIdenticalInputs, check_op, resolve_group)

    def _create(prim, t: popxl.Tensor, op: str, group):
        what = prim.name
        return prim.create(t, op=check_op(op, what), group=resolve_group(group, what), name=t.name + "_" + what)

    def _identical_inputs(t, op, group):
        return _create(ReplicatedAllReduceIdenticalInputs, t, op, group)

    def _identical_grad_inputs(t, op, group):
        return _create(ReplicatedAllReduceIdenticalGradInputs, t, op, group)
else:
    def _sdk_op(name: str):
        try:
            from popxl_addons.ops.replicated_all_reduce_TP import replicated_all_reduce_TP as sdk
        except ImportError as e:
            raise ImportError(f"{name} needs popxl-addons' custom op with the Poplar SDK; install popxl-addons") from e
        return getattr(sdk, name)

    def _identical_inputs(t, op, group):
        return _sdk_op("replicated_all_reduce_identical_inputs")(t, op, group)

    def _identical_grad_inputs(t, op, group):
        return _sdk_op("replicated_all_reduce_identical_grad_inputs")(t, op, group)


def replicated_all_reduce(t: popxl.Tensor, op: str = "add", group=None) -> popxl.Tensor:
    """``ops.collectives.replicated_all_reduce``: reduction over each group, gradient all-reduced."""
    return ops.collectives.replicated_all_reduce(t, op, group)


def replicated_all_reduce_identical_inputs(t: popxl.Tensor, op: str = "add", group=None) -> popxl.Tensor:
    """``t`` unchanged; its gradient is the ``op`` all-reduce over ``group`` of the output gradients."""
    return _identical_inputs(t, op, group)


def replicated_all_reduce_identical_grad_inputs(t: popxl.Tensor, op: str = "add",
                                                group: Optional[object] = None) -> popxl.Tensor:
    """The ``op`` all-reduce of ``t`` over ``group``; its gradient is the output gradient unchanged."""
    return _identical_grad_inputs(t, op, group)
