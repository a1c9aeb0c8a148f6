"""Shape and indexing ops against torch/numpy: reshape, transpose, slicing, concat/split, indexing,
gather, onehot, topk, dynamic slice/update, subsample."""
import numpy as np
import pytest
import torch

import gptj_popxl.popxl_cpu as popxl
from gptj_popxl.popxl_cpu import constant, dtypes, ops
from ops_check import FLOATS, build_error, check, rand, run_graph, spec


@pytest.mark.parametrize("dtype", FLOATS)
def test_reshape_transpose_flatten(dtype, rng):
    x = rand(rng, 2, 3, 4, dtype=dtype)
    check(lambda x: (ops.reshape(x, (4, -1)), ops.transpose(x, (2, 0, 1)), ops.transpose(x), ops.flatten(x), x.T,
                     x.reshape((6, 4))),
          lambda x: (x.reshape(4, -1), x.permute(2, 0, 1), x.permute(2, 1, 0), x.reshape(-1), x.permute(2, 1, 0),
                     x.reshape(6, 4)), x)


def test_aliasing_views(rng):
    x = rand(rng, 2, 3)

    def fn(x):
        y = ops.identity(x)
        flat = ops.reshape_(y, (6,))
        ops.add_(flat, constant(np.float32(1)))  # writes y through its alias
        t = ops.transpose_(y)
        return y, t, ops.flatten_(t)
    check(fn, lambda x: (x + 1, (x + 1).T, (x + 1).T.reshape(-1)), x, grad=False)


@pytest.mark.parametrize("dtype", FLOATS)
def test_slice(dtype, rng):
    x = rand(rng, 5, 6, dtype=dtype)
    check(lambda x: (ops.slice(x, 1, 4, axis=0), ops.slice(x, [0, 5], [5, 0], [2, -2]),
                     ops.slice(x, start=-3, axis=1), ops.slice(x, stop=[0], step=[-1], axis=[0])),
          lambda x: (x[1:4], x[0:5:2][:, torch.tensor([5, 3, 1])], x[:, -3:], torch.flip(x, (0,))[:4]), x)
    check(lambda x: (ops.slice(x, [4, 5], [0, 0], [-1, -2]),), lambda x: torch.flip(x, (0, 1))[:4, ::2], x)


def test_slice_inplace(rng):
    x = rand(rng, 4, 3)

    def fn(x):
        y = ops.identity(x)
        ops.add_(ops.slice_(y, 1, 3, axis=0), constant(np.float32(10)))
        return y
    check(fn, lambda x: x + torch.tensor([[0.0], [10.0], [10.0], [0.0]], dtype=torch.float64), x, grad=False)


def test_getitem(rng):
    x = rand(rng, 3, 4, 5)
    idx = np.array([2, 0], np.int32)
    mask = rng.standard_normal((3, 4, 5)) > 0
    check(lambda x, i, m: (x[1], x[:, 2:, ::2], x[..., -1], x[1, ..., 1:3], x[i], x[m]),
          lambda x, i, m: (x[1], x[:, 2:, ::2], x[..., -1], x[1, ..., 1:3], x[i], torch.where(m.bool(), x, 0)),
          x, idx, mask)


@pytest.mark.parametrize("dtype", FLOATS)
def test_concat_split(dtype, rng):
    a, b = rand(rng, 2, 3, dtype=dtype), rand(rng, 2, 5, dtype=dtype)
    check(lambda a, b: (ops.concat([a, b], axis=1), ops.concat((a, a), axis=-2), ops.concat_([b], 0)),
          lambda a, b: (torch.cat([a, b], 1), torch.cat([a, a], 0), b), a, b)
    check(lambda b: tuple(ops.split(b, [1, 4], axis=1)) + tuple(ops.split(b, 2)),
          lambda b: tuple(torch.split(b, [1, 4], 1)) + tuple(torch.split(b, 1)), b)


def test_squeeze(rng):
    x = rand(rng, 1, 3, 1, 2)
    check(lambda x: (ops.squeeze(x), ops.squeeze(x, [0]), ops.squeeze(x, -2)),
          lambda x: (x.squeeze(), x.squeeze(0), x.squeeze(-2)), x)


def test_subsample(rng):
    x = rand(rng, 5, 7)
    check(lambda x: ops.subsample(x, [2, 3]), lambda x: x[::2, ::3], x)


# ---------------------------------------------------------------- gather

@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis,index_shape", [(0, (3,)), (1, (2, 2)), (-1, ()), (1, (4,))])
def test_gather(axis, index_shape, dtype, rng):
    x = rand(rng, 4, 5, 3, dtype=dtype)
    idx = rng.integers(0, x.shape[axis], index_shape).astype(np.int32)
    idx.flat[:1] = 1  # a repeated index: gradients must add up
    if idx.size > 1:
        idx.flat[-1] = 1
    ref = lambda x, i: torch.index_select(x, axis % 3, i.reshape(-1)).reshape(  # noqa: E731
        x.shape[:axis % 3] + i.shape + x.shape[axis % 3 + 1:])
    check(lambda x, i: ops.gather(x, i, axis), ref, x, idx)
    check(lambda x, i: ops.tied_gather(x, i, axis), ref, x, idx)


def test_gather_out_of_range(rng):
    x = rand(rng, 4, 3)
    idx = np.array([[1, -1], [4, 3]], np.int32)

    def zeroed(x, i):
        ok = (i >= 0) & (i < 4)
        return x[i.clamp(0, 3)] * ok.unsqueeze(-1)
    check(lambda x, i: ops.gather(x, i, zero_OOR=True), zeroed, x, idx)
    check(lambda x, i: ops.gather(x, i), lambda x, i: x[i.clamp(0, 3)], x, idx)
    check(lambda x, i: ops.gather(x, i), lambda x, i: x[i.clamp(0, 3)], x, np.array([7, 0], np.uint32))


def test_gather_errors():
    with pytest.raises(TypeError, match="gather indices 'indices' must have an integer dtype, got float32"):
        build_error(ops.gather, spec((3, 2)), spec((2,)))
    with pytest.raises(ValueError, match="axis 2 is out of range for rank 2"):
        build_error(lambda x, i: ops.gather(x, i, 2), spec((3, 2)), spec((2,), dtypes.int32))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_onehot(axis, rng):
    # 4 and -1 are out of range, all off: popops' encodeOneHot (PopART's kernel) reads indices as unsigned.
    idx = np.array([[0, 2, -1], [4, 1, 3]], np.int32)
    values = np.array([-0.5, 2.0], np.float32)

    def ref(i, v):
        hot = F_one_hot(i, 4).movedim(-1, axis % 3)
        return torch.where(hot, v[1], v[0])
    check(lambda i, v: ops.onehot(i, constant(4, dtypes.int32), v, axis), ref, idx, values)
    check(lambda i, v: ops.onehot(i, 4, v, axis), ref, idx, values)


def F_one_hot(i, depth):
    ok = (i >= 0) & (i < depth)
    return torch.nn.functional.one_hot(i.clamp(0, depth - 1), depth).bool() & ok.unsqueeze(-1)


def test_onehot_errors():
    with pytest.raises(ValueError, match="values 'v' must have shape \\(2,\\)"):
        build_error(lambda i, v: ops.onehot(i, 3, v, 0), spec((2,), dtypes.int32), spec((3,)))
    with pytest.raises(ValueError, match="num_classes 'n' must be a scalar constant"):
        build_error(lambda i, v, n: ops.onehot(i, n, v, 0), spec((2,), dtypes.int32), spec((2,)),
                    spec((), dtypes.int32))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("largest", [True, False])
def test_topk(largest, dtype, rng):
    x = rng.permutation(60).reshape(3, 4, 5).astype(dtype) / 7  # distinct values: one right answer
    for axis in (0, -1):
        check(lambda x: ops.topk(x, 2, axis, largest, True),
              lambda x: (lambda v, i: (v, i.int()))(*torch.topk(x, 2, axis, largest, True)), x)


def test_topk_errors():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\] \(axis 1\), got 5"):
        build_error(lambda x: ops.topk(x, 5, 1, True, True), spec((3, 4)))


# ---------------------------------------------------------------- dynamic slicing

def poplibs_region(shape, axes, sizes, index):
    """Positions per axis under the documented poplibs rule: bad offsets start at 0, regions wrap."""
    key = [np.arange(n) for n in shape]
    for a, s, o in zip(axes, sizes, index):
        start = o if 0 <= o < shape[a] else 0
        key[a] = (start + np.arange(s)) % shape[a]
    return np.ix_(*key)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("index", [[1, 2], [3, 4], [9, -1]])  # in range, wrapping, out of range
def test_dynamic_slice(index, dtype, rng):
    x = rand(rng, 4, 3, 6, dtype=dtype)
    axes, sizes = [0, 2], [2, 3]
    key = poplibs_region(x.shape, axes, sizes, index)
    idx = np.array(index, np.int32)
    check(lambda x, i: ops.dynamic_slice(x, i, axes, sizes, True), lambda x, i: x[key], x, idx)
    u = rand(rng, 2, 3, 3, dtype=dtype)

    def updated(x, i, u):
        out = x.clone()
        out[key] = u
        return out
    check(lambda x, i, u: ops.dynamic_update(x, i, u, axes, sizes, True), updated, x, idx, u)


def test_dynamic_update_inplace(rng):
    x, u = rand(rng, 5, 2), rand(rng, 1, 2)
    idx = np.array([3], np.uint32)

    def fn(x, i, u):
        y = ops.identity(x)
        out = ops.dynamic_update_(y, i, u, [0], [1], True)
        return out, y

    def ref(x, i, u):
        out = x.clone()
        out[3:4] = u
        return out, out
    check(fn, ref, x, idx, u, grad=False)
    check(lambda x, i, u: fn(x, i, u)[0], lambda x, i, u: ref(x, i, u)[0], x, idx, u)


def test_dynamic_update_inplace_from_a_view_of_its_target(rng):
    """The update is read before the write, even when it is a slice of the tensor being written."""
    data = rand(rng, 8, 3)
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(data, name="v")
        shifted = ops.slice_(v, start=[1], stop=[5], axis=[0])
        ops.dynamic_update_(v, popxl.constant(np.array([0], np.uint32)), shifted, [0], [4], False)
    with popxl.Session(ir) as session:
        session.run()
        expected = data.copy()
        expected[0:4] = data[1:5]
        np.testing.assert_array_equal(session.get_tensor_data(v), expected)


def test_dynamic_update_inplace_writes_a_variable(rng):
    """A cache written one row per run at a runtime offset, as a KV cache is."""
    rows = rand(rng, 3, 2)
    ir = popxl.Ir()
    with ir.main_graph:
        cache = popxl.variable(np.zeros((3, 2), np.float32), name="cache")
        step_stream = popxl.h2d_stream((1,), dtypes.uint32, "step")
        row_stream = popxl.h2d_stream((1, 2), dtypes.float32, "row")
        ops.dynamic_update_(cache, ops.host_load(step_stream), ops.host_load(row_stream), [0], [1], True)
    with popxl.Session(ir) as session:
        for step in (2, 0):
            session.run({step_stream: np.array([step], np.uint32), row_stream: rows[step:step + 1]})
        np.testing.assert_array_equal(session.get_tensor_data(cache), rows * np.array([[1], [0], [1]], np.float32))


def test_dynamic_errors():
    i2 = spec((2,), dtypes.uint32)
    with pytest.raises(ValueError, match="index 'i' must be a 1-D integer tensor of 1 offsets"):
        build_error(lambda x, i: ops.dynamic_slice(x, i, [0], [1], True), spec((3, 4)), i2)
    with pytest.raises(ValueError, match=r"size 5 for axis 1 of 'x' \(3, 4\) must be in \[1, 4\]"):
        build_error(lambda x, i: ops.dynamic_slice(x, i, [0, 1], [1, 5], True), spec((3, 4)), i2)
    with pytest.raises(ValueError, match=r"t_update 'u' \(1, 3\) float32 must be \(1, 4\) float32"):
        build_error(lambda x, i, u: ops.dynamic_update(x, i, u, [0], [1], True), spec((3, 4)),
                    spec((1,), dtypes.int32), spec((1, 3)))
    with pytest.raises(ValueError, match="repeated axes"):
        build_error(lambda x, i: ops.dynamic_slice(x, i, [0, 0], [1, 1], True), spec((3, 4)), i2)


def test_replicas_index_their_own_data(rng):
    """Each replica gathers/slices with its own indices from its own data."""
    x = rand(rng, 2, 5, 3)
    idx = np.array([[4, 0, 4], [1, 2, 2]], np.int32)
    check(lambda x, i: ops.gather(x, i, 0), lambda x, i: x[i], x, idx, replication=2)
    check(lambda x, i: ops.gather(x, i, 1, zero_OOR=True), lambda x, i: x[:, i.clamp(0, 2)] * (i < 3), x, idx,
          replication=2)
    offsets = np.array([[3], [1]], np.uint32)
    u = rand(rng, 2, 2, 3)

    def sliced(x, i):
        return x[int(i[0]):int(i[0]) + 2]

    def updated(x, i, u):
        out = x.clone()
        out[int(i[0]):int(i[0]) + 2] = u
        return out
    check(lambda x, i: ops.dynamic_slice(x, i, [0], [2], True), sliced, x, offsets, replication=2)
    check(lambda x, i, u: ops.dynamic_update(x, i, u, [0], [2], True), updated, x, offsets, u, replication=2)
    values = np.array([[0, 1], [-1, 3]], np.float32)
    check(lambda i, v: ops.onehot(i, 5, v, -1), lambda i, v: torch.where(F_one_hot(i, 5), v[1], v[0]), idx, values,
          replication=2)
    y = np.stack([rng.permutation(15).reshape(5, 3) for _ in range(2)]).astype(np.float32)
    check(lambda y: ops.topk(y, 2, 0, True, True), lambda y: (lambda v, i: (v, i.int()))(*torch.topk(y, 2, 0)), y,
          replication=2)
    scatter_idx = np.array([[[0, 2, 1]], [[3, 3, 0]]], np.int32)
    check(lambda x, i, v: ops.scatter(x, i, v), lambda x, i, v: torch.scatter(x, 0, i, v), x, scatter_idx,
          rand(rng, 2, 1, 3), replication=2)
    check(lambda x: (ops.transpose(x), ops.slice(x, 1, 4, 2, 0), ops.concat([x, x], 1), ops.reshape(x, (3, 5))),
          lambda x: (x.T, x[1:4:2], torch.cat([x, x], 1), x.reshape(3, 5)), x, replication=2)


def test_concat_inplace_refuses_what_would_show_it_copies():
    """popxl's concat_ result aliases its inputs; this runtime's is a copy, so graphs that would tell the two
    apart (writing the result, or reading it after writing an input) are errors, and others run as popxl."""
    ir = popxl.Ir()
    with ir.main_graph:
        a, b = popxl.variable(np.ones(2, np.float32), name="a"), popxl.variable(np.zeros(2, np.float32), name="b")
        y = ops.concat_([a, b])
        doubled = y * 2.0  # read before any write: fine
        with pytest.raises(NotImplementedError, match="ops.add_ writes 'reshape_', the result of concat_"):
            ops.add_(ops.reshape_(y, (2, 2)), constant(1.0))
        ops.add_(a, constant(1.0))  # writing an input is fine while nothing reads the result afterwards
        a_doubled = a * 2.0  # and reading the input is too
        with pytest.raises(NotImplementedError, match="ops.mul reads 'concat', the result of concat_ 'concat' after "
                                                      "one of its inputs was written"):
            y * 3.0
        out, a_out = popxl.d2h_stream((4,), popxl.float32, "out"), popxl.d2h_stream((2,), popxl.float32, "a_out")
        ops.host_store(out, doubled)
        ops.host_store(a_out, a_doubled)
    with popxl.Session(ir) as session:
        outputs = session.run()
        np.testing.assert_array_equal(outputs[out], [2, 2, 0, 0])
        np.testing.assert_array_equal(outputs[a_out], [4, 4])
        np.testing.assert_array_equal(session.get_tensor_data(a), [2, 2])


def test_shape_errors():
    with pytest.raises(ValueError, match=r"cannot reshape 'x' \(2, 3\) \(6 elements\) to \(4, 2\)"):
        build_error(lambda x: ops.reshape(x, (4, 2)), spec((2, 3)))
    with pytest.raises(ValueError, match=r"axis 0 has size 2, not 1"):
        build_error(lambda x: ops.squeeze(x, 0), spec((2, 3)))
    with pytest.raises(ValueError, match=r"cannot split axis 0 of 'x' \(2, 3\) into 3 equal parts"):
        build_error(lambda x: ops.split(x, 3), spec((2, 3)))
    with pytest.raises(ValueError, match="cannot concat"):
        build_error(lambda x, y: ops.concat([x, y], 1), spec((2, 3)), spec((3, 3)))
    with pytest.raises(ValueError, match="is not a permutation"):
        build_error(lambda x: ops.transpose(x, (0, 0)), spec((2, 3)))
    with pytest.raises(ValueError, match=r"strides \[2\] must be 2 positive ints"):
        build_error(lambda x: ops.subsample(x, [2]), spec((2, 3)))
    with pytest.raises(IndexError, match="index 3 is out of range for axis 0"):
        build_error(lambda x: x[3], spec((2, 3)))
    with pytest.raises(ValueError, match=r"shape \(-2, -3\) has a negative size"):
        build_error(lambda x: ops.reshape(x, (-2, -3)), spec((2, 3)))
    with pytest.raises(ValueError, match=r"split sizes \[4, -1\] are not sizes adding up to 3"):
        build_error(lambda x: ops.split(x, [4, -1], 1), spec((2, 3)))
    with pytest.raises(ValueError, match=r"slice of 'x' \(4, 4\): start \[0\], stop \[2, 3\] must have one length"):
        build_error(lambda x: ops.slice(x, start=[0], stop=[2, 3]), spec((4, 4)))
    with pytest.raises(ValueError, match=r"axis \[0, 0\] names an axis twice"):
        build_error(lambda x: ops.slice(x, start=[0, 1], stop=[2, 3], axis=[0, 0]), spec((4, 4)))
    with pytest.raises(ValueError, match=r"indices 'i' \(2, 4\) may not be larger than 'x' \(2, 3\) off the scatter"):
        build_error(lambda x, i: ops.scatter(x, i, ops.cast(i, dtypes.float32)), spec((2, 3)),
                    spec((2, 4), dtypes.int32))


def test_dynamic_gradients_match_finite_differences(rng):
    """dynamic_update's gradients, independently of torch: central differences of sum(dy * f)."""
    x, u = rand(rng, 4, 3).astype(np.float32), rand(rng, 2, 3).astype(np.float32)
    idx = np.array([3], np.int32)  # wraps: rows 3 and 0
    dy = rand(rng, 4, 3)
    fn = lambda x, i, u: ops.dynamic_update(x, i, u, [0], [2], False)  # noqa: E731
    _, grads = run_graph(fn, x, idx, u, dys=[dy])

    def objective(x, u):
        return float(np.sum(dy.astype(np.float64) * run_graph(fn, x, idx, u)[0][0]))
    eps = 1e-2
    for k, arr in ((0, x), (2, u)):
        num = np.zeros_like(arr)
        for j in range(arr.size):
            plus, minus = arr.copy(), arr.copy()
            plus.flat[j] += eps
            minus.flat[j] -= eps
            args = [(plus if k == 0 else x, plus if k == 2 else u), (minus if k == 0 else x, minus if k == 2 else u)]
            num.flat[j] = (objective(*args[0]) - objective(*args[1])) / (2 * eps)
        np.testing.assert_allclose(grads[k], num, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [0, 1])
def test_scatter(axis, dtype, rng):
    x = rand(rng, 4, 5, dtype=dtype)
    shape = (2, 5) if axis == 0 else (4, 2)
    # Distinct positions per line along the axis, so no two values land in the same place.
    idx = np.stack([rng.permutation(x.shape[axis])[:2] for _ in range(shape[1 - axis])], 1 - axis).astype(np.int32)
    v = rand(rng, *shape, dtype=dtype)
    check(lambda x, i, v: ops.scatter(x, i, v, axis), lambda x, i, v: torch.scatter(x, axis, i, v), x, idx, v)


def test_scatter_ignores_out_of_range_indices(rng):
    x, v = rand(rng, 3, 2), rand(rng, 2, 2)
    idx = np.array([[5, 1], [0, -1]], np.int32)

    def ref(x, i, v):
        keep = (i >= 0) & (i < 3)
        out = torch.cat([x, torch.zeros(1, 2, dtype=x.dtype)])
        return torch.scatter(out, 0, torch.where(keep, i, 3), v)[:3]
    check(lambda x, i, v: ops.scatter(x, i, v), ref, x, idx, v)
    with pytest.raises(ValueError, match=r"indices 'i' \(2,\) and values 'v' \(2, 2\) float32 must share one shape"):
        build_error(lambda x, i, v: ops.scatter(x, i, v), spec((3, 2)), spec((2,), dtypes.int32), spec((2, 2)))
