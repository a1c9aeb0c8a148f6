"""GPT-J's rotary position embedding: a C++ custom op for popxl_cpu and a composite of plain popxl ops.

For ``x`` of shape ``(batch, seq, heads, head_dim)`` and per-token ``positions`` ``(batch, seq)`` int32,
feature pair ``(x[2i], x[2i+1])``, ``i < rotary_dim / 2``, of every head is rotated by the angle
``positions * base^(-2i / rotary_dim)``, read from precomputed tables (see :func:`trig_tables`)::

    out[2i]   = x[2i]   * cos - x[2i+1] * sin
    out[2i+1] = x[2i+1] * cos + x[2i]   * sin

and features ``rotary_dim..head_dim-1`` pass through (GPT-J's "rotate every two"). The gradient is
the inverse rotation of the output gradient. float16 inputs are rotated in float32 and stored as
float16.

Registering a custom op (the project's pattern)
-----------------------------------------------
Custom ops are :class:`~gptj_popxl.popxl_cpu.primitive.Primitive` subclasses defined outside the
runtime package; nothing else needs registering:

1. Write the kernel in C++ under ``custom_ops/``: a header-only kernel on raw pointers (built and
   unit-tested by CMake without Python, ``make cpp-test``) plus a thin pybind11 binding
   ``custom_ops/<name>.cpp`` whose first lines are the cppimport configuration comment
   ``/* <% setup_pybind11(cfg) ... %> */``. cppimport compiles the binding on first use into
   ``custom_ops/<name>.<abi>.so`` (git-ignored) and rebuilds it when the source or a listed
   dependency changes. Its file lock lets concurrent processes (pytest-xdist workers) import
   safely: one builds while the others wait for it.
2. Subclass ``Primitive``: ``infer`` (shape/dtype rule, raising errors that name tensors and shapes),
   ``kernel`` (torch values in and out, each with a leading replica axis of size
   ``ir.replication_factor``; hand the extension one replica slice at a time) and ``grad`` (built
   from ops, here the same primitive with ``inverse`` flipped). Override ``lower`` to do per-session
   work once, such as loading the extension.
3. Expose a public function that validates its arguments and calls ``Prim.create(...)``, and give
   it a composite of plain popxl ops so the model also builds with the Poplar SDK.
"""
import functools
import os
from typing import Optional, Tuple

import numpy as np
import torch

from gptj_popxl.backend import IS_CPU, ops, popxl
from gptj_popxl.model.config import is_positive_int
IMPLS = ("auto", "cpp", "composite")

_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "custom_ops", "rotary_embedding.cpp")


def trig_tables(max_positions: int, rotary_dim: int, base: float = 10000) -> Tuple[np.ndarray, np.ndarray]:
    """``(sin, cos)`` tables, each ``(max_positions, rotary_dim // 2)`` float32.

    Row ``p``, column ``i`` holds the sine / cosine of ``p * base^(-2i / rotary_dim)``. Computed in
    float32 as GPT-J's reference implementation does, so the tables match its buffers exactly.
    """
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"trig_tables: rotary_dim must be a positive even int, got {rotary_dim!r}")
    if not is_positive_int(max_positions):
        raise ValueError(f"trig_tables: max_positions must be a positive int, got {max_positions!r}")
    inv_freq = 1.0 / (float(base) ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq
    return torch.sin(angles).numpy(), torch.cos(angles).numpy()


def _describe(t) -> str:
    return f"{t.name!r} {tuple(t.shape)} {t.dtype.name}"


def check_inputs(x, sin, cos, positions, rotary_dim: Optional[int] = None) -> int:
    """Validates the operands of a rotary embedding; returns ``rotary_dim`` (default ``2 * sin.shape[1]``).

    ``x``: (batch, seq, heads, head_dim) float32/float16; ``sin``, ``cos``: (max_positions,
    rotary_dim / 2) float32, or float16 when ``x`` is; ``positions``: (batch, seq) int32.
    """
    for what, t in (("x", x), ("sin", sin), ("cos", cos), ("positions", positions)):
        if not isinstance(t, popxl.Tensor):
            raise TypeError(f"rotary_embedding: {what} must be a popxl Tensor, got {type(t).__name__}")
    if len(x.shape) != 4 or x.dtype.name not in ("float32", "float16"):
        raise ValueError(f"rotary_embedding: x must be (batch, seq, heads, head_dim) float32 or float16, "
                         f"got x {_describe(x)}")
    batch, seq, _, head_dim = x.shape
    for what, t in (("sin", sin), ("cos", cos)):
        if len(t.shape) != 2 or t.dtype.name not in ("float32", x.dtype.name):
            raise ValueError(f"rotary_embedding: {what} must be a (max_positions, rotary_dim/2) table of float32 "
                             f"or x's dtype, got {what} {_describe(t)} for x {_describe(x)}")
    if tuple(sin.shape) != tuple(cos.shape) or sin.dtype != cos.dtype:
        raise ValueError(f"rotary_embedding: sin {_describe(sin)} and cos {_describe(cos)} must match")
    if rotary_dim is None:
        rotary_dim = 2 * sin.shape[1]
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_embedding: rotary_dim {rotary_dim!r} must be even, positive and at most "
                         f"head_dim {head_dim} of x {_describe(x)}")
    if 2 * sin.shape[1] != rotary_dim:
        raise ValueError(f"rotary_embedding: sin/cos tables {_describe(sin)} need rotary_dim/2 = {rotary_dim // 2} "
                         f"columns for rotary_dim {rotary_dim}")
    if tuple(positions.shape) != (batch, seq) or positions.dtype.name != "int32":
        raise ValueError(f"rotary_embedding: positions must be ({batch}, {seq}) int32 to match x {_describe(x)}, "
                         f"got positions {_describe(positions)}")
    return rotary_dim


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ extension module, built by cppimport on first call."""
    import cppimport
    return cppimport.imp_from_filepath(_SOURCE, "rotary_embedding")


# The C++ op is a popxl_cpu primitive: defined only on that backend, so the SDK never imports popxl_cpu.
if IS_CPU:
    from gptj_popxl.popxl_cpu.primitive import Primitive

    class RotaryEmbedding(Primitive):
        """The C++ rotary embedding on popxl_cpu; ``inverse`` rotates backwards (the gradient)."""
        name = "rotary_embedding"

        @staticmethod
        def infer(x, sin, cos, positions, rotary_dim, inverse):
            check_inputs(x, sin, cos, positions, rotary_dim)
            return x.spec

        @staticmethod
        def kernel(x, sin, cos, positions, rotary_dim, inverse):
            ext, threads = extension(), torch.get_num_threads()
            x = x.contiguous()
            out = torch.empty_like(x)
            for r in range(x.shape[0]):
                try:
                    ext.rotary_embedding(x[r].numpy(), sin[r].float().contiguous().numpy(),
                                         cos[r].float().contiguous().numpy(), positions[r].contiguous().numpy(),
                                         out[r].numpy(), rotary_dim, inverse, threads)
                except IndexError as e:
                    raise IndexError(f"rotary_embedding, replica {r}: {e}") from None
            return out

        @classmethod
        def lower(cls, op, runtime):
            extension()  # build or load at session creation, not in the middle of the first run
            return super().lower(op, runtime)

        @staticmethod
        def grad(g):
            dx = RotaryEmbedding.create(g.dy, g.x(1), g.x(2), g.x(3), rotary_dim=g.attrs["rotary_dim"],
                                        inverse=not g.attrs["inverse"])
            return [dx, None, None, None]


def cast_to(t, dtype):
    """``t`` cast to ``dtype``, or ``t`` itself when it already has it (no copy op)."""
    return t if t.dtype == dtype else ops.cast(t, dtype)


def rotary_embedding_composite(x, sin, cos, positions, rotary_dim: Optional[int] = None):
    """The rotary embedding from plain popxl ops (gather, slice, mul, add, concat); runs on any backend."""
    rotary_dim = check_inputs(x, sin, cos, positions, rotary_dim)
    batch, seq, heads, head_dim = x.shape
    half = rotary_dim // 2
    # (batch, seq, 1, half, 1): broadcast over heads, shared by both members of a pair.
    sin_t, cos_t = (ops.reshape(cast_to(ops.gather(t, positions), popxl.float32), (batch, seq, 1, half, 1))
                    for t in (sin, cos))
    rot = x if rotary_dim == head_dim else ops.slice(x, stop=rotary_dim, axis=3)
    pairs = cast_to(ops.reshape(rot, (batch, seq, heads, half, 2)), popxl.float32)
    even, odd = ops.split(pairs, 2, axis=4)
    rotated = ops.concat([even * cos_t - odd * sin_t, odd * cos_t + even * sin_t], axis=4)
    rotated = ops.reshape(cast_to(rotated, x.dtype), (batch, seq, heads, rotary_dim))
    if rotary_dim == head_dim:
        return rotated
    return ops.concat([rotated, ops.slice(x, start=rotary_dim, axis=3)], axis=3)


def rotary_embedding(x, sin, cos, positions, rotary_dim: Optional[int] = None, impl: str = "auto"):
    """Rotary position embedding of ``x`` (batch, seq, heads, head_dim) at ``positions`` (batch, seq) int32.

    ``sin``/``cos``: (max_positions, rotary_dim / 2) tables from :func:`trig_tables` (as float32
    tensors, or float16 for float16 ``x``); ``rotary_dim`` defaults to twice their width. ``impl``:
    'cpp' (the C++ custom op; popxl_cpu only), 'composite' (plain popxl ops) or 'auto' (the C++ op on
    popxl_cpu, else the composite). No gradient flows to the tables or positions. Out-of-range
    positions raise IndexError at run time with the C++ op; the composite follows ``ops.gather``.
    """
    if impl not in IMPLS:
        raise ValueError(f"rotary_embedding: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cpp" and not IS_CPU:
        raise ValueError("rotary_embedding: impl='cpp' needs the popxl_cpu runtime; use 'composite' or 'auto'")
    if impl == "composite" or not IS_CPU:
        return rotary_embedding_composite(x, sin, cos, positions, rotary_dim)
    rotary_dim = check_inputs(x, sin, cos, positions, rotary_dim)
    return RotaryEmbedding.create(x, sin, cos, positions, rotary_dim=rotary_dim, inverse=False)
