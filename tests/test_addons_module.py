"""Module.build_grad / create_grad_graph (custom gradients) against torch, and the small addons helpers
(GraphCache, from_variable_factories, utils, debugging, patterns, 2D array munging) against numpy."""
import logging

import numpy as np
import pytest
import torch

from gptj_popxl import addons
from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.addons import array_munging as am
from gptj_popxl.addons import debugging, utils
from gptj_popxl.addons.graph_cache import GraphCache
from gptj_popxl.addons.patterns import apply_pre_alias_patterns
from gptj_popxl.popxl_cpu import ops

W = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], np.float32)


class FloorLinear(addons.Module):
    """``floor(x) @ w`` with a straight-through gradient for ``x`` (floor has none of its own)."""

    def build(self, x):
        w = self.add_variable_input("w", lambda: W, popxl.float32)
        fx = ops.floor(x)
        self.aux["fx"] = fx
        self.aux["w"] = w
        return fx @ w

    def build_grad(self, dy):
        self.var_grad["w"] = self.aux["fx"].T @ dy
        return dy @ self.aux["w"].T


class Outer(addons.Module):
    def build(self, x):
        (y,) = self.call_module(FloorLinear(), name="inner")(x)
        return ops.sum(y * y)


def torch_reference(x):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    ste = xt + (torch.floor(xt) - xt).detach()
    loss = ((ste @ wt) ** 2).sum()
    loss.backward()
    return loss.item(), xt.grad.numpy(), wt.grad.numpy()


def test_build_grad_is_used_by_autodiff_of_an_outer_module():
    x = np.array([[0.3, 1.7], [-1.2, 2.5], [0.9, -0.4]], np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        stream = popxl.h2d_stream(x.shape, popxl.float32, "x")
        xt = ops.host_load(stream)
        facts, fwd = Outer().create_graph(xt)
        grad = addons.autodiff(fwd)
        variables = facts.init()
        site = fwd.bind(variables).call_with_info(xt)
        dx, dw = grad.call(popxl.constant(1.0), args=grad.grad_graph_info.inputs_dict(site))
        outs = [addons.host_store(t) for t in (site.outputs[0], dx, dw)]
    with popxl.Session(ir) as session:
        got = session.run({stream: x})
    loss, ref_dx, ref_dw = torch_reference(x)
    np.testing.assert_allclose(got[outs[0]], loss, rtol=1e-5)
    np.testing.assert_allclose(got[outs[1]], ref_dx, rtol=1e-5)
    np.testing.assert_allclose(got[outs[2]], ref_dw, rtol=1e-5)


def test_create_grad_graph_info_and_errors():
    ir = popxl.Ir()
    with ir.main_graph:
        module = FloorLinear()
        assert module.implements_grad_graph and not addons.layers.Linear(2).implements_grad_graph
        with pytest.raises(RuntimeError, match="call_module"):
            module(popxl.constant(np.zeros((3, 2), np.float32)))
        facts, fwd = module.create_graph(popxl.TensorSpec((3, 2), popxl.float32))
        grad = fwd.autodiff()  # method "auto" -> build_grad
        info = grad.grad_graph_info
        assert info.forward_graph is fwd.graph and len(info.graph.outputs) == 2
        assert [c.connection_type.name for c in info.expected_inputs] == ["FwdGrad", "Fwd", "Fwd"]
        assert [t.name for t in info.outputs] == [fwd.graph.inputs[0].name, fwd.args.w.name]

        class Incomplete(FloorLinear):
            def build_grad(self, dy):
                return dy @ self.aux["w"].T  # var_grad["w"] missing
        _, fwd2 = Incomplete().create_graph(popxl.TensorSpec((3, 2), popxl.float32))
        with pytest.raises(ValueError, match="var_grad"):
            fwd2.autodiff(method="build_grad")
        with pytest.raises(ValueError, match="graph caching"):
            FloorLinear(cache=True)


def test_from_variable_factories_and_graph_cache():
    ir = popxl.Ir()
    with ir.main_graph:
        f = addons.VariableFactory(lambda: np.ones(3, np.float32), name="v")

        class UsesFactories(addons.Module):
            def build(self, x):
                self.inner = addons.Module.from_variable_factories([f, f])
                return x + self.inner[0] * self.inner[1]
        facts, graph = UsesFactories().create_graph(popxl.TensorSpec((3,), popxl.float32))
        assert sorted(facts.to_dict()) == ["inner.0", "inner.1"]
        assert len(graph.graph.inputs) == 3  # x and the two variables
        cache = GraphCache()
        fn = lambda x, scale: x * scale  # noqa: E731
        g1 = cache.create_graph(fn, popxl.TensorSpec((2,), popxl.float32), 2.0)
        assert cache.create_graph(fn, popxl.TensorSpec((2,), popxl.float32), 2.0) is g1
        assert cache.create_graph(fn, popxl.TensorSpec((3,), popxl.float32), 2.0) is not g1
        assert cache.create_graph(fn, popxl.TensorSpec((2,), popxl.float32), 3.0) is not g1


def test_utils(caplog):
    assert utils.duplicate_items([1, 2, 1, 3, 2]) == {1, 2}
    assert utils.suffix_graph_name("layer_subgraph(12)", "grad") == "layer_grad"
    assert utils.overrides(FloorLinear, addons.Module, "build_grad")
    assert not utils.overrides(addons.layers.Linear, addons.Module, "build_grad")
    d = utils.OrderedDict(a=1, b=2)
    assert d.idx(1) == 2
    with utils.null_context():
        pass
    with caplog.at_level(logging.INFO), utils.timer("Step", log_to_wandb=False):
        pass
    assert "Step duration" in caplog.text
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(np.zeros((2, 3), np.float32), name="v")
        weights = utils.WeightsDict({v: np.ones((2, 3), np.float32)})
        assert len(weights) == 1 and list(weights) == [v]
        with pytest.raises(ValueError, match="dtype"):
            weights[v] = np.ones((2, 3), np.float16)
        with pytest.raises(ValueError, match="shape"):
            weights[v] = np.ones((3, 2), np.float32)


def test_debugging_levels(monkeypatch, capfd):
    monkeypatch.setenv("MODEL_LOG_LEVEL", "INFO")
    ir = popxl.Ir()
    with ir.main_graph:
        t = popxl.constant(np.array([1.0, 2.0], np.float32))
        assert debugging.print_tensor(t, "hidden", level="DEBUG") is t
        shown = debugging.print_tensor(t, "shown", level="WARN")
        assert shown is not t
        out = addons.host_store(shown)
    with popxl.Session(ir) as session:
        np.testing.assert_array_equal(session.run()[out], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        debugging.print_text("x", level="LOUD")


def test_apply_pre_alias_patterns_accepts_levels():
    ir = popxl.Ir()
    for level in ("no_patterns", "minimal", "default", "all"):
        apply_pre_alias_patterns(ir, level)
    with pytest.raises(ValueError, match="level"):
        apply_pre_alias_patterns(ir, "most")


def test_2d_array_munging_and_tensor_parallel_output():
    x = np.arange(4 * 6).reshape(4, 6)
    s = am.shard2D(x, 2, 3, 0, 1)
    assert s.shape == (6, 2, 2)
    np.testing.assert_array_equal(s[1], x[:2, 2:4])  # axis_2's shards vary fastest
    np.testing.assert_array_equal(s[3], x[2:, :2])
    np.testing.assert_array_equal(am.unshard2D(s, 2, 3, 0, 1), x)
    assert [len(row) for row in am.split2D(x, 2, 3, 0, 1)] == [3, 3]
    data = np.arange(6 * 2).reshape(6, 2)  # 6 samples of shape (2,)
    tp, rf = 2, 4
    fed = am.tensor_parallel_input(data, tp, rf)  # (3 transfers, 4 replicas, 2)
    np.testing.assert_array_equal(am.tensor_parallel_output(fed, 3, tp, rf, (2,)), data)
    both = am.tensor_parallel_output(fed, 3, tp, rf, (2,), tp_identical=False)
    assert both.shape == (6, 2, 2)
    np.testing.assert_array_equal(am.tensor_parallel_output(fed, 3, tp, rf, (2,), true_num_host_transfers=2),
                                  data[:4])


def test_print_named_tensors_prints_values_when_the_program_runs(capsys):
    """As popxl-addons': a print op per tensor, titled by its dotted name; the printed tensors are returned."""
    ir = popxl.Ir()
    with ir.main_graph:
        nt = addons.NamedTensors.from_dict({"b.w": popxl.variable(np.float32([1.5, -2.0]), name="bw")})
        printed = addons.named_tensors.print_named_tensors(nt)
        out = popxl.d2h_stream((2,), popxl.float32, "out")
        ops.host_store(out, printed.b.w * 2.0)
    assert capsys.readouterr().err == ""
    with popxl.Session(ir) as session:
        np.testing.assert_array_equal(session.run()[out], [3.0, -4.0])
    assert "b.w: [ 1.5 -2. ]" in capsys.readouterr().err


def test_route_tensor_into_already_called_graphs():
    """A main-graph variable reaches a graph called (twice, in a repeat) from a graph called by main."""
    from gptj_popxl.addons.route_tensor import called_graph_paths, is_subgraph, route_tensor_into_graph
    ir = popxl.Ir()
    with ir.main_graph:
        counter = popxl.variable(np.zeros(2, np.float32), name="counter")
        inner = ir.create_empty_graph("inner")
        outer = ir.create_empty_graph("outer")
        with outer:
            ops.repeat(inner, 3)
        ops.call(outer)
        assert is_subgraph(ir.main_graph, inner) and not is_subgraph(inner, outer)
        assert called_graph_paths(ir.main_graph, inner) == {(ir.main_graph, outer, inner)}
        with inner:
            routed = route_tensor_into_graph(counter, modified=True)
            ops.var_updates.accumulate_(routed, popxl.constant(np.array([1.0, 2.0], np.float32)))
        assert route_tensor_into_graph(counter, inner) is routed
        with pytest.raises(ValueError, match="not in graph"):
            route_tensor_into_graph(routed, ir.main_graph)  # main does not lie below inner
    with popxl.Session(ir) as session:
        session.run()
        np.testing.assert_array_equal(session.get_tensor_data(counter), [3.0, 6.0])


def test_call_module_passes_keyword_tensors_in_the_signature_order():
    class Difference(addons.Module):
        def build(self, x, y):
            return x - y

    class Outer(addons.Module):
        def build(self, a, b):
            (d,) = self.call_module(Difference(), name="difference")(y=b, x=a)
            return d
    ir = popxl.Ir()
    with ir.main_graph:
        a = popxl.constant(np.array([10.0], np.float32))
        b = popxl.constant(np.array([1.0], np.float32))
        facts, graph = Outer().create_graph(a, b)
        (out,) = graph.bind(facts.init()).call(a, b)
        stream = addons.host_store(out)
    with popxl.Session(ir) as session:
        np.testing.assert_array_equal(session.run()[stream], [9.0])
