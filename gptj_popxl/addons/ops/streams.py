"""A host stream and its load / store op in one call."""
from typing import Tuple

import numpy as np

from ...backend import ops, popxl


def _host_array(t, dtype) -> np.ndarray:
    """Host data (numpy array, torch tensor or scalar) as a numpy array of ``dtype``."""
    if hasattr(t, "detach"):  # a torch tensor
        t = t.detach().cpu().numpy()
    return np.asarray(t).astype(dtype.as_numpy())


def host_load(t, dtype, name: str) -> Tuple[np.ndarray, popxl.HostToDeviceStream, popxl.Tensor]:
    """An h2d stream shaped like host data ``t`` (named ``<name>_stream``) and its ``ops.host_load``.

    Returns ``(t as a numpy array of dtype, stream, loaded tensor)``: feed the array to the stream.
    """
    stream = popxl.h2d_stream(tuple(np.shape(t)), dtype, name=f"{name}_stream")
    return _host_array(t, dtype), stream, ops.host_load(stream, name)


def host_store(t: popxl.Tensor) -> popxl.DeviceToHostStream:
    """A d2h stream (``<t.name>_stream``) and an ``ops.host_store`` of ``t`` into it; returns the stream."""
    stream = popxl.d2h_stream(t.shape, t.dtype, name=f"{t.name}_stream")
    ops.host_store(stream, t)
    return stream
