"""gptj_popxl.addons: named trees, modules and graphs, layers, the TP all-reduce pair, the sharded
cross entropy, the Adam step, remote buffers, gradient accumulation and array munging.

References: torch (layers, losses, optimiser), numpy (collectives, munging).
"""
import math
from functools import partial

import numpy as np
import pytest
import torch

from gptj_popxl import addons
from gptj_popxl.addons.layers._init import truncated_normal
from gptj_popxl.addons.array_munging import (pad_axis, repeat, repeat_shard, shard, squeeze_safe, tensor_parallel_input,
                                             unshard)
from gptj_popxl.backend import ops, popxl

F32 = popxl.float32
TP_IN = addons.ops.replicated_all_reduce_identical_inputs
TP_OUT = addons.ops.replicated_all_reduce_identical_grad_inputs


def fetch(ir, named, weights=None):
    """Stores the main-graph tensors ``named`` ({name: tensor}), writes ``weights`` ({variable: data})
    and runs ``ir`` once; returns the stored values by name."""
    with ir.main_graph:
        streams = {}
        for k, t in named.items():
            streams[k] = popxl.d2h_stream(t.shape, t.dtype, name=k)
            ops.host_store(streams[k], t)
    with popxl.Session(ir) as session:
        session.write_variables_data(weights or {})
        out = session.run()
    return {k: out[s] for k, s in streams.items()}


def fwd_and_grad(graph, inputs, dys, args=None):
    """Calls ``graph`` (GraphWithNamedArgs) on ``inputs`` and its gradient graph on ``dys``.

    Returns (outputs, {forward input: gradient}) as main-graph tensors.
    """
    n_out = len(graph.graph.outputs)
    grad = graph.autodiff()
    info = graph.bind(args).call_with_info(*inputs)
    grads = grad.call(*dys, args=grad.grad_graph_info.inputs_dict(info))
    by_input = {c.fwd_tensor: g for c, g in zip(grad.grad_graph_info.expected_outputs, grads)}
    return info.outputs[:n_out], by_input


def per_replica(data, ir):
    """A variable holding ``data[r]`` on replica ``r``."""
    if ir.replication_factor == 1:
        return popxl.variable(data[0])
    return popxl.variable(data, replica_grouping=ir.replica_grouping(group_size=1))


def tp_groupings(ir, tp):
    """(sharded variable grouping, TP collective grouping) for ``tp`` shards: replica r holds shard r % tp."""
    sharded = ir.replica_grouping(stride=tp, group_size=ir.replication_factor // tp)
    return sharded, sharded.transpose()


# ------------------------------------------------------------------ DotTree / NamedTensors


def test_dot_tree_names_nesting_and_serialisation():
    t = addons.DotTree(b=1)
    t.insert("a.x", 2)
    t.insert("a.y.0", 3)
    t.insert(1, 4)
    assert t.a.x == 2 and t["a"]["y"][0] == 3 and t.get("a.y.0") == 3 and t[1] == 4 and t[-1] == 4
    assert t.to_dict() == {"b": 1, "a.x": 2, "a.y.0": 3, "1": 4}
    assert t.keys() == ["b", "a", "1"] and t.keys_flat() == ["b", "a.x", "a.y.0", "1"]
    assert t.len() == 3 and t.len_flat() == 4 and t.values_flat() == [1, 2, 3, 4]
    names, values = t.unpack()
    assert names == ("1", "a.x", "a.y.0", "b") and values == (4, 2, 3, 1)
    assert addons.DotTree.pack(names, values).to_dict() == dict(zip(names, values))
    with pytest.raises(ValueError, match="pack: 4 keys for 3 values"):
        addons.DotTree.pack(names, values[:3])
    assert addons.DotTree.from_dict(t.to_dict()).to_dict() == t.to_dict()
    assert t.map(lambda v: v * 10).to_dict() == {"b": 10, "a.x": 20, "a.y.0": 30, "1": 40}
    assert t.to_mapping(t.map(str)) == {1: "1", 2: "2", 3: "3", 4: "4"}
    assert t.filter_keys(["a"]).to_dict() == {"a.x": 2, "a.y.0": 3}
    c = t.copy()
    c.insert("a.z", 5)
    assert "a.z" not in t and "a.z" in c
    u = addons.DotTree(b=9, c=8)
    with pytest.raises(ValueError, match="'b' already exists"):
        t.update(u)
    t.update(u, overwrite=True)
    assert t.b == 9 and t.c == 8
    with pytest.raises(ValueError, match="not a valid key"):
        t.insert("bad-name", 0)
    with pytest.raises(AttributeError, match="no key or attribute 'nope'"):
        t.nope


def test_named_tensors_sorts_tensors_by_name_and_remaps():
    ir = popxl.Ir()
    with ir.main_graph:
        a = popxl.variable(np.zeros(2, np.float32), name="zz")
        b = popxl.variable(np.zeros(3, np.float32), name="aa")
        nt = addons.NamedTensors.from_dict({"first": a, "second.x": b})
        assert nt.tensors == (b, a) and nt.named_tensors == {"first": a, "second.x": b}
        assert nt.variables == (b, a)
        assert nt.remap({a: b, b: a}).to_dict() == {"first": b, "second.x": a}


# ------------------------------------------------------------------ modules, graphs, factories


class Inner(addons.Module):
    def build(self, x):
        w = self.add_variable_input("w", lambda: np.full(x.shape[-1:], 2.0, np.float32))
        return x * w


class Outer(addons.Module):
    def __init__(self):
        super().__init__()
        self.first = Inner()
        self.second = Inner()

    def build(self, x, scale: float):
        y = self.second(self.first(x)) * scale
        b = self.add_variable_input("b", partial(np.ones, x.shape[-1:], np.float32))
        return y + b


def test_create_graph_names_sub_module_variables_and_scopes():
    ir = popxl.Ir()
    with ir.main_graph:
        x = popxl.variable(np.arange(3, dtype=np.float32), name="x")
        module = Outer()
        facts, graph = module.create_graph(x, 3.0)
        assert sorted(facts.to_dict()) == ["b", "first.w", "second.w"]
        assert graph.args.first.w.name == "first/w" and graph.args.b.name == "b"
        assert [t.name for t in graph.graph.inputs] == ["x", "first/w", "second/w", "b"]
        # The module keeps no state: a second graph gets its own inputs.
        facts2, graph2 = module.create_graph(x, 3.0)
        assert graph2.graph is not graph.graph and graph2.args.first.w is not graph.args.first.w
        variables = facts.init("outer")
        assert variables.first.w.name == "outer.first.w"
        (y,) = graph.bind(variables).call(x)
        (y2,) = graph2.call(x, args={graph2.args.b: variables.b, graph2.args.first.w: variables.first.w,
                                     graph2.args.second.w: variables.second.w})
    out = fetch(ir, {"y": y, "y2": y2})
    np.testing.assert_allclose(out["y"], np.arange(3) * 4 * 3 + 1)
    np.testing.assert_allclose(out["y2"], out["y"])


def test_call_module_outlines_sub_graphs_and_their_gradients():
    class Caller(addons.Module):
        def build(self, x):
            (y,) = self.call_module(Inner(), name="inner", autodiff="autodiff")(x)
            (z,) = self.call_module(Inner())(y)
            return z

    x_np = np.array([1.0, -3.0], np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        x = popxl.variable(x_np)
        facts, graph = Caller().create_graph(x)
        assert sorted(facts.to_dict()) == ["Inner.w", "inner.w"]
        assert sum(op.prim.name == "call" for op in graph.graph._ops) == 2
        assert len(graph.called_graphs_grad_info) == 1  # the gradient graph made for "inner"
        variables = facts.init()
        (y,), grads = fwd_and_grad(graph, [x], [popxl.constant(np.ones(2, np.float32))], variables)
        dx, dw_inner = grads[graph.graph.inputs[0]], grads[graph.args.inner.w]
        with pytest.raises(RuntimeError, match="already differentiated"):
            graph.autodiff()
    out = fetch(ir, {"y": y, "dx": dx, "dw": dw_inner})
    np.testing.assert_allclose(out["y"], x_np * 4)  # both weights start at 2
    np.testing.assert_allclose(out["dx"], [4.0, 4.0])
    np.testing.assert_allclose(out["dw"], x_np * 2)


def test_module_cache_reuses_the_graph_for_equal_specs():
    ir = popxl.Ir()
    with ir.main_graph:
        module = Inner(cache=True)
        f1, g1 = module.create_graph(popxl.TensorSpec((2,), F32))
        f2, g2 = module.create_graph(popxl.TensorSpec((2,), F32))
        f3, g3 = module.create_graph(popxl.TensorSpec((3,), F32))
        assert g1.graph is g2.graph and g3.graph is not g1.graph
        assert f2.w.shape == (2,) and f3.w.shape == (3,)


def test_duplicate_variable_input_name_is_an_error():
    class Twice(addons.Module):
        def build(self, x):
            self.add_variable_input("w", lambda: np.zeros(2, np.float32))
            self.add_variable_input("w", lambda: np.zeros(2, np.float32))
            return x

    ir = popxl.Ir()
    with ir.main_graph, pytest.raises(ValueError, match="'w' already exists"):
        Twice().create_graph(popxl.TensorSpec((2,), F32))


def test_variable_factory_draws_once_per_replica_group_in_sorted_order():
    draws = iter(np.arange(100, dtype=np.float32))
    ir = popxl.Ir(replication=4)
    with ir.main_graph:
        rg = ir.replica_grouping(stride=2, group_size=2)  # 2 groups: replicas {0, 2} and {1, 3}
        facts = addons.NamedVariableFactories(
            b=addons.VariableFactory(lambda: np.array([next(draws)]), F32, "b", replica_grouping=rg),
            a=addons.VariableFactory(lambda: np.array([next(draws)]), F32, "a"))
        # Each callable was called once to learn the shape: draws 0 (b) and 1 (a).
        assert facts.a.shape == (1,) and facts.a.replica_grouping.num_groups == 1
        v = facts.init()  # sorted: a draws 2; b draws 3 and 4 (one per group)
        assert v.b.shape == (1,) and v.b.shape_on_host == (2, 1)
        zeros = facts.init_zero()
        assert zeros.b.shape == (1,)
        y = v.b + zeros.b
    out = fetch(ir, {"y": y})
    np.testing.assert_array_equal(out["y"][:, 0], [3, 4, 3, 4])
    with popxl.Session(ir) as s:
        np.testing.assert_array_equal(s.get_tensor_data(v.a), [2])


def test_variable_factory_from_an_iterable_and_bad_data():
    ir = popxl.Ir()
    with ir.main_graph:
        f = addons.VariableFactory(iter([np.zeros(2), np.ones(2)]), F32, "w")
        assert f.create_tensor().shape == (2,)
        assert f.create_tensor().shape == (2,)
        with pytest.raises(ValueError, match="ran out of data"):
            f.create_tensor()
        with pytest.raises(TypeError, match="numpy array, torch tensor or scalar"):
            addons.VariableFactory(lambda: [1, 2], F32, "w")


def test_linear_weights_are_drawn_from_a_normal_truncated_at_two_deviations():
    """As popxl-addons' Linear: N(0, 0.02) cut at +-2 standard deviations, whose standard deviation is
    0.02 * sqrt(1 - 2 * 2 * phi(2) / (2 * Phi(2) - 1))."""
    ir = popxl.Ir()
    with ir.main_graph:
        facts, graph = addons.layers.Linear(512).create_graph(popxl.TensorSpec((2, 256), F32))
        embedding = addons.layers.Embedding(F32, 10, 4)
        embedding.create_graph(popxl.TensorSpec((2,), popxl.int32))
        assert embedding.weight.shape == (10, 4)  # the layer's table, as popxl-addons' build sets it
        np.random.seed(3)
        weight = facts.init().weight
    with popxl.Session(ir) as session:
        w = session.get_tensor_data(weight)
    density, mass = math.exp(-2.0) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    assert np.abs(w).max() <= 0.04
    np.testing.assert_allclose(w.std(), 0.02 * math.sqrt(1 - 4 * density / mass), rtol=0.01)


def test_deferred_data_is_drawn_only_when_variables_are_made():
    from gptj_popxl.model.config import GPTJConfig
    from gptj_popxl.model.layers import DecoderBlock, tp_groups

    ir = popxl.Ir()
    _, before_pool, before_position, *_ = np.random.get_state()
    with ir.main_graph:
        linear_facts, _ = addons.layers.Linear(4).create_graph(popxl.TensorSpec((2, 3), F32))
        embed_facts, _ = addons.layers.Embedding(F32, 10, 4).create_graph(popxl.TensorSpec((2,), popxl.int32))
        config = GPTJConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, rotary_dim=2)
        block_facts, _ = DecoderBlock(config, tp_groups(ir, 1)).create_graph(
            popxl.TensorSpec((1, 4, 8), F32), popxl.TensorSpec((1, 4), popxl.int32))
        # Building the graphs drew no random numbers: numpy's global generator is where it was (its
        # position in the pool, which moves with every draw, and the pool, refilled every 624).
        _, pool, position, *_ = np.random.get_state()
        assert position == before_position
        np.testing.assert_array_equal(pool, before_pool)
        assert linear_facts.weight.shape == (3, 4) and embed_facts.weight.shape == (10, 4)
        np.random.seed(7)
        weight = linear_facts.init().weight
    np.random.seed(7)
    with popxl.Session(ir) as session:
        np.testing.assert_allclose(session.get_tensor_data(weight), truncated_normal((3, 4)), rtol=1e-6)

    drawn = []
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        f = addons.VariableFactory(addons.DeferredData((2,), np.float32, lambda: drawn.append(len(drawn)) or
                                                       np.full(2, len(drawn), np.float32)),
                                   F32, "w", replica_grouping=ir.replica_grouping(group_size=1))
        assert drawn == [] and f.shape == (2,)
        assert f.create_tensor().shape_on_host == (2, 2) and drawn == [0, 1]
        wrong = addons.VariableFactory(addons.DeferredData((3,), np.float32, lambda: np.zeros(2, np.float32)), F32, "v")
        with pytest.raises(ValueError, match="variable 'v': data_iter gave shape"):
            wrong.create_tensor()


# ------------------------------------------------------------------ layers


def test_linear_and_layer_norm_match_torch_with_gradients(rng):
    torch.manual_seed(0)  # torch's layers draw their weights: not from whatever state earlier tests left
    x_np = rng.standard_normal((2, 3, 5)).astype(np.float32)
    torch_lin = torch.nn.Linear(5, 4)
    torch_ln = torch.nn.LayerNorm(4)
    with torch.no_grad():
        torch_ln.weight.uniform_(0.5, 1.5)
        torch_ln.bias.uniform_(-0.5, 0.5)

    class Net(addons.Module):
        def __init__(self):
            super().__init__()
            self.lin = addons.layers.Linear(4)
            self.ln = addons.layers.LayerNorm()

        def build(self, x):
            return self.ln(self.lin(x))

    dy_np = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        x = popxl.variable(x_np, name="x")
        facts, graph = Net().create_graph(x)
        variables = facts.init()
        (y,), grads = fwd_and_grad(graph, [x], [popxl.constant(dy_np)], variables)
        named = {"y": y, "dx": grads[graph.graph.inputs[0]]}
        named.update({k: grads[t] for k, t in graph.args.to_dict().items()})
    weights = {**addons.layers.Linear.torch_mapping(variables.lin, torch_lin),
               **addons.layers.LayerNorm.torch_mapping(variables.ln, torch_ln)}
    out = fetch(ir, named, weights)

    xt = torch.tensor(x_np, requires_grad=True)
    yt = torch_ln(torch_lin(xt))
    yt.backward(torch.tensor(dy_np))
    np.testing.assert_allclose(out["y"], yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["dx"], xt.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["lin.weight"], torch_lin.weight.grad.numpy().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["lin.bias"], torch_lin.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["ln.weight"], torch_ln.weight.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["ln.bias"], torch_ln.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_embedding_unsharded_matches_torch(rng):
    table = rng.standard_normal((7, 3)).astype(np.float32)
    ids = np.array([[0, 6, 3], [3, 1, 1]], np.int32)
    ir = popxl.Ir()
    with ir.main_graph:
        idx = popxl.variable(ids)
        facts, graph = addons.layers.Embedding(F32, 7, 3).create_graph(idx)
        assert facts.weight.shape == (7, 3)  # exact vocabulary: no rounding up to 16
        v = facts.init()
        (y,) = graph.bind(v).call(idx)
    out = fetch(ir, {"y": y}, {v.weight: table})
    np.testing.assert_array_equal(out["y"], table[ids])


@pytest.mark.parametrize("replicas,tp", [(2, 2), (4, 4), (4, 2)])
def test_vocab_sharded_embedding_sums_to_the_full_lookup(rng, replicas, tp):
    vocab, hidden = 11, 3  # 11 rows do not divide into the shards: the last shard is zero-padded
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    ids = np.array([0, 10, 5, 3, 7, 2], np.int32)
    size = addons.layers.Embedding.get_vocab_shard_size(vocab, tp)
    assert size == -(-vocab // tp)
    np.testing.assert_array_equal(addons.layers.Embedding.get_offsets(vocab, tp), np.arange(tp) * size)
    ir = popxl.Ir(replication=replicas)
    with ir.main_graph:
        sharded, tp_group = tp_groupings(ir, tp)
        # Replica r holds shard r % tp; give it the ids relative to that shard.
        offset_ids = addons.layers.Embedding.offset_input(ids, vocab, tp)
        idx = per_replica(offset_ids[np.arange(replicas) % tp], ir)
        layer = addons.layers.Embedding(F32, vocab, hidden, replica_grouping=sharded)
        facts, graph = layer.create_graph(idx)
        assert facts.weight.shape == (size, hidden)
        v = facts.init()
        (partial_rows,) = graph.bind(v).call(idx)
        y = TP_OUT(partial_rows, group=tp_group)
    out = fetch(ir, {"y": y}, {v.weight: shard(pad_axis(table, size * tp, 0), tp, 0)})
    np.testing.assert_array_equal(out["y"], np.broadcast_to(table[ids], (replicas,) + table[ids].shape))


# ------------------------------------------------------------------ tensor-parallel all-reduce pair


@pytest.mark.parametrize("replicas,group_size,stride", [(2, 2, 1), (4, 4, 1), (4, 2, 1), (4, 2, 2)])
def test_tp_pair_values_and_gradients(rng, replicas, group_size, stride):
    x_np = rng.standard_normal((replicas, 3)).astype(np.float32)
    c_np = rng.standard_normal((replicas, 3)).astype(np.float32)
    dy_np = rng.standard_normal((replicas, 3)).astype(np.float32)
    ir = popxl.Ir(replication=replicas)
    with ir.main_graph:
        group = ir.replica_grouping(stride=stride, group_size=group_size)
        x, c, dy = (per_replica(a, ir) for a in (x_np, c_np, dy_np))

        def enter(x, c):
            return TP_IN(x, group=group) * c

        def leave(x, c):
            return TP_OUT(x * c, group=group)

        results = {}
        for name, fn in (("in", enter), ("out", leave)):
            graph = addons.GraphWithNamedArgs(ir.create_graph(fn, x, c))
            (y,), grads = fwd_and_grad(graph, [x, c], [dy])
            results[name] = y
            results[name + "_dx"] = grads[graph.graph.inputs[0]]
    out = fetch(ir, results)
    members = [list(m) for m in group.groups()]

    def group_sum(a):
        total = np.empty_like(a)
        for m in members:
            total[m] = a[m].sum(0)
        return total

    np.testing.assert_allclose(out["in"], x_np * c_np, rtol=1e-6)
    np.testing.assert_allclose(out["in_dx"], group_sum(dy_np * c_np), rtol=1e-5)
    np.testing.assert_allclose(out["out"], group_sum(x_np * c_np), rtol=1e-5)
    np.testing.assert_allclose(out["out_dx"], dy_np * c_np, rtol=1e-6)


class TPMLP(addons.Module):
    """fc_in column-sharded, fc_out row-sharded, the pair around them."""

    def __init__(self, hidden, inner, tp, sharded, tp_group):
        super().__init__()
        self.tp_group = tp_group
        self.fc_in = addons.layers.Linear(inner // tp, replica_grouping=sharded)
        self.fc_out = addons.layers.Linear(hidden, bias=False, replica_grouping=sharded)

    def build(self, x):
        h = ops.gelu(self.fc_in(TP_IN(x, group=self.tp_group)))
        y = TP_OUT(self.fc_out(h), group=self.tp_group)
        return y + self.add_variable_input("bias", partial(np.zeros, (x.shape[-1],), np.float32))


@pytest.mark.parametrize("replicas,tp", [(2, 2), (4, 2), (4, 4)])
def test_tp_sharded_mlp_equals_the_unsharded_mlp_with_gradients(rng, replicas, tp):
    hidden, inner = 4, 8
    torch.manual_seed(0)
    fc_in, fc_out = torch.nn.Linear(hidden, inner), torch.nn.Linear(inner, hidden)
    x_np = rng.standard_normal((3, hidden)).astype(np.float32)
    dy_np = rng.standard_normal((3, hidden)).astype(np.float32)
    ir = popxl.Ir(replication=replicas)
    with ir.main_graph:
        sharded, tp_group = tp_groupings(ir, tp)
        x = popxl.variable(x_np, name="x")
        facts, graph = TPMLP(hidden, inner, tp, sharded, tp_group).create_graph(x)
        v = facts.init()
        (y,), grads = fwd_and_grad(graph, [x], [popxl.constant(dy_np)], v)
        named = {"y": y, "dx": grads[graph.graph.inputs[0]]}
        named.update({k: grads[t] for k, t in graph.args.to_dict().items()})
    weights = {
        v.fc_in.weight: shard(fc_in.weight.detach().numpy().T, tp, -1),
        v.fc_in.bias: shard(fc_in.bias.detach().numpy(), tp, 0),
        v.fc_out.weight: shard(fc_out.weight.detach().numpy().T, tp, 0),
        v.bias: fc_out.bias.detach().numpy(),
    }
    out = fetch(ir, named, weights)

    xt = torch.tensor(x_np, requires_grad=True)
    yt = fc_out(torch.nn.functional.gelu(fc_in(xt), approximate="tanh"))
    yt.backward(torch.tensor(dy_np))
    shard_of = np.arange(replicas) % tp
    tol = dict(rtol=1e-5, atol=1e-5)
    for r in range(replicas):
        np.testing.assert_allclose(out["y"][r], yt.detach().numpy(), **tol)
        np.testing.assert_allclose(out["dx"][r], xt.grad.numpy(), **tol)
        np.testing.assert_allclose(out["bias"][r], fc_out.bias.grad.numpy(), **tol)
        s = shard_of[r]
        np.testing.assert_allclose(out["fc_in.weight"][r], shard(fc_in.weight.grad.numpy().T, tp, -1)[s], **tol)
        np.testing.assert_allclose(out["fc_in.bias"][r], shard(fc_in.bias.grad.numpy(), tp, 0)[s], **tol)
        np.testing.assert_allclose(out["fc_out.weight"][r], shard(fc_out.weight.grad.numpy().T, tp, 0)[s], **tol)


# ------------------------------------------------------------------ sharded cross entropy


@pytest.mark.parametrize("replicas,tp", [(1, 1), (2, 2), (4, 4), (4, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_sharded_loss_matches_torch(rng, replicas, tp, reduction):
    _check_cross_entropy_sharded_loss(rng, replicas, tp, reduction)


# The float32 kernels' vector loops take 64 and 16 classes a step, then a scalar tail: 1100 classes make
# shards of 1100, 550 and 275 with all three. A spread of 40 takes some exponents below float32's normal
# range (the kernels flush those to 0); -inf logits are masked classes.
@pytest.mark.parametrize("replicas,tp", [(1, 1), (2, 2), (4, 4)])
@pytest.mark.parametrize("spread", [3.0, 40.0])
def test_cross_entropy_sharded_loss_wide_shards_match_torch(rng, replicas, tp, spread):
    _check_cross_entropy_sharded_loss(rng, replicas, tp, "mean", vocab=1100, spread=spread)


@pytest.mark.parametrize("replicas,tp", [(1, 1), (2, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_sharded_loss_with_every_label_ignored_matches_torch(rng, replicas, tp, reduction):
    """torch's mean is then NaN, with a zero gradient."""
    _check_cross_entropy_sharded_loss(rng, replicas, tp, reduction, labels=[-100] * 5)


def _check_cross_entropy_sharded_loss(rng, replicas, tp, reduction, vocab=12, spread=3.0,
                                      labels=(3, 11, -100, 0, 7)):
    n, ignore = 5, -100
    logits_np = (spread * rng.standard_normal((n, vocab))).astype(np.float32)
    if vocab > 12:
        logits_np[1, 100:700] = -np.inf
    labels = np.array(labels, np.int64)
    size = vocab // tp
    offsets = np.arange(tp) * size
    shard_of = np.arange(replicas) % tp
    ir = popxl.Ir(replication=replicas)
    with ir.main_graph:
        sharded, tp_group = tp_groupings(ir, tp)
        logits = per_replica(shard(logits_np, tp, 1)[shard_of], ir)
        # Each shard sees labels and the ignore index relative to its own first class.
        idx = per_replica((labels[None] - offsets[shard_of, None]).astype(np.int32), ir)
        # Unsharded, the ignore index may be a python int; sharded, it is shifted like the labels.
        ignore_arg = ignore if tp == 1 else per_replica((ignore - offsets[shard_of]).astype(np.int32), ir)

        def loss_fn(logits, idx, ignore_index):
            return addons.ops.cross_entropy_sharded_loss(logits, idx, ignore_index, tp_group, reduction)

        graph = addons.GraphWithNamedArgs(ir.create_graph(loss_fn, logits, idx, ignore_arg))
        dloss = popxl.constant(np.full(graph.graph.outputs[0].shape, 0.5, np.float32))
        grad = graph.autodiff(grads_required=[graph.graph.inputs[0]])  # the int inputs have no gradient
        info = graph.call_with_info(logits, idx, *([] if tp == 1 else [ignore_arg]))
        (dlogits,) = grad.call(dloss, args=grad.grad_graph_info.inputs_dict(info))
    out = fetch(ir, {"loss": info.outputs[0], "dlogits": dlogits})

    lt = torch.tensor(logits_np, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(lt, torch.tensor(labels), ignore_index=ignore, reduction=reduction)
    ref.backward(torch.full(ref.shape, 0.5))
    loss_out = out["loss"] if replicas > 1 else out["loss"][None]
    dlogits = out["dlogits"] if replicas > 1 else out["dlogits"][None]
    for r in range(replicas):
        np.testing.assert_allclose(loss_out[r], ref.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dlogits[r], shard(lt.grad.numpy(), tp, 1)[shard_of[r]], rtol=1e-5, atol=1e-6)


def test_tp_ops_reject_unknown_reductions():
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        x = popxl.variable(np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="op 'avg' is not a collective op"):
            TP_IN(x, op="avg")
        with pytest.raises(ValueError, match="op 'avg' is not a collective op"):
            TP_OUT(x, op="avg")


def test_cross_entropy_sharded_loss_rejects_bad_shapes():
    ir = popxl.Ir()
    with ir.main_graph:
        logits = popxl.variable(np.zeros((2, 3, 4), np.float32), name="logits")
        with pytest.raises(ValueError, match=r"logits 'logits' must be \(n_samples, classes_per_shard\)"):
            addons.ops.cross_entropy_sharded_loss(logits, popxl.variable(np.zeros(2, np.int32)))
        flat = popxl.variable(np.zeros((2, 4), np.float32), name="flat")
        with pytest.raises(ValueError, match=r"indices 'ids' \(3,\) must be \(2,\)"):
            addons.ops.cross_entropy_sharded_loss(flat, popxl.variable(np.zeros(3, np.int32), name="ids"))
        with pytest.raises(ValueError, match="reduction must be one of"):
            addons.ops.cross_entropy_sharded_loss(flat, popxl.variable(np.zeros(2, np.int32)), reduction="avg")


# ------------------------------------------------------------------ optimiser


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_adamw_step_matches_torch_over_several_steps(rng, lr_as_tensor):
    lr, wd, eps, betas = 0.1, 0.05, 1e-5, (0.8, 0.95)
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    ir = popxl.Ir()
    with ir.main_graph:
        w = popxl.variable(w0, name="w")
        kwargs = dict(beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd, first_order_dtype=F32)
        if lr_as_tensor:
            facts, step = addons.optimizers.AdamOptimizerStep().create_graph(
                w, w.spec, lr=popxl.TensorSpec((), F32), **kwargs)
            lr_args = {step.graph.inputs_by_name["lr"]: popxl.constant(lr, F32)}
        else:
            facts, step = addons.optimizers.AdamOptimizerStep().create_graph(w, w.spec, lr=lr, **kwargs)
            lr_args = {}
        assert sorted(facts.to_dict()) == ["first_order", "second_order", "step"]
        state = facts.init()
        for g in grads:
            step.bind(state).call(w, popxl.constant(g), args=lr_args)
    with popxl.Session(ir) as session:
        session.run()
        got = session.get_tensors_data([w, state.step])

    wt = torch.nn.Parameter(torch.tensor(w0))
    opt = torch.optim.AdamW([wt], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for g in grads:
        wt.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(got[w], wt.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert got[state.step] == len(grads)


# ------------------------------------------------------------------ gradient accumulation


def test_autodiff_with_accumulation_keeps_the_mean_gradient(rng):
    x_np = rng.standard_normal((3, 2)).astype(np.float32)
    dys = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    ir = popxl.Ir()
    with ir.main_graph:
        x = popxl.variable(x_np, name="x")
        facts, graph = addons.layers.Linear(4).create_graph(x)
        variables = facts.init()
        groups = {"weight": ir.replica_grouping(group_size=1)}
        accum_facts, grad = addons.autodiff_with_accumulation(graph, [graph.args.weight, graph.args.bias],
                                                              grads_required=[graph.graph.inputs[0]],
                                                              replica_groupings=groups)
        assert sorted(accum_facts.to_dict()) == ["accum.bias", "accum.weight", "mean_accum_counter"]
        assert accum_facts.accum.weight.replica_grouping == groups["weight"]
        assert [c.fwd_tensor for c in grad.grad_graph_info.expected_outputs] == [graph.graph.inputs[0]]
        accums = accum_facts.init()
        dxs = []
        for dy in dys:
            info = graph.bind(variables).call_with_info(x)
            (dx,) = grad.bind(accums).call(popxl.constant(dy), args=grad.grad_graph_info.inputs_dict(info))
            dxs.append(dx)
    with popxl.Session(ir) as session:
        session.write_variable_data(variables.weight, rng.standard_normal((2, 4)).astype(np.float32))
        w = session.get_tensor_data(variables.weight)
    out = fetch(ir, {f"dx{i}": dx for i, dx in enumerate(dxs)}, {variables.weight: w})
    for i, dy in enumerate(dys):
        np.testing.assert_allclose(out[f"dx{i}"], dy @ w.T, rtol=1e-5, atol=1e-6)
    with popxl.Session(ir) as session:
        session.write_variable_data(variables.weight, w)
        session.run()
        acc = session.get_tensors_data(accums.tensors)
    np.testing.assert_allclose(acc[accums.accum.weight], np.mean([x_np.T @ dy for dy in dys], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc[accums.accum.bias], np.mean([dy.sum(0) for dy in dys], 0), rtol=1e-5, atol=1e-6)
    assert acc[accums.mean_accum_counter] == len(dys)


# ------------------------------------------------------------------ remote buffers and streams


@pytest.mark.parametrize("sharded", [False, True])
def test_remote_load_and_store_graphs_round_trip(rng, sharded):
    data = {"a": rng.standard_normal((2, 3)).astype(np.float32), "b.c": rng.standard_normal(4).astype(np.float32)}
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        facts = addons.NamedVariableFactories.from_dict(
            {k: addons.VariableFactory(lambda v=v: v.copy(), F32, k.rpartition(".")[2]) for k, v in data.items()})
        buffers = addons.remote.named_variable_buffers(facts, entries=2, shard_over_dict=sharded)
        assert buffers.a.entries == 2 and bool(buffers.a.meta_shape) == sharded
        facts.init_remote(buffers, 0, "layer0")
        layer1 = facts.init_remote(buffers, 1, "layer1")
        load, names = addons.remote.load_remote_graph(buffers)
        store = addons.remote.store_remote_graph(buffers)
        assert names == ["a", "b.c"] and sorted(store.args.keys_flat()) == names
        loaded1 = addons.NamedTensors.pack(names, load.call(1))
        store.bind(loaded1.map(lambda t: t * 2)).call(0)  # entry 0 <- 2 * entry 1
        reloaded0 = addons.remote.load_remote(buffers, 0)
    out = fetch(ir, {"a": reloaded0.a, "c": reloaded0.b.c},
                {layer1.a: data["a"] + 1, layer1.b.c: data["b.c"] + 1})
    for key, name in (("a", "a"), ("c", "b.c")):
        expected = 2 * (data[name] + 1)
        if sharded:  # each replica holds one half of the flattened tensor
            np.testing.assert_allclose(np.concatenate(list(out[key])), expected.reshape(-1))
        else:
            np.testing.assert_allclose(out[key], np.broadcast_to(expected, (2,) + expected.shape))


def test_input_and_output_streams_by_name():
    ir = popxl.Ir()
    with ir.main_graph:
        inputs = addons.streams.InputStreams(x=((2,), F32), n=((), popxl.int32))
        outputs = addons.streams.OutputStreams(y=((2,), F32))
        assert list(inputs) == ["x", "n"] and inputs.x.shape == (2,)
        ops.host_store(outputs.y, ops.host_load(inputs.x) * 3)
        with pytest.raises(AttributeError, match="no stream 'z'"):
            inputs.z
    with popxl.Session(ir) as session:
        out = session.run({inputs.x: np.array([1, 2], np.float32)})
    np.testing.assert_array_equal(out[outputs.y], [3, 6])


# ------------------------------------------------------------------ array munging


def test_array_munging_round_trips():
    x = np.arange(24).reshape(2, 3, 4)
    s = shard(x, 2, -1)
    assert s.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(s[1], x[..., 2:])
    np.testing.assert_array_equal(unshard(s, -1), x)
    np.testing.assert_array_equal(unshard(shard(x, 3, 1), 1), x)
    np.testing.assert_array_equal(repeat(x, 3, 1)[:, 2], x)
    assert pad_axis(x, 5, 1, value=-1).shape == (2, 5, 4) and (pad_axis(x, 5, 1, value=-1)[:, 3:] == -1).all()
    np.testing.assert_array_equal(repeat_shard(np.arange(4), 2, 2, 0), [[0, 1], [2, 3], [0, 1], [2, 3]])
    np.testing.assert_array_equal(repeat_shard(np.arange(4), 2, 2, 0, "strided"), [[0, 1], [0, 1], [2, 3], [2, 3]])
    np.testing.assert_array_equal(tensor_parallel_input(np.arange(4), 2, 4), [[0, 0, 1, 1], [2, 2, 3, 3]])
    assert squeeze_safe(np.zeros((1, 2, 1)), [0, 1]).shape == (2, 1)
    with pytest.raises(ValueError, match="cannot shard axis 1 of length 3"):
        shard(x, 2, 1)
    with pytest.raises(ValueError, match="cannot pad axis 1 of length 3"):
        pad_axis(x, 2, 1)
