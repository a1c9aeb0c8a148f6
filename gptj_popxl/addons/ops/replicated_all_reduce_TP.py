"""The tensor-parallel all-reduce pair, with gradients chosen for sharded layers.

* ``replicated_all_reduce_identical_inputs``: forward identity (the input is already equal on the
  group), backward all-reduce of the gradient. Put before column-sharded layers.
* ``replicated_all_reduce_identical_grad_inputs``: forward all-reduce (of partial results),
  backward identity (the output gradient is equal on the group). Put after row-sharded layers.

On the CPU runtime these are custom ops (``gptj_popxl.backend.custom_op``); with the Poplar SDK they
are popxl-addons' custom ops (popxl itself has no such ops).
"""
from typing import Optional

from ...backend import IS_CPU, custom_op, ops, popxl

if IS_CPU:
    class ReplicatedAllReduceIdenticalInputs(custom_op.CustomOp):
        """Identity forward (the input is equal on the group), all-reduce of the gradients backward."""
        name = "replicated_all_reduce_identical_inputs"
        view = True

        @staticmethod
        def infer(t, op, group):
            return t.spec

        @staticmethod
        def kernel(t, op, group):
            return t

        @staticmethod
        def grad(g):
            return [ops.collectives.replicated_all_reduce(g.dy, g.attrs["op"], g.attrs["group"])]

    class ReplicatedAllReduceIdenticalGradInputs(custom_op.CustomOp):
        """All-reduce forward, identity backward (the output gradients are equal on the group)."""
        name = "replicated_all_reduce_identical_grad_inputs"

        @staticmethod
        def infer(t, op, group):
            return t.spec

        @classmethod
        def lower(cls, op, runtime):
            return custom_op.group_reducer(op.attrs["op"], op.attrs["group"])

        @staticmethod
        def grad(g):
            return [g.dy]

    def _create(prim, t: popxl.Tensor, op: str, group):
        op, group = custom_op.collective_args(op, group, prim.name)
        return prim.create(t, op=op, group=group, name=t.name + "_" + prim.name)

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
