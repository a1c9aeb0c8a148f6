"""Building graphs (create_graph, inputs, outputs, captures, contexts) and the semantics of calls."""
import numpy as np
import pytest

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops
from ops_check import fetch, run_and_read

F32 = popxl.float32


def spec(*shape, dtype=F32):
    return popxl.TensorSpec(shape, dtype)


X = np.arange(6, dtype=np.float32).reshape(2, 3)


# ------------------------------------------------------------------ create_graph


def test_create_graph_with_specs_tensors_and_python_args():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(X, name="v")

        def fn(x, y, scale, shift=1.0):
            return x * scale + y + shift

        g = ir.create_graph(fn, spec(2, 3), v, 3.0, shift=2.0)
        assert [t.name for t in g.inputs] == ["x", "y"]
        assert [(t.shape, t.dtype) for t in g.inputs] == [((2, 3), F32)] * 2
        assert g.inputs_by_name["y"] is g.inputs[1]
        (y,) = ops.call(g, v, v)
    np.testing.assert_array_equal(fetch(ir, [y])[0], X * 3 + X + 2)


def test_create_graph_orders_inputs_as_the_signature():
    """popxl binds the arguments to the signature: keywords given in another order keep its order."""
    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(lambda x, y: x - y, y=spec(2), x=spec(2))
        assert [t.name for t in g.inputs] == ["x", "y"]
        (d,) = ops.call(g, popxl.constant(np.array([10, 10], np.float32)), popxl.constant(np.array([1, 2], np.float32)))
    np.testing.assert_array_equal(fetch(ir, [d])[0], [9, 8])


def test_create_graph_makes_inputs_of_tensor_spec_defaults():
    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(lambda x, bias=spec(2), scale=2.0: x * scale + bias, spec(2))
        assert [t.name for t in g.inputs] == ["x", "bias"]
        x = popxl.constant(np.array([1.0, 2.0], np.float32))
        bias = popxl.constant(np.array([0.5, -0.5], np.float32))
        (y,) = ops.call(g, x, bias)
    np.testing.assert_array_equal(fetch(ir, [y])[0], [2.5, 3.5])


def test_tensor_by_ref_on_sequences_and_varargs():
    """As popxl: List/Tuple[TensorByRef] and TensorByRef on *args/**kwargs make every such input by reference,
    so in-place writes reach the caller's tensors."""
    from typing import List
    ir = popxl.Ir()
    with ir.main_graph:
        vs = [popxl.variable(np.zeros(2, np.float32), name=f"v{i}") for i in range(6)]

        def in_list(xs: List[popxl.TensorByRef]):
            for x in xs:
                x += 1.0

        def in_varargs(*xs: popxl.TensorByRef):
            for x in xs:
                x += 1.0

        def in_kwargs(**xs: popxl.TensorByRef):
            for x in xs.values():
                x += 1.0
        for fn, args, kwargs in ((in_list, ([spec(2), spec(2)],), {}), (in_varargs, (spec(2), spec(2)), {}),
                                 (in_kwargs, (), dict(p=spec(2), q=spec(2)))):
            g = ir.create_graph(fn, *args, **kwargs)
            assert len(g._by_ref_inputs) == 2, fn.__name__
            first, second = vs[:2]
            ops.call(g, first, second)
            vs = vs[2:]
        assert [t.name for t in g.inputs] == ["p", "q"]
        # the hint that applies is the value's kind's: a bare TensorByRef does not reach into a list
        assert not ir.create_graph(lambda xs: None, [spec(2)])._by_ref_inputs

        def list_hinted(x: List[popxl.TensorByRef], xs: popxl.TensorByRef):
            pass
        assert not ir.create_graph(list_hinted, spec(2), [spec(2), spec(2)])._by_ref_inputs
    with popxl.Session(ir) as session:
        session.run()
        values = session.get_tensors_data(ir.main_graph.variables)
    assert all((v == 1).all() for v in values.values())


def test_an_input_given_twice_is_refused():
    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(lambda x, y: x + y, spec(2), spec(2))
        a = popxl.constant(np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="graph input 'x' is given twice, positionally and in inputs_dict"):
            ops.call(g, a, a, inputs_dict={g.inputs[0]: a})


def test_io_tile_exchange_puts_exchanges_on_io_tiles_and_verifies_their_overlap():
    ir = popxl.Ir()
    with ir.main_graph:
        s = popxl.h2d_stream((2,), F32, "s")
        with popxl.transforms.io_tile_exchange():
            x = ops.host_load(s)
        assert x.tile_set == "io"
        with pytest.raises(RuntimeError, match="More than one Op remained after io_tile_exchange: mul, add"):
            with popxl.transforms.io_tile_exchange():
                (ops.host_load(s) * 2.0) + 1.0
        with popxl.transforms.io_tile_exchange(verify_overlap=False):
            ops.host_load(s) * 2.0 + 1.0
        # init ops and ops made in other graphs are not the block's compute, as in popxl
        buffer = popxl.remote_buffer((2,), F32, 1)
        with popxl.transforms.io_tile_exchange():
            ops.remote_load_(buffer, 0, ops.init((2,), F32))
            ir.create_graph(lambda x: x * 2.0 + 1.0, spec(2))
            ops.host_load(s)
        with popxl.name_scope("a") as scopes, popxl.in_sequence(False) as mode, popxl.ipu(0) as ipu:
            assert (scopes, mode, ipu) == (["a"], False, 0)
        with popxl.in_sequence("pass") as passed, popxl.in_sequence(np.True_) as truthy:
            assert passed is None and truthy
        with pytest.raises(TypeError, match="in_sequence: mode must be a bool or 'pass', got None"):
            with popxl.in_sequence(None):
                pass


def test_create_graph_with_lists_of_specs():
    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(lambda xs, k: ops.concat(xs, axis=0) * k, [spec(1, 3), spec(1, 3)], spec(2, 3))
        assert [t.name for t in g.inputs] == ["xs_0", "xs_1", "k"]
        v = popxl.variable(X, name="v")
        (y,) = ops.call(g, [v[0:1], v[1:2]], v)
    np.testing.assert_array_equal(fetch(ir, [y])[0], X * X)
    with ir.main_graph, pytest.raises(TypeError, match="mixes tensors and other values"):
        ir.create_graph(lambda xs: xs[0], [spec(2), 3.0])


def test_create_graph_with_module_and_graph_inputs():
    class Scale(popxl.Module):
        def __init__(self, factor):
            self.factor = factor

        def build(self, x):
            bias = popxl.graph_input((3,), F32, "bias")
            y = x * self.factor + bias
            popxl.graph_output(y)
            popxl.graph_output(ops.sum(y))

    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(Scale(2.0), spec(2, 3))
        assert g.name == "Scale"
        assert [t.name for t in g.inputs] == ["x", "bias"]
        assert len(g.outputs) == 2
        v, b = popxl.variable(X, name="v"), popxl.variable(np.ones(3, np.float32), name="b")
        y, s = ops.call(g, v, b)
    y, s = fetch(ir, [y, s])
    np.testing.assert_array_equal(y, X * 2 + 1)
    assert s == (X * 2 + 1).sum()


def test_create_graph_rejects_non_tensor_outputs():
    ir = popxl.Ir()
    with ir.main_graph, pytest.raises(TypeError, match="must return tensors"):
        ir.create_graph(lambda x: 3.0, spec(2))


def test_enclosing_graph_tensors_are_captured_and_connected_at_call():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(X, name="v")
        w = popxl.variable(np.full(3, 2.0, np.float32), name="w")

        def outer(x):
            inner = ir.create_graph(lambda y: y * w + v, x)  # w and v from the main graph
            return ops.call(inner, x)[0] + v

        g = ir.create_graph(outer, spec(2, 3))
        assert [t.name for t in g.inputs] == ["x", "w", "v"]  # in order of first use
        (y,) = ops.call(g, v)
    np.testing.assert_array_equal(fetch(ir, [y])[0], X * 2 + X + X)


def test_graph_properties():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(X, name="v")
        inner = ir.create_graph(lambda x: x + popxl.constant(1.0, name="one"), spec(2, 3))

        def outer(x):
            return ops.call(inner, x)[0] * popxl.constant(2.0, name="two")

        g = ir.create_graph(outer, spec(2, 3))
        (y,) = ops.call(g, v)
    assert g.called_graphs == (inner,)
    assert ir.main_graph.called_graphs == (g,)
    assert [c.name for c in g.constants] == ["two"] and [c.name for c in inner.constants] == ["one"]
    assert ir.main_graph.variables == (v,) and g.variables == ()
    assert g.outputs[0].shape == (2, 3) and g.ir is ir and g.main_graph is ir.main_graph
    assert g.get_tensor(g.inputs[0].id) is g.inputs[0]
    with pytest.raises(KeyError, match="has no tensor"):
        g.get_tensor("nope")


def test_name_scope_ipu_io_tiles_in_sequence_are_recorded():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(X, name="v")
        with popxl.name_scope("layer"), popxl.name_scope("attn"):
            a = ops.gelu(v)
        with popxl.ipu(1):
            b = v + 1.0
        with popxl.io_tiles():
            c = v * 2.0
        with popxl.in_sequence():
            d = v - 1.0
        e = ops.tanh(v)
    assert a.name == "layer/attn/gelu" and a.scope == "layer/attn"
    assert (b.ipu, e.ipu) == (1, 0)
    assert (c.tile_set, e.tile_set) == ("io", "compute")
    assert d._producer.in_sequence and not e._producer.in_sequence
    with pytest.raises(ValueError, match="ipu must be >= 0"), popxl.ipu(-1):
        pass


# ------------------------------------------------------------------ errors


def test_tensor_of_an_unrelated_graph_is_rejected():
    ir = popxl.Ir()
    with ir.main_graph:
        g1 = ir.create_graph(lambda x: x * 2.0, spec(2))
        with pytest.raises(ValueError, match=r"'x' \(2,\) belongs to graph '<lambda>'"):
            ir.create_graph(lambda y: y + g1.inputs[0], spec(2))


def test_call_checks_input_shapes_and_dtypes():
    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(lambda x: x * 2.0, spec(2, 3))
        v = popxl.variable(np.zeros((3, 2), np.float32), name="v")
        k = popxl.variable(np.zeros((2, 3), np.int32), name="k")
        with pytest.raises(ValueError, match=r"input 'x' expects \(2, 3\) float32, got 'v' \(3, 2\) float32"):
            ops.call(g, v)
        with pytest.raises(ValueError, match=r"input 'x' expects \(2, 3\) float32, got 'k' \(2, 3\) int32"):
            ops.call(g, k)
        with pytest.raises(ValueError, match="2 inputs given, the graph has 1"):
            ops.call(g, v, v)
        with pytest.raises(ValueError, match=r"no tensor given for graph input 'x' \(2, 3\)"):
            ops.call(g)


def test_repeat_checks_carried_shapes_and_count():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.zeros(3, np.float32), name="v")
        bad = ir.create_graph(lambda x: ops.sum(x), spec(3))
        with pytest.raises(ValueError, match=r"output 0 'sum' \(\) float32 cannot feed input 0 'x' \(3,\) float32"):
            ops.repeat(bad, 2, v)
        good = ir.create_graph(lambda x: x + 1.0, spec(3))
        with pytest.raises(ValueError, match="repeat_count must be >= 0"):
            ops.repeat(good, -1, v)
        two = ir.create_graph(lambda: (popxl.constant(1.0), popxl.constant(2.0)))
        with pytest.raises(ValueError, match="2 outputs but only 0 inputs"):
            ops.repeat(two, 1)


def test_inputs_dict_and_python_values():
    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(lambda x, s: x * s, spec(2, 3), spec())
        v = popxl.variable(X, name="v")
        (y,) = ops.call(g, v, inputs_dict={g.inputs[1]: 0.5})
        with pytest.raises(ValueError, match="inputs_dict key .* is not an input"):
            ops.call(g, v, inputs_dict={v: v})
    np.testing.assert_array_equal(fetch(ir, [y])[0], X * 0.5)


# ------------------------------------------------------------------ in-place semantics of calls


def _write_input(x):
    ops.add_(x, popxl.constant(1.0))
    return x * 2.0


def test_subgraph_writing_its_input_leaves_the_parent_tensor_unless_modified():
    for mode in ("by_value", "set_parent_input_modified", "by_ref"):
        ir = popxl.Ir()
        with ir.main_graph:
            if mode == "by_ref":
                def fn():
                    x = popxl.graph_input((2, 3), F32, "x", by_ref=True)
                    return _write_input(x)
                g = ir.create_graph(fn)
            else:
                g = ir.create_graph(_write_input, spec(2, 3))
            v = popxl.variable(X, name="v")
            site = ops.call_with_info(g, v)
            if mode == "set_parent_input_modified":
                site.set_parent_input_modified(v)
            after = v * 1.0
        (y, after), (v_host,) = run_and_read(ir, [site.outputs[0], after], [v])
        expected_v = X if mode == "by_value" else X + 1
        np.testing.assert_array_equal(y, (X + 1) * 2)
        np.testing.assert_array_equal(after, expected_v, err_msg=mode)
        np.testing.assert_array_equal(v_host, expected_v, err_msg=mode)


def test_remote_load_written_in_a_nested_call_through_a_view_leaves_the_buffer():
    # A call counts a by-reference input as modified only where its graph writes it: here two calls
    # down, through a reshape alias. The loaded value is written, the buffer entry is not.
    ir = popxl.Ir()
    with ir.main_graph:
        def inner():
            x = popxl.graph_input((2, 3), F32, "x", by_ref=True)
            ops.add_(x.reshape_((6,)), popxl.constant(1.0))

        def outer():
            x = popxl.graph_input((2, 3), F32, "x", by_ref=True)
            ops.call(inner_graph, x)
            return x * 1.0

        inner_graph = ir.create_graph(inner)
        outer_graph = ir.create_graph(outer)
        buffer = popxl.remote_buffer((2, 3), F32, 1)
        ops.remote_store(buffer, 0, popxl.variable(X, name="v"))
        loaded = ops.remote_load(buffer, 0)
        (seen,) = ops.call(outer_graph, loaded)
        after = loaded * 1.0
        stored = ops.remote_load(buffer, 0) * 1.0
    (seen, after, stored), _ = run_and_read(ir, [seen, after, stored], [])
    np.testing.assert_array_equal(seen, X + 1)
    np.testing.assert_array_equal(after, X + 1)
    np.testing.assert_array_equal(stored, X)


def test_captured_tensor_written_in_place_changes_the_enclosing_tensor():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(X, name="v")
        g = ir.create_graph(lambda: ops.add_(v, popxl.constant(1.0)) * 1.0)
        ops.call(g)
        ops.call(g)
    _, (v_host,) = run_and_read(ir, [], [v])
    np.testing.assert_array_equal(v_host, X + 2)


def test_by_value_input_of_repeat_is_fresh_each_iteration():
    def body(h, k):
        ops.add_(k, popxl.constant(1.0))
        return h + k

    ir = popxl.Ir()
    with ir.main_graph:
        g = ir.create_graph(body, spec(3), spec(3))
        h = popxl.variable(np.zeros(3, np.float32), name="h")
        k = popxl.variable(np.zeros(3, np.float32), name="k")
        (y,) = ops.repeat(g, 3, h, k)
    (y,), (k_host,) = run_and_read(ir, [y], [k])
    np.testing.assert_array_equal(y, np.full(3, 3.0))
    np.testing.assert_array_equal(k_host, np.zeros(3))


def test_view_ops_copy_when_their_source_is_written():
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(X, name="v")
        r = ops.reshape(v, (3, 2))
        ops.add_(r, popxl.constant(10.0))      # writes the reshape's output only
        t = ops.transpose(v)                   # taken before v is written
        ops.add_(v, popxl.constant(1.0))
        c = popxl.constant(X, name="c")
        a = ops.reshape_(c, (3, 2))            # aliases c: writing a writes c
        ops.add_(a, popxl.constant(100.0))
        c_after = c * 1.0
    (r, t, c_after), (v_host,) = run_and_read(ir, [r, t, c_after], [v])
    np.testing.assert_array_equal(r, X.reshape(3, 2) + 10)
    np.testing.assert_array_equal(t, X.T)
    np.testing.assert_array_equal(v_host, X + 1)
    np.testing.assert_array_equal(c_after, X + 100)


def test_constant_written_in_place_restarts_each_run():
    ir = popxl.Ir()
    with ir.main_graph:
        c = popxl.constant(np.zeros(3, np.float32), name="c")
        y = ops.add_(c, popxl.constant(1.0)) * 1.0
    np.testing.assert_array_equal(fetch(ir, [y], runs=3)[0], np.ones(3))


def test_a_value_a_graph_returns_twice_comes_back_as_two_values():
    """Outputs sharing storage (one value twice, or a value and a view of it) are returned as separate
    values: writing one in place leaves the other (numpy's copies)."""
    for second in (lambda b: b, lambda b: ops.reshape(b, (16,))):
        ir = popxl.Ir()
        with ir.main_graph:
            x_stream = popxl.h2d_stream((4, 4), popxl.float32, "x")
            x = ops.host_load(x_stream)
            graph = ir.create_graph(lambda a: _twice(a, second), x)
            first, other = ops.call(graph, x)
            ops.add_(first, popxl.constant(1.0, popxl.float32))
            streams = [popxl.d2h_stream(t.shape, t.dtype, f"o{i}") for i, t in enumerate((first, other))]
            for stream, t in zip(streams, (first, other)):
                ops.host_store(stream, t)
        with popxl.Session(ir) as session:
            out = session.run({x_stream: np.ones((4, 4), np.float32)})
        np.testing.assert_array_equal(out[streams[0]], np.full((4, 4), 3.0, np.float32))
        np.testing.assert_array_equal(out[streams[1]].reshape(4, 4), np.full((4, 4), 2.0, np.float32))


def _twice(a, second):
    doubled = a * 2.0
    return doubled, second(doubled)
