"""Whose kernel computes the runtime's float32 products ``x @ w`` of many rows by a weight-like ``w``:
MKL's ``sgemm`` (``torch.mm``) or oneDNN's matmul, both from torch's own build.

Measured on 2 cores of an AMD EPYC (Zen, AVX2): with ``w`` read as an ``(n, k)`` row-major matrix
(``w`` transposed in memory, as ``nn.Linear`` keeps it) oneDNN runs GPT-J's products 10-15% faster
than MKL, which is below 90% of the processor's peak there; with ``w`` as ``(k, n)`` row-major it is
slower than MKL. So, where oneDNN is chosen (:data:`ONEDNN`):

* a product whose ``w`` is the transpose of row-major memory (a backward pass's ``dy @ w.T``) takes
  oneDNN's kernel on that memory as it is;
* a product whose ``w`` is a variable the session's program only reads takes it on an ``(n, k)``
  copy of the variable (:func:`read_only_copy`), made on first use and kept while the weight is
  unchanged: one copy per weight memory, whichever sessions read it.

The choice: ``GPTJ_POPXL_GEMM=onednn`` or ``mkl``; by default oneDNN on AMD processors, MKL
elsewhere (on Intel's, MKL met the benchmarks' goals; oneDNN there is unmeasured).
"""
import os
import weakref
from typing import Dict, Optional

import torch

# Smaller products keep MKL: a decode step's few rows (the runtime's streamed kernels compute most of
# those), and products under 2**25 multiply-adds, where oneDNN's fixed cost per call outweighed its speed
# (measured: 0.5x MKL's at 64 x 64 x 64, 0.92x at 64 x 512 x 512, 1.02x at 128 x 512 x 512, 1.16x at
# 64 x 512 x 2048).
MIN_ROWS = 16
MIN_MULTIPLY_ADDS = 1 << 25


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _choose_onednn() -> bool:
    choice = os.environ.get("GPTJ_POPXL_GEMM", "auto")
    if choice not in ("auto", "onednn", "mkl"):
        raise ValueError(f"GPTJ_POPXL_GEMM must be 'auto', 'onednn' or 'mkl', got {choice!r}")
    if choice == "mkl" or not torch.backends.mkldnn.is_available():
        return False
    return choice == "onednn" or _cpu_vendor() == "AuthenticAMD"


ONEDNN = _choose_onednn()


def takes_onednn(rows: int, k: int, n: int) -> bool:
    """Whether a ``(rows, k) @ (k, n)`` float32 product takes oneDNN's kernel (where it can)."""
    return ONEDNN and rows >= MIN_ROWS and k > 0 and rows * k * n >= MIN_MULTIPLY_ADDS


def linear(x: torch.Tensor, w_rows: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ w_rows.T (+ bias)`` by oneDNN, for a 2-D ``x`` and a row-major ``(n, k)`` ``w_rows``."""
    return torch.ops.mkldnn._linear_pointwise(x, w_rows, bias, "none", [], "")


# Incremented by every write of a variable's value that torch's version counters may not see: a host
# copy into a variable, or a run of a program that writes variables kept in host memory
# (``back_variable``), which other sessions may read as theirs.
_generation = 0


def variables_written() -> None:
    """Marks every read-only copy out of date."""
    global _generation
    _generation += 1


class _Copy:
    def __init__(self, address: int, owner: torch.Tensor, rows: torch.Tensor):
        self.owner, self.rows = weakref.ref(owner), rows
        self.generation, self.version = _generation, owner._version
        # Dropped with the variable value that made it (the memory may then be another's).
        self.finalizer = weakref.finalize(owner, _copies.pop, address, None)

    def current(self, w: torch.Tensor) -> bool:
        owner = self.owner()
        return (owner is not None and self.generation == _generation and self.version == owner._version
                and self.rows.shape == w.shape[::-1])


# Weight memory address -> its (n, k) copy.
_copies: Dict[int, _Copy] = {}


def read_only_copy(read_only: Dict[int, torch.Tensor], w: torch.Tensor) -> Optional[torch.Tensor]:
    """The ``(n, k)`` row-major copy of a ``(k, n)`` ``w`` that is the whole of a variable the program
    only reads (``read_only``: such variables' device values by address), else None."""
    address = w.data_ptr()
    value = read_only.get(address)
    if value is None or value.numel() != w.numel() or not w.is_contiguous():
        return None
    copy = _copies.get(address)
    if copy is not None and not copy.current(w):
        _copies.pop(address).finalizer.detach()
        copy = None  # its memory goes before the new copy's comes
    if copy is None:
        copy = _copies[address] = _Copy(address, value, w.t().contiguous())
    return copy.rows
