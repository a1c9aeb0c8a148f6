"""Custom ops of a decode step (one new token per sequence), for the KV-cache model (``model.kv_cache``).

- ``streamed_matmul(x, w)``: ``x @ w`` for a weight ``w`` and few rows of ``x``. A decode step's
  time is that of reading the weights. The product is formed either by BLAS (torch's MKL ``sgemm``,
  called from C++) or by a kernel that reads each weight once for all rows, on one thread or split
  over torch's thread count by chunks of consecutive weight rows, each read front to back and its
  sums added in a fixed order (a team that never waits for a thread to start, see ``work_team.h``).
  Which is faster is the machine's to say, so every op tries the ways on its first calls and keeps
  the fastest (``Fastest``; ``GPTJ_POPXL_PRODUCTS`` fixes the way). float16 weights are widened as
  the kernel reads them, and torch's float16 product takes BLAS's place among the ways: on one
  2-core VM streaming a (4096, 16384) float16 weight on two threads took 10 ms against oneDNN's
  21 ms, both bound by memory.
- ``decode_layer(...)``: a whole decoder layer for one new token per row over the KV cache
  (LayerNorm, the products formed as above, rotary embedding, cache write, attention, GELU,
  residual) in one op instead of some thirty small ones.
- ``prefill_layer(...)``: the same layer over a prefill's few tokens (up to ``MAX_ROWS`` rows in all),
  each attending to its own row's tokens, returning the rotated keys and the values.
- ``greedy_head(...)``: ``ln_f``, the LM head and the argmax of a greedy decode step in one op.
- ``greedy_decode_steps(...)``: greedy decode steps with every layer resident, each the embedding
  lookup, every ``decode_layer`` and ``greedy_head``, with the decode loop's bookkeeping between
  them (mask, tokens, counters): a whole run of the loop in one op, no Python between steps.

On the CPU runtime these are custom ops (``gptj_popxl.backend.custom_op``) whose kernels are the C++
in ``streamed_matmul.h``, ``decode_attention.h`` and ``decode_layer.h``, bound by ``decode_kernels.cpp``
and compiled by cppimport on first use (into this folder, git-ignored, or the kernel cache: see
``popxl_cpu/native.py``). They are inference only (no gradient rule); :func:`streamed_matmul` takes
float32 or float16 and falls back to ``ops.matmul`` for more than ``MAX_ROWS`` rows, other dtypes or
the Poplar SDK. The layer kernels take a float32 or a
float16 model (the model's tensors all of one type: float16 ones widened as read, the arithmetic in
float32, a float16 result rounded once as it is stored; BLAS gets float16 weights widened a block at
a time, in a prefill), and :func:`can_decode_layer` says when they apply.
"""
import contextlib
import ctypes
import functools
import os
import time
import weakref
from typing import Sequence, Tuple

import numpy as np
import torch

from gptj_popxl.backend import IS_CPU, custom_op, native, popxl

__all__ = ["streamed_matmul", "MAX_ROWS", "decode_layer", "prefill_layer", "greedy_head", "greedy_decode_steps",
           "can_decode_layer", "product_choices", "portable_graphs"]

# Most rows of x given to the kernel; beyond, the product is compute-bound and plain BLAS (``ops.matmul``)
# serves. Streaming won up to 64 rows on one machine measured (one thread, the benchmark model's 17
# products: 1.4 / 2.8 / 5.3 / 17.5 ms at 1 / 4 / 16 / 64 rows against MKL's 2.2 / 5.1 / 8.9 / 23.1 ms).
MAX_ROWS = 64

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_kernels.cpp")


# The environment variable that fixes how the kernels form their products: "blas" (for
# ``streamed_matmul``'s float16 weights torch's own float16 product in its place; a float16 prefill
# widens its weights for sgemm, the other float16 layer ops stream), "streamed" (on torch's thread
# count) or, when unset, the faster on this machine (see ``Fastest``). The attention's heads run on
# the same threads as the products (see ``decode_attention.h``).
PRODUCTS_VARIABLE = "GPTJ_POPXL_PRODUCTS"


@functools.lru_cache(maxsize=None)
def blas_sgemm() -> int:
    """The address of the BLAS ``sgemm_`` (Fortran interface) that torch's CPU build carries (MKL),
    or 0 where torch exports none or it does not give a known product (checked once). torch links
    MKL's LP64 interface (32-bit sizes), which the kernels' ``FortranSgemm`` declares."""
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        sgemm = ctypes.CDLL(library).sgemm_
    except (OSError, AttributeError):
        return 0
    address = ctypes.cast(sgemm, ctypes.c_void_p).value or 0
    x, w = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    out = np.zeros((2, 4), np.float32)
    extension().matmul(x, w, out, 1, address)
    return address if np.array_equal(out, x @ w) else 0


class Fastest:
    """Runs one op by the fastest of several ways, found on the op's first calls.

    ``ways`` maps a name to a callable; all give the op's result, so the trials do useful work.
    Each way in turn serves a block of ``1 + TRIALS`` consecutive calls, the first of which is not
    timed (a switch between ways pays once for their thread pools: MKL's OpenMP threads and the
    streaming kernels' team spin for a while after a job and hold the cores the other wants); the
    way with the least median time then serves every later call. The choice is the machine's: on
    one 2-core VM streaming a decode step's weights on one thread beat MKL (1.4 against 2.2 ms for
    the benchmark model's 17 products), on another MKL on two threads beat every streamed variant
    (0.9 against 1.5 ms). ``fixed`` (a name) skips the trials. ``decisions`` (a dict shared by ops
    that run the same work, with this op's ``key`` in it) takes the way another op chose, even in
    the middle of the trials, and gets this op's choice.

    The ways round differently, so while an op tries them its results may differ in the last bits
    from one call to the next, and the way kept may differ between processes: fix it (``fixed``,
    ``PRODUCTS_VARIABLE``) for bit-for-bit repeatable runs. Calls must come from one thread at a time,
    as a session runs them.
    """
    TRIALS = 3

    def __init__(self, ways: dict, fixed: str = None, decisions: dict = None, key=None):
        self.ways, self.times = ways, {name: [] for name in ways}
        self._decisions, self._key = decisions, key
        if fixed is None and len(ways) == 1:
            fixed = next(iter(ways))
        self.chosen = fixed
        self._run = ways[fixed] if fixed is not None else None
        self._calls = 0

    def __call__(self, *args):
        if self._run is not None:
            return self._run(*args)
        if self._decisions is not None and self._key in self._decisions:
            self.chosen = self._decisions[self._key]
            self._run = self.ways[self.chosen]
            return self._run(*args)
        name, position = list(self.ways)[self._calls // (1 + self.TRIALS)], self._calls % (1 + self.TRIALS)
        self._calls += 1
        start = time.perf_counter()
        result = self.ways[name](*args)
        if position:
            self.times[name].append(time.perf_counter() - start)
        if self._calls == len(self.ways) * (1 + self.TRIALS):
            self.chosen = min(self.times, key=lambda n: np.median(self.times[n]))
            self._run = self.ways[self.chosen]
            if self._decisions is not None:
                self._decisions[self._key] = self.chosen
        return result


# Every live op's ``Fastest``: its op name and IR, what ``product_choices`` reports.
_CHOOSERS: "weakref.WeakKeyDictionary[Fastest, tuple]" = weakref.WeakKeyDictionary()
# The way chosen for each (op name, input shapes and dtypes, replicas, thread count) in this process:
# ops doing the same work, in this program or a later one, take it instead of trying the ways again.
_DECISIONS: dict = {}


def product_ways(op, runtime, kernel, library=None, widened_blas=False) -> "Fastest":
    """A ``Fastest`` over the ways ``op`` (a decode custom op lowered for ``runtime``) can form its
    products: ``kernel(threads, blas)`` gives the op's callable for ``threads`` streaming threads, or
    for the sgemm at address ``blas`` when nonzero. The ways are BLAS (where ``blas_sgemm`` finds it)
    and streaming on one thread and on torch's count; ``library``, the op's callable by a library's
    product, takes BLAS's place where given (``streamed_matmul``'s float16 weights). For float16
    tensors BLAS is a way only with ``widened_blas``, an op whose kernel widens its weights for sgemm
    and whose rows are many (a prefill): at a decode step's few rows widening moves more bytes than
    streaming, so it could never win (``PRODUCTS_VARIABLE`` "blas" then streams). Ops with the same
    name, input shapes and dtypes, replicas and thread count share one decision per process."""
    op_name = op.prim.name
    threads = torch.get_num_threads()
    streamed = {f"streamed on {n} thread{'s' * (n > 1)}": kernel(n, 0) for n in sorted({1, threads})}
    wanted = os.environ.get(PRODUCTS_VARIABLE)
    streamed_only = library is None and not widened_blas and any(t.dtype == popxl.float16 for t in op.inputs)
    if wanted == "streamed" or streamed_only:
        ways = streamed
    elif library is not None:
        ways = dict(streamed, blas=library)
    else:
        blas = blas_sgemm()
        ways = dict(streamed, **({"blas": kernel(threads, blas)} if blas else {}))
    if wanted is None:
        key = (op_name, tuple((tuple(t.shape), t.dtype.name) for t in op.inputs), runtime.replicas, threads)
        chooser = Fastest(ways, decisions=_DECISIONS, key=key)
    elif wanted == "streamed" or (wanted == "blas" and streamed_only):
        chooser = Fastest(ways, list(streamed)[-1])
    elif wanted == "blas" and "blas" in ways:
        chooser = Fastest(ways, "blas")
    else:
        raise ValueError(f"{PRODUCTS_VARIABLE} must be 'blas' (where torch carries a BLAS sgemm) or 'streamed', "
                         f"got {wanted!r}")
    _CHOOSERS[chooser] = (op_name, runtime.ir)
    return chooser


def product_choices(irs) -> dict:
    """How the decode ops of the programs of ``irs`` form their products: ``{op name: {way: ops}}``, the
    way "trying" for an op still timing its first calls."""
    irs = set(irs)
    choices: dict = {}
    for chooser, (op_name, ir) in list(_CHOOSERS.items()):
        if ir not in irs:
            continue
        way = chooser.chosen or "trying"
        choices.setdefault(op_name, {}).setdefault(way, 0)
        choices[op_name][way] += 1
    return choices


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ kernel module, built by cppimport on first call (for this processor)."""
    return native.build(_SOURCE, "decode_kernels")


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


def _wrap_int32(value: int) -> int:
    """``value`` wrapped into int32, as int32 arithmetic on the device wraps."""
    return (value + 2 ** 31) % 2 ** 32 - 2 ** 31


def _one_replica(op_name: str, runtime) -> None:
    if runtime.replicas != 1:
        raise ValueError(f"{op_name} runs on one replica (no tensor parallelism)")


if IS_CPU:
    from gptj_popxl.popxl_cpu.ops.nn import half_product_operands

    class StreamedMatMul(custom_op.CustomOp):
        """``x (..., K) @ w (K, N)`` by the C++ kernel, one replica after another: float32, or float16
        summed in float32 and rounded once (as ``ops.matmul``), the kernel widening ``w`` as it reads it."""
        name = "streamed_matmul"

        @staticmethod
        def infer(x, w):
            if len(w.shape) != 2 or len(x.shape) < 2 or x.shape[-1] != w.shape[0]:
                raise ValueError("x (..., K) and w (K, N) must agree on K")
            if x.dtype != w.dtype or x.dtype not in (popxl.float32, popxl.float16):
                raise TypeError(f"x and w must both be float32 or both float16, got {x.dtype.name} and {w.dtype.name}")
            return custom_op.spec(tuple(x.shape[:-1]) + (w.shape[1],), x.dtype)

        @classmethod
        def lower(cls, op, runtime):
            ext = extension()  # build or load at session creation, not in the middle of the first run
            shape = (runtime.replicas,) + tuple(op.outputs[0].shape)
            if op.inputs[0].dtype == popxl.float16:
                return cls._lower_half(op, runtime, ext, shape)
            if runtime.replicas == 1:  # no per-replica views, the weight's array made once: every decode step
                arrays = _ArrayViews()

                def kernel(threads, blas):
                    def product(xs, ws):
                        out = torch.empty(shape, dtype=torch.float32)
                        ext.matmul(xs.contiguous().numpy(), arrays(ws), out.numpy(), threads, blas)
                        return out
                    return product
                return product_ways(op, runtime, kernel)

            def kernel(threads, blas):
                def per_replica_product(xs, ws):
                    out = torch.empty(shape, dtype=torch.float32)
                    for x_r, w_r, out_r in zip(xs.contiguous(), ws.contiguous(), out):
                        ext.matmul(x_r.numpy(), w_r.numpy(), out_r.numpy(), threads, blas)
                    return out
                return per_replica_product
            return product_ways(op, runtime, kernel)

        @staticmethod
        def _lower_half(op, runtime, ext, shape):
            """float16: streamed with x's few rows widened first, or torch's float16 product as
            ``ops.matmul`` forms it (the library way), whichever ``Fastest`` finds faster."""
            arrays = _ArrayViews()
            x_rows, (k, n) = (runtime.replicas, _rows(op.inputs[0])), op.inputs[1].shape

            def kernel(threads, blas):
                def product(xs, ws):
                    wide = xs.reshape(x_rows + (k,)).float()
                    out = torch.empty(shape, dtype=torch.float32)
                    weights = arrays(ws)  # (replicas, K, N): the array made once for all replicas
                    for r in range(runtime.replicas):
                        ext.matmul(wide[r].numpy(), weights[r], out[r].numpy(), threads, blas)
                    return out.to(torch.float16)
                return product

            def library(xs, ws):
                x, w = half_product_operands(xs.reshape(x_rows + (k,)), ws.reshape(runtime.replicas, k, n), True)
                return torch.matmul(x, w).to(torch.float16).reshape(shape)
            return product_ways(op, runtime, kernel, library)

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
            _one_replica(cls.name, runtime)
            batch, _, _, cache_len = op.inputs[12].shape
            n_embd = op.inputs[0].shape[-1]
            arrays = _ArrayViews()

            def kernel(threads, blas):
                def layer(x, *rest):
                    weights, (positions, sin, cos, k_cache, v_cache, write, mask) = rest[:8], rest[8:]
                    x_next = torch.empty((1, batch, 1, n_embd), dtype=x.dtype)
                    # Arrays keep the replica axis (of size 1); the C++ side skips leading axes of size 1.
                    ext.decode_layer(x.reshape(batch, n_embd).contiguous().numpy(), *map(arrays, weights),
                                     positions.contiguous().numpy(), arrays(sin), arrays(cos), arrays(k_cache),
                                     arrays(v_cache), write.item(), mask.reshape(batch, cache_len).contiguous().numpy(),
                                     eps, x_next.numpy().reshape(batch, n_embd), threads, blas)
                    return k_cache, x_next
                return layer
            return product_ways(op, runtime, kernel)

    class PrefillLayer(custom_op.CustomOp):
        """One decoder layer over a prefill's tokens by the C++ kernel; outputs the layer's output and
        the rotated keys and the values (batch, heads, seq, head_dim)."""
        name = "prefill_layer"

        @staticmethod
        def infer(x, ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, positions, sin, cos, mask,
                  eps, heads):
            batch, seq, _ = x.shape
            kv = custom_op.spec((batch, heads, seq, w_qkv.shape[-1] // (3 * heads)), x.dtype)
            return x.spec, kv, kv

        @classmethod
        def lower(cls, op, runtime):
            ext, eps = extension(), op.attrs["eps"]
            _one_replica(cls.name, runtime)
            (batch, seq, n_embd), kv_shape = op.inputs[0].shape, (1,) + tuple(op.outputs[1].shape)
            arrays = _ArrayViews()

            def kernel(threads, blas):
                def layer(x, *rest):
                    weights, (positions, sin, cos, mask) = rest[:8], rest[8:]
                    k, v = (torch.empty(kv_shape, dtype=x.dtype) for _ in range(2))
                    x_next = torch.empty((1, batch, seq, n_embd), dtype=x.dtype)
                    ext.prefill_layer(x.contiguous().numpy(), *map(arrays, weights), positions.contiguous().numpy(),
                                      arrays(sin), arrays(cos), mask.reshape(batch, seq, seq).contiguous().numpy(),
                                      eps, k.numpy(), v.numpy(), x_next.numpy(), threads, blas)
                    return x_next, k, v
                return layer
            return product_ways(op, runtime, kernel, widened_blas=True)

    class GreedyHead(custom_op.CustomOp):
        """Each row's greedy next token from the final hidden states by the C++ kernel."""
        name = "greedy_head"

        @staticmethod
        def infer(x, ln_weight, ln_bias, w, bias, eps):
            return custom_op.spec((_rows(x),), popxl.int32)

        @classmethod
        def lower(cls, op, runtime):
            ext, eps = extension(), op.attrs["eps"]
            _one_replica(cls.name, runtime)
            rows, n_embd = _rows(op.inputs[0]), op.inputs[0].shape[-1]
            arrays = _ArrayViews()

            def kernel(threads, blas):
                def head(x, ln_weight, ln_bias, w, bias):
                    tokens = np.empty((1, rows), np.int32)
                    ext.greedy_head(x.reshape(rows, n_embd).contiguous().numpy(),
                                    *map(arrays, (ln_weight, ln_bias, w, bias)), eps, tokens, threads, blas)
                    return torch.from_numpy(tokens)
                return head
            return product_ways(op, runtime, kernel)


    class GreedyDecodeSteps(custom_op.CustomOp):
        """Greedy decode steps by the C++ kernel (see :func:`greedy_decode_steps`). Inputs: token,
        position, column, mask, tokens, step, embedding, sin, cos, ln_f's weight and bias, the LM
        head's weight and bias (``HEAD`` of them), then 8 weights per layer, then the key caches and
        the value caches, which it writes in place; outputs: the first key cache, then the next token,
        position, column, mask, tokens and step."""
        name = "greedy_decode_steps"
        HEAD = 13

        @classmethod
        def modified_inputs(cls, op):
            first = cls.HEAD + 8 * op.attrs["n_layer"]
            return tuple(range(first, first + 2 * op.attrs["n_layer"]))

        @staticmethod
        def infer(token, position, column, mask, tokens, step, *rest, n_layer, eps, n_positions, steps):
            k_cache = rest[GreedyDecodeSteps.HEAD - 6 + 8 * n_layer]
            return k_cache.spec, token.spec, position.spec, column.spec, mask.spec, tokens.spec, step.spec

        @classmethod
        def lower(cls, op, runtime):
            ext, attrs = extension(), op.attrs
            n_layer, eps, n_positions, steps = attrs["n_layer"], attrs["eps"], attrs["n_positions"], attrs["steps"]
            _one_replica(cls.name, runtime)
            (batch, chunk), cache_len = op.inputs[4].shape, op.inputs[3].shape[-1]
            arrays = _ArrayViews()

            def kernel(threads, blas):
                def run(state, fixed, column, first, count):
                    embedding, weights, sin, cos, keys, values, *head = fixed
                    token, positions, mask, tokens = state
                    ext.greedy_decode_steps(token, positions, column, mask, tokens, first, count, n_positions,
                                            embedding, weights, sin, cos, keys, values, *head, eps, threads, blas)
                return run
            chooser = product_ways(op, runtime, kernel)

            def run_steps(token, position, column, mask, tokens, step, embedding, sin, cos, ln_weight, ln_bias, w,
                          bias, *rest):
                weights, caches = rest[:8 * n_layer], rest[8 * n_layer:]
                if not all(c.is_contiguous() for c in caches):  # an array of a copy would lose the writes
                    raise ValueError("greedy_decode_steps writes the caches in place: they must be contiguous")
                fixed = (arrays(embedding), [arrays(t) for t in weights], arrays(sin), arrays(cos),
                         [arrays(c) for c in caches[:n_layer]], [arrays(c) for c in caches[n_layer:]],
                         *map(arrays, (ln_weight, ln_bias, w, bias)))
                # The kernel writes these as it goes: the next token and positions, the mask, the tokens.
                token, positions = (t.reshape(batch).clone(memory_format=torch.contiguous_format)
                                    for t in (token, position))
                mask, tokens = (t.clone(memory_format=torch.contiguous_format) for t in (mask, tokens))
                state = token.numpy(), positions.numpy(), mask.numpy().reshape(batch, -1), tokens.numpy().reshape(
                    batch, chunk)
                column, first, done = int(column), int(step), 0
                # While the ways are on trial each call is one step: whole runs as trials would make a
                # process's first dozen runs partly slow ones.
                while chooser.chosen is None and done < steps:
                    chooser(state, fixed, (column + done) % cache_len, first + done, 1)
                    done += 1
                if done < steps:
                    chooser(state, fixed, (column + done) % cache_len, first + done, steps - done)
                return (rest[8 * n_layer], token.reshape(1, batch, 1), positions.reshape(1, batch, 1),
                        torch.tensor([[(column + steps) % cache_len]], dtype=torch.int32), mask, tokens,
                        torch.tensor([[_wrap_int32(first + steps)]], dtype=torch.int32))
            return run_steps


# Open ``portable_graphs`` contexts: while any is, the ops build plain popxl ops.
_portable_depth = 0


@contextlib.contextmanager
def portable_graphs():
    """While active, :func:`streamed_matmul` and the layer kernels build plain popxl ops, the graph the
    Poplar SDK gets: for analysing the program an IPU would run (``gptj_popxl.plan``), whose FLOPs the
    custom ops would hide."""
    global _portable_depth
    _portable_depth += 1
    try:
        yield
    finally:
        _portable_depth -= 1


def _cpu_kernels() -> bool:
    """Whether graphs built now use the C++ ops: on the CPU runtime, outside ``portable_graphs``."""
    return IS_CPU and not _portable_depth


def streamed_matmul(x: popxl.Tensor, w: popxl.Tensor) -> popxl.Tensor:
    """``x @ w`` for ``x`` (..., K) and a matrix ``w`` (K, N); by the C++ kernel (BLAS or streamed, as
    timed fastest; for float16, streamed or torch's float16 product) when ``x`` has at most
    ``MAX_ROWS`` rows of float32 or float16 on the CPU runtime (see the module documentation)."""
    if not _cpu_kernels() or _rows(x) > MAX_ROWS or x.dtype != w.dtype or x.dtype not in (popxl.float32, popxl.float16):
        return x @ w
    return StreamedMatMul.create(x, w, name="product")


def can_decode_layer(dtype, tp: int) -> bool:
    """Whether the layer kernels (:func:`decode_layer`, :func:`prefill_layer`, :func:`greedy_head`,
    :func:`greedy_decode_steps`) run for a model of ``dtype`` (a popxl dtype) with ``tp`` shards:
    float32 or float16, one shard, the CPU runtime."""
    return _cpu_kernels() and dtype in (popxl.float32, popxl.float16) and tp == 1


def _require(op: str, context: str, expected: dict, model: popxl.Tensor) -> None:
    """Raises naming the first tensor of ``expected`` (``{what: (tensor, shape[, dtype])}``) whose shape
    or dtype is not as given; ``context`` says what the shapes follow from. A tensor without a dtype
    there is one of the model's, all of one type: that of the weight ``model``, float32 or float16."""
    if model.dtype not in (popxl.float32, popxl.float16):
        raise TypeError(f"{op}: the model's tensors must be float32 or float16, got {model.name!r} "
                        f"{model.dtype.name}")
    for what, (t, shape, *dtype) in expected.items():
        dtype = dtype[0] if dtype else model.dtype
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{op}: {what} must be {tuple(shape)} {dtype.name} for {context}, got {t.name!r} "
                             f"{tuple(t.shape)} {t.dtype.name}")


def _weights_expected(n_embd: int, inner: int, width: int, weights, sin, cos) -> dict:
    """What the layer kernels require of a layer's 8 weights and the rotary tables, for rows of
    ``n_embd`` features, an MLP of ``inner`` and attention ``width`` (heads x head_dim)."""
    ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out = weights
    return {"ln_weight": (ln_weight, (n_embd,)), "ln_bias": (ln_bias, (n_embd,)),
            "w_qkv": (w_qkv, (n_embd, 3 * width)), "w_in": (w_in, (n_embd, inner)),
            "b_in": (b_in, (inner,)), "w_out": (w_out, (width, n_embd)),
            "w_fc_out": (w_fc_out, (inner, n_embd)), "b_fc_out": (b_fc_out, (n_embd,)),
            "sin": (sin, (sin.shape[0], sin.shape[-1]), popxl.float32),
            "cos": (cos, tuple(sin.shape), popxl.float32)}


def _layer_expected(n_embd: int, inner: int, weights, positions, sin, cos, k_cache, v_cache, write, mask) -> dict:
    """What ``decode_layer`` requires of a layer's 8 weights and its step's tensors, for rows of
    ``n_embd`` features, an MLP of ``inner`` and ``k_cache``'s shape."""
    batch, heads, head_dim, cache_len = k_cache.shape
    return {**_weights_expected(n_embd, inner, heads * head_dim, weights, sin, cos),
            "k_cache": (k_cache, tuple(k_cache.shape)), "v_cache": (v_cache, (batch, heads, cache_len, head_dim)),
            "mask": (mask, (batch, 1, 1, cache_len), popxl.float32),
            "positions": (positions, (batch, 1), popxl.int32), "write": (write, (1,), popxl.int32)}


def _check_rotary(op: str, sin, head_dim: int) -> None:
    if 2 * sin.shape[-1] > head_dim:
        raise ValueError(f"{op}: rotary tables {tuple(sin.shape)} rotate more than head_dim {head_dim}")


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
    cache_len) additive, float32 as the rotary tables. ``x``, the weights and the caches are the
    model's type, float32 or float16. Returns the layer's output, ``x``'s shape.
    """
    weights = (ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out)
    n_embd = x.shape[-1]
    expected = {"x": (x, (k_cache.shape[0], 1, n_embd)),
                **_layer_expected(n_embd, w_in.shape[-1], weights, positions, sin, cos, k_cache, v_cache, write, mask)}
    _require("decode_layer", f"x {tuple(x.shape)} and k_cache {tuple(k_cache.shape)}", expected, w_qkv)
    _check_rotary("decode_layer", sin, k_cache.shape[2])
    return DecodeLayer.create(x, *weights, positions, sin, cos, k_cache, v_cache, write, mask, eps=float(eps),
                              name="decode_layer")[1]


def prefill_layer(x: popxl.Tensor, ln_weight: popxl.Tensor, ln_bias: popxl.Tensor, w_qkv: popxl.Tensor,
                  w_in: popxl.Tensor, b_in: popxl.Tensor, w_out: popxl.Tensor, w_fc_out: popxl.Tensor,
                  b_fc_out: popxl.Tensor, positions: popxl.Tensor, sin: popxl.Tensor, cos: popxl.Tensor,
                  mask: popxl.Tensor, eps: float, heads: int) -> Tuple[popxl.Tensor, popxl.Tensor, popxl.Tensor]:
    """One GPT-J decoder layer over the tokens of a prefill, as :func:`decode_layer` but every token of
    ``x`` (batch, seq, n_embd) at its ``positions`` (batch, seq) int32, attending to its own row's
    tokens under ``mask`` (batch, 1, seq, seq) additive. Returns the layer's output, ``x``'s shape, and
    the rotated keys and the values (batch, heads, seq, head_dim), as the layer's graph does."""
    weights = (ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out)
    batch, seq, n_embd = x.shape
    if not (isinstance(heads, int) and heads > 0 and w_qkv.shape[-1] % (3 * heads) == 0):
        raise ValueError(f"prefill_layer: w_qkv {tuple(w_qkv.shape)} must hold 3 x {heads!r} heads")
    head_dim = w_qkv.shape[-1] // (3 * heads)
    expected = {**_weights_expected(n_embd, w_in.shape[-1], heads * head_dim, weights, sin, cos),
                "positions": (positions, (batch, seq), popxl.int32),
                "mask": (mask, (batch, 1, seq, seq), popxl.float32)}
    _require("prefill_layer", f"x {tuple(x.shape)} and {heads} heads", expected, w_qkv)
    _check_rotary("prefill_layer", sin, head_dim)
    return PrefillLayer.create(x, *weights, positions, sin, cos, mask, eps=float(eps), heads=heads,
                               name="prefill_layer")


def _head_expected(n_embd: int, ln_weight, ln_bias, w, bias) -> dict:
    vocab = w.shape[-1]
    return {"ln_weight": (ln_weight, (n_embd,)), "ln_bias": (ln_bias, (n_embd,)), "w": (w, (n_embd, vocab)),
            "bias": (bias, (vocab,))}


def greedy_head(x: popxl.Tensor, ln_weight: popxl.Tensor, ln_bias: popxl.Tensor, w: popxl.Tensor, bias: popxl.Tensor,
                eps: float) -> popxl.Tensor:
    """The greedy next token (batch,) int32 of each row of the final hidden states ``x`` (batch, ...,
    n_embd), float32 or float16 as the weights: the first largest logit of ``layer_norm(x) @ w + bias``
    (``ln_f`` and the LM head, ``w`` (n_embd, vocab)), as ``torch.argmax``; the logits are never stored."""
    expected = {**_head_expected(x.shape[-1], ln_weight, ln_bias, w, bias), "x": (x, tuple(x.shape))}
    _require("greedy_head", f"x {tuple(x.shape)} and w {tuple(w.shape)}", expected, w)
    return GreedyHead.create(x, ln_weight, ln_bias, w, bias, eps=float(eps), name="greedy_token")


def greedy_decode_steps(token: popxl.Tensor, position: popxl.Tensor, column: popxl.Tensor, mask: popxl.Tensor,
                        tokens: popxl.Tensor, step: popxl.Tensor, embedding: popxl.Tensor,
                        layers: Sequence[Sequence[popxl.Tensor]], sin: popxl.Tensor, cos: popxl.Tensor,
                        k_caches: Sequence[popxl.Tensor], v_caches: Sequence[popxl.Tensor], ln_weight: popxl.Tensor,
                        ln_bias: popxl.Tensor, w: popxl.Tensor, bias: popxl.Tensor, eps: float, n_positions: int,
                        steps: int) -> Tuple[popxl.Tensor, ...]:
    """``steps`` iterations of the greedy decode loop in one op, each fed the last one's tokens.

    An iteration: the cache column ``column`` (1,) int32 is unmasked in ``mask`` (batch, 1, 1,
    cache_len) (every row writes it), each row's ``token`` (batch, 1) int32 is looked up in
    ``embedding`` (vocab, n_embd) (clamped into range, as ``ops.gather``), every layer runs in turn as
    :func:`decode_layer` (``layers``: each layer's 8 weights in its argument order; its caches
    ``k_caches[i]``, ``v_caches[i]`` written at ``column``) at ``position`` (batch, 1) int32, then
    :func:`greedy_head` (``ln_weight``, ``ln_bias``, ``w``, ``bias``) gives the new tokens. They go
    into column ``step`` (1,) int32 of ``tokens`` (batch, chunk) int32 (column 0 when ``step`` is
    outside it, as ``ops.dynamic_update``), and the counters advance: position and column by one,
    wrapped at ``n_positions`` and cache_len as ``ops.increment_mod``, step by one.

    Returns the loop's carried values after ``steps`` iterations: ``(token, position, column,
    mask, tokens, step)``; the caches are written in place. One op saves a step's calls between
    its kernels and the loop's small ops, which each cost tens of microseconds after a step has
    filled the processor's caches with weights.
    """
    n_embd = embedding.shape[-1]
    if not layers or len(k_caches) != len(layers) or len(v_caches) != len(layers):
        raise ValueError(f"greedy_decode_steps: one key and one value cache per layer, got {len(layers)} layers, "
                         f"{len(k_caches)} key and {len(v_caches)} value caches")
    batch = k_caches[0].shape[0]
    context = f"embedding {tuple(embedding.shape)} and k_caches[0] {tuple(k_caches[0].shape)}"
    if len(tokens.shape) != 2 or tokens.shape[1] < 1:
        raise ValueError(f"greedy_decode_steps: tokens must be ({batch}, chunk) int32 with chunk >= 1 columns for "
                         f"the steps' tokens, got {tokens.name!r} {tuple(tokens.shape)} {tokens.dtype.name}")
    chunk = tokens.shape[1]
    expected = {"token": (token, (batch, 1), popxl.int32), "embedding": (embedding, tuple(embedding.shape)),
                "tokens": (tokens, (batch, chunk), popxl.int32), "step": (step, (1,), popxl.int32),
                **_head_expected(n_embd, ln_weight, ln_bias, w, bias)}
    _require("greedy_decode_steps", context, expected, embedding)
    if any(len(weights) != 8 for weights in layers):
        raise ValueError(f"greedy_decode_steps: every layer must have 8 weights, got {[len(w) for w in layers]}")
    inner = layers[0][3].shape[-1]
    for i, (weights, k_cache, v_cache) in enumerate(zip(layers, k_caches, v_caches)):
        expected = {f"layers[{i}] {what}": e for what, e in _layer_expected(
            n_embd, inner, weights, position, sin, cos, k_cache, v_cache, column, mask).items()}
        expected[f"k_caches[{i}]"] = (k_cache, tuple(k_caches[0].shape))
        _require("greedy_decode_steps", context, expected, embedding)
    _check_rotary("greedy_decode_steps", sin, k_caches[0].shape[2])
    if not (isinstance(n_positions, int) and 0 < n_positions <= sin.shape[0]):
        raise ValueError(f"greedy_decode_steps: n_positions must be an int in [1, {sin.shape[0]}] (the rotary "
                         f"tables' rows), got {n_positions!r}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"greedy_decode_steps: steps must be an int >= 0, got {steps!r}")
    return GreedyDecodeSteps.create(
        token, position, column, mask, tokens, step, embedding, sin, cos, ln_weight, ln_bias, w, bias,
        *[t for weights in layers for t in weights], *k_caches, *v_caches, n_layer=len(layers), eps=float(eps),
        n_positions=n_positions, steps=steps, name="greedy_decode_steps")[1:]
