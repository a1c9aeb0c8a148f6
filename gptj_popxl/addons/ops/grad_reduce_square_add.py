"""Sum of squares of a loss-scaled gradient, unscaled (for gradient norms)."""
from typing import Union

from ...backend import ops, popxl


def grad_reduce_square_add(t: popxl.Tensor, loss_scaling: Union[int, float, popxl.Tensor]) -> popxl.Tensor:
    """``sum(t ** 2) / loss_scaling ** 2`` as a float32 scalar, accumulated in float32.

    ``ops.sqrt`` of the sum over all gradients is their global norm.
    """
    sumsq = ops.sum(ops.cast(t, popxl.float32) ** 2)
    if isinstance(loss_scaling, popxl.Tensor):
        ls = ops.cast(loss_scaling, popxl.float32)
        return sumsq / (ls * ls)
    return sumsq * popxl.constant(1.0 / (float(loss_scaling) ** 2), popxl.float32, "inv_loss_scaling_sq")
