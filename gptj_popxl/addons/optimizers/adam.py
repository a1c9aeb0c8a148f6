"""AdamW step as a Module: its optimiser state (moments, step count) are its variables."""
from functools import partial
from typing import Optional, Union

import numpy as np

from ...backend import ops, popxl
from ..module import Module

Scalar = Union[float, popxl.Tensor]


class AdamOptimizerStep(Module):
    """One AdamW update of ``var`` (in place) from ``grad``.

    ``create_graph(var, grad, replica_grouping, lr=..., ...)`` gives a graph whose ``var`` input is
    passed by reference and whose named args are ``first_order`` (dtype ``first_order_dtype``),
    ``second_order`` (float32) and, with ``bias_correction``, ``step`` (float32 scalar), all zeros
    initially. Each call does, with ``g = grad / loss_scaling`` (times
    ``global_norm_max / max(global_norm, global_norm_max)`` when ``global_norm`` is given)::

        m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2;  step += 1
        var -= lr * (m / (1 - beta1^step) / (sqrt(v / (1 - beta2^step)) + eps) + weight_decay * var)

    which is ``torch.optim.AdamW``. The state uses ``replica_grouping`` (default: all replicas).
    """

    def __init__(self, *args, **kwargs):
        """As :class:`Module` (``cache``, ``grad_inlining_error``)."""
        super().__init__(*args, **kwargs)

    def build(self, var: popxl.TensorByRef, grad: popxl.Tensor, replica_grouping=None, *, lr: Scalar,
              beta1: Scalar = 0.9, beta2: Scalar = 0.999, eps: Scalar = 1e-5, weight_decay: Scalar = 1e-2,
              first_order_dtype=popxl.float16, bias_correction: bool = True, loss_scaling: Scalar = 1,
              global_norm: Optional[popxl.Tensor] = None, global_norm_max: Optional[Scalar] = None) -> None:
        with popxl.in_sequence():
            grad = self._scaled(grad, loss_scaling, global_norm, global_norm_max)
            first_order = self._state("first_order", var, first_order_dtype, replica_grouping)
            ops.var_updates.accumulate_moving_average_(first_order, grad, f=beta1)
            second_order = self._state("second_order", var, popxl.float32, replica_grouping)
            ops.var_updates.accumulate_moving_average_square_(second_order, grad, f=beta2)
            step = None
            if bias_correction:
                step = self.add_variable_input("step", partial(np.zeros, ()), popxl.float32, by_ref=True)
            updater = ops.var_updates.adam_updater(first_order, second_order, weight=var, time_step=step,
                                                   weight_decay=weight_decay, beta1=beta1, beta2=beta2, epsilon=eps)
            ops.scaled_add_(var, updater, b=-lr)

    @staticmethod
    def _scaled(grad, loss_scaling, global_norm, global_norm_max):
        scale = None
        if not (isinstance(loss_scaling, (int, float)) and loss_scaling == 1):
            scale = 1 / loss_scaling
        if global_norm is not None:
            if global_norm_max is None:
                raise ValueError("AdamOptimizerStep: global_norm needs global_norm_max")
            if not isinstance(global_norm_max, popxl.Tensor):
                global_norm_max = popxl.constant(global_norm_max, popxl.float32, "global_norm_max")
            clip = global_norm_max / ops.maximum(global_norm, global_norm_max)
            scale = clip if scale is None else clip * scale
        if scale is None:
            return grad
        return ops.cast(grad, popxl.float32) * scale

    def _state(self, name, var, dtype, replica_grouping):
        if var.meta_shape:
            return self.add_replica_sharded_variable_input(name, partial(np.zeros, var.meta_shape), dtype, by_ref=True,
                                                           replica_grouping=replica_grouping)
        return self.add_variable_input(name, partial(np.zeros, var.shape), dtype, by_ref=True,
                                       replica_grouping=replica_grouping)
