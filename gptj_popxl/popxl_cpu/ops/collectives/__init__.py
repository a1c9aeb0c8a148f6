"""popxl.ops.collectives: collectives across replicas, and across the IPUs of one replica."""
from .all_reduce import all_reduce, all_reduce_identical_grad_inputs, all_reduce_identical_inputs
from .replicated import (replica_sharded_slice, replicated_all_gather, replicated_all_reduce, replicated_all_reduce_,
                         replicated_reduce_scatter, replicated_slice)

__all__ = ["all_reduce", "all_reduce_identical_grad_inputs", "all_reduce_identical_inputs", "replica_sharded_slice",
           "replicated_all_gather", "replicated_all_reduce", "replicated_all_reduce_", "replicated_reduce_scatter",
           "replicated_slice"]
