"""A random-seed variable whose value differs per replica group."""
from typing import Tuple

from ..backend import IS_CPU, ops, popxl


def seed_variable(seed: int, replica_grouping=None) -> Tuple[popxl.Variable, popxl.Tensor]:
    """A uint32 ``(2,)`` seed per group of ``replica_grouping`` (default: one group per replica).

    Returns ``(variable, tensor)``: read or write the seed through the variable with the session,
    use the tensor in the main graph. On the CPU both are one on-chip variable. With the SDK (as
    popxl-addons does) the variable lives in a remote buffer, loaded into the tensor when weights
    go to the device and stored back when they come to the host.
    """
    ir = popxl.gcg().ir
    replica_grouping = replica_grouping or ir.replica_grouping(group_size=1)
    seeds = popxl.create_seeds(seed, replicas=replica_grouping.num_groups)
    if IS_CPU:
        var = popxl.variable(seeds, popxl.uint32, "random_seed", replica_grouping=replica_grouping)
        return var, var
    import popart._internal.ir as _ir
    from popxl.context import _execution_context
    buffer = popxl.remote_buffer((2,), popxl.uint32)
    var = popxl.remote_variable(seeds, buffer, replica_grouping=replica_grouping, name="random_seed")
    with popxl.gmg():
        with _execution_context(_ir.ExecutionContext.WeightsFromHostFragment):
            seed_t = ops.remote_load(buffer, 0, "random_seed_h2d")
        with _execution_context(_ir.ExecutionContext.WeightsToHostFragment):
            ops.remote_store(buffer, 0, seed_t)
    return var, seed_t
