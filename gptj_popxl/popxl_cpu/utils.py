"""Host-side helpers of popxl's public ``popxl.utils``."""
import numpy as np

# Without an explicit dtype, popxl sends 64-bit host data as its 32-bit counterpart.
DOWNCAST = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.uint32),
            np.dtype(np.float64): np.dtype(np.float32)}


def to_numpy(x, dtype=None, downcast: bool = True, copy: bool = True, log2_scale=None,
             nan_on_overflow=None) -> np.ndarray:
    """``x`` (numpy array, torch tensor, scalar or sequence) as a C-ordered numpy array.

    ``dtype`` (a popxl dtype) converts the data; without it, 64-bit data becomes 32-bit when
    ``downcast``. ``copy`` guarantees the result shares no memory with ``x``. ``log2_scale`` and
    ``nan_on_overflow`` apply only to float8 types, which this runtime does not have: as popxl, any
    other value than None raises RuntimeError.
    """
    for option, value in (("log2_scale", log2_scale), ("nan_on_overflow", nan_on_overflow)):
        if value is not None:
            raise RuntimeError(f"Non-default value for '{option}' is not supported for dtypes that are not "
                               f"popxl.float8_143 or popxl.float8_152 (this runtime has no float8 dtypes)")
    try:
        import torch
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if dtype is not None:
        target = np.dtype(dtype.as_numpy())
    else:
        target = x.dtype if isinstance(x, np.ndarray) else np.asarray(x).dtype
        if downcast:
            target = DOWNCAST.get(target, target)
    arr = np.asarray(x, dtype=target, order="C")
    if copy and isinstance(x, np.ndarray) and np.may_share_memory(arr, x):
        arr = arr.copy()
    return arr
