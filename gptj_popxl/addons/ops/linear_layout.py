"""Tile-layout hint for a tensor."""
from ...backend import ops, popxl


def linear_layout(t: popxl.Tensor, bs: int = 1) -> popxl.Tensor:
    """``t`` unchanged in value; on the IPU it is laid out linearly over tiles in multiples of ``bs``
    elements. Layout means nothing to the CPU runtime, so this is a copy (and so with the SDK)."""
    if int(bs) < 1:
        raise ValueError(f"linear_layout: bs must be >= 1, got {bs}")
    return ops.identity(t)
