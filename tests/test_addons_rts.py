"""addons.rts: replica-sharded gather and reduce against numpy, with tensor x data parallel groupings.

Replication 4 as tp 2 x dp 2: the tensor-parallel groups are {0,1}, {2,3} and the data-parallel
groups {0,2}, {1,3}. A flat shard k of a tensor is elements ``[k*n, (k+1)*n)`` of its flattened,
zero-padded value; replica r holds the shard at its position within its shard group.
"""
import numpy as np
import pytest
from test_collectives import run

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl

R = 4
DP_GROUPS = [[0, 2], [1, 3]]
ALL = [[0, 1, 2, 3]]


def group_of(r, groups):
    return next(g for g in groups if r in g)


def flat_shard(x, k, n_shards):
    flat = x.reshape(-1)
    size = -(-flat.size // n_shards)
    flat = np.concatenate([flat, np.zeros(size * n_shards - flat.size, flat.dtype)])
    return flat[k * size:(k + 1) * size]


def groupings(ir):
    return {"dp": ir.replica_grouping(stride=2, group_size=2), "all": ir.replica_grouping()}


def test_replica_sharded_spec():
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        x = popxl.variable(np.zeros((3, 4), np.float32))
        odd = popxl.variable(np.zeros((5,), np.float32))
        dp, everyone = groupings(ir).values()
        assert addons.rts.replica_sharded_spec(x, dp) == popxl.TensorSpec((6,), popxl.float32, (3, 4))
        assert addons.rts.replica_sharded_spec(x, everyone) == popxl.TensorSpec((3,), popxl.float32, (3, 4))
        assert addons.rts.replica_sharded_spec(odd, dp) == odd.spec  # 5 elements do not shard over 2
        assert addons.rts.replica_sharded_spec(x, ir.replica_grouping(group_size=1)) == x.spec


@pytest.mark.parametrize("op", ["add", "mean"])
@pytest.mark.parametrize("shard", ["dp", "all"])
def test_reduce_then_gather_equals_numpy(op, shard, rng):
    """Reduce over dp, shard over ``shard``: reduce-scatter when they match, all-reduce + slice otherwise."""
    ir = popxl.Ir(replication=R)
    data = rng.normal(size=(R, 3, 4)).astype(np.float32)
    with ir.main_graph:
        g = groupings(ir)
        stream = popxl.h2d_stream((3, 4), popxl.float32, "x")
        x = ops.host_load(stream)
        shard_t = addons.reduce_replica_sharded_tensor(x, op, replica_group=g["dp"], shard_group=g[shard])
        assert shard_t.meta_shape == (3, 4)
        full = addons.gather_replica_sharded_tensor(shard_t, replica_group=g[shard])
    got_shard, got_full = run(ir, {stream: data}, [shard_t, full])
    shard_groups = DP_GROUPS if shard == "dp" else ALL
    for r in range(R):
        peers = group_of(r, DP_GROUPS)
        expected = data[peers].sum(0) if op == "add" else data[peers].mean(0)
        members = group_of(r, shard_groups)
        np.testing.assert_allclose(got_shard[r], flat_shard(expected, members.index(r), len(members)), rtol=1e-6)
        # The gathered value is the reduction of r's shard group's dp groups: with shard "all" each
        # replica contributes the shard of its own dp group's result.
        pieces = [flat_shard(data[group_of(m, DP_GROUPS)].sum(0) if op == "add" else
                             data[group_of(m, DP_GROUPS)].mean(0), i, len(members)) for i, m in enumerate(members)]
        np.testing.assert_allclose(got_full[r].reshape(-1), np.concatenate(pieces)[:12], rtol=1e-6)


def test_reduce_of_an_unshardable_tensor_is_an_all_reduce(rng):
    ir = popxl.Ir(replication=R)
    data = rng.normal(size=(R, 5)).astype(np.float32)
    with ir.main_graph:
        g = groupings(ir)
        stream = popxl.h2d_stream((5,), popxl.float32, "x")
        y = addons.reduce_replica_sharded_tensor(ops.host_load(stream), "add", replica_group=g["dp"])
        assert y.shape == (5,) and not y.meta_shape
    (got,) = run(ir, {stream: data}, [y])
    for r in range(R):
        np.testing.assert_allclose(got[r], data[group_of(r, DP_GROUPS)].sum(0), rtol=1e-6)


def test_graphs_gather_remote_shards_and_reduce_gradients(rng):
    """The graph forms, as a phase uses them: load shards of a weight from a replica-sharded remote
    buffer, all-gather them, then reduce-scatter a per-replica gradient over dp back to shards."""
    ir = popxl.Ir(replication=R)
    weight = rng.normal(size=(4, 2)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    grads = {"w": rng.normal(size=(R, 4, 2)).astype(np.float32), "b": rng.normal(size=(R, 3)).astype(np.float32)}
    with ir.main_graph:
        g = groupings(ir)
        w_buf = addons.create_remote_buffer(popxl.TensorSpec((4, 2), popxl.float32), 1, g["all"], 4)
        b_buf = popxl.remote_buffer((3,), popxl.float32, 1)
        popxl.remote_replica_sharded_variable(weight, w_buf, 0, name="w")
        popxl.remote_variable(bias, b_buf, 0, name="b")
        shards = addons.NamedTensors(w=ops.remote_load(w_buf, 0), b=ops.remote_load(b_buf, 0))
        assert shards.w.shape == (2,) and shards.w.meta_shape == (4, 2)
        groups = addons.NamedReplicaGrouping(w=g["all"], b=g["all"])
        gather, names = addons.all_gather_replica_sharded_graph(shards, replica_groups=groups)
        assert names == ["b", "w"]
        full = addons.NamedTensors.pack(names, gather.bind(shards).call())

        streams = {k: popxl.h2d_stream(v.shape[1:], popxl.float32, k) for k, v in grads.items()}
        loaded = addons.NamedTensors(**{k: ops.host_load(s) for k, s in streams.items()})
        reduce, names = addons.reduce_replica_sharded_graph(
            loaded, "add", shard_groups=addons.NamedReplicaGrouping(w=g["dp"], b=g["dp"]), replica_group=g["dp"])
        reduced = addons.NamedTensors.pack(names, reduce.bind(loaded).call())
        assert reduced.w.shape == (4,) and reduced.b.shape == (3,)  # 3 elements do not shard over 2
    got = run(ir, {streams[k]: v for k, v in grads.items()}, [full.w, full.b, reduced.w, reduced.b])
    for r in range(R):
        np.testing.assert_array_equal(got[0][r], weight)
        np.testing.assert_array_equal(got[1][r], bias)
        peers = group_of(r, DP_GROUPS)
        np.testing.assert_allclose(got[2][r], flat_shard(grads["w"][peers].sum(0), peers.index(r), 2), rtol=1e-6)
        np.testing.assert_allclose(got[3][r], grads["b"][peers].sum(0), rtol=1e-6)
