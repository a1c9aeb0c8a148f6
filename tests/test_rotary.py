"""Rotary position embedding: the C++ custom op and the composite, against HF GPT-J and torch autograd."""
import numpy as np
import pytest
import torch
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.addons.ops.rotary_pos_embed import (RotaryPosEmbed, extension, rotary_pos_embed, trig_table_constants)
from gptj_popxl.addons.ops.rotary_pos_embed import trig_tables as addons_trig_tables
from gptj_popxl.model.rotary import rotary_embedding, trig_tables
from gptj_popxl.popxl_cpu import ops

IMPLS = ["cpp", "composite"]
B, S, H, D, P = 2, 5, 3, 16, 40


def hf_rotary(x, positions, rotary_dim, max_positions=P, table_dtype=torch.float32):
    """HF GPT-J's attention rotary step: gather table rows by position, rotate the first rotary_dim features."""
    sincos = create_sinusoidal_positions(max_positions, rotary_dim)[torch.as_tensor(positions).long()]
    sin, cos = torch.split(sincos.to(table_dtype), rotary_dim // 2, dim=-1)
    return torch.cat([apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos), x[..., rotary_dim:]], dim=-1)


def inputs(seed, dtype=np.float32, shape=(B, S, H, D)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    # Consecutive positions from a different non-zero start per sequence, as in cached generation.
    starts = rng.integers(1, P - shape[1], shape[0])
    return x, (starts[:, None] + np.arange(shape[1])).astype(np.int32)


def run_rotary(x, positions, rotary_dim, impl, table_dtype=popxl.float32, replication=1, tables=None):
    """Streams in ``x`` and ``positions`` (leading replica axis when replicated); returns the output."""
    ir = popxl.Ir(replication=replication)
    shape, pos_shape = (x.shape, positions.shape) if replication == 1 else (x.shape[1:], positions.shape[1:])
    with ir.main_graph:
        xs = popxl.h2d_stream(shape, popxl.dtype.as_dtype(x.dtype), name="x")
        ps = popxl.h2d_stream(pos_shape, popxl.int32, name="positions")
        if tables is None:
            sin, cos = (popxl.constant(t, table_dtype, name=n) for t, n in zip(trig_tables(P, rotary_dim), "sc"))
        else:
            grouping = ir.replica_grouping(group_size=1)
            sin, cos = (popxl.variable(t, table_dtype, name=n, replica_grouping=grouping) for t, n in zip(tables, "sc"))
        y = rotary_embedding(ops.host_load(xs), sin, cos, ops.host_load(ps), rotary_dim, impl=impl)
        out = popxl.d2h_stream(y.shape, y.dtype, name="y")
        ops.host_store(out, y)
    with popxl.Session(ir) as session:
        return session.run({xs: x, ps: positions})[out]


@pytest.mark.parametrize("rotary_dim,max_positions", [(64, 2048), (8, 10)])
def test_trig_tables_match_hf(rotary_dim, max_positions):
    sin, cos = trig_tables(max_positions, rotary_dim)
    want_sin, want_cos = np.split(create_sinusoidal_positions(max_positions, rotary_dim).numpy(), 2, axis=1)
    assert sin.dtype == cos.dtype == np.float32 and sin.shape == (max_positions, rotary_dim // 2)
    np.testing.assert_allclose(sin, want_sin, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cos, want_cos, rtol=0, atol=1e-6)


def test_addons_float16_tables_round_only_the_results():
    """popxl-addons' tables in float16: within one float16 step (4.9e-4 below 1) of HF's float32 tables
    (angles computed in float16 were off by up to a radian near position 2047)."""
    sin, cos = addons_trig_tables(2048, 64, np_dtype="float16")
    want_sin, want_cos = np.split(create_sinusoidal_positions(2048, 64).numpy(), 2, axis=1)
    assert sin.dtype == cos.dtype == np.float16
    np.testing.assert_allclose(sin.astype(np.float32), want_sin, rtol=0, atol=4.9e-4)
    np.testing.assert_allclose(cos.astype(np.float32), want_cos, rtol=0, atol=4.9e-4)


@pytest.mark.parametrize("args,match", [((8, 5), "rotary_dim must be a positive even int"),
                                        ((0, 4), "max_positions must be a positive int")])
def test_trig_tables_errors(args, match):
    with pytest.raises(ValueError, match=match):
        trig_tables(*args)


@pytest.mark.parametrize("rotary_dim", [8, D])
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_matches_hf(impl, rotary_dim):
    x, positions = inputs(1)
    y = run_rotary(x, positions, rotary_dim, impl)
    want = hf_rotary(torch.from_numpy(x), positions, rotary_dim).numpy()
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("rotary_dim", [8, D])
def test_float16_computes_in_float32(rotary_dim):
    x, positions = inputs(2, np.float16)
    cpp, composite = (run_rotary(x, positions, rotary_dim, impl) for impl in IMPLS)
    assert cpp.dtype == composite.dtype == np.float16
    # Both round the same float32 results to float16.
    np.testing.assert_array_equal(cpp, composite)
    want = hf_rotary(torch.from_numpy(x).float(), positions, rotary_dim).half().numpy()
    np.testing.assert_array_equal(cpp, want)


def test_float16_tables_match_hf_half_precision():
    """float16 x with float16 tables, as HF's half-precision model casts its sin/cos to the query dtype."""
    x, positions = inputs(3, np.float16)
    cpp, composite = (run_rotary(x, positions, 8, impl, table_dtype=popxl.float16) for impl in IMPLS)
    np.testing.assert_array_equal(cpp, composite)
    want = hf_rotary(torch.from_numpy(x).float(), positions, 8, table_dtype=torch.float16).half().numpy()
    np.testing.assert_allclose(cpp.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rotary_dim", [8, D])
@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_matches_torch_autograd(impl, rotary_dim):
    x, positions = inputs(4)
    dy = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    sin, cos = trig_tables(P, rotary_dim)
    ir = popxl.Ir()
    with ir.main_graph:
        specs = [popxl.TensorSpec(a.shape, popxl.dtype.as_dtype(a.dtype)) for a in (x, sin, cos, positions)]
        fwd = ir.create_graph(lambda a, s, c, p: rotary_embedding(a, s, c, p, rotary_dim, impl=impl), *specs)
        info = popxl.transforms.autodiff(fwd, grads_required=[fwd.inputs[0]])
        args = [popxl.constant(a, name=n) for a, n in zip((x, sin, cos, positions), ("x", "sin", "cos", "pos"))]
        site = ops.call_with_info(fwd, *args)
        (dx,) = ops.call(info.graph, popxl.constant(dy, name="dy"), inputs_dict=info.inputs_dict(site))
        out = popxl.d2h_stream(dx.shape, dx.dtype, name="dx")
        ops.host_store(out, dx)
    with popxl.Session(ir) as session:
        got = session.run()[out]
    xt = torch.tensor(x, requires_grad=True)
    (want,) = torch.autograd.grad(hf_rotary(xt, positions, rotary_dim), xt, torch.from_numpy(dy))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


def test_gradient_rule_is_the_inverse_op():
    ir = popxl.Ir()
    with ir.main_graph:
        fwd = ir.create_graph(lambda a, s, c, p: rotary_embedding(a, s, c, p, impl="cpp"),
                              popxl.TensorSpec((1, 2, 1, 4), popxl.float32), popxl.TensorSpec((3, 1), popxl.float32),
                              popxl.TensorSpec((3, 1), popxl.float32), popxl.TensorSpec((1, 2), popxl.int32))
        info = popxl.transforms.autodiff(fwd, grads_required=[fwd.inputs[0]])
    (op,) = [op for op in info.graph._ops if op.prim is RotaryPosEmbed]
    assert op.attrs == {"rotary_dim": 2, "inverse": True}


@pytest.mark.parametrize("impl", IMPLS)
def test_replicas_use_their_own_data(impl):
    replicas, rotary_dim = 2, 8
    x, positions = inputs(6, shape=(replicas * B, S, H, D))
    x, positions = x.reshape(replicas, B, S, H, D), positions.reshape(replicas, B, S)
    # Replica 1's tables are for base 500, so a kernel reading replica 0's tables gives wrong numbers.
    tables = [np.stack(t) for t in zip(trig_tables(P, rotary_dim), trig_tables(P, rotary_dim, base=500))]
    y = run_rotary(x, positions, rotary_dim, impl, replication=replicas, tables=tables)
    for r in range(replicas):
        sin, cos = (torch.from_numpy(t[r][positions[r]]) for t in tables)
        xr = torch.from_numpy(x[r])
        want = torch.cat([apply_rotary_pos_emb(xr[..., :rotary_dim], sin, cos), xr[..., rotary_dim:]], dim=-1)
        np.testing.assert_allclose(y[r], want.numpy(), rtol=0, atol=1e-6)


def test_auto_uses_the_custom_op_on_popxl_cpu():
    ir = popxl.Ir()
    with ir.main_graph:
        sin, cos = (popxl.constant(t) for t in trig_tables(P, 8))
        rotary_embedding(popxl.constant(np.zeros((1, 2, 1, 8), np.float32)), sin, cos,
                         popxl.constant(np.zeros((1, 2), np.int32)))
    assert RotaryPosEmbed in [op.prim for op in ir.main_graph._ops]


def _build(x_shape=(B, S, H, D), x_dtype=popxl.float32, table_shape=(P, 4), table_dtype=popxl.float32,
           cos_shape=None, pos_shape=(B, S), pos_dtype=popxl.int32, rotary_dim=8, impl="cpp"):
    def fn(q, sin, cos, pos):
        return rotary_embedding(q, sin, cos, pos, rotary_dim, impl=impl)

    ir = popxl.Ir()
    with ir.main_graph:
        ir.create_graph(fn, popxl.TensorSpec(x_shape, x_dtype), popxl.TensorSpec(table_shape, table_dtype),
                        popxl.TensorSpec(cos_shape or table_shape, table_dtype), popxl.TensorSpec(pos_shape, pos_dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs,match", [
    (dict(x_shape=(B, S, H * D)), r"x must be \(batch, seq, heads, head_dim\).*'q' \(2, 5, 48\)"),
    (dict(x_dtype=popxl.int32), r"x must be .*float32 or float16, got x 'q' \(2, 5, 3, 16\) int32"),
    (dict(rotary_dim=7), r"rotary_dim 7 must be even, positive and at most head_dim 16"),
    (dict(rotary_dim=18, table_shape=(P, 9)), r"rotary_dim 18 must be even.*head_dim 16"),
    (dict(rotary_dim=6), r"tables 'sin' \(40, 4\) float32 need rotary_dim/2 = 3 columns"),
    (dict(cos_shape=(P + 1, 4)), r"sin 'sin' \(40, 4\) float32 and cos 'cos' \(41, 4\) float32 must match"),
    (dict(table_dtype=popxl.float16), r"sin must be .* float32 or x's dtype, got sin 'sin' \(40, 4\) float16"),
    (dict(pos_shape=(B, S + 1)), r"positions must be \(2, 5\) int32 .* got positions 'pos' \(2, 6\) int32"),
    (dict(pos_dtype=popxl.uint32), r"positions must be \(2, 5\) int32 .* got positions 'pos' \(2, 5\) uint32"),
    (dict(impl="fused"), r"impl must be one of \('auto', 'cpp', 'composite'\), got 'fused'"),
])
def test_build_errors_name_the_tensor(impl, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _build(**{"impl": impl, **kwargs})


def test_non_tensor_operand():
    with popxl.Ir().main_graph, pytest.raises(TypeError, match="positions must be a popxl Tensor, got ndarray"):
        sin = popxl.constant(np.zeros((P, 4), np.float32))
        rotary_embedding(popxl.constant(np.zeros((1, 2, 1, 8), np.float32)), sin, sin, np.zeros((1, 2), np.int32))


def test_out_of_range_position_follows_gather_in_both_impls():
    x, positions = inputs(7)
    positions[1, 2] = P
    np.testing.assert_array_equal(run_rotary(x, positions, 8, "cpp"), run_rotary(x, positions, 8, "composite"))


# ------------------------------------------------------------------ popxl-addons' API

def test_addons_trig_tables_match_hf():
    sin, cos = addons_trig_tables(12, 8)
    want_sin, want_cos = np.split(create_sinusoidal_positions(12, 8).numpy(), 2, axis=1)
    assert sin.shape == cos.shape == (12, 4) and sin.dtype == np.float32
    np.testing.assert_allclose(sin, want_sin, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cos, want_cos, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8])
def test_addons_rotary_pos_embed_matches_hf_and_its_gradient(per_batch, rotary_dim):
    """popxl-addons' signature: t (batch, seq, heads, head_dim) and per-position table rows, shared by
    the batch (seq, rotary_dim/2) or per sequence (batch, seq, rotary_dim/2); against HF GPT-J."""
    x, positions = inputs(9)
    rd = rotary_dim or D
    dy = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        if per_batch:
            sin, cos = (popxl.constant(t[positions]) for t in addons_trig_tables(P, rd))
        else:
            sin, cos = trig_table_constants(S, rd)
        fwd = ir.create_graph(lambda t, s, c: rotary_pos_embed(t, s, c, rotary_dim),
                              popxl.TensorSpec(x.shape, popxl.float32), sin.spec, cos.spec)
        info = popxl.transforms.autodiff(fwd, grads_required=[fwd.inputs[0]])
        site = ops.call_with_info(fwd, popxl.constant(x), sin, cos)
        (dx,) = ops.call(info.graph, popxl.constant(dy), inputs_dict=info.inputs_dict(site))
        streams = [popxl.d2h_stream(t.shape, t.dtype) for t in (site.outputs[0], dx)]
        for stream, t in zip(streams, (site.outputs[0], dx)):
            ops.host_store(stream, t)
    with popxl.Session(ir) as session:
        got = session.run()
    xt = torch.tensor(x, requires_grad=True)
    hf_positions = positions if per_batch else np.tile(np.arange(S), (B, 1))
    want = hf_rotary(xt, hf_positions, rd)
    (want_dx,) = torch.autograd.grad(want, xt, torch.from_numpy(dy))
    np.testing.assert_allclose(got[streams[0]], want.detach().numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[streams[1]], want_dx.numpy(), rtol=0, atol=1e-5)


def test_addons_rotary_pos_embed_errors_name_the_tensor():
    with popxl.Ir().main_graph:
        t = popxl.constant(np.zeros((B, S, H, D), np.float32), name="t")
        sin, cos = trig_table_constants(S + 1, D)
        with pytest.raises(ValueError, match=r"sin must be \(5, 8\) or \(2, 5, 8\).*got sin 'sin' \(6, 8\)"):
            rotary_pos_embed(t, sin, cos)


def test_extension_checks_its_arrays():
    x = np.zeros((1, 2, 1, 8), np.float32)
    table, positions = np.zeros((4, 4), np.float32), np.zeros((1, 2), np.int32)
    with pytest.raises(ValueError, match=r"out \(1, 2, 1, 4\) float32 must match x \(1, 2, 1, 8\) float32"):
        extension().rotary_embedding(x, table, table, positions, np.zeros((1, 2, 1, 4), np.float32), 8)
    with pytest.raises(ValueError, match=r"positions must be int32 \(batch, seq\) = \(1, 2\), got positions .* int64"):
        extension().rotary_embedding(x, table, table, positions.astype(np.int64), np.zeros_like(x), 8)
