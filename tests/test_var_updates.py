"""In-place variable updates and optimizer terms, each checked against its formula in numpy."""
import numpy as np
import pytest

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops
from gptj_popxl.popxl_cpu.ops.var_updates.accumulate import increment_

V = ops.var_updates
F32, F16 = popxl.float32, popxl.float16


def values_after(ir, variables, runs=1, outputs=()):
    """Runs ``runs`` times; returns the variables' values, then the last values of ``outputs``."""
    with ir.main_graph:
        streams = [popxl.d2h_stream(t.shape, t.dtype, name=f"out{i}") for i, t in enumerate(outputs)]
        for s, t in zip(streams, outputs):
            ops.host_store(s, t)
    with popxl.Session(ir) as session:
        for _ in range(runs):
            out = session.run()
        data = session.get_tensors_data(variables)
    return [data[v] for v in variables] + [out[s] for s in streams]


RNG = np.random.default_rng(0)
T = RNG.normal(size=(3, 4)).astype(np.float32)
X = RNG.normal(size=(3, 4)).astype(np.float32)

ACCUMULATORS = [
    ("accumulate_", lambda t, x, f: t + x, None),
    ("accumulate_", lambda t, x, f: t + f * x, 0.3),
    ("accumulate_square_", lambda t, x, f: t + f * x * x, 0.7),
    ("accumulate_mean_", lambda t, x, f: f / (f + 1) * t + x / (f + 1), 3.0),
    ("accumulate_moving_average_", lambda t, x, f: f * t + (1 - f) * x, 0.9),
    ("accumulate_moving_average_square_", lambda t, x, f: f * t + (1 - f) * x * x, 0.9),
]


# The large shape is above the size where the CPU kernels once went block by block.
@pytest.mark.parametrize("shape", [(3, 4), (3, 30000)])
@pytest.mark.parametrize("tensor_factor", [False, True])
@pytest.mark.parametrize("name, formula, f", ACCUMULATORS)
def test_accumulators(name, formula, f, tensor_factor, shape):
    ir = popxl.Ir()
    T, X = (RNG.normal(size=shape).astype(np.float32) for _ in range(2))
    with ir.main_graph:
        t, x = popxl.variable(T, name="t"), popxl.variable(X, name="x")
        factor = popxl.variable(np.float32(f), name="f") if tensor_factor and f is not None else f
        args = () if f is None else (factor,)
        out = getattr(V, name)(t, x, *args)
        assert out.shape == t.shape
        (got,) = values_after(ir, [t])
    # atol: the reference rounds (1 - f) in float64, which shows where f * t and (1 - f) * x nearly cancel.
    np.testing.assert_allclose(got, formula(T, X, f), rtol=1e-6, atol=1e-6)


# float16 updates: (op, its call on t, X and a factor, its float32 formula in torch as torch.optim
# computes it, factors, whether it runs on t itself for a factor (python float or tensor)). Given
# float32 copies of the float16 values, the op must give exactly the formula's result rounded once.
ALWAYS = lambda f, tensor: True  # noqa: E731
FLOAT16_UPDATES = [
    ("accumulate_", lambda t, x, f: V.accumulate_(t, x, f), lambda t, x, f: t.add_(x, alpha=f),
     (1.0, 0.3, 0.999, 2.0), lambda f, tensor: f == 1.0 and not tensor),
    ("accumulate_square_", lambda t, x, f: V.accumulate_square_(t, x, f), lambda t, x, f: t.addcmul_(x, x, value=f),
     (1.0, 0.3, 0.999, 2.0), lambda f, tensor: not tensor),
    ("accumulate_mean_", lambda t, x, f: V.accumulate_mean_(t, x, f),
     lambda t, x, f: t.lerp_(x, float(np.float32(1) / np.float32(f + 1))), (0.0, 1.0, 2.0, 7.0), ALWAYS),
    ("accumulate_moving_average_", lambda t, x, f: V.accumulate_moving_average_(t, x, f),
     lambda t, x, f: t.lerp_(x, 1 - f), (1.0, 0.3, 0.999, 2.0), ALWAYS),
    ("accumulate_moving_average_square_", lambda t, x, f: V.accumulate_moving_average_square_(t, x, f),
     lambda t, x, f: t.mul_(f).addcmul_(x, x, value=1 - f), (1.0, 0.3, 0.999, 2.0), lambda f, tensor: False),
    ("accumulator_scale_", lambda t, x, f: V.accumulator_scale_(t, f), lambda t, x, f: t.mul_(f),
     (0.0, 0.3, 0.999, 2.0), ALWAYS),
    ("copy_var_update_", lambda t, x, f: V.copy_var_update_(t, x), lambda t, x, f: t.copy_(x), (None,), ALWAYS),
    ("increment_", lambda t, x, f: increment_(t), lambda t, x, f: t.add_(1), (None,), ALWAYS),
]


@pytest.mark.parametrize("name, call, formula, f, in_place, tensor_factor", [
    pytest.param(name, call, formula, f, in_place, tensor, id=f"{name}{f}{'-tensor' * tensor}")
    for name, call, formula, factors, in_place in FLOAT16_UPDATES for f in factors
    for tensor in ((False, True) if f is not None else (False,))])
def test_float16_updates_round_once(name, call, formula, f, in_place, tensor_factor):
    import torch
    rng = np.random.default_rng(1)
    # Magnitudes over most of float16's range, so that any rounding of a factor or a term shows.
    T16, X16 = (np.clip(rng.normal(size=(4, 5000)) * np.exp(rng.normal(size=(4, 5000)) * 2.5), -6e4, 6e4)
                .astype(np.float16) for _ in range(2))
    ir = popxl.Ir()
    with ir.main_graph:
        t, x = popxl.variable(T16, F16, name="t"), popxl.variable(X16, F16, name="x")
        call(t, x, popxl.variable(np.float32(f), name="f") if tensor_factor else f)
    with popxl.Session(ir) as session:
        session.run()
        got = session.get_tensor_data(t)
        kernels = [step[0].__name__ for step in session._rt.plan(ir.main_graph).steps]
    assert ("update_in_place" in kernels) == in_place(f, tensor_factor), kernels
    with np.errstate(over="ignore", invalid="ignore"):
        expected = formula(torch.from_numpy(T16).float(), torch.from_numpy(X16).float(),
                           None if f is None else float(np.float32(f))).half().numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name, formula, f", ACCUMULATORS + [
    ("scaled_add_", lambda t, x, f: 2.0 * t + f * x, 0.5)], ids=lambda v: v if isinstance(v, str) else "")
def test_updates_of_a_variable_by_itself(name, formula, f):
    """X is t itself (a variable updated by its own value): the formula reads t as it was."""
    ir = popxl.Ir()
    with ir.main_graph:
        t = popxl.variable(T, name="t")
        if name == "scaled_add_":
            ops.scaled_add_(t, t, 2.0, f)
        else:
            getattr(V, name)(t, t, *([] if f is None else [f]))
    (got,) = values_after(ir, [t])
    np.testing.assert_allclose(got, formula(T, T, f), rtol=1e-6, atol=1e-6)


def test_accumulate_square_default_factor_and_mixed_precision():
    ir = popxl.Ir()
    with ir.main_graph:
        t = popxl.variable(T.astype(np.float16), name="t")
        x = popxl.variable(X, name="x")
        V.accumulate_square_(t, x)
        (got,) = values_after(ir, [t])
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, (T.astype(np.float16).astype(np.float32) + X * X).astype(np.float16), rtol=1e-3)


def test_accumulate_mean_gives_the_running_mean():
    xs = RNG.normal(size=(4, 3)).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        # A restarted mean (step 0) only multiplies what the accumulator held by 0.
        mean = popxl.variable(np.array([-7.0, 3e38, 5.0], np.float32), name="mean")
        step = popxl.variable(np.float32(0), name="step")
        data = popxl.h2d_stream((3,), F32, "x")
        V.accumulate_mean_(mean, ops.host_load(data), step)
        V.accumulate_(step, popxl.constant(np.float32(1)))
    with popxl.Session(ir) as session:
        for x in xs:
            session.run({data: x})
        got = session.get_tensor_data(mean)
    np.testing.assert_allclose(got, xs.mean(0), rtol=1e-6)


def test_accumulate_mean_restarted_on_a_non_finite_value_is_nan():
    held = np.array([np.nan, np.inf, -np.inf, 2.0], np.float32)
    x = RNG.normal(size=4).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        mean = popxl.variable(held, name="mean")
        V.accumulate_mean_(mean, popxl.constant(x), popxl.constant(np.float32(0)))
    (got,) = values_after(ir, [mean])
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(got, 0 * held + x)  # PopART's (step / (step + 1)) t + x / (step + 1)


def test_accumulator_scale_and_zero():
    t_nan = T.copy()
    t_nan[0, 0] = np.nan
    ir = popxl.Ir()
    with ir.main_graph:
        scaled = popxl.variable(T, name="scaled")
        by_tensor = popxl.variable(T, name="by_tensor")
        zero_const = popxl.variable(t_nan, name="zero_const")
        zero_tensor = popxl.variable(t_nan, name="zero_tensor")
        zeroed = popxl.variable(t_nan, name="zeroed")
        V.accumulator_scale_(scaled, 0.5)
        V.accumulator_scale_(by_tensor, popxl.variable(np.float32(-2.0)))
        V.accumulator_scale_(zero_const, 0.0)
        V.accumulator_scale_(zero_tensor, popxl.variable(np.float32(0.0)))
        V.accumulator_zero_(zeroed)
        got = values_after(ir, [scaled, by_tensor, zero_const, zero_tensor, zeroed])
    np.testing.assert_allclose(got[0], T * 0.5)
    np.testing.assert_allclose(got[1], T * -2.0)
    np.testing.assert_array_equal(got[2], np.zeros_like(T))  # a constant 0 zeroes, NaN included
    assert np.isnan(got[3][0, 0]) and np.all(got[3].ravel()[1:] == 0)  # a tensor 0 multiplies
    np.testing.assert_array_equal(got[4], np.zeros_like(T))


def test_copy_var_update_and_the_alias_it_returns():
    ir = popxl.Ir()
    with ir.main_graph:
        t, x = popxl.variable(T, name="t"), popxl.variable(X, name="x")
        alias = V.copy_var_update_(t, x)
        doubled = alias * 2.0
        got_t, got_doubled = values_after(ir, [t], outputs=[doubled])
    np.testing.assert_array_equal(got_t, X)
    np.testing.assert_array_equal(got_doubled, 2 * X)


# [[-1, 0], [4, 1]]: -1 (and 4 along the axis of size 4) fall outside and add nothing, as in popops'
# multiUpdateAdd (PopART's kernel), which reads indices as unsigned.
@pytest.mark.parametrize("indices", [[[3, 0], [3, 1]], [[-1, 0], [4, 1]]])
@pytest.mark.parametrize("axis", [0, 1])
def test_sparse_accumulate(axis, indices):
    t0 = RNG.normal(size=(4, 5)).astype(np.float32)
    idx = np.array(indices, np.int32)
    x_shape = (2, 2, 5) if axis == 0 else (4, 2, 2)
    x = RNG.normal(size=x_shape).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        t = popxl.variable(t0, name="t")
        V.sparse_accumulate_(t, popxl.variable(x), popxl.variable(idx), axis=axis, f=0.5)
        (got,) = values_after(ir, [t])
    expected = t0.copy()
    moved = np.moveaxis(expected, axis, 0)
    rows = np.moveaxis(x.reshape(x_shape[:axis] + (4,) + x_shape[axis + 2:]), axis, 0)
    valid = (idx.ravel() >= 0) & (idx.ravel() < t0.shape[axis])
    np.add.at(moved, idx.ravel()[valid], 0.5 * rows[valid])  # repeated index 3 adds twice
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sparse_accumulate_float16_sums_repeated_indices_in_float32():
    # 2048 + 1 + 1: one rounding gives 2050; adding in float16 twice would round back to 2048 each time.
    t0 = np.full((1, 3), 2048, np.float16)
    x = np.ones((2, 3), np.float16)
    ir = popxl.Ir()
    with ir.main_graph:
        t = popxl.variable(t0, name="t")
        V.sparse_accumulate_(t, popxl.variable(x), popxl.variable(np.array([0, 0], np.int32)))
        (got,) = values_after(ir, [t])
    np.testing.assert_array_equal(got, (t0.astype(np.float32) + x.astype(np.float32).sum(0)).astype(np.float16))


def _adam_reference(m, v, w=None, step=None, wd=0.0, b1=None, b2=None, eps=1e-7, adamax=False):
    if step is not None:
        m = m / (1 - b1 ** step)
        if not adamax:
            v = v / (1 - b2 ** step)
    x = m / (v + eps) if adamax else m / (np.sqrt(v) + eps)
    return x + wd * w if wd else x


M = RNG.normal(size=(3, 4)).astype(np.float32)
VV = RNG.random((3, 4)).astype(np.float32)
W = RNG.normal(size=(3, 4)).astype(np.float32)


@pytest.mark.parametrize("fn, kwargs, ref", [
    ("adam_updater", dict(), dict()),
    ("adam_updater", dict(beta1=0.9, beta2=0.999, time_step=True), dict(b1=0.9, b2=0.999)),
    ("adam_updater", dict(beta1=0.9, beta2=0.999, time_step=True, weight_decay=0.01, epsilon=1e-5),
     dict(b1=0.9, b2=0.999, wd=0.01, eps=1e-5)),
    ("lamb_updater", dict(beta1=0.8, beta2=0.99, time_step=True, weight_decay=True), dict(b1=0.8, b2=0.99, wd=0.1)),
    ("adamax_updater", dict(time_step=True, beta1=0.7), dict(b1=0.7, adamax=True)),
])
def test_adam_family_updaters(fn, kwargs, ref):
    """Two steps: the time step is incremented in place before bias correction (t = 3 then 4)."""
    ir = popxl.Ir()
    with ir.main_graph:
        m, v, w = popxl.variable(M, name="m"), popxl.variable(VV, name="v"), popxl.variable(W, name="w")
        step = popxl.variable(np.float32(2.0), name="step")
        args = dict(kwargs)
        if args.pop("time_step", False):
            args["time_step"] = step
        if args.get("weight_decay") is True:
            args["weight_decay"] = popxl.variable(np.float32(0.1), name="wd")
        if "weight_decay" in args:
            args["weight"] = w
        x = getattr(V, fn)(m, v, **args)
        got_step, got_x = values_after(ir, [step], runs=2, outputs=[x])
    timed = "time_step" in args
    assert got_step == (4.0 if timed else 2.0)
    expected = _adam_reference(M, VV, W, step=4.0 if timed else None, **ref)
    np.testing.assert_allclose(got_x, expected, rtol=5e-5)  # float32 1 - beta2**t loses digits


def test_adam_updater_output_dtype_follows_the_weight_with_decay():
    ir = popxl.Ir()
    with ir.main_graph:
        m, v = popxl.variable(M), popxl.variable(VV)
        w16 = popxl.variable(W.astype(np.float16))
        assert V.adam_updater(m, v).dtype == F32
        assert V.adam_updater(m, v, weight=w16, weight_decay=0.1).dtype == F16
        assert V.adam_updater(m, v, weight=w16).dtype == F32  # no decay: the weight is not an input


@pytest.mark.parametrize("at_once", [True, False])
def test_adam_steps_of_several_weights_each_get_their_own_updater(at_once, planned):
    """Weights of two shapes, two runs, every updater written into the plan's kept memory. Updaters
    applied at once share one block; updaters all made first, then applied, must not."""
    shapes = [(3, 4), (5,), (3, 4)]
    ms = [RNG.normal(size=s).astype(np.float32) for s in shapes]
    vs = [RNG.random(s).astype(np.float32) for s in shapes]
    ws = [RNG.normal(size=s).astype(np.float32) for s in shapes]
    ir = popxl.Ir()
    with ir.main_graph:
        weights = [popxl.variable(w, name=f"w{i}") for i, w in enumerate(ws)]
        moments = [(popxl.variable(m), popxl.variable(v)) for m, v in zip(ms, vs)]
        if at_once:
            for w, (m, v) in zip(weights, moments):
                ops.scaled_add_(w, V.adam_updater(m, v, epsilon=1e-3), b=-0.1)
        else:
            updaters = [V.adam_updater(m, v, epsilon=1e-3) for m, v in moments]
            for w, x in zip(weights, updaters):
                ops.scaled_add_(w, x, b=-0.1)
        got = values_after(ir, weights, runs=2)
    assert planned == ([(12,)] if at_once else [(12,), (5,), (12,)])
    for g, w, m, v in zip(got, ws, ms, vs):
        np.testing.assert_allclose(g, w - 2 * 0.1 * _adam_reference(m, v, w, eps=1e-3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r1, r2, ratio", [(4.0, 1.0, 2.0), (0.0, 1.0, 1.0), (4.0, 0.0, 1.0), (9.0, 4.0, 1.5)])
def test_adam_var_update_applies_the_trust_ratio(r1, r2, ratio):
    ir = popxl.Ir()
    with ir.main_graph:
        t, x = popxl.variable(T, name="t"), popxl.variable(X, name="x")
        lr = popxl.variable(np.float32(0.1), name="lr")
        V.adam_var_update(t, x, popxl.variable(np.float32(r1)), popxl.variable(np.float32(r2)), learning_rate=lr)
        (got,) = values_after(ir, [t])
    np.testing.assert_allclose(got, T - 0.1 * ratio * X, rtol=1e-6)


# PopART's adamvarupdatex.cpp: ratio = min(sqrt(r1), mwn) / sqrt(r2), or 1 where r1, r2 or a mwn tensor is 0.
@pytest.mark.parametrize("mwn, ratio", [(1.0, 0.5), (3.0, 1.5), (None, 2.0), ("tensor 0", 1.0), ("tensor 1.5", 0.75)])
def test_adam_var_update_caps_the_weight_norm(mwn, ratio):
    ir = popxl.Ir()
    with ir.main_graph:
        t, x = popxl.variable(T, name="t"), popxl.variable(X, name="x")
        if isinstance(mwn, str):
            mwn = popxl.variable(np.float32(mwn.split()[1]), name="mwn")
        V.adam_var_update(t, x, popxl.variable(np.float32(16.0)), popxl.variable(np.float32(4.0)), learning_rate=0.1,
                          max_weight_norm=mwn)
        (got,) = values_after(ir, [t])
    np.testing.assert_allclose(got, T - 0.1 * ratio * X, rtol=1e-6)
    with pytest.raises(ValueError, match="max_weight_norm must not be a constant 0"):
        with popxl.Ir().main_graph:
            V.adam_var_update(popxl.variable(T), popxl.variable(X), popxl.constant(1.0), popxl.constant(1.0), 0.1, 0.0)


def test_adam_step_in_a_subgraph_on_replicas():
    """updater + var update inside a called graph, per replica, with grouped (per-replica) variables."""
    R = 2
    ir = popxl.Ir(replication=R)
    ms = RNG.normal(size=(R, 3)).astype(np.float32)
    with ir.main_graph:
        rg = ir.replica_grouping(group_size=1)
        w = popxl.variable(np.ones((R, 3), np.float32), replica_grouping=rg, name="w")
        m = popxl.variable(ms, replica_grouping=rg, name="m")
        v = popxl.variable(np.ones((R, 3), np.float32), name="v", replica_grouping=rg)
        step = popxl.variable(np.zeros((R,), np.float32), replica_grouping=rg, name="step")

        def update(w, m, v, step):
            x = V.adam_updater(m, v, time_step=step, beta1=0.9, beta2=0.999)
            zero = popxl.constant(np.float32(0.0))
            V.adam_var_update(w, x, zero, zero, learning_rate=0.5)

        g = ir.create_graph(update, w, m, v, step)
        info = ops.call_with_info(g, w, m, v, step)
        for t in (w, step):
            info.set_parent_input_modified(t)
        got_w, got_step = values_after(ir, [w, step])
    np.testing.assert_array_equal(got_step, [1.0, 1.0])
    np.testing.assert_allclose(got_w, 1 - 0.5 * _adam_reference(ms, np.ones_like(ms), step=1.0, b1=0.9, b2=0.999),
                               rtol=1e-5)


def test_var_update_errors_name_the_problem():
    ir = popxl.Ir()
    with ir.main_graph:
        t, m, v = popxl.variable(T, name="t"), popxl.variable(M, name="m"), popxl.variable(VV, name="v")
        with pytest.raises(ValueError, match=r"X 'x' \(4,\) must have the shape of t 't' \(3, 4\)"):
            V.accumulate_(t, popxl.variable(np.zeros(4, np.float32), name="x"))
        with pytest.raises(ValueError, match=r"f must be a scalar, got 'vec' \(2,\)"):
            V.accumulate_(t, m, popxl.variable(np.zeros(2, np.float32), name="vec"))
        with pytest.raises(ValueError, match="weight decay 0.1 needs the weight"):
            V.adam_updater(m, v, weight_decay=0.1)
        with pytest.raises(ValueError, match="bias correction .* needs beta1 and beta2"):
            V.adam_updater(m, v, time_step=popxl.variable(np.float32(0)), beta1=0.9)
        with pytest.raises(ValueError, match="AdaMax needs time_step"):
            V.adamax_updater(m, v)
        with pytest.raises(ValueError, match=r"X '.*' \(2, 5\) must be \(3, 5\)"):
            V.sparse_accumulate_(popxl.variable(np.zeros((4, 5), np.float32)), popxl.variable(np.zeros((2, 5),
                                 np.float32)), popxl.variable(np.zeros(3, np.int32)))
    assert V.weight_decay_is_required(0.0) is False and V.weight_decay_is_required(0.1) is True
