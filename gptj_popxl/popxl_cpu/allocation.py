"""Fresh tensors for large values, in memory backed by transparent huge pages.

glibc maps a fresh allocation of tens of megabytes page by page, and every first write to a 4 KiB
page faults: filling a fresh 100 MB torch tensor took ~7x as long as filling one it had written
before. numpy advises the kernel to back its arrays of 4 MiB and more with 2 MiB pages, which fault
512x less often, so large fresh values are torch views of numpy arrays.

A ``Recycler`` goes further for the values one step makes run after run: it hands a step memory it
made for an earlier run once nothing references that memory any more, so pages are faulted once.
"""
import sys

import numpy as np
import torch

# numpy advises huge pages for arrays from this size on.
LARGE_BYTES = 1 << 22
# Op outputs from this size on get memory a plan keeps or recycles (``executor``): glibc serves
# allocations from 128 KiB on (its first mmap threshold) by fresh mappings, or trims them back off its
# heap's top once freed, so each run faulted their pages in again.
PLANNED_BYTES = 1 << 17

_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
                 torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
                 torch.uint8: np.uint8, torch.bool: np.bool_}


def nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
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


class Recycler:
    """Fresh-to-its-user memory of one shape for one step, run after run: memory the step had before
    is handed out again once no object references it (the caller dropped that run's value and
    every view of it); else new memory. Keeps at most ``keep`` arrays, so that a caller holding
    the last value while the step runs again (``x = f(x)``, a loop keeping its last result)
    still gets memory back."""

    def __init__(self, shape, dtype: torch.dtype, keep: int = 2):
        self.shape, self.dtype, self.keep = tuple(shape), dtype, keep
        self.numpy_dtype = _NUMPY_DTYPES.get(dtype)
        self.arrays = []

    def __call__(self) -> torch.Tensor:
        if self.numpy_dtype is None:
            return empty(self.shape, self.dtype)
        for array in self.arrays:
            # References: the list, the loop variable and getrefcount's argument. A tensor, view or
            # numpy array made from the memory holds one more until it is freed.
            if sys.getrefcount(array) == 3:
                return torch.from_numpy(array)
        array = np.empty(self.shape, self.numpy_dtype)
        self.arrays = [array] + self.arrays[: self.keep - 1]
        return torch.from_numpy(array)
