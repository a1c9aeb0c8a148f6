"""Misc ops: increment_mod, scaled_add, print_tensor, ipu/io-tile copies, cumsum, init."""
import numpy as np
import pytest
import torch

import gptj_popxl.popxl_cpu as popxl
from gptj_popxl.popxl_cpu import dtypes, ops
from ops_check import FLOATS, build_error, check, rand, run_graph, spec


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_increment_mod(dtype, rng):
    x = rng.integers(-4, 8, (6,)).astype(dtype)
    out, _ = run_graph(lambda x: ops.increment_mod(x, 3, 5), x)
    np.testing.assert_array_equal(out[0], np.fmod(x + 3, 5).astype(dtype))
    check(lambda x: ops.increment_mod(x, 0.5, 2.0), lambda x: torch.fmod(x + 0.5, 2.0), rand(rng, 5))


def test_increment_mod_inplace_counts_across_runs():
    ir = popxl.Ir()
    with ir.main_graph:
        counter = popxl.variable(np.float32(0), name="counter")
        ops.increment_mod_(counter, 1, 3)
        out = popxl.d2h_stream((), dtypes.float32, "out")
        ops.host_store(out, counter)
    with popxl.Session(ir) as session:
        seen = [float(session.run()[out]) for _ in range(4)]
    assert seen == [1.0, 2.0, 0.0, 1.0]


@pytest.mark.parametrize("dtype", FLOATS)
def test_scaled_add(dtype, rng):
    x, y = rand(rng, 3, 4, dtype=dtype), rand(rng, 3, 4, dtype=dtype)
    check(lambda x, y: ops.scaled_add(x, y, 0.5, -2.0), lambda x, y: 0.5 * x - 2.0 * y, x, y)
    check(lambda x, y: ops.scaled_add(x, y), lambda x, y: x + y, x, y)
    a, b = np.array(1.5, np.float32), np.array(-0.25, np.float32)
    check(lambda x, y, a: ops.scaled_add(x, y, a), lambda x, y, a: a * x + y, x, y, a,
          tol=(2e-2, 2e-2) if dtype == np.float16 else None)
    check(lambda x, y, a, b: ops.scaled_add(x, y, a, b), lambda x, y, a, b: a * x + b * y, x, y, a, b,
          tol=(2e-2, 2e-2) if dtype == np.float16 else None)
    check(lambda x, y, b: ops.scaled_add(x, y, 3.0, b), lambda x, y, b: 3 * x + b * y, x, y, b,
          tol=(2e-2, 2e-2) if dtype == np.float16 else None)


@pytest.mark.parametrize("x_dtype, y_dtype", [(np.float16, np.float32), (np.float32, np.float16)])
def test_scaled_add_of_two_dtypes_gives_xs(x_dtype, y_dtype, rng):
    """popxl: X and Y "can be different types" (poplibs' mixed-precision scaled add)."""
    x, y = rand(rng, 3, 4, dtype=x_dtype), rand(rng, 3, 4, dtype=y_dtype)
    b = np.array(-0.25, np.float32)
    out, _ = run_graph(lambda x, y: ops.scaled_add(x, y, 0.5, -2.0), x, y)
    assert out[0].dtype == x_dtype
    check(lambda x, y, b: ops.scaled_add(x, y, 0.5, b), lambda x, y, b: 0.5 * x + b * y, x, y, b, tol=(2e-2, 2e-2))
    # Y beyond float16's range: its scale's gradient (sum of dy * Y) is still finite, as in float32.
    big = np.array([7e4, 3.0], y_dtype) if y_dtype == np.float32 else np.array([6e4, 3.0], y_dtype)
    _, grads = run_graph(lambda x, y, b: ops.scaled_add(x, y, 0.5, b), np.ones(2, x_dtype), big, b,
                         dys=[np.ones(2, x_dtype)])
    np.testing.assert_allclose(grads[2], big.astype(np.float64).sum(), rtol=1e-3)


def test_scaled_add_inplace_sgd_step(rng):
    w0, g = rand(rng, 4, 3), rand(rng, 4, 3)
    ir = popxl.Ir()
    with ir.main_graph:
        w = popxl.variable(w0, name="w")
        lr_stream = popxl.h2d_stream((), dtypes.float32, "lr")
        grad_stream = popxl.h2d_stream((4, 3), dtypes.float32, "g")
        grad = ops.host_load(grad_stream)
        ops.scaled_add_(w, grad, b=ops.host_load(lr_stream))
        ops.scaled_add_(w, grad, a=0.5, b=1.0)
    with popxl.Session(ir) as session:
        session.run({lr_stream: np.float32(-0.1), grad_stream: g})
        np.testing.assert_allclose(session.get_tensor_data(w), 0.5 * (w0 - 0.1 * g) + g, rtol=1e-6)


def test_scaled_add_errors():
    with pytest.raises(ValueError, match=r"X 'x' \(2, 3\) float32 and Y 'y' \(3,\) float32 must be floating point "
                                         r"tensors of one shape"):
        build_error(lambda x, y: ops.scaled_add(x, y), spec((2, 3)), spec((3,)))
    with pytest.raises(ValueError, match=r"scale a 'a' must be a floating point scalar, got \(2,\) float32"):
        build_error(lambda x, a: ops.scaled_add(x, x, a), spec((2,)), spec((2,)))


def test_print_tensor(capsys):
    x = np.array([[1.5, -2.0], [0.25, 3.0]], np.float32)
    dy = np.ones_like(x)
    out, grads = run_graph(lambda x: ops.print_tensor(x * 2, "doubled", print_gradient=True), x, dys=[dy])
    np.testing.assert_array_equal(out[0], 2 * x)
    np.testing.assert_array_equal(grads[0], 2 * dy)
    err = capsys.readouterr().err
    assert f"doubled: {np.array2string(2 * x, precision=8)}" in err
    assert f"doubled_gradient: {np.array2string(dy, precision=8)}" in err
    run_graph(lambda x: ops.print_tensor(x, "hidden", print_self=False), x)
    run_graph(lambda x: ops.print_tensor(x, open_bracket="(", close_bracket=")", separator=",",
                                         float_format="fixed", digits=2), x, replication=1)
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "printx: ((1.50,-2.00)," in err  # the default title is "print" + the tensor's name


def test_print_tensor_per_replica(capsys):
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    run_graph(lambda x: ops.print_tensor(x, "v"), x, replication=2)
    err = capsys.readouterr().err
    assert "v (replica 0): [0. 1.]" in err and "v (replica 1): [2. 3.]" in err
    with pytest.raises(ValueError, match="float_format must be one of"):
        build_error(lambda x: ops.print_tensor(x, float_format="hex"), spec((2,)))


def test_ipu_and_io_tile_copies(rng):
    x = rand(rng, 3)

    def fn(x):
        with popxl.ipu(1):
            y = ops.mul(x, x)
        z = ops.ipu_copy(y, 0, source=1)
        assert y.ipu == 1 and z.ipu == 0
        with popxl.io_tiles():
            w = ops.io_tile_copy(z)
        assert w.tile_set == "io" and z.tile_set == "compute"
        return w, y.copy_to_ipu(2, 1)
    check(fn, lambda x: (x * x, x * x), x)
    with pytest.raises(ValueError, match=r"source 3 is not the ipu of"):
        build_error(lambda x: ops.ipu_copy(ops.negate(x), 1, source=3), spec((2,)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_cumsum(dtype, rng):
    x = rand(rng, 3, 4, dtype=dtype)
    check(lambda x: (ops.cumsum(x), ops.cumsum(x, -1)), lambda x: (torch.cumsum(x, 0), torch.cumsum(x, -1)), x)
    out, _ = run_graph(lambda i: ops.cumsum(i, 0), np.arange(5, dtype=np.int32))
    np.testing.assert_array_equal(out[0], np.cumsum(np.arange(5)))
    assert out[0].dtype == np.int32


def test_init_and_identity_name():
    def fn():
        z = ops.init((2, 3), dtypes.float16, "z")
        u = ops.init((2,), dtypes.int32, init_type="undef")
        assert z.name == "z" and ops.identity(z, output_name="named").name == "named"
        return z, u
    out, _ = run_graph(fn)
    np.testing.assert_array_equal(out[0], np.zeros((2, 3), np.float16))
    assert out[0].dtype == np.float16 and out[1].shape == (2,)
    with pytest.raises(ValueError, match="init_type must be 'zero' or 'undef'"):
        build_error(lambda: ops.init((2,), dtypes.float32, init_type="ones"))


def test_replicas_count_and_scale_their_own_data(rng):
    x, y = rand(rng, 2, 3, 4), rand(rng, 2, 3, 4)
    a = np.array([0.5, -2.0], np.float32)
    check(lambda x, y, a: (ops.scaled_add(x, y, a, 2.0), ops.cumsum(x, 1), ops.increment_mod(x, 1.0, 0.75)),
          lambda x, y, a: (a * x + 2 * y, torch.cumsum(x, 1), torch.fmod(x + 1.0, 0.75)), x, y, a, replication=2)


def test_histogram_and_lamb_square(rng):
    x = rand(rng, 2, 50)
    levels = [-1.0, 0.0, 0.5]
    (counts, abs_counts, square), _ = run_graph(
        lambda x: (ops.histogram(x, levels, False), ops.histogram(x, levels, True), ops.lamb_square(x)), x)
    edges = [-np.inf] + levels + [np.inf]
    np.testing.assert_array_equal(counts, np.histogram(x, edges)[0])
    np.testing.assert_array_equal(abs_counts, np.histogram(np.abs(x), edges)[0])
    assert counts.dtype == np.uint32
    np.testing.assert_allclose(square, np.sum(x.astype(np.float64) ** 2), rtol=1e-6)
    (half,), _ = run_graph(ops.lamb_square, x.astype(np.float16))
    assert half.dtype == np.float32
    (per_replica,), _ = run_graph(ops.lamb_square, x, replication=2)
    np.testing.assert_allclose(per_replica, np.sum(x.astype(np.float64) ** 2, 1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"levels \[1.0, 0.0\] must be strictly increasing"):
        build_error(lambda x: ops.histogram(x, [1, 0], False), spec((2,)))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64, np.int8, np.int32])
@pytest.mark.parametrize("inplace", [False, True])
def test_increment_mod_wraps_the_sum_in_its_dtype(dtype, inplace):
    """As PopART's IncrementMod: ``t + increment`` wraps around in t's dtype, then the remainder is taken
    (C's, following the sum's sign); numpy's integer arithmetic wraps the same way."""
    info = np.iinfo(dtype)
    t = np.array([info.max, info.max - 1, 3, 0, info.min, info.max // 2 + 1], dtype)
    fn = ops.increment_mod_ if inplace else ops.increment_mod
    (got,), _ = run_graph(lambda x: fn(x, 1, 10), t)
    total = t + dtype(1)
    want = (np.fmod(total, dtype(10))).astype(dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
