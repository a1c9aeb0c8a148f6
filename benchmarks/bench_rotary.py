"""Rotary embedding: the C++ custom op against the composite of popxl ops, both run through popxl Sessions.

GPT-J 6B head sizes: batch 1, seq 256, 16 heads of 256 features, rotary_dim 64. Each program applies
the embedding CHAIN times to a device-resident variable and sends a few values back, so session.run
time is the ops', not host transfers'. The speed-up (goal >= 2x) is printed at the end; nothing is
asserted on timings.
"""
import numpy as np
import pytest

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.model.rotary import rotary_embedding, trig_tables
from gptj_popxl.popxl_cpu import ops

BATCH, SEQ, HEADS, HEAD_DIM, ROTARY_DIM, MAX_POSITIONS = 1, 256, 16, 256, 64, 2048
CHAIN = 8
_medians = {}


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


@pytest.fixture(scope="module", autouse=True)
def report_speedup(request):
    yield
    if "cpp" in _medians and "composite" in _medians:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            print(f"\nrotary embedding: C++ op {_medians['cpp'] * 1e3 / CHAIN:.3f} ms, composite "
                  f"{_medians['composite'] * 1e3 / CHAIN:.3f} ms per op (medians); speed-up "
                  f"{_medians['composite'] / _medians['cpp']:.2f}x (goal >= 2x)")


@pytest.mark.parametrize("impl", ["cpp", "composite"])
def test_rotary_embedding(benchmark, impl):
    benchmark.group = "rotary_embedding"
    with _session(impl) as session:
        session.run()  # warm-up: first-run allocations
        benchmark(session.run)
    if benchmark.stats is not None:
        _medians[impl] = benchmark.stats.stats.median
        benchmark.extra_info["ms_per_op"] = _medians[impl] * 1e3 / CHAIN
