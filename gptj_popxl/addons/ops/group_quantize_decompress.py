"""4-bit group quantisation of float16 weights (as in FlexGen, arXiv:2303.06865).

A tensor is quantised along one axis in groups of ``group_size`` elements: each group keeps a
float16 ``scale = (max - min) / 15`` and ``bias = min`` and its elements as 4-bit codes
``round((x - min) / scale)``, packed four to a uint16 (first element in the high nibble). The
quantised axis is moved last: codes ``(*other_dims, n_groups, group_size // 4)``, scale and bias
``(*other_dims, n_groups, 1)``. Decompression gives ``code * scale + bias`` in float16.
"""
from typing import Tuple

import numpy as np

from ...backend import ops, popxl

_SHIFTS = (12, 8, 4, 0)  # nibble order within a uint16, first element first


def _axis_to_position(x, dim: int, transpose):
    """``x`` with its last axis moved to position ``dim`` (no-op for -1)."""
    if dim == -1:
        return x
    perm = list(range(len(x.shape)))
    perm.insert(dim, perm.pop(-1))
    return transpose(x, perm)


def group_quantize_compress_numpy(t: np.ndarray, group_size: int,
                                  dim: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes uint16, scale float16, bias float16)`` of ``t`` quantised along ``dim``
    (whose length must be a multiple of ``group_size``, itself a multiple of 4)."""
    t = np.moveaxis(np.asarray(t), dim, -1)
    n = t.shape[-1]
    if group_size < 4 or group_size % 4 or n % group_size:
        raise ValueError(f"group_quantize_compress_numpy: group_size {group_size} must be a multiple of 4 dividing "
                         f"the quantised axis length {n}")
    if not np.isfinite(t).all():
        raise ValueError("group_quantize_compress_numpy: cannot quantise non-finite values")
    groups = t.reshape(*t.shape[:-1], n // group_size, group_size)
    lo = groups.min(-1, keepdims=True).astype(np.float16)
    hi = groups.max(-1, keepdims=True).astype(np.float16)
    scale = (hi - lo) / np.float16(15)
    codes = np.round((groups - lo) / scale).astype(np.uint16)
    quads = codes.reshape(*codes.shape[:-1], group_size // 4, 4)
    packed = sum(quads[..., i] << np.uint16(s) for i, s in enumerate(_SHIFTS))
    return packed.astype(np.uint16), scale, lo


def group_quantize_decompress_numpy(t: np.ndarray, group_scale: np.ndarray, group_bias: np.ndarray,
                                    dim: int) -> np.ndarray:
    """float16 values of packed codes ``t``; the quantised axis ends up at position ``dim``."""
    codes = np.stack([(t >> np.uint16(s)) & np.uint16(15) for s in _SHIFTS], axis=-1)
    codes = codes.reshape(*t.shape[:-1], t.shape[-1] * 4).astype(np.float16)
    values = codes * group_scale + group_bias
    values = values.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1] * 4)
    return _axis_to_position(values, dim, np.transpose)


def group_quantize_decompress(t: popxl.Tensor, group_scale: popxl.Tensor, group_bias: popxl.Tensor,
                              dim: int = -1) -> popxl.Tensor:
    """Decompresses packed codes ``t`` (rows, n_groups, ids) uint16 with ``group_scale`` /
    ``group_bias`` (rows, n_groups[, 1]) to (rows, n_groups * ids * 4) of the scale's dtype, the
    quantised axis then moved to position ``dim``. Inference only (no gradient)."""
    if t.rank != 3:
        raise NotImplementedError(f"group_quantize_decompress: packed tensor '{t.name}' must have rank 3, "
                                  f"got {t.shape}")
    stats = []
    for name, s in (("group_scale", group_scale), ("group_bias", group_bias)):
        if s.rank == 2:
            s = s.reshape((*s.shape, 1))
        if s.rank != 3 or tuple(s.shape) != (*t.shape[:2], 1):
            raise ValueError(f"group_quantize_decompress: {name} '{s.name}' {s.shape} must be "
                             f"{(*t.shape[:2], 1)} or {tuple(t.shape[:2])}")
        stats.append(s)
    scale, bias = stats
    # uint16 codes are exact in float32; nibbles come from floor division and a remainder.
    packed = ops.cast(t, popxl.float32)
    sixteen = popxl.constant(16.0, popxl.float32, "sixteen")
    nibbles = [ops.fmod(ops.floor(packed / popxl.constant(float(2 ** s), popxl.float32)), sixteen)
               .reshape((*t.shape, 1)) for s in _SHIFTS]
    codes = ops.concat(nibbles, axis=3).reshape((t.shape[0], t.shape[1], t.shape[2] * 4))
    values = (ops.cast(codes, scale.dtype) * scale + bias).reshape((t.shape[0], t.shape[1] * t.shape[2] * 4))
    return _axis_to_position(values, dim, ops.transpose)
