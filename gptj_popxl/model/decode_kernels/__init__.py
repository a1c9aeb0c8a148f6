"""Custom ops of a decode step (one new token per sequence), for the KV-cache model (``model.kv_cache``).

- ``streamed_matmul(x, w)``: ``x @ w`` for a weight ``w`` and few rows of ``x``. A decode step's
  time is that of reading the weights, which BLAS kernels tuned for many rows do at a fraction of
  the memory bandwidth; this kernel reads each weight once for all rows, split over torch's
  thread count by blocks of output columns (a team that never waits for a thread to start, see
  ``work_team.h``).
- ``decode_layer(...)``: a whole decoder layer for one new token per row over the KV cache
  (LayerNorm, the products streamed as above, rotary embedding, cache write, attention, GELU,
  residual) in one op instead of some thirty small ones.
- ``greedy_head(...)``: ``ln_f``, the LM head and the argmax of a greedy decode step in one op.

On the CPU runtime these are custom ops (``gptj_popxl.backend.custom_op``) whose kernels are the C++
in ``streamed_matmul.h``, ``decode_attention.h`` and ``decode_layer.h``, bound by ``decode_kernels.cpp`` and compiled
by cppimport on first use (into this folder, git-ignored). Both are inference only (no gradient
rule) and float32; :func:`streamed_matmul` falls back to ``ops.matmul`` for more than ``MAX_ROWS``
rows, other dtypes or the Poplar SDK, and :func:`can_decode_layer` says when ``decode_layer``
applies.
"""
import ctypes
import functools
import os
import weakref

import numpy as np
import torch

from gptj_popxl.backend import IS_CPU, custom_op, popxl

__all__ = ["streamed_matmul", "MAX_ROWS", "decode_layer", "greedy_head", "can_decode_layer"]

# Most rows of x streamed; beyond, the product is compute-bound and BLAS does better. Measured on the
# benchmark model's weights (one thread, 17 products): 1.4 / 2.8 / 5.3 / 17.5 ms at 1 / 4 / 16 / 64
# rows against MKL's 2.2 / 5.1 / 8.9 / 23.1 ms; so a prefill of a few short prompts streams too.
MAX_ROWS = 64

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.cpp")


def _threads(rows: int) -> int:
    """Threads for a kernel over ``rows`` rows: one for a single row, which is bound by reading the
    weights, and there one core streamed them faster than two on the 2-core machine measured (a decode
    step's 17 products: 1.75 ms against 2.34, medians of 8); torch's count otherwise."""
    return 1 if rows == 1 else torch.get_num_threads()


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ kernel module, built by cppimport on first call."""
    import cppimport
    return cppimport.imp_from_filepath(_SOURCE, "decode_kernels")


def _rows(t) -> int:
    return int(np.prod(t.shape[:-1], dtype=np.int64))


class _ArrayViews:
    """numpy arrays over the long-lived tensors a kernel reads at every call (weights, tables, caches),
    made once per tensor: a conversion costs one to two microseconds and a decode layer passes
    sixteen tensors. An array does not hold its tensor (the entry goes when the tensor does), so
    tensors new at every call (offloaded weights) are not kept alive; it is used only while the
    caller passes that tensor."""

    def __init__(self):
        self._views = {}

    def __call__(self, t: torch.Tensor) -> np.ndarray:
        held = self._views.get(id(t))
        if held is not None and held[0]() is t:
            return held[1]
        array = t.contiguous().numpy()
        if not t.is_contiguous():
            return array  # a copy: valid for this call only
        key, memory = id(t), (ctypes.c_char * array.nbytes).from_address(array.ctypes.data)
        unowned = np.ndarray(array.shape, array.dtype, memory)

        def forget(ref):
            if self._views.get(key, (None,))[0] is ref:
                del self._views[key]
        self._views[key] = (weakref.ref(t, forget), unowned)
        return unowned


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
            shape = (runtime.replicas,) + tuple(op.outputs[0].shape)
            threads = _threads(_rows(op.inputs[0]))
            if runtime.replicas == 1:  # no per-replica views, the weight's array made once: every decode step
                arrays = _ArrayViews()

                def product(xs, ws):
                    out = torch.empty(shape, dtype=torch.float32)
                    ext.streamed_matmul(xs.contiguous().numpy(), arrays(ws), out.numpy(), threads)
                    return out
                return product

            def per_replica_product(xs, ws):
                out = torch.empty(shape, dtype=torch.float32)
                for x_r, w_r, out_r in zip(xs.contiguous(), ws.contiguous(), out):
                    ext.streamed_matmul(x_r.numpy(), w_r.numpy(), out_r.numpy(), threads)
                return out
            return per_replica_product

    class DecodeLayer(custom_op.CustomOp):
        """One decoder layer of a decode step by the C++ kernel, writing the caches in place: its
        outputs are ``k_cache`` itself (the first input it modifies; ``v_cache`` is written too) and
        the layer's output."""
        name = "decode_layer"
        modifies = (12, 13)

        @staticmethod
        def infer(x, ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, positions, sin, cos, k_cache,
                  v_cache, write, mask, eps):
            return k_cache.spec, x.spec

        @classmethod
        def lower(cls, op, runtime):
            ext, eps = extension(), op.attrs["eps"]
            if runtime.replicas != 1:
                raise ValueError("decode_layer runs on one replica (no tensor parallelism)")
            batch, _, _, cache_len = op.inputs[12].shape
            n_embd = op.inputs[0].shape[-1]
            threads = _threads(batch)
            arrays = _ArrayViews()

            def layer(x, *rest):
                weights, (positions, sin, cos, k_cache, v_cache, write, mask) = rest[:8], rest[8:]
                x_next = np.empty((1, batch, 1, n_embd), np.float32)
                # Arrays keep the replica axis (of size 1); the C++ side skips leading axes of size 1.
                ext.decode_layer(x.reshape(batch, n_embd).contiguous().numpy(), *map(arrays, weights),
                                 positions.contiguous().numpy(), arrays(sin), arrays(cos), arrays(k_cache),
                                 arrays(v_cache), write.item(), mask.reshape(batch, cache_len).contiguous().numpy(),
                                 eps, x_next.reshape(batch, n_embd), threads)
                return k_cache, torch.from_numpy(x_next)
            return layer

    class GreedyHead(custom_op.CustomOp):
        """Each row's greedy next token from the final hidden states by the C++ kernel."""
        name = "greedy_head"

        @staticmethod
        def infer(x, ln_weight, ln_bias, w, bias, eps):
            return custom_op.spec((_rows(x),), popxl.int32)

        @classmethod
        def lower(cls, op, runtime):
            ext, eps = extension(), op.attrs["eps"]
            if runtime.replicas != 1:
                raise ValueError("greedy_head runs on one replica (no tensor parallelism)")
            rows, n_embd = _rows(op.inputs[0]), op.inputs[0].shape[-1]
            threads = _threads(rows)
            arrays = _ArrayViews()

            def head(x, ln_weight, ln_bias, w, bias):
                tokens = np.empty((1, rows), np.int32)
                ext.greedy_head(x.reshape(rows, n_embd).contiguous().numpy(),
                                *map(arrays, (ln_weight, ln_bias, w, bias)), eps, tokens, threads)
                return torch.from_numpy(tokens)
            return head


def streamed_matmul(x: popxl.Tensor, w: popxl.Tensor) -> popxl.Tensor:
    """``x @ w`` for ``x`` (..., K) and a matrix ``w`` (K, N); streamed when ``x`` has at most
    ``MAX_ROWS`` rows of float32 on the CPU runtime (see the module documentation)."""
    if not IS_CPU or _rows(x) > MAX_ROWS or x.dtype != popxl.float32 or w.dtype != popxl.float32:
        return x @ w
    return StreamedMatMul.create(x, w, name="product")


def can_decode_layer(dtype, tp: int) -> bool:
    """Whether :func:`decode_layer` and :func:`greedy_head` run for a model of ``dtype`` (a popxl
    dtype) with ``tp`` shards: float32, one shard, the CPU runtime."""
    return IS_CPU and dtype == popxl.float32 and tp == 1


def decode_layer(x: popxl.Tensor, ln_weight: popxl.Tensor, ln_bias: popxl.Tensor, w_qkv: popxl.Tensor,
                 w_in: popxl.Tensor, b_in: popxl.Tensor, w_out: popxl.Tensor, w_fc_out: popxl.Tensor,
                 b_fc_out: popxl.Tensor, positions: popxl.Tensor, sin: popxl.Tensor, cos: popxl.Tensor,
                 k_cache: popxl.Tensor, v_cache: popxl.Tensor, write: popxl.Tensor, mask: popxl.Tensor,
                 eps: float) -> popxl.Tensor:
    """One GPT-J decoder layer (LayerNorm, parallel attention and MLP, residual) for one new token per row.

    ``x`` (batch, 1, n_embd) the layer's input; the weights as the layer's variables (``w_qkv``
    fused ``[q | k | v]`` columns); ``positions`` (batch, 1) int32 rows of the rotary tables
    ``sin``, ``cos`` (positions, rotary_dim / 2); ``k_cache`` (batch, heads, head_dim, cache_len)
    (keys transposed) and ``v_cache`` (batch, heads, cache_len, head_dim), written in place: column
    ``write`` (1,) int32 takes the new key and value before the query attends; ``mask`` (batch, 1, 1,
    cache_len) additive. Returns the layer's output, ``x``'s shape.
    """
    batch, heads, head_dim, cache_len = k_cache.shape
    n_embd, inner, rotary = x.shape[-1], w_in.shape[-1], sin.shape[-1]
    expected = {"x": (x, (batch, 1, n_embd)), "ln_weight": (ln_weight, (n_embd,)), "ln_bias": (ln_bias, (n_embd,)),
                "w_qkv": (w_qkv, (n_embd, 3 * heads * head_dim)), "w_in": (w_in, (n_embd, inner)),
                "b_in": (b_in, (inner,)), "w_out": (w_out, (heads * head_dim, n_embd)),
                "w_fc_out": (w_fc_out, (inner, n_embd)), "b_fc_out": (b_fc_out, (n_embd,)),
                "sin": (sin, (sin.shape[0], rotary)), "cos": (cos, tuple(sin.shape)),
                "v_cache": (v_cache, (batch, heads, cache_len, head_dim)), "mask": (mask, (batch, 1, 1, cache_len)),
                "positions": (positions, (batch, 1), popxl.int32), "write": (write, (1,), popxl.int32)}
    for what, (t, shape, *dtype) in expected.items():
        dtype = dtype[0] if dtype else popxl.float32
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"decode_layer: {what} must be {shape} {dtype.name} for x {tuple(x.shape)} and k_cache "
                             f"{tuple(k_cache.shape)}, got {t.name!r} {tuple(t.shape)} {t.dtype.name}")
    if 2 * rotary > head_dim:
        raise ValueError(f"decode_layer: rotary tables {tuple(sin.shape)} rotate more than head_dim {head_dim}")
    return DecodeLayer.create(x, ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, positions, sin, cos,
                              k_cache, v_cache, write, mask, eps=float(eps), name="decode_layer")[1]


def greedy_head(x: popxl.Tensor, ln_weight: popxl.Tensor, ln_bias: popxl.Tensor, w: popxl.Tensor, bias: popxl.Tensor,
                eps: float) -> popxl.Tensor:
    """The greedy next token (batch,) int32 of each row of the final hidden states ``x`` (batch, ...,
    n_embd) float32: the first largest logit of ``layer_norm(x) @ w + bias`` (``ln_f`` and the LM head,
    ``w`` (n_embd, vocab)), as ``torch.argmax``; the logits are never stored."""
    n_embd, vocab = x.shape[-1], w.shape[-1]
    expected = {"ln_weight": (ln_weight, (n_embd,)), "ln_bias": (ln_bias, (n_embd,)), "w": (w, (n_embd, vocab)),
                "bias": (bias, (vocab,)), "x": (x, tuple(x.shape))}
    for what, (t, shape) in expected.items():
        if tuple(t.shape) != shape or t.dtype != popxl.float32:
            raise ValueError(f"greedy_head: {what} must be {shape} float32 for x {tuple(x.shape)} and w "
                             f"{tuple(w.shape)}, got {t.name!r} {tuple(t.shape)} {t.dtype.name}")
    return GreedyHead.create(x, ln_weight, ln_bias, w, bias, eps=float(eps), name="greedy_token")
