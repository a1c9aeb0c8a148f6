"""Host-side seed helpers, as popxl's ``popxl.random_seed``: a seed is a uint64 held in two uint32s,
the most significant half first."""
from typing import Tuple

import numpy as np

_UINT64_MAX = 2 ** 64 - 1
_UINT32_MAX = 2 ** 32 - 1


def uint64_to_two_uint32(num: int) -> Tuple[int, int]:
    """``(high, low)``: the most and least significant 32 bits of the uint64 ``num``."""
    num = int(num)
    if not 0 <= num <= _UINT64_MAX:
        raise ValueError(f"Number is negative or cannot be represented as a uint64: {num}")
    return num >> 32, num & _UINT32_MAX


def two_uint32_to_uint64(a: int, b: int) -> int:
    """The uint64 whose most significant 32 bits are ``a`` and least significant ``b``."""
    a, b = int(a), int(b)
    if not (0 <= a <= _UINT32_MAX and 0 <= b <= _UINT32_MAX):
        raise ValueError(f"Either `a` or `b` are negative or cannot be represented as a uint32: {a}, {b}")
    return (a << 32) | b


def create_seeds(seed: int, offset: int = 0, batches_per_step: int = 1, gradient_accumulation_factor: int = 1,
                 replicas: int = 1) -> np.ndarray:
    """Seeds ``(batches_per_step, gradient_accumulation_factor, replicas, 2)`` uint32, axes of size 1
    dropped: uint64s drawn from ``np.random.default_rng(seed + offset)`` over the whole uint64 range
    (popxl's stream, so seeded programs draw the same numbers as on an IPU), each split high half first.
    """
    count = batches_per_step * gradient_accumulation_factor * replicas
    draws = np.random.default_rng(seed + offset).integers(0, _UINT64_MAX, endpoint=True, dtype=np.uint64, size=count)
    halves = np.stack([(draws >> np.uint64(32)).astype(np.uint32), (draws & np.uint64(_UINT32_MAX)).astype(np.uint32)],
                      axis=-1)
    return np.squeeze(halves.reshape(batches_per_step, gradient_accumulation_factor, replicas, 2))
