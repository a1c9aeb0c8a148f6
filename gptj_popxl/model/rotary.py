"""GPT-J's rotary position embedding: popxl-addons' ``rotary_pos_embed`` custom op, or a composite of plain
popxl ops.

For ``x`` of shape ``(batch, seq, heads, head_dim)`` and per-token ``positions`` ``(batch, seq)`` int32,
feature pair ``(x[2i], x[2i+1])``, ``i < rotary_dim / 2``, of every head is rotated by the angle
``positions * base^(-2i / rotary_dim)``, read from precomputed tables (see :func:`trig_tables`)::

    out[2i]   = x[2i]   * cos - x[2i+1] * sin
    out[2i+1] = x[2i+1] * cos + x[2i]   * sin

and features ``rotary_dim..head_dim-1`` pass through (GPT-J's "rotate every two"). The gradient is
the inverse rotation of the output gradient. float16 inputs are rotated in float32 and stored as
float16. The custom op itself (its C++ kernel and how a custom op is defined) lives in
``gptj_popxl/addons/ops/rotary_pos_embed/``.
"""
from typing import Optional, Tuple

import numpy as np
import torch

from gptj_popxl.addons.ops.rotary_pos_embed import rotary_pos_embed
from gptj_popxl.backend import IS_CPU, ops, popxl
from gptj_popxl.model.config import is_positive_int

IMPLS = ("auto", "cpp", "composite")


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
    'cpp' (popxl-addons' ``rotary_pos_embed`` on the table rows gathered at ``positions``; its C++
    kernel on popxl_cpu), 'composite' (plain popxl ops) or 'auto' (the C++ op on popxl_cpu, else the
    composite). No gradient flows to the tables or positions; out-of-range positions follow
    ``ops.gather``.
    """
    if impl not in IMPLS:
        raise ValueError(f"rotary_embedding: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cpp" and not IS_CPU:
        raise ValueError("rotary_embedding: impl='cpp' needs the popxl_cpu runtime; use 'composite' or 'auto'")
    if impl == "composite" or not IS_CPU:
        return rotary_embedding_composite(x, sin, cos, positions, rotary_dim)
    rotary_dim = check_inputs(x, sin, cos, positions, rotary_dim)
    sin_rows, cos_rows = (ops.gather(t, positions) for t in (sin, cos))
    return rotary_pos_embed(x, sin_rows, cos_rows, rotary_dim)
