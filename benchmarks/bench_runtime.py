"""Runtime dispatch overhead: a popxl program run by ``Session.run`` against the same torch eager code.

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/bench_runtime.py -s

The popxl program loads a 512x512 float32 batch from the host, computes ``softmax(gelu(x @ w))``
and stores the result to the host; torch does the same from and to numpy. Each test reports
``popxl time / torch time`` (goal: at most 1.10) in ``benchmark.extra_info`` and prints it.
Timings only: nothing is asserted about them.
"""
import time

import numpy as np
import pytest
import torch

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops

ROUNDS = 40


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


def _interleaved_min(fns, rounds):
    """The fastest of ``rounds`` runs of each function, run in turn so that load from other processes
    affects them alike."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@pytest.mark.parametrize("size", [512, 64])
def test_session_run_overhead(benchmark, size):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size)).astype(np.float32)
    w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    session, run_popxl = _popxl_program(x, w)
    run_torch = _torch_program(x, w)
    with session:
        np.testing.assert_allclose(run_popxl(), run_torch(), rtol=1e-5, atol=1e-7)
        t_popxl, t_torch = _interleaved_min([run_popxl, run_torch], ROUNDS)
        benchmark.pedantic(run_popxl, rounds=ROUNDS, warmup_rounds=2)
    ratio = t_popxl / t_torch
    benchmark.extra_info.update(size=size, popxl_min_s=t_popxl, torch_min_s=t_torch, ratio=ratio,
                                overhead_us=(t_popxl - t_torch) * 1e6)
    print(f"\n{size}x{size} matmul+gelu+softmax: popxl {t_popxl * 1e3:.3f} ms, torch {t_torch * 1e3:.3f} ms, "
          f"ratio {ratio:.3f} (overhead {(t_popxl - t_torch) * 1e6:.0f} us)")


def test_torch_eager_reference(benchmark):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 512)).astype(np.float32)
    w = (rng.standard_normal((512, 512)) / np.sqrt(512)).astype(np.float32)
    benchmark.pedantic(_torch_program(x, w), rounds=ROUNDS, warmup_rounds=2)
