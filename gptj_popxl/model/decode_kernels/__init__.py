"""Custom ops of a decode step (one new token per sequence), for the KV-cache model (``model.kv_cache``).

- ``streamed_matmul(x, w)``: ``x @ w`` for a weight ``w`` and few rows of ``x``. A decode step's
  time is that of reading the weights, which BLAS kernels tuned for many rows do at a fraction of
  the memory bandwidth; this kernel reads each weight once for all rows, split over torch's
  threads by output columns.
- ``decode_layer(...)``: a whole decoder layer for one new token per row over the KV cache (the
  products streamed as above, rotary embedding, attention, GELU, residual) in one op instead of
  some thirty small ones; it returns the new key and value for the caller to write into the cache.

On the CPU runtime these are custom ops (``gptj_popxl.backend.custom_op``) whose kernels are the C++
in ``streamed_matmul.h``, ``decode_attention.h`` and ``decode_layer.h``, bound by ``decode_kernels.cpp`` and compiled
by cppimport on first use (into this folder, git-ignored). Both are inference only (no gradient
rule) and float32; :func:`streamed_matmul` falls back to ``ops.matmul`` for more than ``MAX_ROWS``
rows, other dtypes or the Poplar SDK, and :func:`can_decode_layer` says when ``decode_layer``
applies.
"""
import functools
import os

import numpy as np
import torch

from gptj_popxl.backend import IS_CPU, custom_op, popxl

__all__ = ["streamed_matmul", "MAX_ROWS", "decode_layer", "can_decode_layer"]

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

    class DecodeLayer(custom_op.CustomOp):
        """``(x_next, k_t, v)`` of one decoder layer of a decode step by the C++ kernel."""
        name = "decode_layer"

        @staticmethod
        def infer(x, h, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, positions, sin, cos, k_cache, v_cache, write,
                  mask):
            batch, heads, head_dim, _ = k_cache.shape
            return (x.spec, custom_op.spec((batch, heads, head_dim, 1), x.dtype),
                    custom_op.spec((batch, heads, 1, head_dim), x.dtype))

        @classmethod
        def lower(cls, op, runtime):
            ext = extension()
            if runtime.replicas != 1:
                raise ValueError("decode_layer runs on one replica (no tensor parallelism)")
            batch, heads, head_dim, cache_len = op.inputs[11].shape
            n_embd = op.inputs[0].shape[-1]

            def layer(x, h, *rest):
                weights, (positions, sin, cos, k_cache, v_cache, write, mask) = rest[:6], rest[6:]
                x_next = torch.empty((1, batch, 1, n_embd), dtype=torch.float32)
                k_new = torch.empty((1, batch, heads, head_dim, 1), dtype=torch.float32)
                v_new = torch.empty((1, batch, heads, 1, head_dim), dtype=torch.float32)
                ext.decode_layer(x.reshape(batch, n_embd).contiguous().numpy(),
                                 h.reshape(batch, n_embd).contiguous().numpy(),
                                 *(w[0].contiguous().numpy() for w in weights),
                                 positions.contiguous().numpy(), sin[0].numpy(), cos[0].numpy(),
                                 k_cache[0].contiguous().numpy(), v_cache[0].contiguous().numpy(), int(write[0, 0]),
                                 mask.reshape(batch, cache_len).contiguous().numpy(),
                                 x_next.reshape(batch, n_embd).numpy(),
                                 k_new.reshape(batch, heads, head_dim).numpy(),
                                 v_new.reshape(batch, heads, head_dim).numpy(), torch.get_num_threads())
                return x_next, k_new, v_new
            return layer


def streamed_matmul(x: popxl.Tensor, w: popxl.Tensor) -> popxl.Tensor:
    """``x @ w`` for ``x`` (..., K) and a matrix ``w`` (K, N); streamed when ``x`` has at most
    ``MAX_ROWS`` rows of float32 on the CPU runtime (see the module documentation)."""
    if not IS_CPU or _rows(x) > MAX_ROWS or x.dtype != popxl.float32 or w.dtype != popxl.float32:
        return x @ w
    return StreamedMatMul.create(x, w, name="product")


def can_decode_layer(x: popxl.Tensor, tp: int) -> bool:
    """Whether :func:`decode_layer` runs for hidden states ``x`` of a model with ``tp`` shards (float32,
    one shard, the CPU runtime)."""
    return IS_CPU and x.dtype == popxl.float32 and tp == 1


def decode_layer(x: popxl.Tensor, h: popxl.Tensor, w_qkv: popxl.Tensor, w_in: popxl.Tensor, b_in: popxl.Tensor,
                 w_out: popxl.Tensor, w_fc_out: popxl.Tensor, b_fc_out: popxl.Tensor, positions: popxl.Tensor,
                 sin: popxl.Tensor, cos: popxl.Tensor, k_cache: popxl.Tensor, v_cache: popxl.Tensor,
                 write: popxl.Tensor, mask: popxl.Tensor):
    """One GPT-J decoder layer (parallel attention and MLP, residual) for one new token per row.

    ``x`` (batch, 1, n_embd) the layer's input and ``h`` that after its LayerNorm; the weights as
    the layer's variables (``w_qkv`` fused ``[q | k | v]`` columns); ``positions`` (batch, 1) int32
    rows of the rotary tables ``sin``, ``cos`` (positions, rotary_dim / 2); ``k_cache`` (batch,
    heads, head_dim, cache_len) (keys transposed) and ``v_cache`` (batch, heads, cache_len,
    head_dim), only read: column ``write`` (1,) int32 takes the new key and value; ``mask``
    (batch, 1, 1, cache_len) additive. Returns the layer's output ``x_next`` (x's shape), the rotated
    new key ``k_t`` (batch, heads, head_dim, 1) and the value ``v`` (batch, heads, 1, head_dim), in
    the caches' layouts, for the caller to write at column ``write``.
    """
    batch, heads, head_dim, cache_len = k_cache.shape
    n_embd, inner, rotary = x.shape[-1], w_in.shape[-1], sin.shape[-1]
    expected = {"x": (x, (batch, 1, n_embd), popxl.float32), "h": (h, (batch, 1, n_embd), popxl.float32),
                "w_qkv": (w_qkv, (n_embd, 3 * heads * head_dim), popxl.float32),
                "w_in": (w_in, (n_embd, inner), popxl.float32), "b_in": (b_in, (inner,), popxl.float32),
                "w_out": (w_out, (heads * head_dim, n_embd), popxl.float32),
                "w_fc_out": (w_fc_out, (inner, n_embd), popxl.float32),
                "b_fc_out": (b_fc_out, (n_embd,), popxl.float32), "positions": (positions, (batch, 1), popxl.int32),
                "sin": (sin, (sin.shape[0], rotary), popxl.float32), "cos": (cos, tuple(sin.shape), popxl.float32),
                "v_cache": (v_cache, (batch, heads, cache_len, head_dim), popxl.float32),
                "write": (write, (1,), popxl.int32), "mask": (mask, (batch, 1, 1, cache_len), popxl.float32)}
    for what, (t, shape, dtype) in expected.items():
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"decode_layer: {what} must be {shape} {dtype.name} for x {tuple(x.shape)} and k_cache "
                             f"{tuple(k_cache.shape)}, got {t.name!r} {tuple(t.shape)} {t.dtype.name}")
    if 2 * rotary > head_dim:
        raise ValueError(f"decode_layer: rotary tables {tuple(sin.shape)} rotate more than head_dim {head_dim}")
    return DecodeLayer.create(x, h, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, positions, sin, cos, k_cache,
                              v_cache, write, mask, name="decode_layer")
