"""transforms.autodiff through call and repeat, checked against torch autograd."""
import numpy as np
import pytest
import torch

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops
from gptj_popxl.popxl_cpu.transforms import ExpectedConnectionType
from ops_check import fetch

F32 = popxl.float32


def spec(*shape, dtype=F32):
    return popxl.TensorSpec(shape, dtype)


def popxl_grads(ir, fwd, info, arrays, seeds):
    """Calls ``fwd`` on variables holding ``arrays`` and its gradient graph on ``seeds`` (one per FwdGrad
    input); returns (forward outputs, gradients) as arrays."""
    with ir.main_graph:
        args = [popxl.variable(a, dtype=popxl.dtype.as_dtype(a.dtype), name=f"in{i}") for i, a in enumerate(arrays)]
        site = ops.call_with_info(fwd, *args)
        seed_ts = [popxl.variable(s, name=f"seed{i}") for i, s in enumerate(seeds)]
        grads = ops.call(info.graph, *seed_ts, inputs_dict=info.inputs_dict(site))
        n_out = len(site.outputs) - len(fwd._stitched)
    values = fetch(ir, list(site.outputs[:n_out]) + list(grads))
    return values[:n_out], values[n_out:]


def torch_grads(fn, arrays, provided, required, seeds):
    """Outputs of ``fn`` and the gradients of ``provided`` outputs (seeded) w.r.t. ``required`` inputs."""
    ts = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    outs = fn(*ts)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad([outs[i] for i in provided], [ts[i] for i in required],
                                [torch.tensor(s) for s in seeds], allow_unused=True)
    grads = [torch.zeros_like(ts[i]) if g is None else g for i, g in zip(required, grads)]
    return [o.detach().numpy() for o in outs], [g.numpy() for g in grads]


def check(fn_popxl, fn_torch, arrays, provided=None, required=None, rtol=1e-5, atol=1e-5):
    """Differentiates ``fn_popxl`` and compares outputs and gradients with torch on ``fn_torch``."""
    rng = np.random.default_rng(7)
    ir = popxl.Ir()
    with ir.main_graph:
        fwd = ir.create_graph(fn_popxl, *[spec(*a.shape, dtype=popxl.dtype.as_dtype(a.dtype)) for a in arrays])
    n_out = len(fwd.outputs)
    provided = list(range(n_out)) if provided is None else provided
    required = [i for i, a in enumerate(arrays) if a.dtype.kind == "f"] if required is None else required
    info = popxl.transforms.autodiff(fwd, grads_provided=[fwd.outputs[i] for i in provided],
                                     grads_required=[fwd.inputs[i] for i in required])
    seeds = [rng.standard_normal(fwd.outputs[i].shape).astype(np.float32) for i in provided]
    outs, grads = popxl_grads(ir, fwd, info, arrays, seeds)
    ref_outs, ref_grads = torch_grads(fn_torch, arrays, provided, required, seeds)
    assert len(outs) == len(ref_outs) and len(grads) == len(ref_grads)
    for a, e in zip(outs + grads, ref_outs + ref_grads):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)
    return ir, fwd, info


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def t_gelu(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


# ------------------------------------------------------------------ subgraph calls


def test_call_inside_call_inside_call():
    def inner(x, w):
        return ops.gelu(x @ w)

    def middle(x, w):
        (h,) = ops.call(popxl.gir().create_graph(inner, x, w), x, w)
        return ops.tanh(h) * x

    def outer(x, w, v):
        (h,) = ops.call(popxl.gir().create_graph(middle, x, w), x, w)
        return ops.sum(h @ v)

    def ref(x, w, v):
        return ((torch.tanh(t_gelu(x @ w)) * x) @ v).sum()

    ir, fwd, info = check(outer, ref, [randn(2, 3), randn(3, 3, seed=1), randn(3, 4, seed=2)])
    assert [g.name for g in fwd.called_graphs] == ["middle"]


def test_graph_called_twice_is_differentiated_once():
    def outer(x, w1, w2):
        layer = popxl.gir().create_graph(lambda h, w: ops.gelu(h @ w), x, w1)
        (h,) = ops.call(layer, x, w1)
        (y,) = ops.call(layer, h, w2)
        return ops.sum(y * y)

    def ref(x, w1, w2):
        return (t_gelu(t_gelu(x @ w1) @ w2) ** 2).sum()

    ir, fwd, info = check(outer, ref, [randn(2, 3), randn(3, 3, seed=1), randn(3, 3, seed=2)])
    grad_graphs = [g for g in ir._graphs if g.name.endswith("_grad")]
    assert sorted(g.name for g in grad_graphs) == ["<lambda>_grad", "outer_grad"]


def test_call_made_before_autodiff_gains_the_stitched_outputs():
    ir = popxl.Ir()
    x_data, w_data = randn(2, 3), randn(3, 3, seed=1)
    with ir.main_graph:
        fwd = ir.create_graph(lambda x, w: ops.sum(ops.tanh(x @ w)), spec(2, 3), spec(3, 3))
        x, w = popxl.variable(x_data, name="x"), popxl.variable(w_data, name="w")
        site = ops.call_with_info(fwd, x, w)
        assert len(site.outputs) == 1
        info = popxl.transforms.autodiff(fwd)
        assert len(site.outputs) == len(fwd.outputs) > 1
        (dx, dw) = ops.call(info.graph, popxl.constant(1.0), inputs_dict=info.inputs_dict(site))
    dx, dw = fetch(ir, [dx, dw])
    xt, wt = torch.tensor(x_data, requires_grad=True), torch.tensor(w_data, requires_grad=True)
    torch.tanh(xt @ wt).sum().backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ repeat


def _layer(h, c, w):
    return ops.tanh(h @ w) + c, h * c


def _t_layer(h, c, w):
    return torch.tanh(h @ w) + c, h * c


@pytest.mark.parametrize("count", [0, 1, 3])
def test_repeat_with_carried_and_constant_inputs(count):
    def outer(h, c, w):
        body = popxl.gir().create_graph(_layer, h, c, w)
        return ops.repeat(body, count, h, c, w)

    def ref(h, c, w):
        for _ in range(count):
            h, c = _t_layer(h, c, w)
        return h * 1, c * 1

    check(outer, ref, [randn(2, 3), randn(2, 3, seed=1) * 0.5, randn(3, 3, seed=2)])


def test_repeat_inside_call():
    def block(x, w, b):
        body = popxl.gir().create_graph(lambda h, w, b: ops.tanh(h @ w + b), x, w, b)
        (y,) = ops.repeat(body, 3, x, w, b)
        return y

    def outer(x, w, b):
        (y,) = ops.call(popxl.gir().create_graph(block, x, w, b), x, w, b)
        return ops.sum(y * y)

    def ref(x, w, b):
        for _ in range(3):
            x = torch.tanh(x @ w + b)
        return (x * x).sum()

    check(outer, ref, [randn(2, 3), randn(3, 3, seed=1), randn(3, seed=2)])


def test_call_inside_repeat():
    def body(h, w):
        inner = popxl.gir().create_graph(lambda a, b: ops.gelu(a @ b), h, w)
        (y,) = ops.call(inner, h, w)
        return y

    def outer(x, w):
        (y,) = ops.repeat(popxl.gir().create_graph(body, x, w), 2, x, w)
        return y

    check(outer, lambda x, w: t_gelu(t_gelu(x @ w) @ w), [randn(2, 3), randn(3, 3, seed=1)])


def test_a_tensor_returned_twice_gets_both_gradients():
    """A called graph or a repeat body returning one tensor in two places: both output gradients reach it."""
    def called(x):
        graph = popxl.gir().create_graph(lambda a: (ops.sin(a),) * 2, x)
        p, q = ops.call(graph, x)
        return p * 2.0 + q * 3.0

    check(called, lambda x: torch.sin(x) * 5.0, [randn(3)])
    check(lambda x: (ops.sin(x),) * 2, lambda x: (torch.sin(x),) * 2, [randn(3)])  # one gradient input each

    def repeated(x):
        body = popxl.gir().create_graph(lambda a, b: (ops.tanh(a + b),) * 2, x, x)
        return ops.repeat(body, 2, x, x)

    def ref(x):
        a, b = x, x
        for _ in range(2):
            a = b = torch.tanh(a + b)
        return a, b
    check(repeated, ref, [randn(3)])


# ------------------------------------------------------------------ provided / required


def _two_outputs(x, w):
    h = x @ w
    return ops.tanh(h), ops.sum(h * h)


def _t_two_outputs(x, w):
    h = x @ w
    return torch.tanh(h), (h * h).sum()


def test_grads_provided_subset():
    ir, fwd, info = check(_two_outputs, _t_two_outputs, [randn(2, 3), randn(3, 4, seed=1)], provided=[1])
    grad_inputs = [c for c in info.expected_inputs if c.connection_type is ExpectedConnectionType.FwdGrad]
    assert [c.fwd_tensor for c in grad_inputs] == [fwd.outputs[1]]
    assert info.expected_inputs[0] is grad_inputs[0]


def test_grads_required_subset_in_given_order():
    ir, fwd, info = check(_two_outputs, _t_two_outputs, [randn(2, 3), randn(3, 4, seed=1)], required=[1, 0])
    assert info.outputs == (fwd.inputs[1], fwd.inputs[0])
    assert all(c.connection_type is ExpectedConnectionType.FwdGrad for c in info.expected_outputs)
    ir, fwd, info = check(_two_outputs, _t_two_outputs, [randn(2, 3), randn(3, 4, seed=1)], required=[1])
    assert info.outputs == (fwd.inputs[1],)


def test_return_all_grad_graphs_and_reuse():
    ir = popxl.Ir()
    with ir.main_graph:
        leaf = ir.create_graph(lambda x: ops.sin(x) * x, spec(2, 3))
        mid = ir.create_graph(lambda x: ops.call(leaf, x)[0] + x, spec(2, 3))
        top = ir.create_graph(lambda x: ops.sum(ops.call(mid, x)[0]), spec(2, 3))
        infos = popxl.transforms.autodiff(top, return_all_grad_graphs=True)
        assert set(infos) == {top, mid, leaf}
        assert all(infos[g].forward_graph is g for g in infos)
        n_graphs = len(ir._graphs)
        top2 = ir.create_graph(lambda x: ops.sum(ops.call(mid, x)[0] * ops.call(mid, x)[0]), spec(2, 3))
        infos2 = popxl.transforms.autodiff(top2, called_graphs_grad_info=infos, return_all_grad_graphs=True)
        # Only top2 and its gradient are new: mid's and leaf's gradient graphs are reused.
        assert len(ir._graphs) == n_graphs + 2
        assert infos2[mid] is infos[mid] and infos2[leaf] is infos[leaf]
        x_data = randn(2, 3)
        x = popxl.variable(x_data, name="x")
        site = ops.call_with_info(top2, x)
        (dx,) = ops.call(infos2[top2].graph, popxl.constant(1.0), inputs_dict=infos2[top2].inputs_dict(site))
    (dx,) = fetch(ir, [dx])
    xt = torch.tensor(x_data, requires_grad=True)
    ((torch.sin(xt) * xt + xt) ** 2).sum().backward()
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_int_input_is_not_differentiated():
    def fn(x, k):
        return x * ops.cast(k, F32)

    arrays = [randn(2, 3), np.array([[1, 2, 3], [4, 5, 6]], np.int32)]
    ir, fwd, info = check(fn, lambda x, k: x * k.float(), arrays)
    assert info.outputs == (fwd.inputs[0],)
    with pytest.raises(TypeError, match="cannot differentiate with respect to 'k' of dtype int32"):
        popxl.transforms.autodiff(fwd, grads_required=fwd.inputs)


def test_required_input_without_path_gets_zeros():
    check(lambda x, y: ops.sin(x), lambda x, y: torch.sin(x), [randn(2, 3), randn(4, seed=1)])


def test_tensor_used_by_several_ops_accumulates():
    def fn(x, w):
        return ops.sum(x * x + ops.sin(x) + (x @ w) * x)

    check(fn, lambda x, w: (x * x + torch.sin(x) + (x @ w) * x).sum(), [randn(3, 3), randn(3, 3, seed=1)])


def test_output_that_is_an_input():
    check(lambda x, y: (x, x * y), lambda x, y: (x * 1, x * y), [randn(2), randn(2, seed=1)])


# ------------------------------------------------------------------ connection helpers and errors


def test_grad_info_connection_maps():
    ir = popxl.Ir()
    with ir.main_graph:
        fwd = ir.create_graph(lambda x, w: ops.sum(x @ w), spec(2, 3), spec(3, 4))
        info = popxl.transforms.autodiff(fwd)
        x, w = popxl.variable(randn(2, 3), name="x"), popxl.variable(randn(3, 4), name="w")
        site = ops.call_with_info(fwd, x, w)
        grad_site = ops.call_with_info(info.graph, popxl.constant(1.0), inputs_dict=info.inputs_dict(site))
        by_fwd = info.fwd_graph_ins_to_grad_parent_outs(grad_site)
        by_parent = info.fwd_parent_ins_to_grad_parent_outs(site, grad_site)
    assert by_fwd == {fwd.inputs[0]: grad_site.outputs[0], fwd.inputs[1]: grad_site.outputs[1]}
    assert by_parent == {x: grad_site.outputs[0], w: grad_site.outputs[1]}
    assert info.forward_graph is fwd and info.inputs[0] is fwd.outputs[0]
    assert all(k in info.graph.inputs for k in info.inputs_dict(site))
    with pytest.raises(TypeError, match="not the forward graph"):
        info.inputs_dict(grad_site)


def test_autodiff_errors():
    ir = popxl.Ir()
    with ir.main_graph:
        fwd = ir.create_graph(lambda x: ops.gelu_(x * 2.0) + x, spec(2))
        other = ir.create_graph(lambda x: x * 2.0, spec(2))
        with pytest.raises(ValueError, match="grads_provided tensor .* is not an output"):
            popxl.transforms.autodiff(fwd, grads_provided=other.outputs)
        with pytest.raises(ValueError, match="grads_required tensor .* is not an input"):
            popxl.transforms.autodiff(fwd, grads_required=other.inputs)
        with pytest.raises(NotImplementedError, match="op gelu_ .* has no gradient rule"):
            popxl.transforms.autodiff(fwd)
        with pytest.raises(TypeError, match="expects a Graph"):
            popxl.transforms.autodiff(fwd.inputs[0])


@pytest.mark.parametrize("act, act_torch, act_rule_reads", [(ops.relu, torch.relu, "output"),
                                                           (ops.gelu, t_gelu, "input"),
                                                           (ops.tanh, torch.tanh, "output")],
                         ids=["relu", "gelu", "tanh"])
@pytest.mark.parametrize("required", [[0, 1, 2], [0], [1], [2]], ids=lambda r: "d" + "".join("xwb"[i] for i in r))
def test_the_gradient_graph_takes_only_the_forward_values_its_rules_need(act, act_torch, act_rule_reads, required):
    """act(x @ w + b): the activation's rule reads one value; the add's none; the matmul's gradient of x
    reads w, that of w reads x."""
    ir, fwd, info = check(lambda x, w, b: act(x @ w + b), lambda x, w, b: act_torch(x @ w + b),
                          [randn(2, 3), randn(3, 4, seed=1), randn(4, seed=2)], required=required)
    x, w, _ = fwd.inputs
    matmul, add, activation = fwd._ops
    expected = {add.outputs[0] if act_rule_reads == "input" else activation.outputs[0]}
    expected |= {w} if 0 in required else set()
    expected |= {x} if 1 in required else set()
    assert {c.fwd_tensor for c in info.expected_inputs if c.connection_type is ExpectedConnectionType.Fwd} == expected
    assert matmul.outputs[0] not in fwd.outputs


def _no_gradient_rule_before_a_call(sub):
    def fwd(x, w):
        return ops.call(sub, ops.gelu_(x * 2.0), w)[0]  # gelu_ has no gradient rule
    return fwd


def _write_through_a_view_before_a_call(sub):
    def fwd(x, w):
        y = x * 2.0
        view = ops.transpose_(y)
        view += 1.0  # writes y's memory, which the call then reads as 'y'
        return ops.call(sub, y, w)[0]
    return fwd


@pytest.mark.parametrize("make_fwd, error", [(_no_gradient_rule_before_a_call, "no gradient rule"),
                                             (_write_through_a_view_before_a_call, "in place")],
                         ids=["no_gradient_rule", "write_through_a_view"])
def test_refused_autodiff_leaves_the_ir_as_it_was(make_fwd, error):
    """The called graph is differentiated first (its gradient graph made, forward outputs stitched to it and
    its call site) and only then the caller refused: none of it may stay."""
    ir = popxl.Ir()
    with ir.main_graph:
        sub = ir.create_graph(lambda x, w: ops.tanh(x @ w), spec(2, 3), spec(3, 3))
        fwd = ir.create_graph(make_fwd(sub), spec(2, 3), spec(3, 3))
        site = ops.call_with_info(fwd, ops.init((2, 3), F32), ops.init((3, 3), F32))

    def state():
        return ([(g, list(g.outputs), list(g.tensors), list(g._ops)) for g in ir._graphs],
                [(op, list(op.outputs)) for g in ir._graphs for op in g._ops])
    before = state()
    with pytest.raises(NotImplementedError, match=error):
        popxl.transforms.autodiff(fwd)
    assert state() == before
    assert len(site.outputs) == 1 and len(ir._graphs) == 3


def _in_place_bias(x, w, b):
    y = x @ w
    y += b  # writes y; tanh reads y, which now holds add_'s output
    return ops.tanh(y)


def _scaled_then_shifted(x):
    y = x * 2.0
    y += 1.0
    return ops.tanh(y)


def _residual_in_place(x, w):
    h = x * 1.0
    h += ops.tanh(h @ w)  # matmul's rule reads h as it was before this write
    return h


def _read_then_overwritten(x):
    t = ops.tanh(x)
    s = ops.sum(t)
    t += 1.0  # tanh's rule reads its output t as it was before this write
    return s, t


def _written_twice_read_between(x, w, b):
    y = x * 1.0
    y += b
    z = y * w  # mul's rule reads y (after the first write) and w
    y += z
    return ops.tanh(y)


def _scaled_add_with_tensor_scales(x, y, a, b):
    X = x * 1.0
    ops.scaled_add_(X, y, a, b)  # the rule for a reads X before the write, for b reads y
    return ops.tanh(X)


@pytest.mark.parametrize("fn, fn_torch, shapes", [
    (_in_place_bias, lambda x, w, b: torch.tanh(x @ w + b), [(2, 3), (3, 4), (4,)]),
    (_scaled_then_shifted, lambda x: torch.tanh(x * 2.0 + 1.0), [(5,)]),
    (_residual_in_place, lambda x, w: x + torch.tanh(x @ w), [(2, 3), (3, 3)]),
    (_read_then_overwritten, lambda x: (torch.tanh(x).sum(), torch.tanh(x) + 1.0), [(4,)]),
    (_written_twice_read_between, lambda x, w, b: torch.tanh((x + b) + (x + b) * w), [(2, 3), (3,), (3,)]),
    (_scaled_add_with_tensor_scales, lambda x, y, a, b: torch.tanh(a * x + b * y), [(2, 3), (2, 3), (), ()]),
], ids=lambda v: getattr(v, "__name__", ""))
def test_in_place_writes_on_the_gradient_path(fn, fn_torch, shapes):
    """Against torch: reads after an in-place write see the written value and pass gradients through the
    write; a value a gradient rule reads that is overwritten later reaches it as it was."""
    check(fn, fn_torch, [randn(*shape, seed=i) for i, shape in enumerate(shapes)])


def _in_place_through_a_view(x, w, b):
    y = x @ w
    view = ops.transpose_(y)
    view += b  # writes y's memory through another view of it
    return ops.tanh(y)


def test_a_read_of_memory_written_through_another_view_is_refused():
    ir = popxl.Ir()
    with ir.main_graph:
        fwd = ir.create_graph(_in_place_through_a_view, spec(2, 3), spec(3, 4), spec(4, 2))
        outputs = fwd.outputs
        with pytest.raises(NotImplementedError, match=r"op tanh \('tanh'\) reads 'matmul' after op add_ \('add_'\) "
                                                      r"wrote its memory in place through 'transpose_'"):
            popxl.transforms.autodiff(fwd)
        assert fwd.outputs == outputs  # the forward graph is left as it was


def test_in_place_writes_that_keep_gradients_right_are_differentiated():
    """Against torch: a mask written before anything reads it; a statistic accumulated off the gradient
    path; a buffer filled row by row, each write on the previous one's output, then read by a matmul."""
    def fwd(x, w, m, stat):
        mask = m * 1.0
        mask += 0.5
        y = x @ w
        ops.var_updates.accumulate_(stat, ops.sum(y))
        ops.var_updates.accumulate_(stat, ops.sum(y))
        rows = ops.init((2, 4), popxl.float32, "rows")
        for i in range(2):
            rows = ops.dynamic_update_(rows, popxl.constant(np.array([i], np.uint32)), ops.tanh(y[i:i + 1]),
                                       axes=[0], sizes=[1], no_overlap=True)
        return (rows @ w.transpose()) * (mask @ w.transpose())

    check(fwd, lambda x, w, m, stat: (torch.tanh(x @ w) @ w.T) * ((m + 0.5) @ w.T),
          [randn(2, 3), randn(3, 4, seed=1), randn(2, 4, seed=2), randn(1, seed=3).reshape(())], required=[0, 1])


def test_stitched_outputs_keep_their_meta_shape_at_call_sites():
    ir = popxl.Ir(replication=2)
    with ir.main_graph:
        def fwd(x):
            shard = ops.collectives.replica_sharded_slice(x)  # meta_shape (4,)
            return shard * shard  # its gradient needs the shard: autodiff appends it to the outputs
        graph = ir.create_graph(fwd, spec(4))
        site = ops.call_with_info(graph, ops.init((4,), F32))
        popxl.transforms.autodiff(graph)
    assert [t.meta_shape for t in site.outputs] == [t.meta_shape for t in graph.outputs] == [(), (4,)]


@pytest.mark.parametrize("write_in_place", [False, True])
def test_reduction_gradient_is_a_plain_host_array(write_in_place):
    """The gradient of a reduction is a broadcast of dy: written in place or sent to the host, it behaves
    as an ordinary tensor (values as torch's autograd, C-ordered host array)."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    dy = np.array([1.0, 2.0, 3.0], np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        graph = popxl.gir().create_graph(lambda t: ops.sum(t, axis=1), popxl.TensorSpec((3, 4), popxl.float32))
        grad = popxl.transforms.autodiff(graph)
        info = ops.call_with_info(graph, popxl.variable(x))
        dx, = ops.call(grad.graph, popxl.constant(dy), inputs_dict=grad.inputs_dict(info))
        if write_in_place:
            ops.add_(dx, popxl.constant(np.float32(1.0)))
        stream = popxl.d2h_stream(dx.shape, dx.dtype, "dx")
        ops.host_store(stream, dx)
    with popxl.Session(ir) as session:
        out = session.run()[stream]
    xt = torch.from_numpy(x).requires_grad_()
    (xt.sum(1) * torch.from_numpy(dy)).sum().backward()
    np.testing.assert_array_equal(out, xt.grad.numpy() + (1.0 if write_in_place else 0.0))
    assert out.flags.c_contiguous


@pytest.mark.parametrize("by_ref", [False, True])
def test_a_graph_input_written_after_a_rule_read_it(by_ref):
    """mul's rule reads ``a``, which the graph then writes in place: the gradient graph gets ``a`` as it
    was, also when ``a`` is the caller's tensor (by reference), which the call has written."""
    x, w, seed = (np.random.default_rng(i).standard_normal(3).astype(np.float32) for i in range(3))
    ir = popxl.Ir()
    with ir.main_graph:
        def scale_then_bump(a, w):
            product = a * w
            ops.add_(a, 1.0)
            return product
        if by_ref:
            scale_then_bump.__annotations__["a"] = popxl.TensorByRef
        spec = popxl.TensorSpec((3,), popxl.float32)
        graph = ir.create_graph(scale_then_bump, spec, spec)
        info = popxl.transforms.autodiff(graph)
        site = ops.call_with_info(graph, popxl.variable(x), popxl.variable(w))
        dx, dw = ops.call(info.graph, popxl.variable(seed), inputs_dict=info.inputs_dict(site))
    dx, dw = fetch(ir, [dx, dw])
    a, w_torch = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    (a * w_torch).backward(torch.tensor(seed))
    np.testing.assert_allclose(dx, a.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(dw, w_torch.grad.numpy(), rtol=1e-6)
