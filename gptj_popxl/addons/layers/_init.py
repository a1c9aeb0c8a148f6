"""Initial values of layer variables."""
import numpy as np


def truncated_normal(shape, std: float = 0.02, bound: float = 2.0) -> np.ndarray:
    """Normal(0, std) samples of ``shape`` redrawn until within ``bound`` standard deviations."""
    x = np.random.normal(0.0, 1.0, shape)
    outside = np.abs(x) > bound
    while outside.any():
        x[outside] = np.random.normal(0.0, 1.0, int(outside.sum()))
        outside = np.abs(x) > bound
    return x * std
