"""addons.transforms: batch serialisation, recomputation, repeat_graph, remap_grad_info, against torch/numpy.

The training test builds a phased program the way the fine-tuning program does: the weights of
``L`` identical layers in remote buffers with one entry per layer, activations in a
``batch_serial_buffer`` of ``L + 1`` rows by ``S`` micro-batches (layer n reads row n and writes
row n + 1; its backward reads the output gradient from row n + 1 of ``dx`` and writes row n), each
phase loading its layer's weights once and looping over the micro-batches.
"""
import numpy as np
import pytest
import torch

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl

F32 = popxl.float32
B, H, S, L = 2, 4, 3, 2  # micro-batch rows, hidden, micro-batches (steps), layers
IO_MODES = ["compute", "io", "io_overlapped"]


class Layer(addons.Module):
    def __init__(self):
        super().__init__()
        self.fc = addons.layers.Linear(H)

    def build(self, x):
        return ops.tanh(self.fc(x))


def host_data(rng, micro_batches=S):
    return {"x": rng.normal(size=(micro_batches, B, H)).astype(np.float32),
            "dy": rng.normal(size=(micro_batches, B, H)).astype(np.float32),
            "w": rng.normal(size=(L, H, H)).astype(np.float32) * 0.5,
            "b": rng.normal(size=(L, H)).astype(np.float32) * 0.1}


def torch_reference(data):
    """Layer outputs, the input gradient per micro-batch and the weight gradients (mean over micro-batches)
    of ``sum_m sum(y_m * dy_m)``."""
    w = torch.tensor(data["w"], requires_grad=True)
    b = torch.tensor(data["b"], requires_grad=True)
    x = torch.tensor(data["x"], requires_grad=True)
    h = x
    for n in range(L):
        h = torch.tanh(h @ w[n] + b[n])
    (h * torch.tensor(data["dy"])).sum().backward()
    m = x.shape[0]
    return {"y": h.detach().numpy(), "dx": x.grad.numpy(), "dw": w.grad.numpy() / m, "db": b.grad.numpy() / m}


def layer_and_gradient():
    """``(facts, fwd, accum_facts, bwd)``: the layer's forward graph on (B, H) and its gradient graph,
    which accumulates the weights' gradients (running means) and returns the input's."""
    facts, fwd = Layer().create_graph(popxl.TensorSpec((B, H), F32))
    accum_facts, bwd = addons.autodiff_with_accumulation(fwd, fwd.args.tensors, grads_required=[fwd.graph.inputs[0]])
    return facts, fwd, accum_facts, bwd


def run_phases(ir, data, weights, outputs, grads):
    """Runs ``ir`` once with layer n's weights ``weights[n]`` set from ``data``; returns the values of the
    ``outputs`` remote variables and of the gradient variables ``grads``."""
    with popxl.Session(ir) as session:
        for n in range(L):
            session.write_variables_data({weights[n].fc.weight: data["w"][n], weights[n].fc.bias: data["b"][n]})
        session.run()
        return session.get_tensors_data([t for ts in outputs.values() for t in ts]
                                        + [t for g in grads for t in g.tensors])


def build_phased_training(data, io_mode, recompute, replicas=1):
    """The phased program; returns the IR, per-layer weight and gradient variables and the remote variables
    standing for the last activation row and the first gradient row. With several replicas (all
    computing the same) the activations are kept replica-sharded over all of them."""
    ir = popxl.Ir(replication=replicas)
    with ir.main_graph:
        shard_group = ir.replica_grouping() if replicas > 1 else None
        remote_variable = popxl.remote_replica_sharded_variable if shard_group else popxl.remote_variable
        facts, fwd, accum_facts, bwd = layer_and_gradient()
        if recompute:
            bwd = addons.recompute_graph(bwd)
        weight_buffers = addons.named_variable_buffers(facts, entries=L, shard_over_dict=False)
        weights = [facts.init_remote(weight_buffers, n, f"layer{n}") for n in range(L)]
        grads = [accum_facts.init(f"grad{n}") for n in range(L)]

        x_buffer = addons.batch_serial_buffer(fwd.graph.outputs[0], steps=S, rows=L + 1, shard_group=shard_group)
        dx_buffer = addons.batch_serial_buffer(bwd.graph.inputs[0], steps=S, rows=L + 1, shard_group=shard_group)
        assert x_buffer.entries == dx_buffer.entries == S * (L + 1)
        assert x_buffer.tensor_shape == ((B * H // replicas,) if shard_group else (B, H))
        # Row 0 of x holds the inputs, row L of dx the loss gradient; x row L and dx row 0 receive the results.
        for s in range(S):
            remote_variable(data["x"][s], x_buffer, s, name=f"x{s}")
            remote_variable(data["dy"][s], dx_buffer, L * S + s, name=f"dy{s}")
        outputs = {"y": [remote_variable(np.zeros((B, H), np.float32), x_buffer, L * S + s, name=f"y{s}")
                         for s in range(S)],
                   "dx": [remote_variable(np.zeros((B, H), np.float32), dx_buffer, s, name=f"dx{s}")
                          for s in range(S)]}

        fwd_bs, bwd_bs = addons.batch_serialise_fwd_and_grad(
            fwd, bwd, fwd.args, S,
            load_handles={fwd.graph.inputs[0]: addons.RemoteHandle(x_buffer, 0, shard_group),
                          bwd.graph.inputs[0]: addons.RemoteHandle(dx_buffer, 1, shard_group)},
            store_streams={},
            store_buffers={fwd.graph.outputs[0]: addons.RemoteHandle(x_buffer, 1, shard_group),
                           bwd.graph.outputs[0]: addons.RemoteHandle(dx_buffer, 0, shard_group)},
            rows=L, io_mode=io_mode)
        # The forward weights the backward reads become its named args (all of them when it recomputes).
        needed = fwd.args.keys_flat() if recompute else ["fc.weight"]
        assert sorted(bwd_bs.graph.args.keys_flat()) == sorted(needed + accum_facts.keys_flat())

        load, names = addons.load_remote_graph(weight_buffers)
        for n in range(L):  # forward phases
            fwd_bs.graph.bind(addons.NamedTensors.pack(names, load.call(n))).call(n)
        for n in reversed(range(L)):  # backward phases
            layer = addons.NamedTensors.pack(names, load.call(n))
            layer.update(grads[n])
            bwd_bs.graph.bind(layer).call(n)
    return ir, weights, grads, outputs


@pytest.mark.parametrize("io_mode, recompute, replicas", [(m, r, 1) for m in IO_MODES for r in (False, True)]
                         + [("io", True, 2), ("io_overlapped", False, 2)])
def test_batch_serialised_phased_training_equals_torch(io_mode, recompute, replicas, rng):
    data = host_data(rng)
    ir, weights, grads, outputs = build_phased_training(data, io_mode, recompute, replicas)
    got = run_phases(ir, data, weights, outputs, grads)
    ref = torch_reference(data)
    for key in ("y", "dx"):
        np.testing.assert_allclose(np.stack([got[t] for t in outputs[key]]), ref[key], rtol=1e-5, atol=1e-6)
    for n in range(L):
        np.testing.assert_allclose(got[grads[n].accum.fc.weight], ref["dw"][n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[grads[n].accum.fc.bias], ref["db"][n], rtol=1e-5, atol=1e-6)
        assert got[grads[n].mean_accum_counter] == S


def test_data_parallel_phases_with_replica_sharded_weights_and_gradients(rng):
    """The phase pattern of the training program with dp 2: weights replica-sharded in remote buffers
    (one entry per layer) are all-gathered at the start of a phase; the backward phase zeroes the
    accumulators, loops over the micro-batches, reduce-scatters the mean gradient over dp and stores
    its shard in a gradient buffer at the layer's entry. Replica r takes micro-batches r*S .. r*S+S-1."""
    R = 2
    data = host_data(rng, R * S)
    ir = popxl.Ir(replication=R)
    with ir.main_graph:
        dp = ir.replica_grouping()
        own = ir.replica_grouping(group_size=1)  # a value per replica
        facts, fwd, accum_facts, bwd = layer_and_gradient()
        bwd = addons.recompute_graph(bwd)
        weight_buffers = addons.named_variable_buffers(facts, entries=L)
        grad_buffers = addons.named_variable_buffers(facts, entries=L)
        assert weight_buffers.fc.weight.meta_shape == (H, H)  # replica-sharded over dp
        weights = [facts.init_remote(weight_buffers, n, f"layer{n}") for n in range(L)]
        grads = [facts.init_remote(grad_buffers, n, f"grad{n}") for n in range(L)]
        accums = accum_facts.init()

        x_buffer = addons.batch_serial_buffer(fwd.graph.outputs[0], steps=S, rows=L + 1)
        dx_buffer = addons.batch_serial_buffer(bwd.graph.inputs[0], steps=S, rows=L + 1)
        per_replica = {k: data[k].reshape(R, S, B, H) for k in ("x", "dy")}
        outputs = {"y": [], "dx": []}
        for s in range(S):
            popxl.remote_variable(per_replica["x"][:, s], x_buffer, s, replica_grouping=own, name=f"x{s}")
            popxl.remote_variable(per_replica["dy"][:, s], dx_buffer, L * S + s, replica_grouping=own, name=f"dy{s}")
            zeros = np.zeros((R, B, H), np.float32)
            outputs["y"].append(popxl.remote_variable(zeros, x_buffer, L * S + s, replica_grouping=own, name=f"y{s}"))
            outputs["dx"].append(popxl.remote_variable(zeros, dx_buffer, s, replica_grouping=own, name=f"dx{s}"))
        fwd_bs, bwd_bs = addons.batch_serialise_fwd_and_grad(
            fwd, bwd, fwd.args, S,
            load_handles={fwd.graph.inputs[0]: addons.RemoteHandle(x_buffer, 0),
                          bwd.graph.inputs[0]: addons.RemoteHandle(dx_buffer, 1)},
            store_streams={},
            store_buffers={fwd.graph.outputs[0]: addons.RemoteHandle(x_buffer, 1),
                           bwd.graph.outputs[0]: addons.RemoteHandle(dx_buffer, 0)},
            rows=L)

        load, names = addons.load_remote_graph(weight_buffers)
        gather, gathered_names = addons.all_gather_replica_sharded_graph(
            addons.NamedTensors.pack(names, load.graph.outputs), replica_groups=facts.replica_groupings)
        reduce, reduced_names = addons.reduce_replica_sharded_graph(
            accums.accum, "mean", shard_groups=facts.replica_groupings, replica_group=dp)
        store = addons.store_remote_graph(grad_buffers)

        def layer_weights(n):
            shards = addons.NamedTensors.pack(names, load.call(n))
            return addons.NamedTensors.pack(gathered_names, gather.bind(shards).call())

        for n in range(L):
            fwd_bs.graph.bind(layer_weights(n)).call(n)
        for n in reversed(range(L)):
            ops.var_updates.accumulator_zero_(accums.mean_accum_counter)  # restarts the running means
            layer = layer_weights(n)
            layer.update(accums)
            bwd_bs.graph.bind(layer).call(n)
            shards = addons.NamedTensors.pack(reduced_names, reduce.bind(accums.accum).call())
            store.bind(shards).call(n)
    got = run_phases(ir, data, weights, outputs, grads)
    ref = torch_reference(data)
    for key in ("y", "dx"):
        np.testing.assert_allclose(np.stack([got[t] for t in outputs[key]], 1).reshape(R * S, B, H), ref[key],
                                   rtol=1e-5, atol=1e-6)
    for n in range(L):
        np.testing.assert_allclose(got[grads[n].fc.weight], ref["dw"][n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[grads[n].fc.bias], ref["db"][n], rtol=1e-5, atol=1e-6)


def test_recomputed_gradient_graph_needs_only_the_forward_inputs():
    ir = popxl.Ir()
    with ir.main_graph:
        facts, fwd, accum_facts, bwd = layer_and_gradient()
        Fwd = popxl.transforms.ExpectedConnectionType.Fwd
        before = [c.fwd_tensor for c in bwd.grad_graph_info.expected_inputs if c.connection_type == Fwd]
        assert any(t not in fwd.graph.inputs for t in before)  # autodiff alone takes intermediates
        recomputed = addons.recompute_graph(bwd)
        info = recomputed.grad_graph_info
        fwd_values = [c.fwd_tensor for c in info.expected_inputs if c.connection_type == Fwd]
        assert sorted(t.name for t in fwd_values) == sorted(t.name for t in fwd.graph.inputs)
        assert all(t in fwd.graph.inputs for t in fwd_values)
        assert [c.fwd_tensor for c in info.expected_outputs] == [fwd.graph.inputs[0]]
        assert sorted(recomputed.args.keys_flat()) == sorted(accum_facts.keys_flat())
        assert info.graph is recomputed.graph and info.forward_graph is fwd.graph


def test_recompute_graph_with_forward_outputs_equals_torch(rng):
    """The recomputing gradient graph of ``tanh(x @ w + b)`` that also returns the forward, called on
    two micro-batches with only their inputs and output gradients: its ``dx`` and ``y`` per
    micro-batch and its accumulated (mean) ``dw``, ``db`` against torch autograd."""
    xs, dys = (rng.normal(size=(2, B, H)).astype(np.float32) for _ in range(2))
    w, b = rng.normal(size=(H, H)).astype(np.float32) * 0.5, rng.normal(size=(H,)).astype(np.float32) * 0.1
    fwd_grad = popxl.transforms.ExpectedConnectionType.FwdGrad
    ir = popxl.Ir()
    with ir.main_graph:
        facts, fwd, accum_facts, bwd = layer_and_gradient()
        recomputed = addons.recompute_graph_with_forward_outputs(bwd)
        info = recomputed.grad_graph_info
        assert [c.fwd_tensor for c in info.expected_outputs] == [fwd.graph.inputs[0]]
        weights = {"fc.weight": popxl.variable(w, name="w"), "fc.bias": popxl.variable(b, name="b")}
        accums = accum_facts.init()
        forward_value = {t: weights[name] for name, t in fwd.args.to_dict().items()}
        results = []
        for s in range(2):
            forward_value[fwd.graph.inputs[0]] = popxl.variable(xs[s], name=f"x{s}")
            dy = popxl.variable(dys[s], name=f"dy{s}")
            inputs = [dy if c.connection_type == fwd_grad else forward_value[c.fwd_tensor]
                      for c in info.expected_inputs]
            # The input gradient, then the forward's output y (all tanh's rule reads: autodiff added none).
            dx, y = recomputed.bind(accums).call(*inputs)
            results.append([popxl.d2h_stream(t.shape, t.dtype, f"out{s}.{i}") for i, t in enumerate((dx, y))])
            for stream, t in zip(results[-1], (dx, y)):
                ops.host_store(stream, t)
    with popxl.Session(ir, "cpu") as session:
        got = session.run()
        got.update(session.get_tensors_data([*accums.tensors]))

    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    xt = torch.tensor(xs, requires_grad=True)
    pre_t = xt @ wt + bt
    yt = torch.tanh(pre_t)
    (yt * torch.tensor(dys)).sum().backward()
    for s, (dx, y) in enumerate(results):
        np.testing.assert_allclose(got[dx], xt.grad[s].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[y], yt[s].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[accums.accum.fc.weight], wt.grad.numpy() / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[accums.accum.fc.bias], bt.grad.numpy() / 2, rtol=1e-5, atol=1e-6)


def test_batch_serialise_streams_rows_and_passed_through_inputs(rng):
    """Host streams in and out, a passed-through variable, a seed, and a buffer row offset:
    step s of row 1 stores at entry (1 + 1) * S + s."""
    xs = rng.normal(size=(S, B, H)).astype(np.float32)
    scale = rng.normal(size=(H,)).astype(np.float32)
    ir = popxl.Ir()
    ir.num_host_transfers = S
    with ir.main_graph:
        def fn(x, w, seed):
            return x * w + 1.0, ops.random_uniform(seed, (2,))
        x_spec, w_spec = popxl.TensorSpec((B, H), F32), popxl.TensorSpec((H,), F32)
        graph = addons.GraphWithNamedArgs(ir.create_graph(fn, x_spec, w_spec, popxl.TensorSpec((2,), popxl.uint32)))
        x_in, w_in, seed_in = graph.graph.inputs
        y, noise = graph.graph.outputs
        graph.args = addons.NamedTensors(w=w_in)
        x_stream = popxl.h2d_stream((B, H), F32, "x")
        y_stream = popxl.d2h_stream((B, H), F32, "y")
        noise_stream = popxl.d2h_stream((2,), F32, "noise")
        buffer = popxl.remote_buffer((B, H), F32, 1)
        result = addons.batch_serialise(graph, S, {x_in: x_stream}, {y: y_stream, noise: noise_stream},
                                        {x_in: addons.RemoteHandle(buffer, 1)}, seed_input=seed_in, rows=2)
        assert buffer.entries == 3 * S
        assert result.stored_buffers[x_in].buffer is buffer
        assert [t.shape for t in result.graph.graph.inputs] == [(), (2,), (H,)]  # row, seed, then w
        assert result.remap_tensors(graph.args).w is result.graph.graph.inputs[2]
        w = popxl.variable(scale, name="w")
        seed = popxl.variable(np.array([7, 11], np.uint32), popxl.uint32, name="seed")
        result.graph.bind(addons.NamedTensors(w=w)).call(1, seed)
        kept = [popxl.remote_variable(np.zeros((B, H), np.float32), buffer, 2 * S + s, name=f"kept{s}")
                for s in range(S)]
    with popxl.Session(ir) as session:
        out = session.run({x_stream: xs})
        kept_data = session.get_tensors_data(kept)
    np.testing.assert_allclose(out[y_stream], xs * scale + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.stack([kept_data[t] for t in kept]), xs)
    noise = out[noise_stream]
    assert len({tuple(n) for n in noise}) == S  # every micro-batch draws from its own seed


def test_remap_grad_info_moves_connections_by_position():
    ir = popxl.Ir()
    with ir.main_graph:
        spec = popxl.TensorSpec((B, H), F32)
        facts, fwd = Layer().create_graph(spec)
        _, fwd2 = Layer().create_graph(spec)
        bwd = addons.autodiff(fwd)
        info = bwd.grad_graph_info
        fwd2_bwd = addons.autodiff(fwd2)
        moved = addons.remap_grad_info(info, fwd2.graph, fwd2_bwd.graph)
        ins, ins2 = list(fwd.graph.inputs), list(fwd2.graph.inputs)
        outs, outs2 = list(fwd.graph.outputs), list(fwd2.graph.outputs)
        for old, new in zip(info.expected_inputs, moved.expected_inputs):
            where, where2 = (ins, ins2) if old.fwd_tensor in ins else (outs, outs2)
            assert new.fwd_tensor is where2[where.index(old.fwd_tensor)]
            assert new.connection_type == old.connection_type
        assert [ins2.index(c.fwd_tensor) for c in moved.expected_outputs] == \
            [ins.index(c.fwd_tensor) for c in info.expected_outputs]
        assert moved.graph is fwd2_bwd.graph and moved.forward_graph is fwd2.graph


def test_repeat_graph_repeats_the_whole_main_graph(rng):
    """A training-like main graph (stream in, update a variable in place, stream out) run 3 times per session run."""
    count = 3
    xs = rng.normal(size=(count, H)).astype(np.float32)
    ir = popxl.Ir()
    ir.num_host_transfers = count
    with ir.main_graph:
        total = popxl.variable(np.ones(H, np.float32), name="total")
        x_stream = popxl.h2d_stream((H,), F32, "x")
        out_stream = popxl.d2h_stream((H,), F32, "out")
        x = ops.host_load(x_stream)
        ops.var_updates.accumulate_(total, x * 2.0)
        ops.host_store(out_stream, total + 0.5)
        assert addons.transforms.repeat_graph(ir.main_graph, 1) is ir.main_graph
    body = addons.transforms.repeat_graph(ir.main_graph, count)
    assert body is not ir.main_graph and len(body.inputs) >= 1
    with popxl.Session(ir) as session:
        out = session.run({x_stream: xs})
        final = session.get_tensor_data(total)
    expected = 1.0 + np.cumsum(2.0 * xs, axis=0)
    np.testing.assert_allclose(out[out_stream], expected + 0.5, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(final, expected[-1], rtol=1e-5, atol=1e-6)


def test_available_memory_proportions_are_checked_and_recorded():
    from gptj_popxl.addons.transforms.available_memory_proportion import recorded_proportions
    ir = popxl.Ir()
    with ir.main_graph:
        graph = ir.create_empty_graph("g")
    addons.transforms.set_available_memory_proportion_by_ipu(ir, [0.3, 0.5])
    addons.transforms.set_graph_available_memory_proportion_by_ipu(graph, (0.2,))
    assert recorded_proportions(ir) == (0.3, 0.5) and recorded_proportions(graph) == (0.2,)
    for bad in ([], [0.0], [1.5]):
        with pytest.raises(ValueError, match="proportion"):
            addons.transforms.set_available_memory_proportion_by_ipu(ir, bad)


@pytest.mark.parametrize("io_mode", IO_MODES)
def test_fwd_and_grad_store_host_loaded_inputs_for_the_backward(io_mode, rng):
    """An input the backward needs that came from a host stream (as token ids do) is stored by the
    forward loop and reloaded by the backward loop; streams out from both loops."""
    xs = rng.normal(size=(S, B, H)).astype(np.float32)
    dys = rng.normal(size=(S, B, H)).astype(np.float32)
    w_np = rng.normal(size=(H,)).astype(np.float32)
    ir = popxl.Ir()
    ir.num_host_transfers = S
    with ir.main_graph:
        def fn(x, w):
            return x * w
        graph = addons.GraphWithNamedArgs(ir.create_graph(fn, popxl.TensorSpec((B, H), F32),
                                                          popxl.TensorSpec((H,), F32)))
        x_in, w_in = graph.graph.inputs
        graph.args = addons.NamedTensors(w=w_in)
        accum_facts, grad = addons.autodiff_with_accumulation(graph, [w_in], grads_required=[])
        streams = {"x": popxl.h2d_stream((B, H), F32, "x"), "dy": popxl.h2d_stream((B, H), F32, "dy"),
                   "y": popxl.d2h_stream((B, H), F32, "y")}
        fwd_bs, grad_bs = addons.batch_serialise_fwd_and_grad(
            graph, grad, graph.args, S, {x_in: streams["x"], grad.graph.inputs[0]: streams["dy"]},
            {graph.graph.outputs[0]: streams["y"]}, {}, io_mode=io_mode)
        assert x_in in fwd_bs.stored_buffers and fwd_bs.stored_buffers[x_in].buffer.entries == S
        w = popxl.variable(w_np, name="w")
        accums = accum_facts.init()
        fwd_bs.graph.bind(addons.NamedTensors(w=w)).call(0)
        named = addons.NamedTensors(w=w)
        named.update(accums)
        grad_bs.graph.bind(named).call(0)
    with popxl.Session(ir) as session:
        out = session.run({streams["x"]: xs, streams["dy"]: dys})
        dw = session.get_tensor_data(accums.accum.w)
    np.testing.assert_allclose(out[streams["y"]], xs * w_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, (xs * dys).sum(1).mean(0), rtol=1e-5, atol=1e-6)


def test_batch_serialise_rejects_bad_arguments():
    ir = popxl.Ir()
    with ir.main_graph:
        graph = addons.GraphWithNamedArgs(ir.create_graph(lambda x: x + 1.0, popxl.TensorSpec((H,), F32)))
        (x,), (y,) = graph.graph.inputs, graph.graph.outputs
        stream = popxl.h2d_stream((H,), F32, "x")
        with pytest.raises(TypeError, match="handle of tensor .* must be a RemoteHandle"):
            addons.batch_serialise(graph, S, {}, {}, {y: stream})
        with pytest.raises(ValueError, match="io_mode"):
            addons.batch_serialise(graph, S, {x: stream}, {}, {}, io_mode="fast")
        with pytest.raises(ValueError, match="steps must be >= 1"):
            addons.batch_serialise(graph, 0, {x: stream}, {}, {})
        with pytest.raises(ValueError, match="overlapped IO needs steps >= 2"):
            addons.transforms.batch_serialise_overlapped(graph, 1, {x: stream}, {}, {})
