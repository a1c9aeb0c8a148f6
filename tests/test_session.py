"""Session: host data shapes, host transfers, attachment, and reading/writing variables."""
import numpy as np
import pytest

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops

F32 = popxl.float32


def doubler(R=1, N=1, shape=(2, 3)):
    """A program that loads ``x`` N times per run (in a repeat) and stores ``2 * x`` each time."""
    ir = popxl.Ir(replication=R)
    ir.num_host_transfers = N
    with ir.main_graph:
        x = popxl.h2d_stream(shape, F32, "x")
        y = popxl.d2h_stream(shape, F32, "y")

        def step():
            ops.host_store(y, ops.host_load(x) * 2.0)
        ops.repeat(ir.create_graph(step), N)
    return ir, x, y


@pytest.mark.parametrize("N, R, host_shape", [(1, 1, (2, 3)), (4, 1, (4, 2, 3)), (1, 2, (2, 2, 3)),
                                              (4, 2, (4, 2, 2, 3))])
def test_host_arrays_are_transfers_then_replicas_then_stream_shape(N, R, host_shape):
    ir, x, y = doubler(R, N)
    data = np.arange(np.prod(host_shape), dtype=np.float32).reshape(host_shape)
    with popxl.Session(ir) as session:
        assert session.create_host_outputs()[y].shape == host_shape
        assert session.expected_inputs() == [x]
        out = session.run({x: data})
    np.testing.assert_array_equal(out[y], 2 * data)


def test_more_transfers_than_needed_are_accepted_and_outputs_fill_given_arrays():
    ir, x, y = doubler(R=2, N=3)
    data = np.random.default_rng(0).normal(size=(5, 2, 2, 3)).astype(np.float32)
    target = np.full((3, 2, 2, 3), -1.0, np.float32)
    with popxl.Session(ir) as session:
        assert session.run_with_outputs({x: data}, {y: target}) is None
    np.testing.assert_array_equal(target, 2 * data[:3])


def test_stream_loaded_more_often_than_num_host_transfers():
    ir, x, _ = doubler(N=3)
    ir.num_host_transfers = 2
    with popxl.Session(ir) as session, pytest.raises(ValueError, match="'x' was loaded more than "
                                                                      "ir.num_host_transfers=2 times"):
        session.run({x: np.zeros((2, 2, 3), np.float32)})


def test_all_ones_data_dims_pass_the_shape_check():
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        x = popxl.h2d_stream((1,), F32, "x")
        y = popxl.d2h_stream((1,), F32, "y")
        ops.host_store(y, ops.host_load(x) + 1.0)
    with popxl.Session(ir) as session:
        out = session.run({x: np.array([3.0, 4.0], np.float32)})  # (R,) for stream shape (1,)
    np.testing.assert_array_equal(out[y], [[4.0], [5.0]])


def test_input_errors_name_the_stream_and_shapes():
    ir, x, y = doubler(R=2, N=2)
    with ir.main_graph:
        unused = popxl.h2d_stream((3,), F32, "unused")
    good = np.zeros((2, 2, 2, 3), np.float32)
    with popxl.Session(ir) as session:
        assert session.expected_inputs() == [x]
        with pytest.raises(ValueError, match=r"Missing: 'x' \(2, 2, 2, 3\)"):
            session.run({})
        with pytest.raises(ValueError, match=r"Unexpected: 'unused' \(2, 2, 3\)"):
            session.run({x: good, unused: np.zeros((2, 2, 3), np.float32)})
        with pytest.raises(ValueError, match=r"Dimension 0 \(1\) for the array provided for input stream 'x' "
                                             r"\(shape \(1, 2, 2, 3\), expected \(2, 2, 2, 3\)\) is not large enough"):
            session.run({x: good[:1]})
        with pytest.raises(ValueError, match=r"Dimension 1 \(3\) for the array provided for input stream 'x' "
                                             r".* is the wrong size. It should be of size replication_factor = 2"):
            session.run({x: np.zeros((2, 3, 2, 3), np.float32)})
        with pytest.raises(ValueError, match=r"Shape mismatch for input stream 'x': stream shape = \(2, 3\), "
                                             r"therefore expected full global batch shape \(2, 2, 2, 3\). Got array "
                                             r"shape = \(2, 2, 3, 2\)"):
            session.run({x: np.zeros((2, 2, 3, 2), np.float32)})
        with pytest.raises(TypeError, match=r"input for stream 'x' \(2, 3\) float32 has dtype int32"):
            session.run({x: good.astype(np.int32)})
        with pytest.raises(ValueError, match=r"Dimension 1 \(3\) for the array provided for output stream 'y' \(shape \(2, 3\)"):
            session.run_with_outputs({x: good}, {y: np.zeros((2, 3), np.float32)})
        with pytest.raises(ValueError, match="Missing: 'y'"):
            session.run_with_outputs({x: good})
        with pytest.raises(TypeError, match="the array for output stream 'y' has dtype int32; it must be float32"):
            session.run_with_outputs({x: good}, {y: np.zeros((2, 2, 2, 3), np.int32)})
        # 64-bit data is sent as 32-bit, unless downcasting is off.
        np.testing.assert_array_equal(session.run({x: good.astype(np.float64) + 1})[y], 2 * good + 2)
        with pytest.raises(TypeError, match="has dtype float64"):
            session.run({x: good.astype(np.float64)}, downcast_inputs=False)


def test_streams_nothing_loads_or_stores_are_no_inputs_or_outputs():
    """As popxl's Ir.get_all_*_streams: only streams a host_load reads or a host_store writes count."""
    ir, x, y = doubler()
    with ir.main_graph:
        popxl.h2d_stream((3,), F32, "never_loaded")
        popxl.d2h_stream((3,), F32, "never_stored")
        z = popxl.d2h_stream((3,), F32, "stored_in_a_graph_never_called")
        ir.create_graph(lambda: ops.host_store(z, popxl.constant(np.zeros(3, np.float32))))
    assert ir.get_all_h2d_streams() == {x} and ir.get_all_d2h_streams() == {y, z}
    data = np.ones((2, 3), np.float32)
    with popxl.Session(ir) as session:  # the session's outputs are the IR's, as popxl's
        assert list(session.create_host_outputs()) == [y, z]
        assert list(session.run({x: data})) == [y, z]
        target = np.zeros((2, 3), np.float32)
        session.run_with_outputs({x: data}, {y: target, z: np.zeros(3, np.float32)})
    np.testing.assert_array_equal(target, 2 * data)


def test_a_scalar_stream_gives_an_array():
    ir = popxl.Ir()
    with ir.main_graph:
        x, y = popxl.h2d_stream((), F32, "x"), popxl.d2h_stream((), F32, "y")
        ops.host_store(y, ops.host_load(x) + 1.0)
    with popxl.Session(ir) as session:
        out = session.run({x: np.float32(3)})[y]
    assert isinstance(out, np.ndarray) and out.shape == () and out == 4


def test_streams_are_made_in_the_main_graph_only():
    ir = popxl.Ir()
    with ir.main_graph:
        for make in (popxl.h2d_stream, popxl.d2h_stream):
            with pytest.raises(ValueError, match=f"Can only call `{make.__name__}` in context of main graph"):
                ir.create_graph(lambda: make((2,), F32, "s"))


def test_in_sync_with_ipu_tells_whether_the_host_has_the_devices_value():
    ir = popxl.Ir()
    with ir.main_graph:
        counter = popxl.variable(np.zeros(2, np.float32), name="counter")
        read_only = popxl.variable(np.ones(2, np.float32), name="read_only")
        y = popxl.d2h_stream((2,), F32, "y")
        ops.var_updates.accumulate_(counter, read_only)
        ops.host_store(y, read_only + 0.0)
    session = popxl.Session(ir)
    with session:
        assert counter.in_sync_with_ipu and read_only.in_sync_with_ipu
        session.run()
        assert not counter.in_sync_with_ipu and read_only.in_sync_with_ipu
        np.testing.assert_array_equal(session.get_tensor_data(counter), [1, 1])  # reads the device: in sync again
        assert counter.in_sync_with_ipu
        session.run()
    assert counter.in_sync_with_ipu  # leaving the context copied the weights to the host


def test_running_needs_an_attached_session():
    ir, x, _ = doubler()
    session = popxl.Session(ir)
    assert not session.is_attached
    with pytest.raises(ValueError, match=r"Must be attached to device before calling a runtime function. Put the call \(Session.run\)"):
        session.run({x: np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"Must be attached to device .* \(Session.weights_to_host\)"):
        session.weights_to_host()
    with session:
        assert session.is_attached
        with session:  # nested: still attached after the inner exit
            pass
        assert session.is_attached
        session.run({x: np.zeros((2, 3), np.float32)})
    assert not session.is_attached


def _counter(weights_to_host_on_exit=True):
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.zeros(2, np.float32), name="v")
        ops.var_updates.accumulate_(v, popxl.constant(np.ones(2, np.float32)))
    return popxl.Session(ir, weights_to_host_on_exit=weights_to_host_on_exit), v


def test_weights_to_host_on_exit():
    session, v = _counter()
    with session:
        session.run()
        session.run()
    np.testing.assert_array_equal(session.get_tensor_data(v), [2, 2])

    session, v = _counter(weights_to_host_on_exit=False)
    with session:
        session.run()
        np.testing.assert_array_equal(session.get_tensor_data(v), [1, 1])  # attached: read from the device
    np.testing.assert_array_equal(session.get_tensor_data(v), [1, 1])  # get_tensor_data synced the host
    with session:
        session.run()
    np.testing.assert_array_equal(session.get_tensor_data(v), [1, 1])  # exit did not copy the second run back
    with session:  # entering copies the host value to the device again
        session.run()
        np.testing.assert_array_equal(session.get_tensor_data(v), [2, 2])


def test_write_variable_data_attached_and_detached():
    session, v = _counter()
    session.write_variable_data(v, np.array([5, 6], np.float32))  # host only until attached
    np.testing.assert_array_equal(session.get_tensor_data(v), [5, 6])
    with session:
        session.run()
        session.write_variable_data(v, np.array([10, 10], np.float32))
        np.testing.assert_array_equal(session.get_tensor_data(v), [10, 10])
        session.run()
    np.testing.assert_array_equal(session.get_tensor_data(v), [11, 11])


@pytest.mark.parametrize("R, stride, group_size, mode, read_shape", [
    (1, 1, None, None, (2,)), (4, 1, None, None, (2,)), (4, 1, 2, None, (2, 2)), (4, 2, 2, None, (2, 2)),
    (4, 1, 1, None, (4, 2)), (4, 1, None, "all_replicas", (4, 2)), (4, 2, 2, "all_replicas", (4, 2)),
    (4, 1, 1, "all_replicas", (4, 2))])
def test_variable_host_layout(R, stride, group_size, mode, read_shape):
    """get_tensor_data: one value per group (no group axis with one group), or one per replica."""
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        rg = ir.replica_grouping(stride, group_size)
        host = (rg.num_groups,) * (rg.num_groups > 1) + (2,)
        data = np.arange(np.prod(host), dtype=np.float32).reshape(host)
        v = popxl.variable(data, replica_grouping=rg, retrieval_mode=mode, name="v")
        assert v.shape == (2,) and v.shape_on_host == host and v.shape_on_replica == (2,)
        # Each replica adds its own replica index (read from the host) to its copy.
        index = popxl.h2d_stream((1,), F32, "index")
        ops.var_updates.accumulate_(v, ops.host_load(index) * popxl.constant(np.ones(2, np.float32)))
    per_replica = data.reshape(-1, 2)[rg.assignment] + np.arange(R, dtype=np.float32)[:, None]
    firsts = [rg.assignment.index(g) for g in range(rg.num_groups)]
    with popxl.Session(ir) as session:
        session.run({index: np.arange(R, dtype=np.float32).reshape((R,) * (R > 1) + (1,))})
        got = session.get_tensor_data(v)
    expected = per_replica if mode == "all_replicas" else per_replica[firsts]
    assert got.shape == read_shape
    np.testing.assert_array_equal(got, expected.reshape(read_shape))


def test_get_and_write_errors():
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        v = popxl.variable(np.zeros((2, 3), np.float32), name="v")
        c = popxl.constant(np.arange(3, dtype=np.int32), name="c")
        t = v + 1.0
        everyone = popxl.variable(np.zeros(3, np.float32), retrieval_mode="all_replicas", name="everyone")
        scalar = popxl.variable(np.float16(0), name="scalar")
    other = popxl.Ir()
    with other.main_graph:
        foreign = popxl.variable(np.zeros(1, np.float32), name="foreign")
    session = popxl.Session(ir)
    np.testing.assert_array_equal(session.get_tensor_data(c), [0, 1, 2])
    with pytest.raises(TypeError, match="is not of type Constant or Variable. get_tensor_data is not supported"):
        session.get_tensor_data(t)
    with pytest.raises(TypeError, match="^Tensor c__[0-9]+ is not of type Variable. write_variable_data is not supported"):
        session.write_variable_data(c, np.zeros(3, np.int32))
    with pytest.raises(TypeError, match=r"The dtype of the input array float64 must match the equivalent type of the tensor v__[0-9]+ : float32"):
        session.write_variable_data(v, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"The shape of the input array \(3, 2\) must match the shape of the tensor v__[0-9]+ : "
                                         r"\(2, 3\)"):
        session.write_variable_data(v, np.zeros((3, 2), np.float32))
    session.write_variable_data(scalar, 3)  # python numbers are cast to the variable's dtype...
    assert session.get_tensor_data(scalar).dtype == np.float16 and session.get_tensor_data(scalar) == 3
    with pytest.raises(ValueError, match=r"The shape of the input array \(\) must match the shape of the tensor v__[0-9]+ : \(2, 3\)"):
        session.write_variable_data(v, 3.0)  # ...but must still have the variable's shape
    with pytest.raises(NotImplementedError, match='with "all_replicas" retrieval mode'):
        session.write_variable_data(everyone, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="'foreign' belongs to another IR"):
        session.get_tensor_data(foreign)


def test_host_gets_values_as_stored_even_when_written_later():
    """run() hands over stored activations without copying; values written after their store, and
    variables, must still reach the host as they were at the store, and stay so after later runs."""
    x0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(x0, name="v")
        y = v * 2.0
        z = v + 0.0
        streams = [popxl.d2h_stream((2, 3), popxl.float32, name) for name in ("y", "v", "z")]
        ops.host_store(streams[0], y)
        ops.host_store(streams[1], v)
        ops.host_store(streams[2], z)
        ops.add_(y, popxl.constant(100.0))   # written after its store
        ops.var_updates.accumulate_(v, y)    # the variable changes after its store
    with popxl.Session(ir) as session:
        first = session.run()
        kept = {s: first[s].copy() for s in streams}
        second = session.run()
    np.testing.assert_array_equal(kept[streams[0]], x0 * 2)
    np.testing.assert_array_equal(kept[streams[1]], x0)
    np.testing.assert_array_equal(kept[streams[2]], x0)
    for s in streams:  # a later run does not change arrays an earlier one returned
        np.testing.assert_array_equal(first[s], kept[s])
    v1 = x0 + (x0 * 2 + 100)
    np.testing.assert_array_equal(second[streams[1]], v1)
    np.testing.assert_array_equal(second[streams[0]], v1 * 2)


@pytest.mark.parametrize("R", [1, 2])
def test_streams_storing_one_value_get_arrays_of_their_own(R):
    """One tensor (and a view of it) stored to three streams: run() returns three separate arrays, as
    popxl's one array per stream, so changing one leaves the others as stored."""
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        y = popxl.variable(np.arange(6, dtype=np.float32).reshape(2, 3), name="v") * 2.0
        values = (y, y, y[0], ops.transpose(y))
        streams = [popxl.d2h_stream(t.shape, F32, name) for t, name in zip(values, ("a", "b", "row", "t"))]
        for stream, t in zip(streams, values):
            ops.host_store(stream, t)
    with popxl.Session(ir) as session:
        out = session.run()
    for stream in streams[1:]:
        assert not np.shares_memory(out[streams[0]], out[stream])
        assert out[stream].flags.c_contiguous
    out[streams[0]][...] = -1.0
    value = np.arange(6, dtype=np.float32).reshape(2, 3) * 2
    expected = np.broadcast_to(value, (R, 2, 3)) if R > 1 else value
    np.testing.assert_array_equal(out[streams[1]], expected)
    np.testing.assert_array_equal(out[streams[2]], expected[..., 0, :])
    np.testing.assert_array_equal(out[streams[3]], np.swapaxes(expected, -1, -2))


def _counter_program(storage):
    """A program whose variable ``v`` (backed by ``storage``) is read out, then incremented in place."""
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.zeros(3, np.float32), name="v")
        popxl.back_variable(v, storage)
        out = popxl.d2h_stream((3,), popxl.float32, "out")
        ops.host_store(out, v + 0.0)
        ops.var_updates.accumulate_(v, popxl.constant(np.ones(3, np.float32)))
    return popxl.Session(ir), v, out


def test_back_variable_keeps_programs_in_one_memory():
    storage = np.full(3, 7.0, np.float32)
    first, v1, out1 = _counter_program(storage)  # the session takes the variable's data: zeros
    np.testing.assert_array_equal(storage, 0.0)
    second, v2, out2 = _counter_program(storage)
    with first, second:
        np.testing.assert_array_equal(first.run()[out1], [0, 0, 0])
        np.testing.assert_array_equal(second.run()[out2], [1, 1, 1])  # the first program's update
        np.testing.assert_array_equal(storage, 2.0)
        second.write_variable_data(v2, np.array([5, 6, 7], np.float32))
        np.testing.assert_array_equal(first.run()[out1], [5, 6, 7])
        np.testing.assert_array_equal(first.get_tensor_data(v1), [6, 7, 8])
    np.testing.assert_array_equal(storage, [6, 7, 8])  # leaving copied nothing back over it


def test_back_variable_checks_the_storage_and_the_variable():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.zeros((2, 3), np.float32), name="weight")
        with pytest.raises(ValueError, match=r"storage for 'weight'.*float32 array of shape \(2, 3\), got \(3, 2\)"):
            popxl.back_variable(v, np.zeros((3, 2), np.float32))
        with pytest.raises(ValueError, match="storage for 'weight'"):
            popxl.back_variable(v, np.zeros((2, 3), np.float64))
    replicated = popxl.Ir(replication=2)
    with replicated.main_graph:
        w = popxl.variable(np.zeros(3, np.float32), name="w")
        with pytest.raises(ValueError, match=r"'w' \(3,\) float32 has 2 replicas"):
            popxl.back_variable(w, np.zeros(3, np.float32))


def test_back_variable_copies_only_into_memory_it_is_not():
    storage = np.arange(6, dtype=np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        # Data overlapping the storage at an offset: copied in (numpy copies overlapping memory correctly).
        v = popxl.variable(np.zeros(6, np.float32), name="v")
        v._data = np.roll(storage, 1)[None]
        popxl.back_variable(v, storage)
    np.testing.assert_array_equal(storage, [5, 0, 1, 2, 3, 4])
    with popxl.Session(ir) as session:
        np.testing.assert_array_equal(session.get_tensor_data(v), [5, 0, 1, 2, 3, 4])


def test_one_irs_variables_must_not_share_storage():
    storage = np.zeros(4, np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        a = popxl.variable(np.zeros(2, np.float32), name="a")
        b = popxl.variable(np.zeros(2, np.float32), name="b")
        c = popxl.variable(np.zeros(2, np.float32), name="c")
        popxl.back_variable(a, storage[:2])
        popxl.back_variable(b, storage[2:])  # next to a: no overlap
        popxl.Session(ir)
        popxl.back_variable(c, storage[1:3])
    with pytest.raises(ValueError, match="overlapping storage"):
        popxl.Session(ir)


def test_a_session_made_before_back_variable_keeps_its_own_memory():
    storage = np.zeros(3, np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.ones(3, np.float32), name="v")
    session = popxl.Session(ir)
    popxl.back_variable(v, storage)
    with session:
        session.write_variable_data(v, np.full(3, 4.0, np.float32))
        np.testing.assert_array_equal(session.get_tensor_data(v), 4.0)
    np.testing.assert_array_equal(storage, 1.0)  # the data back_variable copied in, nothing since


def test_a_run_drops_each_value_after_its_last_use():
    """A value no later step reads is released before the next step runs (phased programs rely on it to
    hold one phase's activations at a time), and a step with several outputs or none runs in order."""
    import weakref

    import torch

    from gptj_popxl.popxl_cpu import custom_op

    made, alive_later = [], []

    class Twice(custom_op.CustomOp):
        name = "twice_recorded"

        @staticmethod
        def infer(x):
            return custom_op.spec(x.shape, x.dtype), custom_op.spec(x.shape, x.dtype)

        @staticmethod
        def kernel(x):
            a = x * 2
            made.append(weakref.ref(a))
            return a, x + 1

    class Check(custom_op.CustomOp):
        name = "check_released"

        @staticmethod
        def infer(x):
            return custom_op.spec(x.shape, x.dtype)

        @staticmethod
        def kernel(x):
            alive_later.append(made[-1]() is not None)
            return x * 3

    ir = popxl.Ir()
    with ir.main_graph:
        x = popxl.variable(np.arange(4, dtype=np.float32), name="x")
        doubled, plus_one = Twice.create(x)
        summed = doubled + plus_one  # the last use of doubled
        y = Check.create(summed)
        stream = popxl.d2h_stream(y.shape, y.dtype, "y")
        ops.host_store(stream, y)
    with popxl.Session(ir) as session:
        out = session.run()[stream]
    np.testing.assert_array_equal(out, (np.arange(4) * 3 + 1) * 3)
    assert alive_later == [False]
