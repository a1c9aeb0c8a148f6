"""Remote buffers, remote variables and replica-sharded variables, against numpy."""
import numpy as np
import pytest

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops

F32 = popxl.float32
C = ops.collectives


def store(t, name):
    stream = popxl.d2h_stream(t.shape, t.dtype, name=name)
    ops.host_store(stream, t)
    return stream


def groups_of(R, stride, group_size):
    """Replicas of each group (closed form from popxl's docs), groups in order of their first replica."""
    group = [r % stride + stride * (r // (stride * group_size)) for r in range(R)]
    return [[r for r in range(R) if group[r] == g] for g in range(R // group_size)]


# ------------------------------------------------------------------ remote buffers and remote variables

def test_remote_buffer_properties():
    ir = popxl.Ir()
    with ir.main_graph:
        a = popxl.remote_buffer((2, 3), F32, entries=4)
        b = popxl.remote_buffer((5,), popxl.int32)
        assert (a.remote_buffer_id, b.remote_buffer_id) == (1, 2)
        assert (a.tensor_shape, a.tensor_dtype, a.entries, a.meta_shape) == ((2, 3), F32, 4, ())
        a.entries = 6
        assert a.entries == 6
        with pytest.raises(ValueError, match="Entries must be a non-zero, positive integer"):
            popxl.remote_buffer((2,), F32, entries=0)


@pytest.mark.parametrize("R, stride, group_size", [(1, 1, None), (4, 1, None), (4, 1, 2), (4, 2, 2), (4, 1, 1)])
def test_remote_variables_load_compute_store_round_trip(R, stride, group_size):
    ir = popxl.Ir(replication=R)
    rng = np.random.default_rng(R)
    with ir.main_graph:
        rg = ir.replica_grouping(stride, group_size)
        host = (rg.num_groups,) * (rg.num_groups > 1) + (2, 3)
        data = [rng.normal(size=host).astype(np.float32) for _ in range(3)]
        buffer = popxl.remote_buffer((2, 3), F32, entries=3)
        vs = [popxl.remote_variable(d, buffer, i, replica_grouping=rg, name=f"v{i}") for i, d in enumerate(data)]
        assert vs[0].shape == (2, 3) and vs[0].shape_on_host == host
        loaded = ops.remote_load(buffer, 1)
        ops.remote_store(buffer, 2, loaded + 1.0)
        out = store(ops.remote_load(buffer, 0), "entry0")
    with popxl.Session(ir) as session:
        got = session.run()[out]
        after = session.get_tensors_data(vs)
        assignment = rg.assignment
        np.testing.assert_array_equal(got.reshape((R, 2, 3)), data[0].reshape((-1, 2, 3))[assignment])
        np.testing.assert_array_equal(after[vs[2]], data[1] + 1.0)  # entry 2 holds entry 1 + 1
        np.testing.assert_array_equal(after[vs[1]], data[1])
        session.write_variable_data(vs[0], data[2])
        np.testing.assert_array_equal(session.run()[out].reshape((R, 2, 3)), data[2].reshape((-1, 2, 3))[assignment])


def test_remote_load_with_tensor_offsets_per_replica():
    R = 2
    ir = popxl.Ir(replication=R)
    data = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    with ir.main_graph:
        buffer = popxl.remote_buffer((4,), F32, entries=3)
        for i in range(3):
            popxl.remote_variable(data[i], buffer, i)
        offsets = popxl.h2d_stream((), popxl.uint32, "offset")
        offset = ops.host_load(offsets)
        out = store(ops.remote_load(buffer, offset), "loaded")
        target = ops.init((4,), F32)
        loaded_inplace = ops.remote_load_(buffer, offset, target)
        out_inplace = store(target * 1.0, "target")
        assert loaded_inplace.shape == (4,)
        ops.remote_store(buffer, offset, target * 10.0)
        out_after = store(ops.remote_load(buffer, 2), "after")
    with popxl.Session(ir) as session:
        got = session.run({offsets: np.array([2, 0], np.uint32)})
        np.testing.assert_array_equal(got[out], data[[2, 0]])
        np.testing.assert_array_equal(got[out_inplace], data[[2, 0]])
        # Replica 0 wrote entry 2 after the stores, replica 1 wrote entry 0: replicas own their copies.
        np.testing.assert_array_equal(got[out_after], [data[2] * 10, data[2]])
        with pytest.raises(IndexError, match=r"entry 3 \(on replica 1\) is out of range for RemoteBuffer\[id=1: 3 "
                                             r"entries of \(4,\) float32\]"):
            session.run({offsets: np.array([1, 3], np.uint32)})


@pytest.mark.parametrize("R", [1, 2])
def test_loaded_values_keep_their_value_when_the_buffer_changes(R):
    """Loads may read the buffer's memory in place: a later store, an in-place update of the loaded
    value, a called graph's store or the next run must not show through the values already loaded."""
    ir = popxl.Ir(replication=R)
    data = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    with ir.main_graph, popxl.in_sequence(True):
        buffer = popxl.remote_buffer((2, 3), F32, entries=2)
        v = popxl.remote_variable(data, buffer, 0, name="v")
        popxl.remote_variable(data * 10, buffer, 1, name="w")

        def overwrite(x):
            ops.remote_store(buffer, 0, x)

        overwrite_graph = ir.create_graph(overwrite, popxl.TensorSpec((2, 3), F32))

        def load_overwrite_use():
            x = ops.remote_load(buffer, 0)
            ops.call(overwrite_graph, x * 0.0 + 7.0)
            return x + 0.0

        load_graph = ir.create_graph(load_overwrite_use)
        counter = popxl.remote_buffer((), F32)
        popxl.remote_variable(np.float32(3), counter, 0, name="counter")
        load_counter_graph = ir.create_graph(lambda: ops.remote_load(counter, 0))
        start = store(ops.remote_load(buffer, 0), "start")
        count, = ops.call(load_counter_graph)
        ops.remote_store(counter, 0, count + 1.0)
        count = store(count + 0.0, "count")
        before_store = ops.remote_load(buffer, 0)
        ops.remote_store(buffer, 0, before_store + 1.0)      # entry 0: data + 1
        kept = store(before_store, "kept")                   # still data
        updated = ops.remote_load(buffer, 1)
        ops.var_updates.accumulate_(updated, updated)        # in place on the loaded value only
        doubled = store(updated, "doubled")
        untouched = store(ops.remote_load(buffer, 1), "entry1")
        from_call = store(*ops.call(load_graph), "from_call")  # data + 1, then entry 0 becomes 7
        last = store(ops.remote_load(buffer, 0), "last")
        entry1 = popxl.constant(1, popxl.uint32, "entry1")
        stored_back = ops.remote_load(buffer, entry1)
        ops.var_updates.accumulate_(stored_back, stored_back)
        ops.remote_store(buffer, entry1, stored_back)        # entry 1 doubles every run
        after_store_back = store(ops.remote_load(buffer, 1), "after_store_back")
    with popxl.Session(ir) as session:
        first = session.run()
        second = session.run()
        reps = (R, 2, 3) if R > 1 else (2, 3)
        for n, (run, base) in enumerate(((first, data), (second, np.full((2, 3), 7.0, np.float32)))):
            np.testing.assert_array_equal(run[start], np.broadcast_to(base, reps))
            np.testing.assert_array_equal(run[count], np.full((R,) * (R > 1), 3.0 + n, np.float32))
            np.testing.assert_array_equal(run[kept], np.broadcast_to(base, reps))
            entry1_before = data * 10 * 2 ** n
            np.testing.assert_array_equal(run[doubled], np.broadcast_to(entry1_before * 2, reps))
            np.testing.assert_array_equal(run[untouched], np.broadcast_to(entry1_before, reps))
            np.testing.assert_array_equal(run[after_store_back], np.broadcast_to(entry1_before * 2, reps))
            np.testing.assert_array_equal(run[from_call], np.broadcast_to(base + 1, reps))
            np.testing.assert_array_equal(run[last], np.full(reps, 7.0, np.float32))
        np.testing.assert_array_equal(session.get_tensor_data(v), np.full((2, 3), 7.0, np.float32))


def test_loaded_values_updated_in_place_reach_only_the_entry_stored():
    ir = popxl.Ir()
    a, b = np.float32([1, 2]), np.float32([3, 5])
    with ir.main_graph, popxl.in_sequence(True):
        buffer = popxl.remote_buffer((2,), F32, entries=2)
        vs = [popxl.remote_variable(d, buffer, i, name=f"v{i}") for i, d in enumerate((a, b))]
        moved = ops.remote_load(buffer, 1)
        ops.var_updates.accumulate_(moved, moved)
        ops.remote_store(buffer, 0, moved)                   # entry 0: 2b; entry 1 keeps b
        entry1 = popxl.constant(1, popxl.uint32, "entry1")
        kept = ops.remote_load(buffer, entry1)
        ops.var_updates.accumulate_(kept, kept)
        ops.remote_store(buffer, entry1, kept)              # entry 1: 2b
        ops.var_updates.accumulate_(kept, kept)              # after the store: not in the buffer
        out = store(kept, "kept")
    with popxl.Session(ir) as session:
        np.testing.assert_array_equal(session.run()[out], 4 * b)
        got = session.get_tensors_data(vs)
        np.testing.assert_array_equal(got[vs[0]], 2 * b)
        np.testing.assert_array_equal(got[vs[1]], 2 * b)


@pytest.mark.parametrize("R", [1, 2])
def test_a_load_keeps_its_value_while_a_later_load_of_the_entry_is_updated_and_stored_back(R):
    """Two loads of one entry through one offset tensor: the second, updated in place and stored back
    (left in the buffer's memory), must not show through the first, read between update and store."""
    ir = popxl.Ir(replication=R)
    data = np.float32([1, 2, 3])
    with ir.main_graph, popxl.in_sequence(True):
        buffer = popxl.remote_buffer((3,), F32, entries=1)
        v = popxl.remote_variable(data, buffer, 0, name="v")
        offset = popxl.constant(np.uint32(0), popxl.uint32, name="offset")
        first = ops.remote_load(buffer, offset)
        second = ops.remote_load(buffer, offset)
        ops.var_updates.accumulate_(second, popxl.constant(np.ones(3, np.float32)))
        out = store(first * 2.0, "first")
        ops.remote_store(buffer, offset, second)
    with popxl.Session(ir) as session:
        for n in range(2):
            expected = np.broadcast_to((data + n) * 2, (R, 3) if R > 1 else (3,))
            np.testing.assert_array_equal(session.run()[out], expected)
        np.testing.assert_array_equal(session.get_tensor_data(v), data + 2)


def test_remote_errors_name_the_buffer():
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        buffer = popxl.remote_buffer((2, 3), F32, entries=2)
        with pytest.raises(ValueError, match=r"remote_load: entry 2 is out of range for RemoteBuffer\[id=1"):
            ops.remote_load(buffer, 2)
        with pytest.raises(ValueError, match=r"remote variable 'w': entry 5 is out of range"):
            popxl.remote_variable(np.zeros((2, 3), np.float32), buffer, 5, name="w")
        with pytest.raises(ValueError, match=r"tensor 'x' \(3, 2\) float32 does not match RemoteBuffer\[id=1: 2 "
                                             r"entries of \(2, 3\) float32\]"):
            ops.remote_store(buffer, 0, popxl.variable(np.zeros((3, 2), np.float32), name="x"))
        with pytest.raises(ValueError, match="does not match"):
            ops.remote_load_(buffer, 0, popxl.variable(np.zeros((2, 3), np.int32), name="i"))
        with pytest.raises(ValueError, match="offset must be a scalar integer tensor"):
            ops.remote_load(buffer, popxl.variable(np.zeros(2, np.int32)))
        remote = popxl.remote_variable(np.zeros((2, 3), np.float32), buffer, 0, name="remote")
        store(remote + 1.0, "bad")
    with pytest.raises(ValueError, match="remote variable 'remote' is used directly"):
        popxl.Session(ir)


# ------------------------------------------------------------------ replica-sharded variables

@pytest.mark.parametrize("R, stride, group_size, shard_over", [
    (2, 1, None, None), (4, 1, None, None), (4, 1, None, 2), (4, 2, 2, None), (8, 2, 4, None), (8, 2, 4, 2),
    (8, 1, 4, 2), (4, 1, 2, None)])
def test_replica_sharded_variable_round_trip(R, stride, group_size, shard_over):
    """The shard holds this replica's piece; all_gather over the shard group gives the full value;
    in-place updates of the shard persist and read back as the full variable."""
    ir = popxl.Ir(replication=R)
    rng = np.random.default_rng(R + stride)
    with ir.main_graph:
        rg = ir.replica_grouping(stride, group_size)
        n = shard_over or rg.group_size
        host = (rg.num_groups,) * (rg.num_groups > 1) + (5, 3)  # 15 elements: the last shard is padded
        data = rng.normal(size=host).astype(np.float32)
        var, shard = popxl.replica_sharded_variable(data, replica_grouping=rg, shard_over=shard_over, name="w")
        assert var.shape == (5, 3) and var.shape_on_host == host
        assert shard.shape == (-(-15 // n),) and shard.meta_shape == (5, 3) and shard.name == "w_rts"
        shard_group = ir.replica_grouping(stride, n)  # blocks of n consecutive members of each group
        full = C.replicated_all_gather(shard, group=shard_group)
        out_shard, out_full = store(shard * 1.0, "shard"), store(full, "full")
        ops.var_updates.accumulate_(shard, shard, 2.0)  # shard *= 3, persists between runs
    per_group = data.reshape((-1, 5, 3))
    assignment = rg.assignment
    with popxl.Session(ir) as session:
        got = session.run()
        np.testing.assert_array_equal(got[out_full], per_group[assignment])
        for members in groups_of(R, stride, rg.group_size):
            for r in members:
                k = members.index(r) % n
                flat = np.pad(per_group[assignment[r]].ravel(), (0, shard.shape[0] * n - 15))
                np.testing.assert_array_equal(got[out_shard][r], flat[k * shard.shape[0]:(k + 1) * shard.shape[0]])
        np.testing.assert_allclose(session.get_tensor_data(var), data * 3, rtol=1e-6)
        session.run()
        np.testing.assert_allclose(session.get_tensor_data(var), data * 9, rtol=1e-6)
        session.write_variable_data(var, data)
        np.testing.assert_array_equal(session.run()[out_full], per_group[assignment])


def test_remote_replica_sharded_variables_in_a_multi_entry_buffer():
    """Phased-execution pattern: load a layer's shard, gather, compute, reduce-scatter, store."""
    R, layers = 4, 3
    ir = popxl.Ir(replication=R)
    rng = np.random.default_rng(1)
    data = [rng.normal(size=(2, 5)).astype(np.float32) for _ in range(layers)]
    with ir.main_graph:
        buffer = popxl.replica_sharded_buffer((2, 5), F32, entries=layers)
        assert buffer.tensor_shape == (3,) and buffer.meta_shape == (2, 5)
        vs = [popxl.remote_replica_sharded_variable(d, buffer, i, name=f"layer{i}") for i, d in enumerate(data)]
        shard = ops.remote_load(buffer, 1)
        assert shard.meta_shape == (2, 5)
        full = C.replicated_all_gather(shard)
        # Every replica holds the same full value, so the reduce-scatter sums R equal halves.
        updated = C.replicated_reduce_scatter(full * 0.5, configure_output_for_replicated_tensor_sharding=True)
        ops.remote_store(buffer, 1, updated)
        out_full = store(full, "full")
    with popxl.Session(ir) as session:
        np.testing.assert_array_equal(session.run()[out_full], np.stack([data[1]] * R))
        got = session.get_tensors_data(vs)
    np.testing.assert_allclose(got[vs[1]], data[1] * 0.5 * R, rtol=1e-6)
    np.testing.assert_array_equal(got[vs[0]], data[0])
    np.testing.assert_array_equal(got[vs[2]], data[2])


def test_replica_sharded_errors():
    with popxl.Ir(replication=1).main_graph, pytest.raises(ValueError, match="need more than one replica"):
        popxl.replica_sharded_variable(np.zeros(4, np.float32))
    ir = popxl.Ir(replication=4)
    with ir.main_graph:
        with pytest.raises(ValueError, match="shard_over=3 must divide the replica group size 4"):
            popxl.replica_sharded_buffer((4,), F32, shard_over=3)
        buffer = popxl.replica_sharded_buffer((4, 2), F32)
        with pytest.raises(ValueError, match=r"buffer's meta_shape is \(4, 2\)"):
            popxl.remote_replica_sharded_variable(np.zeros((2, 4), np.float32), buffer)
        with pytest.raises(ValueError, match=r"variable: its replica grouping has 2 groups, so its data must be "
                                             r"shaped \(2, \*shape\); got \(3, 2\)"):
            popxl.variable(np.zeros((3, 2), np.float32), replica_grouping=ir.replica_grouping(1, 2))
        plain = popxl.remote_buffer((3,), F32)
        with pytest.raises(ValueError, match=r"\(2,\) \(as 4 shards of \(2, 3\)\) float32 does not match"):
            popxl.remote_replica_sharded_variable(np.zeros((2, 3), np.float32), plain)

        def make_variable_in_subgraph():
            popxl.variable(np.zeros(2, np.float32), name="inner")
        with pytest.raises(ValueError, match="You cannot initialise a variable tensor within a graph"):
            ir.create_graph(make_variable_in_subgraph)
