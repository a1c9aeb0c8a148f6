import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from gptj_popxl.popxl_cpu import allocation  # noqa: E402  (after the path is set)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def planned(monkeypatch):
    """Every plannable output (``Primitive.lower_out``) planned, whatever its size; returns the shapes of
    the blocks of memory the lowered plans keep, as they allocate them."""
    monkeypatch.setattr(allocation, "PLANNED_BYTES", 0)
    monkeypatch.setattr(allocation, "LARGE_BYTES", 0)
    made = []
    empty = allocation.empty

    def counted(shape, dtype):
        made.append(shape)
        return empty(shape, dtype)
    monkeypatch.setattr(allocation, "empty", counted)
    return made
