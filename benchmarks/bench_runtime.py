"""Runtime dispatch overhead: a popxl program run by ``Session.run`` against the same torch eager code.

The popxl program loads a ``size`` x ``size`` float32 batch from the host, computes
``softmax(gelu(x @ w))`` and stores the result to the host; torch does the same from and to numpy.
Goal on 512x512: overhead <= 10%, i.e. a speed-up of at least 0.91x.

Fixed cost: a program that loads 4 floats, adds 1 and stores them, against the same torch eager
code; the difference of the two times is what ``Session.run`` adds per call (goal <= 10 us).
"""
import contextlib

import numpy as np
import pytest
import torch

from conftest import compare
from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops

SIZES = [512, 64]


def _data(size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size)).astype(np.float32)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    return x, w


def _popxl_program(x, w):
    """A session and a ``run()`` closure computing ``softmax(gelu(x @ w))`` for host ``x``."""
    ir = popxl.Ir()
    with ir.main_graph:
        x_stream = popxl.h2d_stream(x.shape, popxl.float32, "x")
        weight = popxl.variable(w, name="w")
        y = ops.softmax(ops.gelu(ops.host_load(x_stream) @ weight), axis=-1)
        y_stream = popxl.d2h_stream(y.shape, y.dtype, "y")
        ops.host_store(y_stream, y)
    session = popxl.Session(ir)
    inputs = {x_stream: x}
    return session, lambda: session.run(inputs)[y_stream]


def _torch_program(x, w):
    w = torch.from_numpy(w)
    return lambda: torch.softmax(torch.nn.functional.gelu(torch.from_numpy(x) @ w, approximate="tanh"), -1).numpy()


def _tiny_programs():
    """``run()`` closures of the fixed-cost comparison: our session and torch eager."""
    x = np.arange(4, dtype=np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        x_stream = popxl.h2d_stream(x.shape, popxl.float32, "x")
        y = ops.host_load(x_stream) + 1.0
        y_stream = popxl.d2h_stream(y.shape, y.dtype, "y")
        ops.host_store(y_stream, y)
    session = popxl.Session(ir)
    inputs = {x_stream: x}
    return session, lambda: session.run(inputs)[y_stream], lambda: (torch.from_numpy(x.copy()) + 1.0).numpy()


@pytest.fixture(scope="module")
def attached():
    """Enters sessions for the module (``enter(session)``): both sides of a comparison are called
    again after their tests, when they take turns."""
    with contextlib.ExitStack() as stack:
        yield stack.enter_context


def test_popxl_session_run_fixed_cost(benchmark, attached):
    session, run_popxl, run_torch = _tiny_programs()
    attached(session)
    np.testing.assert_array_equal(run_popxl(), run_torch())
    compare(benchmark, "Session.run fixed cost (4 floats + 1)", "ours", run_popxl)


def test_torch_eager_fixed_cost(benchmark):
    compare(benchmark, "Session.run fixed cost (4 floats + 1)", "peer", _tiny_programs()[2])


@pytest.mark.parametrize("size", SIZES)
def test_popxl_session_run(benchmark, attached, size):
    x, w = _data(size)
    session, run_popxl = _popxl_program(x, w)
    attached(session)
    np.testing.assert_allclose(run_popxl(), _torch_program(x, w)(), rtol=1e-5, atol=1e-7)
    compare(benchmark, f"matmul+gelu+softmax {size}x{size}", "ours", run_popxl, goal=0.91 if size == 512 else None)


@pytest.mark.parametrize("size", SIZES)
def test_torch_eager(benchmark, size):
    compare(benchmark, f"matmul+gelu+softmax {size}x{size}", "peer", _torch_program(*_data(size)))
