"""Host-side seed helpers."""
import numpy as np


def uint64_to_two_uint32(num: int) -> np.ndarray:
    return np.array([num & 0xFFFFFFFF, (num >> 32) & 0xFFFFFFFF], dtype=np.uint32)


def two_uint32_to_uint64(a: int, b: int) -> int:
    return (int(b) << 32) | int(a)


def create_seeds(seed: int, offset: int = 0, batches_per_step: int = 1, gradient_accumulation_factor: int = 1,
                 replicas: int = 1) -> np.ndarray:
    """Independent ``(2,)`` uint32 seeds for each replica/batch/accumulation step, as host data."""
    rng = np.random.default_rng([int(seed), int(offset)])
    shape = tuple(d for d in (batches_per_step, gradient_accumulation_factor, replicas) if d > 1) + (2,)
    return rng.integers(0, 2 ** 32, size=shape, dtype=np.uint64).astype(np.uint32)
