"""Ops of popxl-addons built from popxl ops (the TP all-reduce pair: custom primitives on the CPU runtime)."""
from .cross_entropy_sharded_loss import cross_entropy_sharded_loss
from .replicated_all_reduce_TP import (replicated_all_reduce, replicated_all_reduce_identical_grad_inputs,
                                       replicated_all_reduce_identical_inputs)

__all__ = ["cross_entropy_sharded_loss", "replicated_all_reduce", "replicated_all_reduce_identical_grad_inputs",
           "replicated_all_reduce_identical_inputs"]
