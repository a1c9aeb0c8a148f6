"""Graph transforms of popxl-addons."""
from .autodiff import (AccumulatingGradGraphInfo, ExpectedConnection, RemappedGradGraphInfo, autodiff,
                       autodiff_with_accumulation, remap_grad_info)
from .available_memory_proportion import (set_available_memory_proportion_by_ipu,
                                          set_graph_available_memory_proportion_by_ipu)
from .batch_serialisation import (BatchSerialResult, RemoteHandle, batch_serial_buffer, batch_serialise,
                                  batch_serialise_fwd_and_grad, batch_serialise_non_overlapped,
                                  batch_serialise_overlapped)
from .recomputation import add_recompute_inputs, recompute_graph, recompute_graph_with_forward_outputs
from .repeat_graph import repeat_graph

__all__ = ["autodiff", "autodiff_with_accumulation", "remap_grad_info", "AccumulatingGradGraphInfo",
           "RemappedGradGraphInfo", "ExpectedConnection", "batch_serialise", "batch_serialise_fwd_and_grad",
           "batch_serial_buffer", "batch_serialise_overlapped", "batch_serialise_non_overlapped",
           "BatchSerialResult", "RemoteHandle", "recompute_graph", "recompute_graph_with_forward_outputs", "add_recompute_inputs", "repeat_graph",
           "set_available_memory_proportion_by_ipu", "set_graph_available_memory_proportion_by_ipu"]
