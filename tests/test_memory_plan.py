"""Lowering's memory plan: large op outputs are written into memory the plan keeps across runs when
the value never outlives a run, else into fresh memory. The size threshold is lowered to 0 so that
every op of these tiny programs that can take memory does; results are checked against numpy and
transformers on two runs with different data, and the first run's results must survive the second."""
import numpy as np
import pytest
import torch

import gptj_popxl
from gptj_popxl import golden
from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import allocation, ops
from gptj_popxl.popxl_cpu.ops.io import init_value
from helpers_gptj import TINY, tiny_checkpoint

F32 = popxl.float32


def escaping_program():
    """Matmul outputs (all plannable) reaching the host directly, through a view, after an in-place
    add, from a subgraph called twice, into a variable and into a remote buffer; one internal product,
    which a subgraph also sends to the host."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    w2 = rng.normal(size=(5, 5)).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        x_stream = popxl.h2d_stream((4, 3), F32, "x")
        weight, weight2 = popxl.variable(w, F32, "w"), popxl.variable(w2, F32, "w2")
        held = popxl.variable(np.zeros((4, 5), np.float32), F32, "held")
        buffer = popxl.remote_buffer((4, 5), F32, entries=1)
        outputs = {}

        def store(name, t):
            outputs[name] = popxl.d2h_stream(t.shape, t.dtype, name)
            ops.host_store(outputs[name], t)
        store("previous", ops.remote_load(buffer, 0))  # the last run's stored product
        x = ops.host_load(x_stream)
        internal = x @ weight
        store("chain", internal @ weight2)
        store("direct", x @ weight)
        store("transposed", ops.transpose(x @ weight, (1, 0)))
        store("in_place", ops.add_(x @ weight, popxl.constant(1.0, F32)))
        ops.var_updates.copy_var_update_(held, x @ weight)
        ops.remote_store(buffer, 0, x @ weight)

        def product(a, b):
            inner = a @ b  # a value of the subgraph that never leaves it
            return inner @ popxl.constant(np.eye(5, dtype=np.float32)) + inner
        graph = ir.create_graph(product, x, weight)
        store("call_1", ops.call(graph, x, weight)[0])
        store("call_2", ops.call(graph, x * 2.0, weight)[0])
        outputs["stored_in_subgraph"] = popxl.d2h_stream(internal.shape, F32, "stored_in_subgraph")
        ops.call(ir.create_graph(lambda t: ops.host_store(outputs["stored_in_subgraph"], t), internal), internal)
    return ir, x_stream, outputs, held, (w, w2)


def expected(x, w, w2):
    p = x @ w
    return {"chain": p @ w2, "direct": p, "transposed": p.T, "in_place": p + 1, "call_1": 2 * p, "call_2": 4 * p,
            "stored_in_subgraph": p}


def test_outputs_views_variables_and_remote_stores_never_share_kept_memory(planned):
    ir, x_stream, outputs, held, (w, w2) = escaping_program()
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2)]
    with popxl.Session(ir) as session:
        first = session.run({x_stream: xs[0]})
        kept = list(planned)
        second = session.run({x_stream: xs[1]})
        held_after = session.get_tensor_data(held)
    # Kept: the products feeding the chain, the variable update and the remote store (both copy it; one
    # block, since each is dead before the next is made, while the chain's input lives on to the last
    # call), and the subgraph's two inner products (one plan for both calls); the first run allocates
    # them, the second reuses them.
    assert kept == planned == [(20,)] * 4
    for run, got in zip(xs, (first, second)):
        for name, value in expected(run, w, w2).items():
            np.testing.assert_allclose(got[outputs[name]], value, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(second[outputs["previous"]], xs[0] @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(held_after, xs[1] @ w, rtol=1e-5, atol=1e-5)


def test_filled_values_start_from_their_value_on_every_run(planned):
    """Filled tensors accumulated in place: one that never leaves the run (kept memory) and one sent to
    the host (recycled memory) each start from their fill value again on the second run."""
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(2)]
    ir = popxl.Ir()
    with ir.main_graph:
        x_stream, out_stream = popxl.h2d_stream((4, 3), F32, "x"), popxl.d2h_stream((4, 3), F32, "sum")
        x = ops.host_load(x_stream)
        internal = ops.init((4, 3), F32, "internal")
        ops.var_updates.accumulate_(internal, x)
        sent = ops.var_updates.accumulate_(init_value((4, 3), F32, 1.5, "sent"), internal * 2.0)
        ops.host_store(out_stream, sent)
    with popxl.Session(ir) as session:
        got = [session.run({x_stream: x})[out_stream] for x in xs]
    assert len(planned) == 1  # the internal one's
    for x, value in zip(xs, got):
        np.testing.assert_allclose(value, 1.5 + 2 * x, rtol=1e-6)


def test_gptj_forward_and_gradients_match_transformers_run_after_run(planned, tmp_path):
    path = tiny_checkpoint(tmp_path)
    model = gptj_popxl.from_pretrained(path)
    rng = np.random.default_rng(2)
    runs = [rng.integers(0, TINY["vocab_size"], size=(2, 6)) for _ in range(3)]

    def check(ids, ours):
        logits, loss, grads = ours
        ref_logits, ref_loss, ref_grads = golden.hf_logits_loss_grads(path, ids, ids)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        assert abs(loss - ref_loss) <= 1e-5
        for name, g in ref_grads.items():
            np.testing.assert_allclose(grads[name], g, atol=1e-3 * np.abs(g).max(), err_msg=name)

    def run(ids):
        return (model.logits(ids), *model.loss_and_grads(ids, ids))
    first = run(runs[0])
    assert planned  # the logits' gradient inside loss_and_grads
    for ids in runs[1:]:  # the third run gets the second's memory back, the first's is still held
        check(ids, run(ids))
    check(runs[0], first)


def test_recycled_memory_is_handed_out_again_only_once_nothing_references_it():
    recycler = allocation.Recycler((2, 3), torch.float32, keep=2)
    first = recycler()
    address = first.data_ptr()
    view = first[1:].numpy()
    del first
    second = recycler()  # the first run's memory is still seen through ``view``
    assert second.data_ptr() != address
    del view
    assert recycler().data_ptr() == address
    del second
    third = recycler()
    third_view = third.t()
    del third
    assert recycler().data_ptr() not in (third_view.data_ptr(), 0)
