"""popxl-addons' rotary position embedding op: its Python op here, its C++ kernel beside it.

``t`` is ``(batch, seq, heads, head_dim)``; ``sin`` and ``cos`` hold one row per sequence position,
``(seq, rotary_dim / 2)`` (shared by the batch) or ``(batch, seq, rotary_dim / 2)``. Feature pairs
``(t[2i], t[2i+1])``, ``i < rotary_dim / 2``, are rotated by the angle whose sine and cosine are in
column ``i`` (interleaved pairs, GPT-J's "rotate every two")::

    out[2i]   = t[2i]   * cos - t[2i+1] * sin
    out[2i+1] = t[2i+1] * cos + t[2i]   * sin

and the features from ``rotary_dim`` on pass through. The gradient is the inverse rotation of the
output gradient; no gradient flows to the tables.

On the CPU runtime this is a custom op (``gptj_popxl.backend.custom_op``) whose kernel is the C++ in
``rotary_embedding.h``, bound by ``rotary_embedding.cpp`` and compiled by cppimport on first use
for this processor (into this folder, git-ignored, or the kernel cache; concurrent processes wait on cppimport's lock;
another processor rebuilds it, see ``popxl_cpu/native.py``). With the Poplar
SDK the call goes to popxl-addons' own op.
"""
import functools
import os
from typing import Any, Optional, Tuple

import numpy as np
import torch

from ....backend import IS_CPU, custom_op, native, popxl

__all__ = ["rotary_pos_embed", "trig_tables", "trig_table_constants"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rotary_embedding.cpp")


def trig_tables(seq_len: int, rotary_dim: int, base: int = 10000,
                np_dtype: Any = "float32") -> Tuple[np.ndarray, np.ndarray]:
    """``(sin, cos)``, each ``(seq_len, rotary_dim // 2)`` of ``np_dtype``: row ``m``, column ``i`` holds
    the sine / cosine of ``m * base^(-2i / rotary_dim)``. The angles are computed in at least float32
    and only the results rounded to ``np_dtype``: float16 angles are off by up to a radian near
    position 2047 (popxl-addons computes them in ``np_dtype``)."""
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"trig_tables: rotary_dim must be a positive even int, got {rotary_dim!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"trig_tables: seq_len must be a positive int, got {seq_len!r}")
    exact = np.promote_types(np_dtype, np.float32)
    inv_freq = float(base) ** (-np.arange(0, rotary_dim, 2).astype(exact) / rotary_dim)
    angles = np.outer(np.arange(seq_len).astype(exact), inv_freq).astype(exact)
    return np.sin(angles).astype(np_dtype), np.cos(angles).astype(np_dtype)


def trig_table_constants(seq_len: int, rotary_dim: int, base: int = 10000, dtype=popxl.float32):
    """:func:`trig_tables` as a pair of ``dtype`` constants ``(sin, cos)`` in the current graph."""
    sin, cos = trig_tables(seq_len, rotary_dim, base, dtype.as_numpy())
    return popxl.constant(sin, dtype, name="sin"), popxl.constant(cos, dtype, name="cos")


def _describe(t) -> str:
    return f"{t.name!r} {tuple(t.shape)} {t.dtype.name}"


def _check(t, sin, cos, rotary_dim) -> int:
    """Validates the operands; returns ``rotary_dim`` (default: all of ``head_dim``)."""
    for what, x in (("t", t), ("sin", sin), ("cos", cos)):
        if not isinstance(x, popxl.Tensor):
            raise TypeError(f"rotary_pos_embed: {what} must be a popxl Tensor, got {type(x).__name__}")
    if len(t.shape) != 4 or t.dtype.name not in ("float32", "float16"):
        raise ValueError(f"rotary_pos_embed: t must be (batch, seq, heads, head_dim) float32 or float16, "
                         f"got t {_describe(t)}")
    batch, seq, _, head_dim = t.shape
    rotary_dim = head_dim if not rotary_dim else rotary_dim
    if not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_pos_embed: rotary_dim {rotary_dim!r} must be even, positive and at most "
                         f"head_dim {head_dim} of t {_describe(t)}")
    for what, x in (("sin", sin), ("cos", cos)):
        rows = tuple(x.shape[:-2]) if len(x.shape) in (2, 3) else None
        if rows not in ((), (1,), (batch,)) or tuple(x.shape[-2:]) != (seq, rotary_dim // 2) or \
                x.dtype.name not in ("float32", t.dtype.name):
            raise ValueError(f"rotary_pos_embed: {what} must be ({seq}, {rotary_dim // 2}) or ({batch}, {seq}, "
                             f"{rotary_dim // 2}) of float32 or t's dtype for t {_describe(t)} and rotary_dim "
                             f"{rotary_dim}, got {what} {_describe(x)}")
    return rotary_dim


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled C++ kernel module, built by cppimport on first call (for this processor)."""
    return native.build(_SOURCE, "rotary_embedding")


def _table_rows(batch_seq, table_shape) -> np.ndarray:
    """(batch, seq) int32: the row of the stacked tables (``table_shape`` has the leading replica axis)
    that each token's rotation reads: row ``b * seq + s`` of per-sequence tables, or row ``s`` of
    one table shared by the batch."""
    batch, seq = batch_seq
    shared = len(table_shape) == 3 or table_shape[1] == 1
    rows = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    return np.ascontiguousarray(rows if shared else rows + seq * np.arange(batch, dtype=np.int32)[:, None])


if IS_CPU:
    class RotaryPosEmbed(custom_op.CustomOp):
        """The C++ rotation on the CPU runtime; ``inverse`` rotates backwards (the gradient)."""
        name = "rotary_pos_embed"

        @staticmethod
        def infer(t, sin, cos, rotary_dim, inverse):
            return t.spec

        @staticmethod
        def kernel(t, sin, cos, rotary_dim, inverse, rows=None, out=None):
            ext, threads = extension(), torch.get_num_threads()
            t = t.contiguous()
            out = torch.empty_like(t) if out is None else out
            positions = _table_rows(t.shape[1:3], sin.shape) if rows is None else rows
            for r in range(t.shape[0]):
                table_sin, table_cos = (x[r].float().reshape(-1, x.shape[-1]).contiguous() for x in (sin, cos))
                ext.rotary_embedding(t[r].numpy(), table_sin.numpy(), table_cos.numpy(), positions,
                                     out[r].numpy(), rotary_dim, inverse, threads)
            return out

        @classmethod
        def lower_out(cls, op, runtime):
            extension()  # build or load at session creation, not in the middle of the first run
            # The table rows depend on the shapes only: found once here, not at every run.
            rows = _table_rows(op.inputs[0].shape[:2], (runtime.replicas,) + tuple(op.inputs[1].shape))
            kernel, attrs = cls.kernel, op.attrs
            return lambda t, sin, cos, out=None: kernel(t, sin, cos, rows=rows, out=out, **attrs)

        lower = lower_out

        @staticmethod
        def grad(g):
            dt = RotaryPosEmbed.create(g.dy, g.x(1), g.x(2), rotary_dim=g.attrs["rotary_dim"],
                                       inverse=not g.attrs["inverse"])
            return [dt, None, None]


def rotary_pos_embed(t, sin, cos, rotary_dim: Optional[int] = None):
    """``t`` (batch, seq, heads, head_dim) with its first ``rotary_dim`` features (default: all)
    rotated pairwise by the per-position ``sin``/``cos`` rows (see the module documentation)."""
    if not IS_CPU:
        from popxl_addons.ops.rotary_pos_embed import rotary_pos_embed as sdk_rotary_pos_embed
        return sdk_rotary_pos_embed(t, sin, cos, rotary_dim)
    rotary_dim = _check(t, sin, cos, rotary_dim)
    return RotaryPosEmbed.create(t, sin, cos, rotary_dim=rotary_dim, inverse=False, name="t_rotated")
