"""The runtime's C++ kernels (``popxl_cpu/kernels``) against float64 torch: tanh-GELU and its gradient through
``ops.gelu`` and autodiff at sizes that take the kernels, and the attention's ``softmax(s / c + mask)``,
which lowering fuses into one kernel; and host loads that borrow the caller's array instead of copying
it, only where nothing can tell."""
import numpy as np
import pytest
import torch

from gptj_popxl.popxl_cpu import (Ir, Session, TensorByRef, TensorSpec, constant, custom_op, d2h_stream, float32,
                                  h2d_stream, kernels, ops)
from gptj_popxl.popxl_cpu.executor import storage_with_copying_views
from gptj_popxl.popxl_cpu.ops import elementwise
from gptj_popxl.popxl_cpu.ops.nn import Softmax, lowering_fusions
from gptj_popxl.popxl_cpu.session import Runtime
from ops_check import run_graph

F = torch.nn.functional


def _gelu64(x: np.ndarray) -> np.ndarray:
    return F.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()


def _gelu_grad64(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    x64 = torch.from_numpy(x).double().requires_grad_()
    F.gelu(x64, approximate="tanh").backward(torch.from_numpy(dy).double())
    return x64.grad.numpy()


def _inputs(rng, n: int) -> np.ndarray:
    """Normal values, with wide ones, saturating ones and both signs of zero among them."""
    x = rng.standard_normal(n).astype(np.float32) * 3
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 9.0, -9.0, 30.0, -30.0, 1e4, -1e4, 1e15, -1e15], np.float32)
    x[: min(n, len(special))] = special[: min(n, len(special))]
    return rng.permutation(x)


# Around the size from which ops take the C++ kernel, and lengths that leave a scalar tail.
SIZES = [elementwise._NATIVE_GELU_FROM - 1, elementwise._NATIVE_GELU_FROM, 16 * 1024 * 3 + 13, 100003]


@pytest.mark.parametrize("n", SIZES)
def test_gelu_and_its_gradient_match_float64(n, rng):
    x = _inputs(rng, n)
    dy = rng.standard_normal(n).astype(np.float32)
    (y,), (dx,) = run_graph(ops.gelu, x, dys=[dy])
    # float32's own rounding of the formula: about an ulp of the result, plus the tanh's error near 0
    np.testing.assert_allclose(y, _gelu64(x), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(dx, _gelu_grad64(dy, x), rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_adam_updater_kernel_matches_float64(decay, rng):
    """The one-pass updater against numpy in float64, on lengths that take the vector lanes, two threads
    and a scalar tail; zero moments and a zero second moment under a non-zero first one included."""
    n = 100003
    m, w = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    v = (rng.random(n) * 1e-3).astype(np.float32)
    m[:5], v[:9] = 0, 0
    bc1, bc2, eps = 1 - 0.9 ** 3, 1 - 0.999 ** 3, 1e-6
    x = kernels.adam_updater(torch.from_numpy(m), torch.from_numpy(v), torch.from_numpy(w) if decay else None,
                             bc1, bc2, eps, decay).numpy()
    m64, v64 = m.astype(np.float64), v.astype(np.float64)
    expected = m64 / bc1 / (np.sqrt(v64 / bc2) + eps) + decay * w.astype(np.float64)
    np.testing.assert_allclose(x, expected, rtol=2e-6, atol=1e-7)


def test_gelu_kernels_give_torchs_nans_and_infinities():
    x = np.array([np.nan, np.inf, -np.inf, 1.0] * 1000, np.float32)
    dy = np.ones_like(x)
    y = kernels.gelu_tanh(torch.from_numpy(x)).numpy()
    dx = kernels.gelu_tanh_grad(torch.from_numpy(dy), torch.from_numpy(x)).numpy()
    for ours, reference in ((y, _gelu64(x)), (dx, _gelu_grad64(dy, x))):
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))
        np.testing.assert_allclose(ours[~np.isnan(ours)], reference[~np.isnan(reference)], rtol=2e-6)


def test_gelu_kernels_give_the_same_bits_on_any_thread_count(rng):
    x = torch.from_numpy(_inputs(rng, 16 * 5000 + 7))
    dy = torch.from_numpy(rng.standard_normal(x.numel()).astype(np.float32))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((kernels.gelu_tanh(x), kernels.gelu_tanh_grad(dy, x)))
    finally:
        torch.set_num_threads(before)
    for y, dx in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(dx, results[0][1])


def test_gelu_writes_given_memory_for_large_outputs(rng):
    """An output over the plan's large-value size takes memory the plan hands the kernel (``lower_out``)."""
    x = rng.standard_normal((1100, 1024)).astype(np.float32)
    out, _ = run_graph(lambda t: ops.gelu(t) * 2.0, x)
    np.testing.assert_allclose(out[0], 2 * _gelu64(x), rtol=2e-6, atol=2e-6)


def test_gelu_kernel_rejects_arrays_it_would_have_to_convert():
    x = torch.zeros(4096)
    with pytest.raises(TypeError):
        kernels.fused_ops().gelu_tanh(x.numpy(), np.zeros(4096, np.float64), 1)
    with pytest.raises(TypeError):
        kernels.fused_ops().gelu_tanh(x.numpy(), np.zeros((64, 128), np.float32)[:, ::2], 1)
    with pytest.raises(ValueError, match="4096 and 4095 elements"):
        kernels.fused_ops().gelu_tanh(x.numpy(), np.zeros(4095, np.float32), 1)


# ---------------------------------------------------------------- inputs the run borrows

class _Address(custom_op.CustomOp):
    """x + 1, recording the address of the x it is given."""
    name = "address_recorded"
    seen = []

    @staticmethod
    def infer(x):
        return custom_op.spec(x.shape, x.dtype)

    @staticmethod
    def kernel(x):
        _Address.seen.append(x.data_ptr())
        return x + 1


def _program_of(shape, body):
    """A session loading a float32 stream of ``shape``, applying ``body`` and storing its result."""
    ir = Ir()
    with ir.main_graph:
        x_stream = h2d_stream(shape, float32, "x")
        y = body(ops.host_load(x_stream))
        y_stream = d2h_stream(y.shape, y.dtype, "y")
        ops.host_store(y_stream, y)
    return Session(ir), x_stream, y_stream


def _program(body):
    """A session loading a (2, 4) float32 stream, applying ``body`` and storing its result."""
    return _program_of((2, 4), body)


def test_a_load_nothing_writes_or_keeps_reads_the_callers_array():
    session, x_stream, y_stream = _program(_Address.create)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    frozen = x.copy()
    frozen.flags.writeable = False  # torch must not be handed a read-only array
    strided = np.arange(16, dtype=np.float32).reshape(2, 8)[:, ::2]
    with session:
        for data, borrowed in ((x, True), (frozen, False), (strided, False)):
            np.testing.assert_array_equal(session.run({x_stream: data})[y_stream], data + 1)
            assert (_Address.seen[-1] == data.ctypes.data) == borrowed


@pytest.mark.parametrize("body", [lambda t: ops.add_(t, t), lambda t: ops.reshape(ops.gelu_(t), (8,))],
                         ids=["written", "written through a view"])
def test_a_load_written_in_place_is_a_copy(body):
    session, x_stream, y_stream = _program(body)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with session:
        session.run({x_stream: x})
    np.testing.assert_array_equal(x, np.arange(8, dtype=np.float32).reshape(2, 4))


def test_a_load_a_called_graph_writes_by_reference_is_a_copy():
    ir = Ir()
    with ir.main_graph:
        x_stream = h2d_stream((4,), float32, "x")
        loaded = ops.host_load(x_stream)
        def square(t: TensorByRef):
            ops.add_(t, t)

        ops.call(ir.create_graph(square, loaded), loaded)
        y_stream = d2h_stream((4,), float32, "y")
        ops.host_store(y_stream, loaded + 0.0)
    x = np.arange(4, dtype=np.float32)
    with Session(ir) as session:
        y = session.run({x_stream: x})[y_stream]
    np.testing.assert_array_equal(y, np.arange(4, dtype=np.float32) * 2)
    np.testing.assert_array_equal(x, np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("body", [lambda t: t, lambda t: ops.reshape(t, (8,)), lambda t: ops.transpose(t)],
                         ids=["stored", "stored as a view", "stored transposed"])
def test_a_load_the_host_keeps_is_a_copy(body):
    session, x_stream, y_stream = _program(body)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with session:
        y = session.run({x_stream: x})[y_stream]
    expected = y.copy()
    x[...] = -1
    np.testing.assert_array_equal(y, expected)


# ---------------------------------------------------------------- the attention's softmax

def _attention_softmax64(scores, mask, scale):
    return torch.softmax(torch.from_numpy(scores).double() / scale + torch.from_numpy(mask).double(), -1).numpy()


def _attention_graph(scale, mask_value, reuse_quotient=False):
    """``softmax(s / scale + mask)`` as the model builds it; with ``reuse_quotient`` the quotient has a
    second use, which leaves nothing to fuse."""
    def fn(s):
        quotient = s / constant(np.float32(scale))
        probs = ops.softmax(quotient + constant(mask_value), axis=-1)
        return (probs, quotient) if reuse_quotient else probs
    return fn


def _fused_softmaxes(fn, *specs):
    ir = Ir()
    with ir.main_graph:
        graph = ir.create_graph(fn, *specs)
    classes, written, _ = storage_with_copying_views(graph)
    fused, _ = lowering_fusions(graph, Runtime(ir), classes, written)
    return sum(op.prim is Softmax for op in fused)


@pytest.mark.parametrize("keys", [256, 37])
def test_attention_softmax_is_one_kernel_matching_float64(keys, rng):
    queries = keys
    scores = (rng.standard_normal((2, 3, queries, keys)) * 20).astype(np.float32)
    mask = np.where(np.arange(keys)[None, :] <= np.arange(queries)[:, None], 0, np.finfo(np.float32).min)
    mask = mask.astype(np.float32)
    fn = _attention_graph(8.0, mask)
    assert _fused_softmaxes(fn, TensorSpec(scores.shape, float32)) == 1
    dy = rng.standard_normal(scores.shape).astype(np.float32)
    (probs,), (ds,) = run_graph(fn, scores, dys=[dy])
    np.testing.assert_allclose(probs, _attention_softmax64(scores, mask, 8.0), rtol=1e-5, atol=1e-7)
    s64 = torch.from_numpy(scores).double().requires_grad_()
    torch.softmax(s64 / 8.0 + torch.from_numpy(mask).double(), -1).backward(torch.from_numpy(dy).double())
    np.testing.assert_allclose(ds, s64.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_shape", [(8,), (1, 8), (2, 1, 4, 8), (2, 1, 1, 8), (3, 1, 8), (1, 3, 4, 8)],
                         ids=["keys", "one row", "per batch", "per batch keys", "per head", "per head and query"])
def test_attention_softmax_fused_for_masks_broadcast_over_batch_heads_or_queries(mask_shape, rng):
    scores = (rng.standard_normal((2, 3, 4, 8)) * 5).astype(np.float32)  # (batch, heads, queries, keys)
    mask = rng.standard_normal(mask_shape).astype(np.float32)
    fn = _attention_graph(3.0, mask)
    assert _fused_softmaxes(fn, TensorSpec(scores.shape, float32)) == 1
    (probs,), _ = run_graph(fn, scores)
    np.testing.assert_allclose(probs, _attention_softmax64(scores, mask, 3.0), rtol=1e-5, atol=1e-7)


def test_attention_softmax_unfused_where_the_pattern_does_not_hold(rng):
    scores = rng.standard_normal((2, 3, 4, 5, 8)).astype(np.float32)
    spec = TensorSpec(scores.shape, float32)
    over_keys = rng.standard_normal((5, 1)).astype(np.float32)
    two_runs = rng.standard_normal((2, 1, 4, 1, 8)).astype(np.float32)
    assert _fused_softmaxes(_attention_graph(3.0, over_keys), spec) == 0
    assert _fused_softmaxes(_attention_graph(3.0, two_runs), spec) == 0
    assert _fused_softmaxes(_attention_graph(3.0, two_runs[0, 0], reuse_quotient=True), spec) == 0
    for mask in (over_keys, two_runs):
        (probs,), _ = run_graph(_attention_graph(3.0, mask), scores)
        np.testing.assert_allclose(probs, _attention_softmax64(scores, mask, 3.0), rtol=1e-5, atol=1e-7)
    (probs, _), _ = run_graph(_attention_graph(3.0, two_runs[0, 0], reuse_quotient=True), scores)
    np.testing.assert_allclose(probs, _attention_softmax64(scores, two_runs[0, 0], 3.0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scores_shape, mask_shape", [((2, 3, 4, 8), (2, 1, 4, 8)), ((2, 4, 8), (4, 8)),
                                                      ((2, 3, 4, 8), (1, 4, 8)), ((3, 2, 4, 8), (4, 8))])
def test_attention_softmax_fused_with_each_replicas_own_mask(scores_shape, mask_shape, rng, monkeypatch):
    """A prefill's (batch, 1, queries, keys) mask comes from the host, one per replica; a mask of lower
    rank than the scores too, whose rows must still be the replica's own."""
    calls = []
    real = kernels.scaled_masked_softmax
    monkeypatch.setattr(kernels, "scaled_masked_softmax", lambda *a, **k: calls.append(a) or real(*a, **k))
    scores = (rng.standard_normal((2,) + scores_shape) * 5).astype(np.float32)  # replicas first
    masks = np.where(rng.random((2,) + mask_shape) < 0.3, np.finfo(np.float32).min, 0).astype(np.float32)

    def fn(s, mask):
        return ops.softmax(s / constant(np.float32(2.0)) + mask, axis=-1)
    assert _fused_softmaxes(fn, TensorSpec(scores.shape[1:], float32), TensorSpec(masks.shape[1:], float32)) == 1
    (probs,), _ = run_graph(fn, scores, masks, replication=2)
    assert len(calls) == 1
    for r in range(2):
        np.testing.assert_allclose(probs[r], _attention_softmax64(scores[r], masks[r], 2.0), rtol=1e-5, atol=1e-7)


def test_attention_softmax_kernel_keeps_nans_and_gives_zeros_where_masked():
    scores = np.zeros((3, 40), np.float32)
    scores[1, 5] = np.nan
    mask = np.zeros((3, 40), np.float32)
    mask[:, 20:] = np.finfo(np.float32).min
    probs = kernels.scaled_masked_softmax(torch.from_numpy(scores), torch.from_numpy(mask), 2.0).numpy()
    assert np.isnan(probs[1]).all() and not np.isnan(probs[[0, 2]]).any()
    np.testing.assert_array_equal(probs[[0, 2], 20:], 0.0)
    np.testing.assert_allclose(probs[[0, 2], :20], 1 / 20, rtol=1e-6)


def test_gelu_in_place_writes_its_input_at_kernel_sizes(rng):
    x = rng.standard_normal(4096).astype(np.float32)
    def written(t):
        ops.gelu_(t)
        return t  # the input itself, which the op must have written
    session, x_stream, y_stream = _program_of((4096,), written)
    with session:
        y = session.run({x_stream: x})[y_stream]
    np.testing.assert_allclose(y, _gelu64(x), rtol=2e-6, atol=1e-6)


def test_large_gelu_outputs_take_the_memory_the_plan_hands_them(rng, monkeypatch):
    given = []
    real = kernels.gelu_tanh
    monkeypatch.setattr(kernels, "gelu_tanh", lambda x, out=None: given.append(out) or real(x, out))
    x = rng.standard_normal((1100, 1024)).astype(np.float32)
    out, _ = run_graph(lambda t: ops.gelu(t) * 2.0, x)
    np.testing.assert_allclose(out[0], 2 * _gelu64(x), rtol=2e-6, atol=2e-6)
    assert given and given[-1] is not None


def test_attention_softmax_unfused_when_its_input_is_written_before_it_runs(rng):
    scores = rng.standard_normal((4, 8)).astype(np.float32)
    mask = np.where(np.arange(8) < 4, 0, -1e4).astype(np.float32) * np.ones((4, 1), np.float32)

    def fn(s):
        quotient = s / constant(np.float32(2.0))
        ops.add_(s, s)  # after the quotient is taken: the softmax must see the old scores
        return ops.softmax(quotient + constant(mask), axis=-1), s

    assert _fused_softmaxes(fn, TensorSpec(scores.shape, float32)) == 0
    (probs, doubled), _ = run_graph(fn, scores)
    np.testing.assert_allclose(probs, _attention_softmax64(scores, mask, 2.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(doubled, 2 * scores)


@pytest.mark.parametrize("mask_shape", [(16,), (3, 16), (2, 3, 16)], ids=["rank 1", "rank 2", "rank 3"])
def test_attention_softmax_fused_on_replicas_with_masks_of_any_rank(mask_shape, rng):
    scores = (rng.standard_normal((2, 2, 3, 16)) * 5).astype(np.float32)  # replicas first
    mask = rng.standard_normal(mask_shape).astype(np.float32)
    fn = _attention_graph(4.0, mask)
    assert _fused_softmaxes(fn, TensorSpec(scores.shape[1:], float32)) == 1
    (probs,), _ = run_graph(fn, scores, replication=2)
    for r in range(2):
        np.testing.assert_allclose(probs[r], _attention_softmax64(scores[r], mask, 4.0), rtol=1e-5, atol=1e-7)


def test_a_stream_a_called_graph_also_loads_and_writes_is_a_copy():
    ir = Ir()
    ir.num_host_transfers = 2
    with ir.main_graph:
        x_stream = h2d_stream((4,), float32, "x")
        y_stream = d2h_stream((4,), float32, "y")
        ops.host_store(y_stream, ops.host_load(x_stream) + 0.0)

        def doubled_second_transfer():
            t = ops.host_load(x_stream)
            ops.add_(t, t)
            ops.host_store(y_stream, t)
        ops.call(ir.create_graph(doubled_second_transfer))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    with Session(ir) as session:
        y = session.run({x_stream: x})[y_stream]
    np.testing.assert_array_equal(x, np.arange(8, dtype=np.float32).reshape(2, 4))
    np.testing.assert_array_equal(y, [[0, 1, 2, 3], [8, 10, 12, 14]])


def test_an_input_that_is_also_an_output_array_is_read_as_it_was(rng):
    ir = Ir()
    with ir.main_graph:
        x_stream = h2d_stream((4,), float32, "x")
        x = ops.host_load(x_stream)
        twice, plus_one = d2h_stream((4,), float32, "twice"), d2h_stream((4,), float32, "plus_one")
        ops.host_store(twice, x * 2.0)
        ops.host_store(plus_one, x + 1.0)  # runs after the store into the caller's x
    x = np.arange(4, dtype=np.float32)
    result = np.zeros(4, np.float32)
    with Session(ir) as session:
        session.run_with_outputs({x_stream: x}, {twice: x, plus_one: result})
    np.testing.assert_array_equal(x, np.arange(4) * 2)
    np.testing.assert_array_equal(result, np.arange(4) + 1)
