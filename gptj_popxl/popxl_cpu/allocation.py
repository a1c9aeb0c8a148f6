"""Fresh tensors for large values, in memory backed by transparent huge pages.

glibc maps a fresh allocation of tens of megabytes page by page, and every first write to a 4 KiB
page faults: filling a fresh 100 MB torch tensor took ~7x as long as filling one it had written
before. numpy advises the kernel to back its arrays of 4 MiB and more with 2 MiB pages, which fault
512x less often, so large fresh values are torch views of numpy arrays.
"""
import numpy as np
import torch

# numpy advises huge pages for arrays from this size on.
LARGE_BYTES = 1 << 22

_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                 torch.uint8: np.uint8, torch.bool: np.bool_}


def nbytes(shape, dtype: torch.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous tensor; huge-page backed when large."""
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is None or nbytes(shape, dtype) < LARGE_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(shape, numpy_dtype))


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled contiguous tensor; when large, its pages come zeroed from the kernel as they are
    first touched (calloc), with no pass writing zeros."""
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is None or nbytes(shape, dtype) < LARGE_BYTES:
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.zeros(shape, numpy_dtype))
