"""SDK semantics (issue 10): an SDK program run through ``python -m gptj_popxl.popxl_cpu`` gives the
numbers numpy gives, and the runtime's in-place ops, augmented operators, unsigned dtypes and
collective gradients follow the SDK's rules."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdk")
    proc = subprocess.run([sys.executable, "-m", "gptj_popxl.popxl_cpu", str(ROOT / "tests/programs/sdk_semantics.py"),
                           str(tmp / "out.npz"), str(tmp / "mm.bin")], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return dict(np.load(tmp / "out.npz"))


def test_run_copies_inputs(observed):
    np.testing.assert_array_equal(observed["inputs_run1"], np.ones(3))
    np.testing.assert_array_equal(observed["inputs_run2"], np.ones(3))
    np.testing.assert_array_equal(observed["inputs_batch_after"], np.zeros(3))


def test_variables_and_constants_copy_data_at_creation(observed):
    np.testing.assert_array_equal(observed["creation_constant"], np.zeros(2))
    np.testing.assert_array_equal(observed["creation_variable"], np.zeros(2))


def test_call_outputs_of_constants_are_fresh(observed):
    want = np.arange(3) + 10.0
    np.testing.assert_array_equal(observed["call_run1"], want)
    np.testing.assert_array_equal(observed["call_run2"], want)
    np.testing.assert_array_equal(observed["call_table_after"], np.arange(3))


def test_operators(observed):
    v = np.array([2.0, 3.0, 4.0], np.float32)  # after v += 1
    np.testing.assert_array_equal(observed["ops_iadd_variable"], v)
    np.testing.assert_array_equal(observed["ops_isub_variable"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(observed["ops_rpow"], 2.0 ** v, rtol=1e-6)
    np.testing.assert_allclose(observed["ops_rmod"], np.fmod(7.0, v))
    np.testing.assert_array_equal(observed["ops_list_index"], v[[2, 0]])
    np.testing.assert_array_equal(observed["ops_array_index"], v[[1]])
    np.testing.assert_array_equal(observed["ops_mask"], np.where([True, False, True], v, 0))


def test_grads_provided_order(observed):
    # grads_provided=[b, a] with b = 3t, a = 2t: the first gradient input is b's (1), the second a's (100).
    np.testing.assert_array_equal(observed["grads_provided_dx"], 3 * 1.0 + 2 * 100.0)


def test_integer_reductions_wrap(observed):
    assert observed["int_sum"].dtype == np.int32 and observed["int_prod"].dtype == np.int32
    assert observed["int_sum"] == np.array([2 ** 31 - 1, 1], np.int32).sum(dtype=np.int32)
    assert observed["int_prod"] == np.int32(0)  # 2^32 wraps to 0


def test_seed_helpers(observed):
    draws = np.random.default_rng(5 + 2).integers(0, 2 ** 64 - 1, endpoint=True, dtype=np.uint64, size=3)
    want = np.stack([(draws >> np.uint64(32)).astype(np.uint32), (draws & np.uint64(2 ** 32 - 1)).astype(np.uint32)], -1)
    np.testing.assert_array_equal(observed["seeds"], want)
    assert popxl.random_seed.uint64_to_two_uint32(2 ** 32 + 5) == (1, 5)
    assert popxl.random_seed.two_uint32_to_uint64(1, 5) == 2 ** 32 + 5


def test_unsigned_data_and_arithmetic(observed):
    top = np.array([2 ** 32 - 1, 5], np.uint32)
    one = np.array([1, 2], np.uint32)
    assert observed["uint_dtype_probe"].dtype == np.uint32
    np.testing.assert_array_equal(observed["uint_add"], top + one)  # numpy uint32 wraps too
    np.testing.assert_array_equal(observed["uint_sub"], one - top)
    np.testing.assert_array_equal(observed["uint_div"], top // one)
    assert observed["uint_max"] == top.max()
    np.testing.assert_array_equal(observed["uint_increment_mod"], (one + 3) % 4)


def test_remote_variable_with_group_axis(observed):
    np.testing.assert_array_equal(observed["remote_loaded"], np.arange(4) * 2.0)
    np.testing.assert_array_equal(observed["remote_variable"], np.arange(4, dtype=np.float32).reshape(1, 4))


def test_error_messages_start_as_the_sdk(observed):
    starts = ["is not of type Constant or Variable. get_tensor_data is not", "Tensor c",
              "The dtype of the input array float64 must match the equivalent type of the tensor",
              "The shape of the input array (3,) must match the shape of the tensor",
              "Must be attached to device before calling a runtime function.",
              "Entries must be a non-zero, positive integer. Got 0"]
    errors = list(observed["errors"])
    assert len(errors) == len(starts)
    assert starts[0] in errors[0] and "is not of type Variable. write_variable_data" in errors[1]
    for got, want in zip(errors[1:], starts[1:]):
        assert got.startswith(want), (got, want)


def test_memmap_variable_written_back(observed):
    np.testing.assert_array_equal(observed["memmap_after"], [11, 12, 13])
    assert observed["transforms_autodiff_callable"]


# ------------------------------------------------------------------ the whole class, in process

def _inplace_kinds():
    return ["host_load", "variable", "constant", "input_by_value", "input_by_ref", "call_output", "view"]


@pytest.mark.parametrize("kind", _inplace_kinds())
def test_inplace_add_on_every_kind_of_tensor(kind):
    """``add_`` on each kind of tensor, run twice: what changes and what must not, as on the SDK."""
    base = np.array([1.0, 2.0], np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        h2d = popxl.h2d_stream((2,), popxl.float32, "x")
        var = popxl.variable(base, name="var")
        one = popxl.constant(np.ones(2, np.float32))
        if kind == "host_load":
            t = ops.host_load(h2d)
            ops.add_(t, one)
        elif kind == "variable":
            t = var
            ops.add_(t, one)
        elif kind == "constant":
            t = popxl.constant(base)
            ops.add_(t, one)
        elif kind == "input_by_value":
            def body(x):
                ops.add_(x, popxl.constant(np.ones(2, np.float32)))
            ops.call(ir.create_graph(body, var.spec), var)
            t = var
        elif kind == "input_by_ref":
            def body_ref(x: popxl.TensorByRef):
                ops.add_(x, popxl.constant(np.ones(2, np.float32)))
            ops.call(ir.create_graph(body_ref, var.spec), var)
            t = var
        elif kind == "call_output":
            (t,) = ops.call(ir.create_graph(lambda: popxl.constant(base)))
            ops.add_(t, one)
        else:
            t = ops.reshape_(var, (2, 1))
            ops.add_(t, popxl.constant(np.ones((2, 1), np.float32)))
        out = popxl.d2h_stream(t.shape, t.dtype, "out")
        ops.host_store(out, t)
    given = base.copy()
    with popxl.Session(ir) as session:
        feed = {h2d: given} if kind == "host_load" else {}
        first, second = session.run(feed)[out].reshape(2), session.run(feed)[out].reshape(2)
        final = session.get_tensor_data(var)
    # (first run, second run, variable at the end) as added to `base`
    want = {"host_load": (1, 1, 0), "variable": (1, 2, 2), "constant": (1, 1, 0), "input_by_value": (0, 0, 0),
            "input_by_ref": (1, 2, 2), "call_output": (1, 1, 0), "view": (1, 2, 2)}[kind]
    for got, added in zip((first, second, final), want):
        np.testing.assert_array_equal(got, base + added)
    np.testing.assert_array_equal(given, [1.0, 2.0])


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/=", "**=", "%=", "@=", "&=", "|="])
def test_augmented_operators(op):
    """Only ``+=`` is in place (popxl defines ``__iadd__`` alone); the others rebind the name."""
    with popxl.Ir().main_graph:
        dtype = popxl.bool if op in ("&=", "|=") else popxl.float32
        t = popxl.variable(np.ones((2, 2), dtype.as_numpy()), dtype)
        before = t
        ops_before = len(popxl.gcg()._ops)
        scope = {"t": t}
        exec(f"t {op} t", {}, scope)
        assert len(popxl.gcg()._ops) == ops_before + 1
        assert (scope["t"] is before) == (op == "+=")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_unsigned_dtypes_wrap(dtype):
    top = np.iinfo(dtype).max
    x = np.array([top, 3], dtype)
    y = np.array([2, 5], dtype)
    ir = popxl.Ir()
    with ir.main_graph:
        a, b = popxl.constant(x), popxl.constant(y)
        results = {"add": a + b, "sub": b - a, "mul": a * b, "div": ops.div(a, b), "max": ops.max(a)}
        streams = {k: popxl.d2h_stream(v.shape, v.dtype, k) for k, v in results.items()}
        for k, v in results.items():
            ops.host_store(streams[k], v)
    with popxl.Session(ir) as session:
        got = session.run()
    want = {"add": x + y, "sub": y - x, "mul": x * y, "div": x // y, "max": x.max()}
    for k in want:
        assert got[streams[k]].dtype == dtype
        np.testing.assert_array_equal(got[streams[k]], want[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_values_past_the_signed_range(dtype):
    """Unsigned values from half the type's range up (uint64 ones from 2**63 read negative as int64 bits)
    compare, divide, reduce and convert as numpy's."""
    from ops_check import run_graph
    top = np.iinfo(dtype).max
    a = np.array([top, top // 2 + 1, top // 2 + 7, 5, 0, top - 3], dtype)
    b = np.array([3, top // 2 + 1, 2, top, 7, top // 2 + 2], dtype)
    both = np.stack([a, b])
    cases = {  # name: (popxl function, inputs, numpy's result)
        "greater": (ops.greater, (a, b), a > b),
        "equal": (ops.equal, (a, b), a == b),
        "maximum": (ops.maximum, (a, b), np.maximum(a, b)),
        "div": (ops.div, (a, b), a // b),
        "fmod": (ops.fmod, (a, b), a % b),
        "max": (lambda x: ops.max(x, 1), (both,), both.max(1)),
        "min": (lambda x: ops.min(x, 1), (both,), both.min(1)),
        "argmax": (lambda x: ops.argmax(x, 1), (both,), both.argmax(1).astype(np.int32)),
        "argmin": (lambda x: ops.argmin(x, 1), (both,), both.argmin(1).astype(np.int32)),
        "topk": (lambda x: ops.topk(x, 3, 0, True, True)[0], (a,), np.sort(a)[::-1][:3]),
        "topk_smallest": (lambda x: ops.topk(x, 2, 0, False, True)[1], (a,), np.argsort(a)[:2].astype(np.int32)),
        "to_float32": (lambda x: ops.cast(x, popxl.float32), (a,), a.astype(np.float32)),
        "abs": (ops.abs, (a,), a),  # unsigned values are their own abs and relu
        "relu": (ops.relu, (a,), a),
        "sign": (ops.sign, (a,), np.sign(a)),
        "histogram": (lambda x: ops.histogram(x, [1.0, top / 2 + 10], False), (a,),
                      np.histogram(a.astype(np.float64), [-np.inf, 1.0, top / 2 + 10, np.inf])[0].astype(np.uint32)),
    }
    for name, (fn, inputs, want) in cases.items():
        (got,), _ = run_graph(fn, *inputs)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_uint64_max_and_min_across_replicas():
    from ops_check import run_graph
    values = np.array([[2 ** 64 - 1, 3], [5, 2 ** 63]], np.uint64)
    (high, low), _ = run_graph(lambda x: (ops.collectives.replicated_all_reduce(x, "max"),
                                          ops.collectives.replicated_all_reduce(x, "min")), values, replication=2)
    np.testing.assert_array_equal(high, np.broadcast_to(values.max(0), (2, 2)))
    np.testing.assert_array_equal(low, np.broadcast_to(values.min(0), (2, 2)))
