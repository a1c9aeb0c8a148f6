"""Random ops: draws follow the seed and the op (never the replica's index); dropout and random tensors
have the right statistics, and dropout's gradient reuses its mask."""
import numpy as np
import pytest
import torch

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import create_seeds, dtypes, ops
from ops_check import build_error, fetch, run_graph, spec

SEED = np.array([1234, 5678], np.uint32)


def test_split_random_seed_is_deterministic_and_distinct():
    fn = lambda s: ops.split_random_seed(s, 3) + (ops.create_random_seed(s, 1),)  # noqa: E731
    a, _ = run_graph(fn, SEED)
    b, _ = run_graph(fn, SEED)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == np.uint32 and x.shape == (2,)
    assert len({tuple(x) for x in a[:3]} | {tuple(SEED)}) == 4
    np.testing.assert_array_equal(a[1], a[3])  # split seed i is create_random_seed(seed, i)
    c, _ = run_graph(fn, SEED + np.uint32(1))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout(p, dtype, rng):
    x = (rng.standard_normal((64, 64)) + 3).astype(dtype)
    dy = rng.standard_normal((64, 64)).astype(dtype)
    (y,), (dx, _) = run_graph(lambda x, s: ops.dropout(x, s, p), x, SEED, dys=[dy])
    kept = y != 0
    assert abs(kept.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / x.size)
    np.testing.assert_allclose(y[kept], x[kept].astype(np.float32) / (1 - p), rtol=1e-3)
    # The gradient applies the same mask and scale.
    np.testing.assert_allclose(dx, np.where(kept, dy.astype(np.float32) / (1 - p), 0), rtol=1e-3, atol=1e-6)
    assert y.dtype == dtype
    (y2,), _ = run_graph(lambda x, s: ops.dropout(x, s, p), x, SEED)
    np.testing.assert_array_equal(y, y2)
    (y3,), _ = run_graph(lambda x, s: ops.dropout(x, s, p), x, SEED + np.uint32(1))
    assert not np.array_equal(y, y3)


def test_dropout_zero_probability_is_identity(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    (y,), _ = run_graph(lambda x, s: ops.dropout(x, s, 0.0), x, SEED)
    np.testing.assert_array_equal(y, x)


def test_shaped_dropout_drops_whole_rows(rng):
    x = (rng.standard_normal((200, 8)) + 5).astype(np.float32)
    (y,), (dx, _) = run_graph(lambda x, s: ops.shaped_dropout(x, s, [200, 1], 0.5), x, SEED,
                              dys=[np.ones_like(x)])
    kept_rows = (y != 0).all(1)
    dropped_rows = (y == 0).all(1)
    assert (kept_rows | dropped_rows).all() and 0.3 < kept_rows.mean() < 0.7
    np.testing.assert_allclose(y[kept_rows], 2 * x[kept_rows], rtol=1e-6)
    np.testing.assert_array_equal(dx, np.where(kept_rows[:, None], 2.0, 0.0) * np.ones_like(x))


def test_replicas_draw_as_their_seeds_say():
    """As on the IPU, a replica's draws follow its seed, not its index: replicas fed one seed draw the
    same numbers (tensor-parallel shards stay identical), replicas fed their own seeds draw apart, and
    a run draws again what an earlier one drew."""
    x = np.ones((2, 32, 32), np.float32)

    def fn(x, s):
        return ops.dropout(x, s, 0.5), ops.random_normal(s, (16,)), ops.split_random_seed(s)[0]
    (y, r, split), _ = run_graph(fn, x, np.stack([SEED, SEED]), replication=2)
    np.testing.assert_array_equal(y[0], y[1])
    np.testing.assert_array_equal(r[0], r[1])
    np.testing.assert_array_equal(split[0], split[1])
    (y_apart, r_apart, _), _ = run_graph(fn, x, create_seeds(7, replicas=2), replication=2)
    assert not np.array_equal(y_apart[0], y_apart[1]) and not np.array_equal(r_apart[0], r_apart[1])
    (y_again, r_again, _), _ = run_graph(fn, x, create_seeds(7, replicas=2), replication=2)
    np.testing.assert_array_equal(y_apart, y_again)
    np.testing.assert_array_equal(r_apart, r_again)
    (y_single,), _ = run_graph(lambda x, s: ops.dropout(x, s, 0.5), x[0], SEED)
    np.testing.assert_array_equal(y_single, y[0])  # a replica draws what a single replica draws


def test_ops_fed_one_seed_draw_apart_and_a_dropout_gradient_keeps_its_mask(rng):
    """Each random op has its own seed modifier (PopART's): two dropouts of one seed drop different
    elements, and each one's gradient is dy times its own mask (checked against torch autograd)."""
    x = rng.standard_normal((64,)).astype(np.float32)
    dy = rng.standard_normal((64,)).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        seed = popxl.constant(SEED, dtypes.uint32)
        first, second = ops.random_uniform(seed, (64,)), ops.random_uniform(seed, (64,))
        graph = ir.create_graph(lambda t, s: (ops.dropout(t, s, 0.5), ops.dropout(t, s, 0.5)),
                                popxl.TensorSpec((64,), dtypes.float32), popxl.TensorSpec((2,), dtypes.uint32))
        grads = popxl.transforms.autodiff(graph, grads_required=graph.inputs[:1])
        site = ops.call_with_info(graph, popxl.constant(x), seed)
        (dx,) = ops.call(grads.graph, popxl.constant(dy), popxl.constant(dy), inputs_dict=grads.inputs_dict(site))
    first, second, a, b, dx = fetch(ir, [first, second, *site.outputs[:2], dx])
    assert not np.array_equal(first, second) and not np.array_equal(a == 0, b == 0)
    # Each output is x times its op's scaled mask, which a / x recovers.
    t, mask_a, mask_b = torch.tensor(x, requires_grad=True), torch.tensor(a / x), torch.tensor(b / x)
    ((t * mask_a * torch.tensor(dy)).sum() + (t * mask_b * torch.tensor(dy)).sum()).backward()
    np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-5)


def test_a_split_seed_keeps_its_first_word():
    (a, b), _ = run_graph(lambda s: ops.split_random_seed(s), SEED)
    assert a[0] == b[0] == SEED[0] and a[1] != b[1]


@pytest.mark.parametrize("dtype", [dtypes.float32, dtypes.float16])
def test_random_normal_and_uniform(dtype):
    n = 20000
    (normal, uniform, default), _ = run_graph(lambda s: (ops.random_normal(s, (n,), 2.0, 0.5, dtype),
                                                         ops.random_uniform(s, (n,), -1.0, 3.0, dtype),
                                                         ops.random_uniform(s, (10, 3))), SEED)
    assert normal.dtype == dtype.as_numpy() and default.dtype == np.float32 and default.shape == (10, 3)
    normal, uniform = normal.astype(np.float64), uniform.astype(np.float64)
    se = 0.5 / np.sqrt(n)
    assert abs(normal.mean() - 2.0) < 5 * se and abs(normal.std() - 0.5) < 0.02
    assert uniform.min() >= -1.0 and uniform.max() <= 3.0
    assert abs(uniform.mean() - 1.0) < 5 * 4 / np.sqrt(12 * n) and abs(uniform.std() - 4 / np.sqrt(12)) < 0.03
    # Normal samples pass a Kolmogorov-Smirnov test against the normal CDF.
    z = np.sort((normal - 2.0) / 0.5)
    cdf = 0.5 * (1 + torch.erf(torch.tensor(z) / np.sqrt(2))).numpy()
    assert np.max(np.abs(cdf - np.arange(1, n + 1) / n)) < 1.63 / np.sqrt(n) + 1e-3


def test_seeds_from_host_helper():
    seeds = create_seeds(7, replicas=2)
    assert seeds.shape == (2, 2) and seeds.dtype == np.uint32
    (r,), _ = run_graph(lambda s: ops.random_uniform(s, (4,)), seeds, replication=2)
    assert not np.array_equal(r[0], r[1])


def test_random_errors():
    with pytest.raises(ValueError, match=r"seed 's' must be a \(2,\) uint32 tensor, got \(2,\) int32"):
        build_error(lambda x, s: ops.dropout(x, s, 0.5), spec((3,)), spec((2,), dtypes.int32))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        build_error(lambda x, s: ops.dropout(x, s, 1.0), spec((3,)), spec((2,), dtypes.uint32))
    with pytest.raises(ValueError, match=r"mask shape \(2,\) does not broadcast to 'x' \(3,\)"):
        build_error(lambda x, s: ops.shaped_dropout(x, s, [2], 0.5), spec((3,)), spec((2,), dtypes.uint32))
    with pytest.raises(TypeError, match="dtype must be floating point, got int32"):
        build_error(lambda s: ops.random_normal(s, (3,), dtype=dtypes.int32), spec((2,), dtypes.uint32))
    with pytest.raises(ValueError, match="random_uniform: low 2.0 must not exceed high 1.0"):
        build_error(lambda s: ops.random_uniform(s, (3,), 2.0, 1.0), spec((2,), dtypes.uint32))
    with pytest.raises(ValueError, match="n must be >= 1"):
        build_error(lambda s: ops.split_random_seed(s, 0), spec((2,), dtypes.uint32))
