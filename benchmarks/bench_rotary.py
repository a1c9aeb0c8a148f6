"""Rotary embedding: the C++ custom op against the composite of popxl ops, both run through popxl Sessions.

GPT-J 6B head sizes: batch 1, seq 256, 16 heads of 256 features, rotary_dim 64. Each program applies
the embedding CHAIN times to a device-resident variable and sends a few values back, so session.run
time is the ops', not host transfers' (goal: the C++ op >= 2x faster).
"""
import numpy as np
import pytest

from conftest import compare
from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.model.rotary import rotary_embedding, trig_tables
from gptj_popxl.popxl_cpu import ops

BATCH, SEQ, HEADS, HEAD_DIM, ROTARY_DIM, MAX_POSITIONS = 1, 256, 16, 256, 64, 2048
CHAIN = 8


def _session(impl):
    rng = np.random.default_rng(0)
    ir = popxl.Ir()
    with ir.main_graph:
        y = popxl.variable(rng.standard_normal((BATCH, SEQ, HEADS, HEAD_DIM)).astype(np.float32), name="x")
        positions = popxl.variable((100 + np.arange(SEQ, dtype=np.int32))[None].repeat(BATCH, 0), name="positions")
        sin, cos = (popxl.constant(t, name=n) for t, n in zip(trig_tables(MAX_POSITIONS, ROTARY_DIM), ("sin", "cos")))
        for _ in range(CHAIN):
            y = rotary_embedding(y, sin, cos, positions, ROTARY_DIM, impl=impl)
        probe = y[0, 0, 0, :8]
        out = popxl.d2h_stream(probe.shape, probe.dtype, name="probe")
        ops.host_store(out, probe)
    return popxl.Session(ir)


@pytest.fixture(scope="module")
def sessions():
    """Both programs' sessions, entered for the module: they take turns after the second test."""
    with _session("cpp") as cpp, _session("composite") as composite:
        yield {"cpp": cpp, "composite": composite}


@pytest.mark.parametrize("impl", ["cpp", "composite"])
def test_rotary_embedding(benchmark, sessions, impl):
    sessions[impl].run()  # warm-up: first-run allocations
    compare(benchmark, f"rotary embedding x{CHAIN}", "ours" if impl == "cpp" else "peer", sessions[impl].run, goal=2.0)
