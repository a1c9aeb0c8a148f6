"""Elementwise ops (unary, binary, comparisons, casts, where, clip) against torch, forward and backward."""
import numpy as np
import pytest
import torch

from gptj_popxl.popxl_cpu import constant, dtypes, ops
from ops_check import FLOATS, build_error, check, rand, run_graph, spec

F = torch.nn.functional

# name -> (popxl op, torch op, input transform keeping the op's domain and away from kinks)
UNARY = {
    "negate": (ops.negate, torch.neg, None),
    "sqrt": (ops.sqrt, torch.sqrt, lambda x: np.abs(x) + 0.5),
    "exp": (ops.exp, torch.exp, None),
    "log": (ops.log, torch.log, lambda x: np.abs(x) + 0.5),
    "log2": (ops.log2, torch.log2, lambda x: np.abs(x) + 0.5),
    "tanh": (ops.tanh, torch.tanh, None),
    "sin": (ops.sin, torch.sin, None),
    "cos": (ops.cos, torch.cos, None),
    "abs": (ops.abs, torch.abs, lambda x: x + np.sign(x) * 0.1),
    "relu": (ops.relu, torch.relu, lambda x: x + np.sign(x) * 0.1),
    "gelu": (ops.gelu, lambda x: F.gelu(x, approximate="tanh"), None),
    "geluerf": (ops.geluerf, F.gelu, None),
    "swish": (ops.swish, F.silu, None),
    "sign": (ops.sign, torch.sign, None),
    "floor": (ops.floor, torch.floor, None),
    "ceil": (ops.ceil, torch.ceil, None),
    "identity": (ops.identity, lambda x: x, None),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, dtype, rng):
    op, ref, domain = UNARY[name]
    x = rand(rng, 3, 5)
    x = (domain(x) if domain else x).astype(dtype)
    check(op, ref, x)


@pytest.mark.parametrize("name", ["exp_", "relu_", "gelu_", "geluerf_", "swish_"])
def test_unary_inplace(name, rng):
    op, ref, _ = UNARY[name[:-1]]
    x = rand(rng, 2, 3)

    def fn(x):
        y = ops.identity(x)
        out = getattr(ops, name)(y)
        return out, y  # y is written in place, so both show the result
    out = check(fn, lambda x: (ref(x), ref(x)), x, grad=False)
    np.testing.assert_array_equal(out[0], out[1])


def test_detach_blocks_gradient(rng):
    x = rand(rng, 4)
    check(lambda x: ops.mul(ops.detach(x), x), lambda x: x.detach() * x, x)


def test_predicates(rng):
    x = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
    out, _ = run_graph(lambda x: (ops.isnan(x), ops.isinf(x), ops.isfinite(x), ops.logical_not(ops.isnan(x))), x)
    np.testing.assert_array_equal(out[0], np.isnan(x))
    np.testing.assert_array_equal(out[1], np.isinf(x))
    np.testing.assert_array_equal(out[2], np.isfinite(x))
    np.testing.assert_array_equal(out[3], ~np.isnan(x))


def test_integer_unary(rng):
    x = rng.integers(-5, 5, (6,)).astype(np.int32)
    out, _ = run_graph(lambda x: (ops.negate(x), ops.abs(x), ops.relu(x), ops.sign(x)), x)
    for o, r in zip(out, (-x, np.abs(x), np.maximum(x, 0), np.sign(x))):
        np.testing.assert_array_equal(o, r)
        assert o.dtype == np.int32


BINARY = {
    "add": (ops.add, torch.add, None),
    "sub": (ops.sub, torch.sub, None),
    "mul": (ops.mul, torch.mul, None),
    "div": (ops.div, torch.div, lambda a, b: (a, np.abs(b) + 0.5)),
    "pow": (ops.pow, torch.pow, lambda a, b: (np.abs(a) + 0.5, b)),
    "fmod": (ops.fmod, torch.fmod, lambda a, b: (3 * a, np.abs(b) + 0.5)),
    "maximum": (ops.maximum, torch.maximum, None),
}


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((), (2, 3))])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, dtype, shapes, rng):
    op, ref, domain = BINARY[name]
    a, b = rand(rng, *shapes[0]), rand(rng, *shapes[1])
    a, b = domain(a, b) if domain else (a, b)
    check(op, ref, a.astype(dtype), b.astype(dtype))


def test_integer_binary(rng):
    a = rng.integers(-9, 9, (5,)).astype(np.int32)
    b = rng.integers(1, 4, (5,)).astype(np.int32)
    out, _ = run_graph(lambda a, b: (ops.add(a, b), ops.mul(a, b), ops.div(a, b), ops.fmod(a, b)), a, b)
    for o, r in zip(out, (a + b, a * b, np.trunc(a / b), np.fmod(a, b))):
        np.testing.assert_array_equal(o, r.astype(np.int32))


def test_comparisons(rng):
    a = rng.integers(0, 3, (4, 3)).astype(np.float32)
    b = rng.integers(0, 3, (3,)).astype(np.float32)
    out, _ = run_graph(lambda a, b: (ops.equal(a, b), ops.greater(a, b), a > b, a < b,
                                     ops.logical_and(a > b, a > 1), ops.logical_or(a > b, a > 1), ~(a > b)), a, b)
    expected = (a == b, a > b, a > b, a < b, (a > b) & (a > 1), (a > b) | (a > 1), ~(a > b))
    for o, r in zip(out, expected):
        np.testing.assert_array_equal(o, r)


def test_maximum_of_several(rng):
    a, b, c = rand(rng, 4), rand(rng, 4), rand(rng, 4)
    check(lambda a, b, c: ops.maximum(a, b, c), lambda a, b, c: torch.maximum(torch.maximum(a, b), c), a, b, c)


def test_max_min_and_maximum_give_every_tied_input_the_whole_gradient():
    """PopART's rules (reducemaxx.cpp, maxx.cpp): ``dy * (x == result)``, not split between ties as torch's."""
    x = np.array([[1, 3, 3, 0], [2, 2, 2, 2]], np.float32)
    a, b = np.array([1, 2, 3], np.float32), np.array([1, 5, 3], np.float32)
    dy_row, dy = np.array([0.5, 2.0], np.float32), np.array([1.0, 2.0, 4.0], np.float32)

    out, grads = run_graph(lambda x: ops.max(x, 1), x, dys=[dy_row])
    np.testing.assert_array_equal(grads[0], (x == x.max(1, keepdims=True)) * dy_row[:, None])
    out, grads = run_graph(lambda x: ops.min(x, 1), x, dys=[dy_row])
    np.testing.assert_array_equal(grads[0], (x == x.min(1, keepdims=True)) * dy_row[:, None])
    out, grads = run_graph(lambda a, b: ops.maximum(a, b), a, b, dys=[dy])
    np.testing.assert_array_equal(grads[0], (a == np.maximum(a, b)) * dy)
    np.testing.assert_array_equal(grads[1], (b == np.maximum(a, b)) * dy)


def test_maximum_of_one_tensor_is_a_copy(rng):
    a = rand(rng, 3)
    check(lambda a: ops.maximum(a), lambda a: a.clone(), a)


def test_logical_ops_and_where_cast_their_inputs_to_bool():
    """As popxl's ``cast_if_needed``: nonzero is true."""
    a, b = np.array([0, 2, -1, 0], np.int32), np.array([0.0, 0.0, 0.5, 3.0], np.float32)
    out, _ = run_graph(lambda a, b: (ops.logical_and(a, b), ops.logical_or(a, b), ops.logical_not(a),
                                     ops.where(a, b, 7.0)), a, b)
    for o, r in zip(out, (np.logical_and(a, b), np.logical_or(a, b), np.logical_not(a), np.where(a, b, 7.0))):
        np.testing.assert_array_equal(o, r)


def test_tensor_operators_with_scalars(rng):
    x = np.abs(rand(rng, 3)) + 0.5
    check(lambda x: (x + 1, 2 * x, x - 3, 1 - x, x / 2, 4 / x, x ** 2, -x, x % 0.7),
          lambda x: (x + 1, 2 * x, x - 3, 1 - x, x / 2, 4 / x, x ** 2, -x, torch.fmod(x, 0.7)), x)


@pytest.mark.parametrize("src,dst", [(np.float32, dtypes.float16), (np.float16, dtypes.float32),
                                     (np.float32, dtypes.int32), (np.int32, dtypes.float32),
                                     (np.float32, dtypes.bool)])
def test_cast(src, dst, rng):
    x = (rand(rng, 6) * 4).astype(src)
    out, grads = run_graph(lambda x: ops.cast(x, dst), x,
                           dys=[np.ones(6, dst.as_numpy())] if dst.is_floating_point else None)
    np.testing.assert_array_equal(out[0], x.astype(dst.as_numpy()))
    if grads and grads[0] is not None:
        np.testing.assert_array_equal(grads[0], np.ones(6, src))


@pytest.mark.parametrize("dtype", FLOATS)
def test_where(dtype, rng):
    c = rng.standard_normal((3, 1)) > 0
    a, b = rand(rng, 3, 4, dtype=dtype), rand(rng, 4, dtype=dtype)
    check(ops.where, lambda c, a, b: torch.where(c.bool(), a, b), c, a, b)


def test_where_with_python_number_and_bool_index(rng):
    c = rng.standard_normal((5,)) > 0
    a = rand(rng, 5)
    check(lambda c, a: (ops.where(c, a, 2.0), ops.where(c, -1.0, a), a[c]),
          lambda c, a: (torch.where(c.bool(), a, 2.0), torch.where(c.bool(), -1.0, a), torch.where(c.bool(), a, 0.0)),
          c, a)


@pytest.mark.parametrize("dtype", FLOATS)
def test_clip(dtype, rng):
    x = rand(rng, 4, 5, dtype=dtype)
    check(lambda x: ops.clip(x, -0.5, 0.25), lambda x: torch.clamp(x, -0.5, 0.25), x)
    check(lambda x: ops.clip(x, min=0.0), lambda x: torch.clamp(x, min=0.0), x)


def test_clip_gradient_stops_at_the_bounds_and_passes_nan():
    """PopART's rule (clipx.cpp): ``dy * (y != min) * (y != max)`` for the result ``y``."""
    x = np.array([-2, -1, 0, 1, 2, np.nan, 0.5], np.float32)
    dy = np.arange(1, 8, dtype=np.float32)
    _, grads = run_graph(lambda x: ops.clip(x, -1, 1), x, dys=[dy])
    y = np.clip(x, -1, 1)
    np.testing.assert_array_equal(grads[0], np.where((y != -1) & (y != 1), dy, 0))


def test_replicas_get_their_own_data(rng):
    """Broadcasting with a leading replica axis: each replica computes on its own inputs."""
    c = rng.standard_normal((2, 3, 1)) > 0
    a, b = rand(rng, 2, 3, 4), rand(rng, 2, 4)
    check(lambda c, a, b: ops.where(c, ops.mul(a, b), ops.clip(ops.exp(b), 0, 2)),
          lambda c, a, b: torch.where(c.bool(), a * b, torch.clamp(torch.exp(b), 0, 2)), c, a, b, replication=2)
    check(lambda a, b: (ops.pow(ops.abs(a) + 1, b), ops.maximum(a, b), ops.cast(a, dtypes.float16)),
          lambda a, b: (torch.pow(torch.abs(a) + 1, b), torch.maximum(a, b), a), a, b, replication=2,
          tol=(1e-3, 1e-3))


def test_errors():
    with pytest.raises(TypeError, match="same dtype.*float32.*float16"):
        build_error(ops.add, spec((2,)), spec((2,), dtypes.float16))
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4,\) do not broadcast"):
        build_error(ops.mul, spec((2, 3)), spec((4,)))
    with pytest.raises(TypeError, match="sqrt needs a floating point tensor.*int32"):
        build_error(ops.sqrt, spec((2,), dtypes.int32))
    with pytest.raises(ValueError, match=r"do not broadcast"):
        build_error(lambda c, a: ops.where(c, a, a), spec((3,), dtypes.bool), spec((2,)))
    with pytest.raises(ValueError, match="min 1.0 is greater than max 0.0"):
        build_error(lambda x: ops.clip(x, 1, 0), spec((2,)))
    with pytest.raises(ValueError, match="maximum needs at least one tensor"):
        build_error(lambda x: ops.maximum(), spec((2,)))
    with pytest.raises(TypeError, match="where: lhs or rhs must be a Tensor"):
        build_error(lambda c: ops.where(c, 1.0, 2.0), spec((2,), dtypes.bool))


def test_add_inplace(rng):
    a, b = rand(rng, 3, 4), rand(rng, 4)

    def fn(a, b):
        y = ops.identity(a)
        ops.add_(y, b)
        return y
    check(fn, lambda a, b: a + b, a, b, grad=False)
    # each replica adds its own rhs, broadcast over its own rows
    check(fn, lambda a, b: a + b, rand(rng, 2, 3, 4), rand(rng, 2, 4), grad=False, replication=2)

    def onto_own_transpose(a):  # the rhs is the lhs's memory read another way
        y = ops.identity(a)
        ops.add_(ops.transpose_(y), y)
        return y
    square = rand(rng, 3, 3)
    check(onto_own_transpose, lambda a: (a.T + a).T, square, grad=False)
    with pytest.raises(ValueError, match=r"rhs \(3, 4\) must broadcast to lhs \(4,\)"):
        build_error(lambda a, b: ops.add_(b, a), spec((3, 4)), spec((4,)))


def test_constant_operand(rng):
    x = rand(rng, 2, 3)
    c = rand(rng, 3)
    check(lambda x: ops.mul(x, constant(c)), lambda x: x * torch.tensor(c, dtype=torch.float64), x)
