"""Neural-network ops and reductions against torch: matmul, softmax, norms, NLL losses, reductions."""
import numpy as np
import pytest
import torch

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import dtypes, ops
from ops_check import FLOATS, build_error, check, rand, run_graph, spec

F = torch.nn.functional


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 2)), ((4,), (4, 3)), ((3, 4), (4,)),
                                    ((2, 1, 3, 4), (5, 4, 2))])
def test_matmul(shapes, dtype, rng):
    a, b = rand(rng, *shapes[0], dtype=dtype), rand(rng, *shapes[1], dtype=dtype)
    check(ops.matmul, torch.matmul, a, b)


# Matmul + bias in each form lowering fuses into addmm (add either way round, add_), and one it must
# not fuse (the product used twice); as (popxl, torch, has a gradient).
_BIAS_MATMULS = {
    "add": (lambda x, w, b: ops.add(x @ w, b), lambda x, w, b: x @ w + b, True),
    "bias_first": (lambda x, w, b: ops.add(b, x @ w), lambda x, w, b: b + x @ w, True),
    "add_": (lambda x, w, b: ops.add_(x @ w, b), lambda x, w, b: x @ w + b, False),
    "shared": (lambda x, w, b: (lambda y: (y + b, y * 2.0))(x @ w), lambda x, w, b: (x @ w + b, x @ w * 2.0), True),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("replication", [1, 2])
@pytest.mark.parametrize("form", sorted(_BIAS_MATMULS))
def test_matmul_bias_patterns(form, replication, dtype, rng):
    lead = (replication,) if replication > 1 else ()
    x, w, b = (rand(rng, *lead, *shape, dtype=dtype) for shape in ((2, 3, 4), (4, 5), (5,)))
    popxl_fn, torch_fn, grad = _BIAS_MATMULS[form]
    check(popxl_fn, torch_fn, x, w, b, replication=replication, grad=grad)


def test_matmul_bias_stored_after_its_weight(rng, monkeypatch):
    """``x @ w + b`` with ``b``'s memory right after ``w``'s, as the model keeps its LM head, is one product
    ``[x, 1] @ [w; b]`` (for outputs of any size here): against numpy, and again after the bias changes in
    that memory."""
    from gptj_popxl.popxl_cpu.ops import nn
    from gptj_popxl.popxl_cpu.ops.nn import _BiasRow
    monkeypatch.setattr(nn, "_BIAS_ROW_FROM_BYTES", 0)
    x = rand(rng, 2, 3, 4)
    block = rand(rng, 5, 6)  # rows 0-3: w (4, 6); row 4: b (6,)
    ir = popxl.Ir()
    with ir.main_graph:
        w, b = popxl.variable(block[:4], name="w"), popxl.variable(block[4], name="b")
        popxl.back_variable(w, block[:4])
        popxl.back_variable(b, block[4])
        x_stream, y_stream = popxl.h2d_stream(x.shape, popxl.float32, "x"), popxl.d2h_stream((2, 3, 6), popxl.float32)
        ops.host_store(y_stream, ops.host_load(x_stream) @ w + b)
    with popxl.Session(ir) as session:
        np.testing.assert_allclose(session.run({x_stream: x})[y_stream], x @ block[:4] + block[4], rtol=1e-5,
                                   atol=1e-6)
        session.write_variable_data(b, np.full(6, 3.0, np.float32))
        np.testing.assert_allclose(session.run({x_stream: x})[y_stream], x @ block[:4] + 3.0, rtol=1e-5, atol=1e-6)
    as_tensor = torch.from_numpy
    assert torch.equal(_BiasRow(4, 6)(as_tensor(block[:4]), as_tensor(block[4])), as_tensor(block))
    assert _BiasRow(4, 6)(as_tensor(block[:4]), as_tensor(block[4].copy())) is None  # elsewhere: addmm


@pytest.mark.parametrize("native", [True, False], ids=["native", "float32 copies"])
def test_float16_matmul_sums_in_float32_and_rounds_once(native, rng, monkeypatch):
    from gptj_popxl.popxl_cpu.ops import nn
    if native and not nn.native_half_matmul():
        pytest.skip("torch has no native float16 products on this processor")
    monkeypatch.setattr(nn, "native_half_matmul", lambda: native)
    a, b = rand(rng, 2, 8, 1024, dtype=np.float16), rand(rng, 1024, 16, dtype=np.float16)
    (out,), _ = run_graph(lambda a, b: (a @ b,), a, b)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    # Within half an ulp of float16 of the exact sum (plus float32's rounding of 1024 terms): sums kept
    # in float16 would be off by many ulps.
    error = np.abs(out.astype(np.float64) - exact)
    assert np.all(error <= 2.0 ** -11 * np.abs(exact) + 1e-5 * np.abs(exact).max()), error.max()


def test_matmul_output_type_and_operator(rng):
    a, b = rand(rng, 2, 3, dtype=np.float16), rand(rng, 3, 2, dtype=np.float16)
    out, _ = run_graph(lambda a, b: (ops.matmul(a, b, output_type=dtypes.float32), a @ b), a, b)
    assert out[0].dtype == np.float32 and out[1].dtype == np.float16
    np.testing.assert_allclose(out[0], a.astype(np.float32) @ b.astype(np.float32), rtol=1e-6)


def test_matmul_output_type_gradient_has_input_dtype(rng):
    a, b = rand(rng, 2, 3, dtype=np.float16), rand(rng, 3, 4, dtype=np.float16)
    dy = rand(rng, 2, 4)
    _, (da, db) = run_graph(lambda a, b: ops.matmul(a, b, output_type=dtypes.float32), a, b, dys=[dy])
    assert da.dtype == db.dtype == np.float16
    ta, tb = (torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (a, b))
    (ta @ tb).backward(torch.tensor(dy))
    np.testing.assert_allclose(da, ta.grad.numpy(), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [0, -1])
def test_softmax(axis, dtype, rng):
    check(lambda x: ops.softmax(x, axis), lambda x: torch.softmax(x, axis), rand(rng, 3, 5, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_norm(dtype, rng):
    x = (rand(rng, 4, 6) * 3 + 1).astype(dtype)
    w, b = rand(rng, 6, dtype=dtype), rand(rng, 6, dtype=dtype)
    check(ops.layer_norm, lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5), x, w, b, tol=(2e-2, 3e-2)
          if dtype == np.float16 else None)
    check(lambda x, w, b: ops.layer_norm(x, w, b, eps=0.5), lambda x, w, b: F.layer_norm(x, (6,), w, b, 0.5), x, w, b,
          tol=(2e-2, 3e-2) if dtype == np.float16 else None)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,groups", [((2, 6, 3), 2), ((3, 4, 2, 2), 1), ((2, 6), 3)])
def test_group_norm(shape, groups, dtype, rng):
    x = rand(rng, *shape, dtype=dtype)
    w, b = rand(rng, shape[1], dtype=dtype), rand(rng, shape[1], dtype=dtype)
    check(lambda x, w, b: ops.group_norm(x, w, b, groups), lambda x, w, b: F.group_norm(x, groups, w, b, 1e-5),
          x, w, b, tol=(2e-2, 3e-2) if dtype == np.float16 else None)


def test_layer_norm_of_3d_input_normalises_axes_1_on(rng):
    """popxl's layer norm is group norm with one group: 3-D inputs are normalised over axes 1 and 2."""
    x, w, b = rand(rng, 2, 3, 4), rand(rng, 3), rand(rng, 3)
    check(ops.layer_norm, lambda x, w, b: F.group_norm(x, 1, w, b, 1e-5), x, w, b)


def test_batch_norm_inference(rng):
    x = rand(rng, 2, 3, 4)
    scale, bias, mean = rand(rng, 3), rand(rng, 3), rand(rng, 3)
    var = np.abs(rand(rng, 3)) + 0.1
    check(ops.batch_norm_inference,
          lambda x, s, b, m, v: (x - m[:, None]) / torch.sqrt(v[:, None] + 1e-5) * s[:, None] + b[:, None],
          x, scale, bias, mean, var)
    out, _ = run_graph(ops.batch_norm_inference, x, scale, bias, mean, var)
    expected = F.batch_norm(*(torch.tensor(a) for a in (x, mean, var, scale, bias)), training=False, eps=1e-5)
    np.testing.assert_allclose(out[0], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_norm_errors():
    with pytest.raises(ValueError, match=r"ops.layer_norm: weight 'w' must be \(4,\) float32, one per channel of 'x' "
                                         r"\(2, 4\); "
                                         r"got \(3,\) float32"):
        build_error(lambda x, w, b: ops.layer_norm(x, w, b), spec((2, 4)), spec((3,)), spec((4,)))
    with pytest.raises(ValueError, match=r"num_groups 3 must divide the 4 channels"):
        build_error(lambda x, w, b: ops.group_norm(x, w, b, 3), spec((2, 4)), spec((4,)), spec((4,)))
    with pytest.raises(ValueError, match=r"needs rank >= 2"):
        build_error(lambda x, w, b: ops.layer_norm(x, w, b), spec((4,)), spec((4,)), spec((4,)))
    with pytest.raises(TypeError, match=r"mean of 'x' int32: needs a floating point tensor"):
        build_error(lambda x: ops.mean(x), spec((4,), dtypes.int32))
    with pytest.raises(ValueError, match=r"scale 'v' must have shape \(3,\)"):
        build_error(lambda x, v: ops.batch_norm_inference(x, v, v, v, v), spec((2, 3)), spec((2,)))


# ---------------------------------------------------------------- losses

def torch_nll(p, labels, ignore_index, reduction, log_prob, eps=1e-7):
    """torch's nll_loss on log-probabilities with the class axis last; popxl clamps p before the log."""
    logp = p if log_prob else torch.log(p.clamp(min=eps))
    classes = p.shape[-1]
    loss = F.nll_loss(logp.reshape(-1, classes), labels.reshape(-1),
                      ignore_index=-100 if ignore_index is None else ignore_index, reduction=reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("log_prob", [False, True])
def test_nll_loss(log_prob, ignore_index, reduction, dtype, rng):
    logits = torch.tensor(rand(rng, 2, 3, 5) * 2)
    p = (F.log_softmax(logits, -1) if log_prob else F.softmax(logits, -1)).numpy().astype(dtype)
    labels = rng.integers(0, 5, (2, 3)).astype(np.int32)
    labels[0, :2] = 2
    eps = 6.104e-5 if dtype == np.float16 else 1e-7
    check(lambda p, l: ops.nll_loss(p, l, ignore_index, reduction, log_prob),
          lambda p, l: torch_nll(p, l, ignore_index, reduction, log_prob, eps), p, labels)


def test_nll_loss_clamps_tiny_probabilities():
    p = np.array([[1e-9, 1 - 1e-9], [0.5, 0.5]], np.float32)
    labels = np.array([0, 1], np.int32)
    check(lambda p, l: ops.nll_loss(p, l, reduction="none"), lambda p, l: -torch.log(
        torch.stack([p[0, 0].clamp(min=1e-7), p[1, 1]])), p, labels)


@pytest.mark.parametrize("label", [3, 5, -2])
def test_nll_loss_label_outside_the_classes_stops_the_run(label):
    """A label that is no class (nor ignore_index) is an error naming the op and the label, as torch's."""
    p = np.full((2, 3), 1 / 3, np.float32)
    labels = np.array([label, 1], np.int32)
    with pytest.raises(IndexError, match=rf"nll_loss: label {label} is outside the 3 classes \[0, 3\)"):
        run_graph(lambda p, l: ops.nll_loss(p, l, reduction="none"), p, labels)
    with pytest.raises(IndexError, match=rf"nll_loss_with_softmax_grad: label {label} is outside"):
        run_graph(lambda p, l: ops.nll_loss_with_softmax_grad(p, l, ignore_index=-100), p, labels)
    with pytest.raises(IndexError):
        torch.nn.functional.nll_loss(torch.tensor(p).log(), torch.tensor(labels, dtype=torch.int64))
    # ignore_index may lie outside the classes: its rows add nothing.
    out, _ = run_graph(lambda p, l: ops.nll_loss(p, l, ignore_index=label, reduction="none"), p, labels)
    np.testing.assert_allclose(out[0], [0, np.log(3)], rtol=1e-6)


def test_nll_loss_all_ignored_is_zero():
    p = np.full((2, 3), 1 / 3, np.float32)
    out, grads = run_graph(lambda p, l: ops.nll_loss(p, l, ignore_index=1), p, np.array([1, 1], np.int32),
                           dys=[np.float32(1)])
    assert out[0] == 0 and not grads[0].any()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("reduction,ignore_index", [("mean", None), ("mean", 3), ("sum", None), ("none", 0)])
def test_nll_loss_with_softmax_grad(reduction, ignore_index, dtype, rng):
    """``dx`` is torch's gradient of ``loss_grad * cross_entropy`` for the logits."""
    logits = rand(rng, 4, 6)
    labels = rng.integers(0, 6, (4,)).astype(np.int32)
    labels[:2] = 3
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy().astype(dtype)
    loss_grad = 0.5 if reduction != "none" else 1.0
    out, _ = run_graph(lambda p, l: ops.nll_loss_with_softmax_grad(p, l, loss_grad, ignore_index, reduction),
                       probs, labels)
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(x, torch.tensor(labels, dtype=torch.long), reduction=reduction,
                           ignore_index=-100 if ignore_index is None else ignore_index)
    (dx,) = torch.autograd.grad((loss * loss_grad).sum(), x)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0].astype(np.float64), loss.detach().numpy(), **tol)
    np.testing.assert_allclose(out[1].astype(np.float64), dx.numpy(), **tol)
    assert out[1].dtype == dtype


def test_nll_loss_with_softmax_grad_tensor_loss_grad(rng):
    probs = torch.softmax(torch.tensor(rand(rng, 3, 4)), -1).numpy()
    labels = np.array([0, 3, 1], np.int32)
    scale = np.float32(2.5)
    out, _ = run_graph(lambda p, l, g: ops.nll_loss_with_softmax_grad(p, l, g), probs, labels, scale)
    expected = (probs - np.eye(4, dtype=np.float32)[labels]) * scale / 3
    np.testing.assert_allclose(out[1], expected, rtol=1e-6, atol=1e-7)


def test_loss_errors():
    with pytest.raises(ValueError, match=r"labels 'l' \(3,\) must have the shape of probs 'p' \(2, 4\) without its "
                                         r"class axis, \(2,\)"):
        build_error(lambda p, l: ops.nll_loss(p, l), spec((2, 4)), spec((3,), dtypes.int32))
    with pytest.raises(TypeError, match="labels 'l' must have an integer dtype, got float32"):
        build_error(lambda p, l: ops.nll_loss(p, l), spec((2, 4)), spec((2,)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        build_error(lambda p, l: ops.nll_loss(p, l, reduction="avg"), spec((2, 4)), spec((2,), dtypes.int32))
    with pytest.raises(ValueError, match=r"loss_grad 'g' must be a scalar"):
        build_error(lambda p, l, g: ops.nll_loss_with_softmax_grad(p, l, g), spec((2, 4)), spec((2,), dtypes.int32),
                    spec((2,)))


# ---------------------------------------------------------------- reductions

REDUCTIONS = {
    "sum": (ops.sum, lambda x, a, k: torch.sum(x, a, keepdim=k), None),
    "mean": (ops.mean, lambda x, a, k: torch.mean(x, a, keepdim=k), None),
    "max": (ops.max, lambda x, a, k: torch.amax(x, a, keepdim=k), None),
    "min": (ops.min, lambda x, a, k: torch.amin(x, a, keepdim=k), None),
    "prod": (ops.prod, lambda x, a, k: _prod(x, a, k), lambda x: np.abs(x) + 0.5),
    "logsumexp": (ops.logsumexp, lambda x, a, k: torch.logsumexp(x, a, keepdim=k), None),
    "l1": (ops.l1, lambda x, a, k: torch.sum(torch.abs(x), a, keepdim=k), lambda x: x + np.sign(x) * 0.1),
    "l2": (ops.l2, lambda x, a, k: torch.sqrt(torch.sum(x * x, a, keepdim=k)), None),
    "sumsquare": (ops.sumsquare, lambda x, a, k: torch.sum(x * x, a, keepdim=k), None),
    "logsum": (ops.logsum, lambda x, a, k: torch.log(torch.sum(x, a, keepdim=k)), lambda x: np.abs(x) + 0.5),
}


def _prod(x, axes, keepdim):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, a, keepdim=keepdim)
    return x


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis,keepdims", [(None, False), (1, True), ([0, 2], False), (-1, False)])
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction(name, axis, keepdims, dtype, rng):
    op, ref, domain = REDUCTIONS[name]
    x = rand(rng, 2, 3, 4)
    x = (domain(x) if domain else x).astype(dtype)
    axes = [0, 1, 2] if axis is None else ([axis] if isinstance(axis, int) else axis)
    check(lambda x: op(x, axis, keepdims), lambda x: ref(x, axes, keepdims), x,
          tol=(2e-2, 3e-2) if dtype == np.float16 else None)


@pytest.mark.parametrize("axis", [None, 1, [0, 2]])
def test_prod_gradient_with_zeros(axis, rng):
    """Reductions holding one zero (the zero's gradient is the others' product) or two (all zero)."""
    x = rand(rng, 2, 3, 4)
    x[0, 1, 2] = 0.0
    x[1, :, 0] = 0.0
    axes = [0, 1, 2] if axis is None else ([axis] if isinstance(axis, int) else axis)
    check(lambda x: ops.prod(x, axis), lambda x: _prod(x, axes, False), x)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_of_a_scalar_reduces_one_element(name, rng):
    """A rank-0 input has no axis to reduce: the result is the reduction of its one element (the
    square for sumsquare, the magnitude for l1 and l2, the log for logsum), as torch's over all axes."""
    op, ref, domain = REDUCTIONS[name]
    x = rand(rng, 1).reshape(())
    x = domain(x) if domain else x - 2.0  # negative where the domain allows: abs and square show
    check(lambda x: op(x), lambda x: ref(x.reshape(1), [0], False).reshape(()), x)


def test_norms_of_a_scalar_keep_its_dtype_and_range():
    """l2 of a float16 300 is 300 (its square overflows float16), and integer scalars stay integers."""
    out, _ = run_graph(lambda x: ops.l2(x), np.float16(300.0).reshape(()))
    assert out[0] == np.float16(300.0)
    ints = np.int32(-4).reshape(())
    out, _ = run_graph(lambda x: (ops.l2(x), ops.sumsquare(x), ops.l1(x)), ints)
    assert [(o.dtype, int(o)) for o in out] == [(np.int32, 4), (np.int32, 16), (np.int32, 4)]


def test_float16_sums_of_squares_square_in_float32():
    """10,000 float16 values of 1e-4: each square (1e-8) is below float16's smallest subnormal, so only
    squaring in float32 gives the sum 1e-4 (rounded once to float16) and the norm 1e-2."""
    x = np.full(10000, 1e-4, np.float16)
    wide = x.astype(np.float64)
    out, _ = run_graph(lambda x: (ops.sumsquare(x), ops.l2(x)), x)
    np.testing.assert_allclose(out[0], np.float16((wide * wide).sum()), rtol=1e-3)
    np.testing.assert_allclose(out[1], np.float16(np.sqrt((wide * wide).sum())), rtol=1e-3)


def test_argmax_argmin(rng):
    x = rand(rng, 3, 4)
    x[0, :2] = 5.0  # a tie: the first occurrence wins
    out, _ = run_graph(lambda x: (ops.argmax(x, 1), ops.argmin(x), ops.argmax(x, -1, keepdim=True)), x)
    np.testing.assert_array_equal(out[0], np.argmax(x, 1))
    np.testing.assert_array_equal(out[1], np.argmin(x, 0))
    np.testing.assert_array_equal(out[2], np.argmax(x, -1)[:, None])
    assert out[0].dtype == np.int32


def test_replicas_normalise_and_score_their_own_data(rng):
    """Norms, losses, matmuls and reductions keep replicas apart."""
    x = rand(rng, 2, 3, 4) * np.array([1, 5], np.float32)[:, None, None]
    w, b = rand(rng, 2, 4), rand(rng, 2, 4)
    check(lambda x, w, b: ops.layer_norm(x, w, b), lambda x, w, b: F.layer_norm(x, (4,), w, b), x, w, b,
          replication=2)
    check(lambda x, w: (ops.matmul(x, ops.reshape(w, (4, 1))), ops.softmax(x, -1), ops.sum(x, 0), ops.max(x, 1)),
          lambda x, w: (x @ w.reshape(4, 1), torch.softmax(x, -1), x.sum(0), x.amax(1)), x, w, replication=2)
    probs = torch.softmax(torch.tensor(x), -1).numpy()
    labels = np.array([[0, 1, 3], [2, 2, 1]], np.int32)
    check(lambda p, l: ops.nll_loss(p, l, ignore_index=1),
          lambda p, l: torch_nll(p, l, 1, "mean", False), probs, labels, replication=2)
    out, _ = run_graph(lambda p, l: ops.nll_loss_with_softmax_grad(p, l), probs, labels, replication=2)
    expected = (probs - np.eye(4, dtype=np.float32)[labels]) / 3
    np.testing.assert_allclose(out[1], expected, rtol=1e-5, atol=1e-6)


def test_axis_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"axis 2 is out of range for rank 2 of 'x' \(3, 4\)"):
        build_error(lambda x: ops.softmax(x, 2), spec((3, 4)))
    with pytest.raises(ValueError, match=r"axis -3 is out of range for rank 2 of 'x' \(3, 4\)"):
        build_error(lambda x: ops.sum(x, [0, -3]), spec((3, 4)))


@pytest.mark.parametrize("replication", [1, 2])
def test_sumsquare_of_a_large_tensor_matches_numpy(replication):
    # Above the block size of the CPU kernel's whole-tensor path.
    x = np.random.default_rng(0).standard_normal((2, 3, 100_000)).astype(np.float32)
    (got,), _ = run_graph(ops.sumsquare, x if replication > 1 else x[0], replication=replication)
    want = np.sum(x.astype(np.float64) ** 2, axis=(1, 2))
    np.testing.assert_allclose(got, want if replication > 1 else want[0], rtol=1e-6)


def _onednn(monkeypatch):
    from gptj_popxl.popxl_cpu import products
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch has no oneDNN on this processor")
    monkeypatch.setattr(products, "ONEDNN", True)  # read when a program is lowered
    monkeypatch.setattr(products, "MIN_MULTIPLY_ADDS", 0)  # for the tests' small products


def _weight_program(w_data, storage=None, update=False, rows=32):
    """``x @ w (+ b)`` and ``x @ w`` for host ``x`` (rows, 8); ``w`` (8, 6) backed by ``storage`` if given;
    ``update``: the program then adds 1 to ``w`` in place."""
    ir = popxl.Ir()
    with ir.main_graph:
        w = popxl.variable(w_data, name="w")
        if storage is not None:
            popxl.back_variable(w, storage)
        b = popxl.variable(np.arange(6, dtype=np.float32), name="b")
        x_stream = popxl.h2d_stream((rows, 8), popxl.float32, "x")
        x = ops.host_load(x_stream)
        streams = [popxl.d2h_stream((rows, 6), popxl.float32, name) for name in ("biased", "plain")]
        ops.host_store(streams[0], x @ w + b)
        ops.host_store(streams[1], x @ w)
        if update:
            ops.var_updates.accumulate_(w, popxl.constant(np.ones((8, 6), np.float32)))
    return popxl.Session(ir), w, x_stream, streams


def test_onednn_products_by_read_only_weights_follow_every_write(rng, monkeypatch):
    """Products by a weight the program only reads take oneDNN's kernel on a copy of it: against numpy,
    after ``write_variable_data``, and after another program writes the memory they share in place."""
    _onednn(monkeypatch)
    x = rand(rng, 32, 8)
    storage = rand(rng, 8, 6)
    reader, w, x_stream, (biased, plain) = _weight_program(storage.copy(), storage)
    writer, _, writer_x, (writer_biased, _) = _weight_program(storage.copy(), storage, update=True)
    bias = np.arange(6, dtype=np.float32)

    def expect(session, weight):
        out = session.run({x_stream: x})
        np.testing.assert_allclose(out[biased], x.astype(np.float64) @ weight + bias, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[plain], x.astype(np.float64) @ weight, rtol=1e-5, atol=1e-5)
    with reader, writer:
        expect(reader, storage.copy())
        reader.write_variable_data(w, np.full((8, 6), 0.5, np.float32))
        expect(reader, np.full((8, 6), 0.5))
        for weight in (0.5, 1.5):  # the writer reads w, then adds 1 to it in the shared memory
            np.testing.assert_allclose(writer.run({writer_x: x})[writer_biased], x.astype(np.float64) @ np.full(
                (8, 6), weight) + bias, rtol=1e-5, atol=1e-5)
            expect(reader, np.full((8, 6), weight + 1))


def test_onednn_products_by_other_matrices(rng, monkeypatch):
    """A transposed matrix (a backward pass's ``dy @ w.T``) and a loaded one (fresh each run, perhaps at the
    same address) are never read from a copy: results follow each run's data."""
    _onednn(monkeypatch)
    x, m = rand(rng, 32, 8), rand(rng, 6, 8)
    ir = popxl.Ir()
    with ir.main_graph:
        x_stream, m_stream = popxl.h2d_stream((32, 8), popxl.float32, "x"), popxl.h2d_stream((6, 8), popxl.float32, "m")
        x_value, m_value = ops.host_load(x_stream), ops.host_load(m_stream)
        streams = [popxl.d2h_stream((32, 6), popxl.float32, name) for name in ("transposed", "loaded")]
        ops.host_store(streams[0], x_value @ ops.transpose(m_value))
        ops.host_store(streams[1], x_value @ (ops.transpose(m_value) * 1.0))
    with popxl.Session(ir) as session:
        for _ in range(2):
            out = session.run({x_stream: x, m_stream: m})
            for s in streams:
                np.testing.assert_allclose(out[s], x.astype(np.float64) @ m.T, rtol=1e-5, atol=1e-5)
            m[...] = rand(rng, 6, 8)  # the same array, new values


def test_onednn_products_see_writes_that_stop_part_way(rng, monkeypatch):
    """A refused ``write_variables_data`` that has already stored one variable, and a run that writes the
    shared weight and then fails, both leave the weight changed: products by it must read the change."""
    _onednn(monkeypatch)
    x = rand(rng, 32, 8)
    storage = rand(rng, 8, 6)
    reader, w, x_stream, (_, plain) = _weight_program(storage.copy(), storage)
    ir = popxl.Ir()
    with ir.main_graph:  # w += 1, then a remote load of an entry the buffer lacks for a bad offset
        shared = popxl.variable(storage.copy(), name="w")
        popxl.back_variable(shared, storage)
        ops.var_updates.accumulate_(shared, popxl.constant(np.ones((8, 6), np.float32)))
        buffer, offset = popxl.remote_buffer((2,), popxl.float32, 1), popxl.h2d_stream((), popxl.int32, "offset")
        ops.host_store(popxl.d2h_stream((2,), popxl.float32, "r"), ops.remote_load(buffer, ops.host_load(offset)))
    writer = popxl.Session(ir)
    with reader, writer:
        reader.run({x_stream: x})
        with pytest.raises(TypeError):
            reader.write_variables_data({w: np.full((8, 6), 2.0, np.float32), reader.ir.main_graph.variables[1]:
                                         np.zeros(6, np.float64)})
        np.testing.assert_allclose(reader.run({x_stream: x})[plain], x.astype(np.float64) @ np.full((8, 6), 2.0),
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(IndexError):
            writer.run({offset: np.array(5, np.int32)})
        np.testing.assert_allclose(reader.run({x_stream: x})[plain], x.astype(np.float64) @ np.full((8, 6), 3.0),
                                   rtol=1e-5, atol=1e-5)
