"""Replica groupings and collectives, checked against per-replica numpy/torch references.

References compute groups from the closed form in popxl's docs (group of replica r is
``r % stride + stride * (r // (stride * group_size))``), independently of ReplicaGrouping.
"""
import numpy as np
import pytest
import torch

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops
from gptj_popxl.popxl_cpu.transforms import autodiff

F32 = popxl.float32
C = ops.collectives


def members(R, stride, group_size):
    """For each replica: the replicas of its group, ascending."""
    if group_size == 1:
        stride = 1
    group = [r % stride + stride * (r // (stride * group_size)) for r in range(R)]
    return [[s for s in range(R) if group[s] == group[r]] for r in range(R)]


def run(ir, inputs, outputs):
    """Stores ``outputs`` (main-graph tensors) to the host, runs once with ``inputs``; returns arrays."""
    with ir.main_graph:
        streams = []
        for i, t in enumerate(outputs):
            streams.append(popxl.d2h_stream(t.shape, t.dtype, name=f"out{i}"))
            ops.host_store(streams[-1], t)
    with popxl.Session(ir) as session:
        out = session.run(inputs)
    return [out[s].reshape((ir.replication_factor,) + t.shape) for s, t in zip(streams, outputs)]


def load(shape, dtype, name):
    stream = popxl.h2d_stream(shape, dtype, name)
    return stream, ops.host_load(stream)


# ------------------------------------------------------------------ replica groupings

@pytest.mark.parametrize("stride, group_size, assignment", [
    (1, 8, [0] * 8), (1, 1, list(range(8))), (1, 2, [0, 0, 1, 1, 2, 2, 3, 3]), (2, 2, [0, 1, 0, 1, 2, 3, 2, 3]),
    (1, 4, [0, 0, 0, 0, 1, 1, 1, 1]), (2, 4, [0, 1, 0, 1, 0, 1, 0, 1]), (4, 2, [0, 1, 2, 3, 0, 1, 2, 3]),
    (4, 1, list(range(8))), (8, None, list(range(8))), (2, None, [0, 1] * 4)])
def test_replica_grouping_assignment(stride, group_size, assignment):
    g = popxl.Ir(replication=8).replica_grouping(stride, group_size)
    assert g.assignment == assignment
    assert g.num_groups == len(set(assignment))
    assert g.group_size == 8 // g.num_groups
    assert g.stride == (1 if g.group_size == 1 else stride)
    assert g.is_const


@pytest.mark.parametrize("stride, group_size", [(0, 2), (3, 2), (9, 1), (1, 0), (1, 9), (1, 3), (4, 4)])
def test_replica_grouping_rejects_bad_layouts(stride, group_size):
    with pytest.raises(ValueError, match="replica grouping"):
        popxl.Ir(replication=8).replica_grouping(stride, group_size)


@pytest.mark.parametrize("R, stride, group_size", [(8, 1, 2), (8, 2, 4), (8, 2, 2), (8, 1, 8), (8, 1, 1),
                                                   (4, 2, 2), (16, 2, 4), (16, 4, 2)])
def test_transpose_takes_the_jth_member_of_every_group(R, stride, group_size):
    g = popxl.Ir(replication=R).replica_grouping(stride, group_size)
    t = g.transpose()
    groups = sorted({tuple(m) for m in members(R, stride, group_size)})
    expected = [[groups[k][j] for k in range(len(groups))] for j in range(group_size)]
    assert [sorted(r for r in range(R) if t.assignment[r] == j) for j in range(group_size)] == expected
    assert t.group_size == len(groups) and t.num_groups == group_size
    assert t.transpose() == g


def test_transpose_of_a_general_grouping_is_not_const():
    ir = popxl.Ir(replication=16)
    g = ir.replica_grouping(stride=2, group_size=2)  # groups {0,2},{1,3},{4,6},...
    t = g.transpose()
    # New group j holds member j of every old group: {0,1,4,5,8,9,12,13} and {2,3,6,7,...}.
    assert t.assignment == [0, 0, 1, 1] * 4
    assert not t.is_const
    with pytest.raises(ValueError, match="no single stride"):
        t.stride
    assert t.transpose() == g
    with ir.main_graph, pytest.raises(ValueError, match="replicated_all_reduce: collectives need"):
        C.replicated_all_reduce(popxl.variable(np.zeros(2, np.float32)), group=t)


def test_replica_grouping_from_assignments():
    ir = popxl.Ir(replication=8)
    assert ir.replica_grouping_from_assignments([0, 1, 0, 1, 2, 3, 2, 3]) == ir.replica_grouping(2, 2)
    assert ir.replica_grouping_from_assignments([0, 1, 0, 1, 2, 3, 2, 3]).is_const
    general = ir.replica_grouping_from_assignments([0, 0, 1, 1, 1, 1, 0, 0])
    assert not general.is_const and general.group_size == 4 and general.num_groups == 2
    assert general.groups() == [(0, 1, 6, 7), (2, 3, 4, 5)]
    with pytest.raises(ValueError, match="order of first appearance"):
        ir.replica_grouping_from_assignments([1, 1, 0, 0, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="equal sizes"):
        ir.replica_grouping_from_assignments([0, 0, 0, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="has 3 entries for 8"):
        ir.replica_grouping_from_assignments([0, 0, 0])


def test_variables_take_their_groups_value_with_a_general_grouping():
    ir = popxl.Ir(replication=4)
    g = ir.replica_grouping_from_assignments([0, 1, 1, 0])
    data = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    with ir.main_graph:
        v = popxl.variable(data, replica_grouping=g, retrieval_mode="all_replicas")
        (out,) = run(ir, {}, [v * 1.0])
    np.testing.assert_array_equal(out, data[[0, 1, 1, 0]])


# ------------------------------------------------------------------ forward values

def _reduce(op, xs):
    xs = np.stack(xs)
    return {"add": lambda: xs.sum(0), "mean": lambda: xs.mean(0), "mul": lambda: xs.mean(0),  # popxl maps "mul" to a mean
            "min": lambda: xs.min(0), "max": lambda: xs.max(0), "square_add": lambda: (xs * xs).sum(0),
            "and": lambda: xs.all(0), "or": lambda: xs.any(0)}[op]()


def _flat_chunk(value, k, n):
    flat = value.ravel()
    size = -(-flat.size // n)
    return np.pad(flat, (0, size * n - flat.size))[k * size:(k + 1) * size]


GROUPINGS = [(1, 1, None), (2, 1, None), (2, 1, 1), (4, 1, None), (4, 2, 2), (4, 1, 2), (4, 2, 1),
             (8, 1, None), (8, 2, 4), (8, 1, 2), (8, 4, 2), (8, 1, 4), (8, 2, 2)]


@pytest.mark.parametrize("into_memory", [False, True], ids=["fresh", "planned"])
@pytest.mark.parametrize("R, stride, group_size", GROUPINGS)
def test_collectives_match_per_replica_reference(R, stride, group_size, into_memory, request):
    """Every op, grouping and layout; "planned": each output that can be written into memory the plan
    gives it (``Primitive.lower_out``) is, whatever its size."""
    if into_memory:
        request.getfixturevalue("planned")
    rng = np.random.default_rng(R * 100 + stride * 10 + (group_size or 0))
    gs = group_size or R // stride
    peers = members(R, stride, gs)
    shape = (2 * gs, 3)
    x = rng.normal(size=(R,) + shape).astype(np.float32)
    flags = rng.random((R, 5)) > 0.4
    ints = rng.integers(-5, 5, size=(R, 3)).astype(np.int32)
    uints = rng.integers(0, 1000, size=(R, 3)).astype(np.uint32)
    ops_f = ["add", "mean", "mul", "min", "max", "square_add"]
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        group = ir.replica_grouping(stride, group_size)
        xs, xt = load(shape, F32, "x")
        bs, bt = load((5,), popxl.bool, "b")
        is_, it = load((3,), popxl.int32, "i")
        us, ut = load((3,), popxl.uint32, "u")  # computed on in int64: no planned memory of its own dtype
        outs = [C.replicated_all_reduce(xt, op, group) for op in ops_f]
        outs += [C.replicated_all_reduce(bt, "and", group), C.replicated_all_reduce(bt, "or", group),
                 C.replicated_all_reduce(it, "max", group)]
        inplace = ops.add(xt, 0.0)
        C.replicated_all_reduce_(inplace, "add", group)
        outs += [inplace,
                 C.replicated_all_gather(xt, axis=0, group=group), C.replicated_all_gather(xt, axis=1, group=group),
                 C.replicated_all_gather(xt, group=group, output_shape="new_axis"),
                 C.replicated_reduce_scatter(xt, "mean", group), C.replicated_reduce_scatter(xt, "max", group),
                 C.replicated_reduce_scatter(ut, "add", group), C.replicated_all_gather(ut, group=group),
                 C.replicated_reduce_scatter(xt, "add", group), C.replicated_reduce_scatter(it, "min", group),
                 C.replica_sharded_slice(it, group),
                 C.replicated_slice(xt, axis=0, group=group), C.replicated_slice(xt[:gs], axis=0, group=group)]
        # only a replica-sharded output (popxl's configure_output_for_replicated_tensor_sharding) has a meta shape
        assert outs[-4].meta_shape == () and outs[-3].meta_shape == (3,) and outs[-1].shape == (3,)
    got = run(ir, {xs: x.reshape((R,) * (R > 1) + shape), bs: flags.reshape((R,) * (R > 1) + (5,)),
                   is_: ints.reshape((R,) * (R > 1) + (3,)), us: uints.reshape((R,) * (R > 1) + (3,))}, outs)
    for r in range(R):
        p, k = peers[r], peers[r].index(r)
        expected = [_reduce(op, x[p]) for op in ops_f]
        expected += [_reduce("and", flags[p]), _reduce("or", flags[p]), _reduce("max", ints[p]), _reduce("add", x[p]),
                     np.concatenate(x[p], 0), np.concatenate(x[p], 1), x[p],
                     _flat_chunk(_reduce("mean", x[p]), k, gs), _flat_chunk(_reduce("max", x[p]), k, gs),
                     _flat_chunk(_reduce("add", uints[p]), k, gs), np.concatenate(uints[p], 0),
                     _flat_chunk(_reduce("add", x[p]), k, gs), _flat_chunk(_reduce("min", ints[p]), k, gs),
                     _flat_chunk(ints[r], k, gs), np.split(x[r], gs, 0)[k], x[r][k]]
        for i, (value, want) in enumerate(zip(got, expected)):
            np.testing.assert_allclose(value[r], want, rtol=1e-5, atol=1e-5, err_msg=f"output {i}, replica {r}")


def test_reduce_scatter_output_is_replica_sharded_only_when_configured():
    """As popxl: gathering a plain reduce-scatter's chunks concatenates them, padding included; a chunk
    configured for replicated tensor sharding reassembles the reduced tensor's shape."""
    R = 4
    x = np.random.default_rng(4).normal(size=(R, 5, 3)).astype(np.float32)  # 15 elements: padded chunks
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        xs, xt = load((5, 3), F32, "x")
        plain = C.replicated_all_gather(C.replicated_reduce_scatter(xt))
        sharded = C.replicated_all_gather(
            C.replicated_reduce_scatter(xt, configure_output_for_replicated_tensor_sharding=True))
        assert plain.shape == (16,) and sharded.shape == (5, 3)
    got_plain, got_sharded = run(ir, {xs: x}, [plain, sharded])
    total = x.sum(0)
    for r in range(R):
        np.testing.assert_allclose(got_plain[r], np.concatenate([total.reshape(-1), [0.0]]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_sharded[r], total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("into_memory", [False, True], ids=["fresh", "planned"])
@pytest.mark.parametrize("R, stride, group_size", [(4, 1, 2), (8, 2, 4), (8, 4, 2), (4, 2, 2)])
def test_sharded_all_gather_reassembles_meta_shape(R, stride, group_size, into_memory, request):
    """replica_sharded_slice then all_gather('auto' -> meta_shape) is the identity, padding included
    (planned as in ``test_collectives_match_per_replica_reference``)."""
    if into_memory:
        request.getfixturevalue("planned")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(R, 5, 3)).astype(np.float32)  # 15 elements: padded shards
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        group = ir.replica_grouping(stride, group_size)
        xs, xt = load((5, 3), F32, "x")
        shard = C.replica_sharded_slice(xt, group)
        assert shard.shape == (-(-15 // group_size),) and shard.meta_shape == (5, 3)
        full = C.replicated_all_gather(shard, group=group)
        concat = C.replicated_all_gather(shard, group=group, output_shape="concat")
    got_full, got_concat = run(ir, {xs: x}, [full, concat])
    peers = members(R, stride, group_size)
    for r in range(R):
        # Each replica rebuilds the value pieced together from its peers' own shards.
        want = np.concatenate([_flat_chunk(x[s], peers[r].index(s), group_size) for s in peers[r]])
        np.testing.assert_array_equal(got_concat[r], want)
        np.testing.assert_array_equal(got_full[r], want[:15].reshape(5, 3))


def test_tensor_parallel_pattern():
    """GPT-J's TP/DP layout: variables grouped by (stride=tp, group_size=dp), TP collectives over the transpose."""
    tp, dp = 2, 4
    R = tp * dp
    ir = popxl.Ir(replication=R)
    rng = np.random.default_rng(5)
    w = rng.normal(size=(tp, 3, 2)).astype(np.float32)  # one column shard of a (3, 2*tp) weight per TP rank
    x = rng.normal(size=(dp, 4, 3)).astype(np.float32)  # one batch per DP rank
    with ir.main_graph:
        rg = ir.replica_grouping(stride=tp, group_size=dp)
        assert rg.transpose() == ir.replica_grouping(stride=1, group_size=tp)
        wv = popxl.variable(w, replica_grouping=rg)
        xs, xt = load((4, 3), F32, "x")
        partial = C.replicated_all_gather(xt @ wv, axis=1, group=rg.transpose())
        total = C.replicated_all_reduce(ops.sum(xt @ wv), group=rg.transpose())
    batch = np.repeat(x, tp, axis=0)  # replica r works on DP batch r // tp
    got, got_total = run(ir, {xs: batch}, [partial, total])
    full_w = np.concatenate(list(w), axis=1)
    for r in range(R):
        np.testing.assert_allclose(got[r], x[r // tp] @ full_w, rtol=1e-5)
        np.testing.assert_allclose(got_total[r], (x[r // tp] @ full_w).sum(), rtol=1e-5)


def test_all_reduce_across_ipus():
    ir = popxl.Ir()
    with ir.main_graph:
        a, b = popxl.variable(np.array([1.0, 5.0], np.float32)), popxl.variable(np.array([3.0, 2.0], np.float32))
        added = C.all_reduce([a, b])
        maxed = C.all_reduce([a, b], ipus=[0, 1], op="max")
        same = C.all_reduce_identical_inputs([a, b])
        summed = C.all_reduce_identical_grad_inputs([a, b])
        with pytest.raises(ValueError, match="2 tensors but 1 ipus"):
            C.all_reduce([a, b], ipus=[0])
    got = run(ir, {}, added + maxed + same + summed)
    np.testing.assert_array_equal(np.stack([g[0] for g in got]),
                                  [[4, 7], [4, 7], [3, 5], [3, 5], [1, 5], [3, 2], [4, 7], [4, 7]])


# ------------------------------------------------------------------ gradients

def _gather_concat(values, peers, axis):
    return [torch.cat([values[s] for s in p], axis) for p in peers]


def _reduce_scatter(values, peers):
    out = []
    for r, p in enumerate(peers):
        flat = torch.stack([values[s] for s in p]).sum(0).reshape(-1)
        size = -(-flat.numel() // len(p))
        k = p.index(r)
        out.append(torch.nn.functional.pad(flat, (0, size * len(p) - flat.numel()))[k * size:(k + 1) * size])
    return out


def run_with_gradient(fn, R, stride, group_size, shape, seed):
    """Runs ``y = fn(x, group)`` and its gradient graph on random per-replica ``x`` and ``dy``;
    returns ``(x, dy, y, dx)`` as host arrays, each with a leading replica axis."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(R,) + shape).astype(np.float32)
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        group = ir.replica_grouping(stride, group_size)
        fwd = ir.create_graph(lambda x: fn(x, group), popxl.TensorSpec(shape, F32))
        info = autodiff(fwd)
        xs, xt = load(shape, F32, "x")
        site = ops.call_with_info(fwd, xt)
        y = site.outputs[0]
        dys, dyt = load(y.shape, F32, "dy")
        (dx,) = ops.call(info.graph, dyt, inputs_dict=info.inputs_dict(site))
    dy = rng.normal(size=(R,) + y.shape).astype(np.float32)
    got_y, got_dx = run(ir, {xs: x, dys: dy}, [y, dx])
    return x, dy, got_y, got_dx


@pytest.mark.parametrize("R, stride, group_size", [(4, 2, 2), (8, 2, 4), (8, 1, 2)])
@pytest.mark.parametrize("name", ["all_reduce", "all_reduce_mean", "all_reduce_", "all_gather", "reduce_scatter",
                                  "reduce_scatter_mean"])
def test_collective_gradients_match_torch(name, R, stride, group_size):
    """Gradient graphs against torch autograd of sum_r <y_r, dy_r> over all replicas."""
    shape = (group_size, 3)
    fns = {
        "all_reduce": (lambda x, g: C.replicated_all_reduce(x, "add", g),
                       lambda xs, p: [torch.stack([xs[s] for s in q]).sum(0) for q in p]),
        "all_reduce_mean": (lambda x, g: C.replicated_all_reduce(x, "mean", g),
                            lambda xs, p: [torch.stack([xs[s] for s in q]).mean(0) for q in p]),
        "all_reduce_": (lambda x, g: C.replicated_all_reduce_(x * 1.0, "add", g),
                        lambda xs, p: [torch.stack([xs[s] for s in q]).sum(0) for q in p]),
        "all_gather": (lambda x, g: C.replicated_all_gather(x, axis=1, group=g),
                       lambda xs, p: _gather_concat(xs, p, 1)),
        "reduce_scatter": (lambda x, g: C.replicated_reduce_scatter(x, "add", g), _reduce_scatter),
        "reduce_scatter_mean": (lambda x, g: C.replicated_reduce_scatter(x, "mean", g),
                                lambda xs, p: [y / len(p[0]) for y in _reduce_scatter(xs, p)]),
    }
    fn, reference = fns[name]
    x, dy, got_y, got_dx = run_with_gradient(fn, R, stride, group_size, shape, seed=11)
    peers = members(R, stride, group_size)
    xt_ = torch.tensor(x, requires_grad=True)
    ys = reference(list(xt_), peers)
    sum(torch.sum(y_r * torch.tensor(dy[r])) for r, y_r in enumerate(ys)).backward()
    np.testing.assert_allclose(got_y, torch.stack(ys).detach().numpy(), rtol=1e-5, atol=1e-6)
    if name == "all_gather":
        # PopART's rule (not the cross-replica derivative): replica r takes its own chunk of its own dy.
        want = [np.split(dy[r], group_size, axis=1)[q.index(r)] for r, q in enumerate(peers)]
        np.testing.assert_allclose(got_dx, np.stack(want), rtol=0, atol=0)
        return
    np.testing.assert_allclose(got_dx, xt_.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["replicated_slice", "replica_sharded_slice", "identical_inputs",
                                  "identical_grad_inputs"])
def test_gradients_that_assume_identical_values(name):
    """Slices' gradients gather the slices' gradients (popxl treats the input as equal on the group);
    the identical-inputs all-reduce is the identity forward and an all-reduce backward, and the
    identical-grad-inputs one the reverse."""
    from gptj_popxl.addons.ops import (replicated_all_reduce_identical_grad_inputs,
                                       replicated_all_reduce_identical_inputs)
    R, stride, group_size = 8, 2, 4
    shape = (group_size, 2)
    fns = {"replicated_slice": lambda x, g: C.replicated_slice(x, 0, g),
           "replica_sharded_slice": lambda x, g: C.replica_sharded_slice(x, g),
           "identical_inputs": lambda x, g: replicated_all_reduce_identical_inputs(x, "add", g),
           "identical_grad_inputs": lambda x, g: replicated_all_reduce_identical_grad_inputs(x, "add", g)}
    x, dy, got_y, got_dx = run_with_gradient(fns[name], R, stride, group_size, shape, seed=2)
    peers = members(R, stride, group_size)
    for r in range(R):
        p, k = peers[r], peers[r].index(r)
        gathered = np.concatenate([dy[s].reshape(-1) for s in p])[:x[r].size].reshape(shape)
        summed = dy[p].sum(0)
        expected_y, expected_dx = {
            "replicated_slice": (x[r][k], gathered),
            "replica_sharded_slice": (_flat_chunk(x[r], k, group_size), gathered),
            "identical_inputs": (x[r], summed),
            "identical_grad_inputs": (x[p].sum(0), dy[r])}[name]
        np.testing.assert_allclose(got_y[r], expected_y, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_dx[r], expected_dx, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ errors

def test_replication_factor_is_fixed_once_a_collective_is_built():
    """A collective's grouping is made for the replicas the IR has when it is built: setting the
    replication factor afterwards would leave it reducing over the old groups, so it is refused."""
    ir = popxl.Ir()
    with ir.main_graph:
        C.replicated_all_reduce(ops.host_load(popxl.h2d_stream((2,), F32, "x")))
    with pytest.raises(ValueError, match=r"before building ops over replica groups: replicated_all_reduce .* "
                                         r"was built for 1 replicas"):
        ir.replication_factor = 4
    assert ir.replication_factor == 1


def test_collective_errors_name_the_problem():
    ir = popxl.Ir(replication=4)
    other = popxl.Ir(replication=2).replica_grouping()
    with ir.main_graph:
        x = popxl.variable(np.zeros((6, 2), np.float32), name="x")
        with pytest.raises(ValueError, match="op 'sum' is not a collective op"):
            C.replicated_all_reduce(x, op="sum")
        with pytest.raises(ValueError, match="made for 2 replicas, the IR has 4"):
            C.replicated_all_gather(x, group=other)
        with pytest.raises(TypeError, match="group must be a ReplicaGrouping"):
            C.replicated_reduce_scatter(x, group=4)
        with pytest.raises(ValueError, match=r"axis 0 of \(6, 2\) \(size 6\) does not divide into replica "
                                             r"group size 4"):
            C.replicated_slice(x, axis=0)
        with pytest.raises(ValueError, match="output_shape='meta_shape' needs a tensor with a meta shape"):
            C.replicated_all_gather(x, output_shape="meta_shape")
        with pytest.raises(ValueError, match="output_shape must be one of"):
            C.replicated_all_gather(x, output_shape="stack")
        with pytest.raises(ValueError, match="cannot concatenate scalars"):
            C.replicated_all_gather(ops.sum(x))
        fwd = ir.create_graph(lambda t: C.replicated_all_reduce(t, "max"), x)
        with pytest.raises(NotImplementedError, match="op='max' has no gradient rule"):
            autodiff(fwd)
