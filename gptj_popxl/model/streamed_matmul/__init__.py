"""``streamed_matmul(x, w)``: ``x @ w`` for a weight ``w`` and few rows of ``x``, as in a decode step.

A decode step multiplies one row per sequence by every weight matrix, so its time is that of
reading the weights; BLAS kernels tuned for many rows read them at a fraction of the memory
bandwidth. On the CPU runtime this is a custom op (``gptj_popxl.backend.custom_op``) whose kernel,
the C++ in ``streamed_matmul.h`` (bound by ``streamed_matmul.cpp``, compiled by cppimport on first
use into this folder), reads each weight once for all rows, split over torch's threads by output
columns. Products with more rows than ``MAX_ROWS``, other dtypes, and the Poplar SDK use
``ops.matmul``.
"""
import functools
import os

import numpy as np
import torch

from gptj_popxl.backend import IS_CPU, custom_op, ops, popxl

__all__ = ["streamed_matmul", "MAX_ROWS"]

# Most rows of x streamed; beyond, the product is compute-bound and BLAS does better (measured on the
# benchmark model's shapes: at 8 rows the streamed kernel is still 3x faster than MKL).
MAX_ROWS = 8

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "streamed_matmul.cpp")


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ kernel module, built by cppimport on first call."""
    import cppimport
    return cppimport.imp_from_filepath(_SOURCE, "streamed_matmul")


if IS_CPU:
    class StreamedMatMul(custom_op.CustomOp):
        """``x (..., K) @ w (K, N)`` by the C++ kernel, one replica after another; inference only
        (no gradient rule)."""
        name = "streamed_matmul"

        @staticmethod
        def infer(x, w):
            if len(w.shape) != 2 or len(x.shape) < 2 or x.shape[-1] != w.shape[0]:
                raise ValueError("x (..., K) and w (K, N) must agree on K")
            return custom_op.spec(tuple(x.shape[:-1]) + (w.shape[1],), x.dtype)

        @classmethod
        def lower(cls, op, runtime):
            ext = extension()  # build or load at session creation, not in the middle of the first run
            x, w = op.inputs
            rows, k, n = int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1], w.shape[1]
            shape = (runtime.replicas,) + tuple(op.outputs[0].shape)

            def product(xs, ws):
                xs = xs.reshape(runtime.replicas, rows, k).contiguous()
                ws = ws.contiguous()
                out = torch.empty((runtime.replicas, rows, n), dtype=torch.float32)
                threads = torch.get_num_threads()
                for r in range(runtime.replicas):
                    ext.streamed_matmul(xs[r].numpy(), ws[r].numpy(), out[r].numpy(), threads)
                return out.reshape(shape)
            return product


def streamed_matmul(x: popxl.Tensor, w: popxl.Tensor) -> popxl.Tensor:
    """``x @ w`` for ``x`` (..., K) and a matrix ``w`` (K, N); streamed when ``x`` has at most
    ``MAX_ROWS`` rows of float32 on the CPU runtime (see the module documentation)."""
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if not IS_CPU or rows > MAX_ROWS or x.dtype != popxl.float32 or w.dtype != popxl.float32:
        return x @ w
    return StreamedMatMul.create(x, w, name="product")
