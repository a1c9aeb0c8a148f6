"""popxl's public API, executed on the CPU with torch kernels.

Build programs exactly as with the Poplar SDK's ``popxl`` (``Ir``, graphs, ops, ``transforms.autodiff``,
``Session``); replicas run SPMD in one process, every runtime value carrying a leading replica axis.
"""
from . import custom_op, dtypes, native, ops, random_seed, transforms, utils
from .context import (gcg, get_current_context, get_current_graph, get_ir, get_main_graph, gir, gmg, in_sequence,
                      io_tiles, ipu, name_scope)
from .dtypes import (bfloat16, bool, bool_, double, dtype, float, float16, float32, float64, half, int8, int16,
                     int32, int64, uint8, uint16, uint32, uint64)
from .graph import Graph
from .ir import Ir
from .module import Module
from .random_seed import create_seeds
from .remote_buffer import RemoteBuffer, back_remote_buffer, remote_buffer
from .replica_grouping import ReplicaGrouping
from .session import Session
from .streams import DeviceToHostStream, HostToDeviceStream, d2h_stream, h2d_stream
from .tensor import (Constant, Tensor, TensorByRef, TensorSpec, Variable, back_variable, constant, graph_input,
                     graph_output, remote_replica_sharded_variable, remote_variable, replica_sharded_buffer,
                     replica_sharded_variable, variable)

__version__ = "3.4.0+cpu"
IS_POPXL_CPU = True
