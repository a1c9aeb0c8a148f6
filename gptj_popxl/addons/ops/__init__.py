"""Ops of popxl-addons written with public popxl ops (the TP all-reduce pair: custom primitives on the
CPU runtime). Each name is also importable from its popxl-addons module path."""
from .cross_entropy import cross_entropy, cross_entropy_with_grad
from .cross_entropy_sharded_loss import cross_entropy_sharded_loss
from .cross_entropy_sharded_wr_loss import cross_entropy_sharded_wr_loss
from .grad_reduce_square_add import grad_reduce_square_add
from .group_quantize_decompress import (group_quantize_compress_numpy, group_quantize_decompress,
                                        group_quantize_decompress_numpy)
from .layer_norm_distributed import layer_norm_distributed
from .linear_layout import linear_layout
from .replicated_all_reduce_TP import (replicated_all_reduce, replicated_all_reduce_identical_grad_inputs,
                                       replicated_all_reduce_identical_inputs)
from .replicated_strided_collectives import (replicated_all_gather_strided, replicated_all_reduce_strided,
                                             replicated_all_reduce_strided_graph,
                                             replicated_all_reduce_strided_identical_grad_inputs,
                                             replicated_all_reduce_strided_identical_inputs,
                                             replicated_reduce_scatter_strided)
from .streams import host_load, host_store

__all__ = ["cross_entropy", "cross_entropy_sharded_loss", "cross_entropy_sharded_wr_loss", "cross_entropy_with_grad",
           "grad_reduce_square_add", "group_quantize_compress_numpy", "group_quantize_decompress",
           "group_quantize_decompress_numpy", "host_load", "host_store", "layer_norm_distributed", "linear_layout",
           "replicated_all_gather_strided", "replicated_all_reduce", "replicated_all_reduce_identical_grad_inputs",
           "replicated_all_reduce_identical_inputs", "replicated_all_reduce_strided",
           "replicated_all_reduce_strided_graph", "replicated_all_reduce_strided_identical_grad_inputs",
           "replicated_all_reduce_strided_identical_inputs", "replicated_reduce_scatter_strided"]
