"""Custom ops of a decode step (one new token per sequence), for the KV-cache model (``model.kv_cache``).

- ``streamed_matmul(x, w)``: ``x @ w`` for a weight ``w`` and few rows of ``x``. A decode step's
  time is that of reading the weights, which BLAS kernels tuned for many rows do at a fraction of
  the memory bandwidth; this kernel reads each weight once for all rows, split over torch's
  threads by output columns.
- ``decode_attention(...)``: the attention of one new token per row over the cache (rotary
  embedding of the new query and key, scores, softmax, weighted values) in one kernel instead of
  some twenty small ops; it returns the new key and value for the caller to write into the cache.

On the CPU runtime these are custom ops (``gptj_popxl.backend.custom_op``) whose kernels are the C++
in ``streamed_matmul.h`` and ``decode_attention.h``, bound by ``decode_kernels.cpp`` and compiled
by cppimport on first use (into this folder, git-ignored). Both are inference only (no gradient
rule) and float32; :func:`streamed_matmul` falls back to ``ops.matmul`` for more than ``MAX_ROWS``
rows, other dtypes or the Poplar SDK, and :func:`can_decode_attention` says when
``decode_attention`` applies.
"""
import functools
import os

import numpy as np
import torch

from gptj_popxl.backend import IS_CPU, custom_op, popxl

__all__ = ["streamed_matmul", "MAX_ROWS", "decode_attention", "can_decode_attention"]

# Most rows of x streamed; beyond, the product is compute-bound and BLAS does better. Measured on the
# benchmark model's weights (one thread, 17 products): 1.4 / 2.8 / 5.3 / 17.5 ms at 1 / 4 / 16 / 64
# rows against MKL's 2.2 / 5.1 / 8.9 / 23.1 ms; so a prefill of a few short prompts streams too.
MAX_ROWS = 64

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.cpp")


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ kernel module, built by cppimport on first call."""
    import cppimport
    return cppimport.imp_from_filepath(_SOURCE, "decode_kernels")


def _rows(t) -> int:
    return int(np.prod(t.shape[:-1], dtype=np.int64))


if IS_CPU:
    class StreamedMatMul(custom_op.CustomOp):
        """``x (..., K) @ w (K, N)`` by the C++ kernel, one replica after another."""
        name = "streamed_matmul"

        @staticmethod
        def infer(x, w):
            if len(w.shape) != 2 or len(x.shape) < 2 or x.shape[-1] != w.shape[0]:
                raise ValueError("x (..., K) and w (K, N) must agree on K")
            return custom_op.spec(tuple(x.shape[:-1]) + (w.shape[1],), x.dtype)

        @classmethod
        def lower(cls, op, runtime):
            ext = extension()  # build or load at session creation, not in the middle of the first run
            replicas, shape = runtime.replicas, (runtime.replicas,) + tuple(op.outputs[0].shape)

            def product(xs, ws):
                out = torch.empty(shape, dtype=torch.float32)
                threads = torch.get_num_threads()
                if replicas == 1:  # no per-replica views: this runs at every decode step
                    ext.streamed_matmul(xs.contiguous().numpy(), ws.contiguous().numpy(), out.numpy(), threads)
                    return out
                for x_r, w_r, out_r in zip(xs.contiguous(), ws.contiguous(), out):
                    ext.streamed_matmul(x_r.numpy(), w_r.numpy(), out_r.numpy(), threads)
                return out
            return product

    class DecodeAttention(custom_op.CustomOp):
        """``(z, k_t, v)`` of one decode step's attention by the C++ kernel, one replica after another."""
        name = "decode_attention"

        @staticmethod
        def infer(qkv, positions, sin, cos, k_cache, v_cache, write, mask):
            batch, heads, head_dim, _ = k_cache.shape
            return (custom_op.spec((batch, 1, heads * head_dim), qkv.dtype),
                    custom_op.spec((batch, heads, head_dim, 1), qkv.dtype),
                    custom_op.spec((batch, heads, 1, head_dim), qkv.dtype))

        @classmethod
        def lower(cls, op, runtime):
            ext = extension()
            batch, heads, head_dim, cache_len = op.inputs[4].shape
            replicas = runtime.replicas

            def attention(qkv, positions, sin, cos, k_cache, v_cache, write, mask):
                z = torch.empty((replicas, batch, 1, heads * head_dim), dtype=torch.float32)
                k_new = torch.empty((replicas, batch, heads, head_dim, 1), dtype=torch.float32)
                v_new = torch.empty((replicas, batch, heads, 1, head_dim), dtype=torch.float32)
                ins = [t.contiguous() for t in (qkv.reshape(replicas, batch, -1), positions, sin, cos, k_cache,
                                                   v_cache)]
                outs = (z.reshape(replicas, batch, -1), k_new.reshape(replicas, batch, heads, head_dim),
                        v_new.reshape(replicas, batch, heads, head_dim))
                mask, columns = mask.reshape(replicas, batch, cache_len).contiguous(), write.tolist()
                for r in range(replicas):
                    ext.decode_attention(*(t[r].numpy() for t in ins), columns[r][0], mask[r].numpy(),
                                         *(t[r].numpy() for t in outs))
                return z, k_new, v_new
            return attention


def streamed_matmul(x: popxl.Tensor, w: popxl.Tensor) -> popxl.Tensor:
    """``x @ w`` for ``x`` (..., K) and a matrix ``w`` (K, N); streamed when ``x`` has at most
    ``MAX_ROWS`` rows of float32 on the CPU runtime (see the module documentation)."""
    if not IS_CPU or _rows(x) > MAX_ROWS or x.dtype != popxl.float32 or w.dtype != popxl.float32:
        return x @ w
    return StreamedMatMul.create(x, w, name="product")


def can_decode_attention(qkv: popxl.Tensor) -> bool:
    """Whether :func:`decode_attention` runs for this fused projection (float32 on the CPU runtime)."""
    return IS_CPU and qkv.dtype == popxl.float32


def decode_attention(qkv: popxl.Tensor, positions: popxl.Tensor, sin: popxl.Tensor, cos: popxl.Tensor,
                     k_cache: popxl.Tensor, v_cache: popxl.Tensor, write: popxl.Tensor, mask: popxl.Tensor):
    """One new token per row attending over a KV cache whose column ``write`` takes its key and value.

    ``qkv`` (batch, 1, 3 * heads * head_dim) float32, per row ``[q heads | k heads | v heads]``;
    ``positions`` (batch, 1) int32 rows of the rotary tables ``sin``, ``cos`` (positions,
    rotary_dim / 2); ``k_cache`` (batch, heads, head_dim, cache_len) (keys transposed) and
    ``v_cache`` (batch, heads, cache_len, head_dim), read only; ``write`` (1,) int32; ``mask``
    (batch, 1, 1, cache_len) additive. Returns ``z`` (batch, 1, heads * head_dim), the rotated new
    key ``k_t`` (batch, heads, head_dim, 1) and the value ``v`` (batch, heads, 1, head_dim), in the
    caches' layouts for the caller to write at column ``write``.
    """
    batch, heads, head_dim, cache_len = k_cache.shape
    expected = {"qkv": (qkv, (batch, 1, 3 * heads * head_dim), popxl.float32),
                "positions": (positions, (batch, 1), popxl.int32),
                "cos": (cos, tuple(sin.shape), popxl.float32), "sin": (sin, (sin.shape[0], sin.shape[-1]), popxl.float32),
                "v_cache": (v_cache, (batch, heads, cache_len, head_dim), popxl.float32),
                "write": (write, (1,), popxl.int32), "mask": (mask, (batch, 1, 1, cache_len), popxl.float32)}
    for what, (t, shape, dtype) in expected.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"decode_attention: {what} must be {shape} {dtype.name} for k_cache "
                             f"{tuple(k_cache.shape)}, got {t.name!r} {tuple(t.shape)} {t.dtype.name}")
    if 2 * sin.shape[-1] > head_dim:
        raise ValueError(f"decode_attention: rotary tables {tuple(sin.shape)} rotate more than head_dim {head_dim}")
    return DecodeAttention.create(qkv, positions, sin, cos, k_cache, v_cache, write, mask, name="attention")
