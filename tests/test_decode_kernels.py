"""The decode custom ops (``gptj_popxl.model.decode_kernels``) against torch and HF GPT-J's rotary code:
``streamed_matmul`` over row, column and depth tails, ``decode_layer`` (a whole layer of a decode
step, its cache written in place) against the layer written in torch, ``greedy_head`` against
``torch.argmax`` of the head's logits, and ``greedy_decode_steps`` (steps of embedding, layers and head,
fed back into each other, with the decode loop's bookkeeping) against a torch loop; each with its
products streamed and by BLAS (float16 decode ops stream under "blas" too), the layer kernels for
float32 and float16 models (against float64 torch that stores what the model stores in float16
rounded). ``Fastest``, which picks between those by timing, against ways of
known cost."""
import time

import numpy as np
import pytest
import torch
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

from gptj_popxl.model.decode_kernels import (_CHOOSERS, MAX_ROWS, PRODUCTS_VARIABLE, Fastest, StreamedMatMul,
                                             blas_sgemm, decode_layer, extension, greedy_decode_steps, greedy_head,
                                             prefill_layer, streamed_matmul)
from gptj_popxl.model.rotary import trig_tables
from gptj_popxl.popxl_cpu import Ir, Session, TensorSpec, constant, float16, float32, float64, int32, ops
from ops_check import run_graph

POSITIONS = 64


@pytest.fixture(params=["first trial", "streamed", "blas"])
def products(request, monkeypatch):
    """How the kernels form their products: as a program's first call does while ``Fastest`` still
    tries the ways (streamed on one thread), or fixed by the environment variable."""
    if request.param == "first trial":
        monkeypatch.delenv(PRODUCTS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(PRODUCTS_VARIABLE, request.param)
    if request.param == "blas" and not torch.backends.mkl.is_available():
        pytest.skip("this torch build carries no MKL")
    return request.param


def test_torch_mkl_sgemm_is_found():
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch build carries no MKL")
    assert blas_sgemm() != 0


@pytest.mark.parametrize("m,k,n", [(0, 4, 3), (2, 0, 3), (2, 4, 0)])
def test_blas_products_of_empty_sides(m, k, n):
    if not blas_sgemm():
        pytest.skip("this torch build carries no BLAS sgemm")
    x, w = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
    out = np.full((m, n), np.nan, np.float32)
    extension().matmul(x, w, out, 1, blas_sgemm())
    np.testing.assert_array_equal(out, x @ w)


@pytest.mark.parametrize("x_shape,n", [((1, 1, 24), 16), ((3, 2, 37), 45), ((9, 13), 100), ((5, 8), 3)])
def test_streamed_matmul_matches_torch(x_shape, n, products):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((x_shape[-1], n)).astype(np.float32)
    (out,), _ = run_graph(streamed_matmul, x, w)
    expected = torch.from_numpy(x).double() @ torch.from_numpy(w).double()
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,n", [((1, 1, 40), 16), ((3, 2, 37), 45), ((5, 1000), 33)])
def test_float16_streamed_matmul_sums_in_float32_and_rounds_once(x_shape, n, products):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(x_shape).astype(np.float16)
    w = rng.standard_normal((x_shape[-1], n)).astype(np.float16)
    (out,), _ = run_graph(streamed_matmul, x, w)
    assert out.dtype == np.float16
    exact = x.astype(np.float64) @ w.astype(np.float64)
    # Within half an ulp of float16 of the exact sum, plus float32's rounding of the terms: sums kept
    # in float16, or rounded twice, would be off by more.
    error = np.abs(out.astype(np.float64) - exact)
    assert np.all(error <= 2.0 ** -11 * np.abs(exact) + 1e-5 * np.abs(exact).max()), error.max()


def test_streamed_matmul_uses_the_kernel_for_few_rows_only():
    def op_names(rows):
        graph = Ir().create_graph(streamed_matmul, TensorSpec((rows, 8), float32), TensorSpec((8, 4), float32))
        return {op.prim.name for op in graph._ops}
    assert op_names(MAX_ROWS) == {StreamedMatMul.name}
    assert op_names(MAX_ROWS + 1) == {"matmul"}
    half = Ir().create_graph(streamed_matmul, TensorSpec((2, 8), float16), TensorSpec((8, 4), float16))
    assert {op.prim.name for op in half._ops} == {StreamedMatMul.name}


def test_products_variable_must_name_a_way(monkeypatch):
    monkeypatch.setenv(PRODUCTS_VARIABLE, "fast")
    with pytest.raises(ValueError, match=f"{PRODUCTS_VARIABLE} must be 'blas'.*got 'fast'"):
        run_graph(streamed_matmul, np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))


def test_fastest_keeps_the_way_with_the_least_median_time():
    ran = []

    def way(name, seconds):
        def double(v):
            ran.append(name)
            time.sleep(seconds)
            return 2 * v
        return double
    def slow_first(name):  # a way whose first call (the one a switch pays) is slow: not timed
        calls = []

        def double(v):
            calls.append(v)
            return way(name, 0.02 if len(calls) == 1 else 0.0)(v)
        return double
    fastest = Fastest({"slow": way("slow", 0.004), "fast": slow_first("fast"), "slower": way("slower", 0.008)})
    block = 1 + Fastest.TRIALS
    results = [fastest(i) for i in range(3 * block + 5)]
    assert results == [2 * i for i in range(3 * block + 5)]  # the trials' results are the op's
    assert ran == ["slow"] * block + ["fast"] * block + ["slower"] * block + ["fast"] * 5
    assert fastest.chosen == "fast"
    # Ops sharing decisions: a second one takes the first's choice, even in the middle of its trials.
    decisions, ran[:] = {}, []
    first = Fastest({"slow": way("slow", 0.004), "fast": way("fast", 0.0)}, decisions=decisions, key="k")
    second = Fastest({"slow": way("slow", 0.004), "fast": way("fast", 0.0)}, decisions=decisions, key="k")
    second(0)
    for i in range(2 * block):
        first(i)
    assert decisions == {"k": "fast"} and first.chosen == "fast"
    ran.clear()
    assert second(3) == 6 and second.chosen == "fast" and ran == ["fast"]
    fixed = Fastest({"slow": way("slow", 0.004), "fast": way("fast", 0.0)}, fixed="slow")
    ran.clear()
    assert [fixed(i) for i in range(3)] == [0, 2, 4] and ran == ["slow"] * 3


def test_streamed_matmul_kernel_rejects_mismatched_shapes():
    x, w, out = np.zeros((2, 5), np.float32), np.zeros((4, 3), np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="matmul: x"):
        extension().matmul(x, w, out, 1)


def stored_as(dtype):
    """What storing a float64 tensor in a tensor of the model's ``dtype`` keeps of it."""
    return (lambda a: a.to(torch.float16).double()) if dtype == np.float16 else (lambda a: a)


def torch_layer(x, weights, positions, k_cache, v_cache, write, mask, rotary_dim, eps, store=lambda a: a):
    """GPT-J's decoder layer for one token per row in torch, rotary by HF's helpers; returns the
    output and the caches with the new key and value at column ``write``, as ``store`` keeps them
    (the query attends to them as stored)."""
    ln_w, ln_b, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out = weights
    batch, heads, head_dim, _ = k_cache.shape
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], ln_w, ln_b, eps)
    q, k, v = (t.reshape(batch, 1, heads, head_dim) for t in (h @ w_qkv).split(heads * head_dim, dim=-1))
    sincos = create_sinusoidal_positions(POSITIONS, rotary_dim)[torch.as_tensor(positions).long()].double()
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    q, k = (torch.cat([apply_rotary_pos_emb(t[..., :rotary_dim], sin, cos), t[..., rotary_dim:]], dim=-1)[:, 0]
            for t in (q, k))
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[..., write] = store(k)
    v_cache[:, :, write] = store(v[:, 0])
    scores = torch.einsum("bhd,bhdc->bhc", q, k_cache) / head_dim ** 0.5 + mask
    z = torch.einsum("bhc,bhcd->bhd", scores.softmax(-1), v_cache).reshape(batch, -1)
    mlp = torch.nn.functional.gelu(h @ w_in + b_in, approximate="tanh") @ w_fc_out + b_fc_out
    return z @ w_out + mlp + x, k_cache, v_cache


# The model's type for the layer kernels, and how close their results must come to the float64
# reference: float32 to its rounding errors; float16 (the arithmetic in float32, each stored result
# rounded once) to half a float16 ulp beyond those.
MODEL_DTYPES = [np.float32, np.float16]
HALF_ULP = 2.0 ** -11


def close(dtype, rtol):
    """``rtol`` for a float32 result, plus half a float16 ulp for a float16 one."""
    return rtol + (HALF_ULP if dtype == np.float16 else 0.0)


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_decode_layer_matches_torch(products, dtype):
    rng = np.random.default_rng(1)
    batch, heads, head_dim, cache_len, n_embd, inner, rotary_dim, write = 3, 2, 16, 6, 32, 80, 8, 4

    def normal(*shape, scale=1.0, shift=0.0):
        return (shift + scale * rng.standard_normal(shape)).astype(dtype)
    x = normal(batch, 1, n_embd)
    weights = [normal(n_embd, scale=0.1, shift=1), normal(n_embd, scale=0.1),
               normal(n_embd, 3 * heads * head_dim, scale=0.2),
               normal(n_embd, inner, scale=0.2), normal(inner), normal(heads * head_dim, n_embd, scale=0.2),
               normal(inner, n_embd, scale=0.1), normal(n_embd)]
    positions = np.array([[5], [0], [POSITIONS - 1]], np.int32)
    k_cache, v_cache = normal(batch, heads, head_dim, cache_len), normal(batch, heads, cache_len, head_dim)
    # Rows 0 and 2 skip column 0; row 1 sees only the column it writes.
    mask = np.zeros((batch, 1, 1, cache_len), np.float32)
    mask[..., 0] = np.finfo(np.float32).min
    mask[1] = np.finfo(np.float32).min
    mask[1, ..., write] = 0
    sin, cos = trig_tables(POSITIONS, rotary_dim)

    def fn(x, *rest):
        *ws, positions, sin, cos, k_cache, v_cache, write, mask = rest
        out = decode_layer(x, *ws, positions, sin, cos, k_cache, v_cache, write, mask, eps=1e-5)
        return out, k_cache, v_cache  # the caches as the op left them
    (out, k_after, v_after), _ = run_graph(fn, x, *weights, positions, sin, cos, k_cache, v_cache,
                                           np.int32([write]), mask)
    assert out.dtype == k_after.dtype == v_after.dtype == dtype

    def t(a):
        return torch.from_numpy(a).double()
    ref_out, ref_k, ref_v = torch_layer(t(x[:, 0]), [t(w) for w in weights], positions, t(k_cache), t(v_cache), write,
                                        t(mask[:, 0]), rotary_dim, 1e-5, stored_as(dtype))
    np.testing.assert_allclose(out[:, 0], ref_out.numpy(), rtol=close(dtype, 1e-4), atol=1e-4)
    np.testing.assert_allclose(k_after, ref_k.numpy(), rtol=close(dtype, 1e-5), atol=1e-5)
    np.testing.assert_allclose(v_after, ref_v.numpy(), rtol=close(dtype, 1e-5), atol=1e-5)


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_prefill_layer_matches_torch(products, dtype):
    """A prefill's layer over left-padded rows (row 1's first two tokens are padding, masked as keys)
    against GPT-J's layer in torch: the output and the rotated keys and values."""
    rng = np.random.default_rng(2)
    batch, seq, heads, head_dim, n_embd, inner, rotary_dim = 2, 5, 2, 16, 32, 80, 8

    def normal(*shape, scale=1.0, shift=0.0):
        return (shift + scale * rng.standard_normal(shape)).astype(dtype)
    x = normal(batch, seq, n_embd)
    weights = [normal(n_embd, scale=0.1, shift=1), normal(n_embd, scale=0.1),
               normal(n_embd, 3 * heads * head_dim, scale=0.2),
               normal(n_embd, inner, scale=0.2), normal(inner), normal(heads * head_dim, n_embd, scale=0.2),
               normal(inner, n_embd, scale=0.1), normal(n_embd)]
    positions = np.array([[3, 4, 5, 6, 7], [0, 0, 0, 1, 2]], np.int32)
    allowed = np.tril(np.ones((seq, seq), bool))[None].repeat(batch, 0)
    allowed[1, :, :2] = False
    mask = np.where(allowed, 0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    sin, cos = trig_tables(POSITIONS, rotary_dim)

    def fn(x, *rest):
        *ws, positions, sin, cos, mask = rest
        return prefill_layer(x, *ws, positions, sin, cos, mask, eps=1e-5, heads=heads)
    (out, k, v), _ = run_graph(fn, x, *weights, positions, sin, cos, mask)
    assert out.dtype == k.dtype == v.dtype == dtype

    def t(a):
        return torch.from_numpy(a).double()
    ln_w, ln_b, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out = (t(w) for w in weights)
    h = torch.nn.functional.layer_norm(t(x), (n_embd,), ln_w, ln_b, 1e-5)
    q, k_ref, v_ref = (u.reshape(batch, seq, heads, head_dim) for u in (h @ w_qkv).split(heads * head_dim, dim=-1))
    sincos = create_sinusoidal_positions(POSITIONS, rotary_dim)[torch.from_numpy(positions).long()].double()
    sin_t, cos_t = torch.split(sincos, rotary_dim // 2, dim=-1)
    q, k_ref = (torch.cat([apply_rotary_pos_emb(u[..., :rotary_dim], sin_t, cos_t), u[..., rotary_dim:]], dim=-1)
                .transpose(1, 2) for u in (q, k_ref))
    v_ref = v_ref.transpose(1, 2)
    scores = q @ k_ref.transpose(-1, -2) / head_dim ** 0.5 + t(mask)
    z = (scores.softmax(-1) @ v_ref).transpose(1, 2).reshape(batch, seq, heads * head_dim)
    mlp = torch.nn.functional.gelu(h @ w_in + b_in, approximate="tanh") @ w_fc_out + b_fc_out
    np.testing.assert_allclose(out, (z @ w_out + mlp + t(x)).numpy(), rtol=close(dtype, 1e-4), atol=1e-4)
    np.testing.assert_allclose(k, k_ref.numpy(), rtol=close(dtype, 1e-5), atol=1e-5)
    np.testing.assert_allclose(v, v_ref.numpy(), rtol=close(dtype, 1e-5), atol=1e-5)


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
@pytest.mark.parametrize("steps,first_step", [(3, 1), (0, 0), (2, 7)])
def test_greedy_decode_steps_match_a_torch_loop(products, steps, first_step, dtype):
    """``steps`` greedy steps fed back into each other against the same loop in torch: the tokens
    written into ``tokens`` (at column 0 once ``step`` runs past it, as dynamic_update), the caches
    and mask as left in place, and the counters (positions and columns wrapping). For a float16
    model the torch loop stores what the model stores in float16 tensors (each layer's output and
    the caches) rounded to float16, and computes in float64 between."""
    rng = np.random.default_rng(3)
    batch, heads, head_dim, cache_len, n_embd, inner, rotary_dim, vocab, n_layer = 2, 2, 8, 5, 16, 24, 4, 40, 3
    column, chunk, n_positions = 3, 4, 11

    def normal(*shape, scale=1.0, shift=0.0):
        return (shift + scale * rng.standard_normal(shape)).astype(dtype)
    token = np.array([[7], [vocab - 1]], np.int32)
    embedding = normal(vocab, n_embd)
    layers = [[normal(n_embd, scale=0.1, shift=1), normal(n_embd, scale=0.1),
               normal(n_embd, 3 * heads * head_dim, scale=0.3),
               normal(n_embd, inner, scale=0.3), normal(inner), normal(heads * head_dim, n_embd, scale=0.3),
               normal(inner, n_embd, scale=0.2), normal(n_embd)] for _ in range(n_layer)]
    k_caches = [normal(batch, heads, head_dim, cache_len) for _ in range(n_layer)]
    v_caches = [normal(batch, heads, cache_len, head_dim) for _ in range(n_layer)]
    head = [normal(n_embd, scale=0.1, shift=1), normal(n_embd, scale=0.1), normal(n_embd, vocab), normal(vocab)]
    position = np.array([[9], [2]], np.int32)  # row 0 wraps from n_positions - 1 to 0
    mask = np.full((batch, 1, 1, cache_len), np.finfo(np.float32).min, np.float32)
    mask[0, ..., :column] = 0  # row 0 sees the columns before the first it writes, row 1 none of them
    tokens = np.full((batch, chunk), -1, np.int32)
    sin, cos = trig_tables(POSITIONS, rotary_dim)

    def fn(token, position, column, mask, tokens, step, embedding, *rest):
        weights, rest = rest[:8 * n_layer], rest[8 * n_layer:]
        keys, values, (sin, cos, *head) = rest[:n_layer], rest[n_layer:2 * n_layer], rest[2 * n_layer:]
        layers = [weights[8 * i:8 * i + 8] for i in range(n_layer)]
        carried = greedy_decode_steps(token, position, column, mask, tokens, step, embedding, layers, sin, cos, keys,
                                      values, *head, eps=1e-5, n_positions=n_positions, steps=steps)
        return (*carried, *keys, *values)
    def t(a):
        return torch.from_numpy(np.array(a)).double()
    stored = stored_as(dtype)
    # The reference starts from copies made before the op runs.
    ids, pos, col, ref_mask, ref_tokens = token[:, 0].copy(), position[:, 0].copy(), column, t(mask[:, 0, 0]), \
        tokens.copy()
    keys, values = [t(k) for k in k_caches], [t(v) for v in v_caches]
    outs, _ = run_graph(fn, token, position, np.int32([column]), mask, tokens, np.int32([first_step]), embedding,
                        *[w for layer in layers for w in layer], *k_caches, *v_caches, sin, cos, *head)
    for i in range(steps):
        ref_mask[:, col] = 0
        x = t(embedding)[torch.from_numpy(ids).long()]
        for layer in range(n_layer):
            x, keys[layer], values[layer] = torch_layer(x, [t(w) for w in layers[layer]], pos[:, None], keys[layer],
                                                        values[layer], col, ref_mask[:, None], rotary_dim, 1e-5, stored)
            x = stored(x)
        h = torch.nn.functional.layer_norm(x, (n_embd,), t(head[0]), t(head[1]), 1e-5)
        ids = torch.argmax(h @ t(head[2]) + t(head[3]), dim=-1).numpy().astype(np.int32)
        index = first_step + i
        ref_tokens[:, index if index < chunk else 0] = ids
        pos, col = (pos + 1) % n_positions, (col + 1) % cache_len
    new, next_position, next_column, mask_after, tokens_after, next_step, *caches = outs
    np.testing.assert_array_equal(new[:, 0], ids)
    np.testing.assert_array_equal(next_position[:, 0], pos)
    np.testing.assert_array_equal(next_column, [col])
    np.testing.assert_array_equal(next_step, [first_step + steps])
    np.testing.assert_array_equal(tokens_after, ref_tokens)
    np.testing.assert_array_equal(mask_after[:, 0, 0], ref_mask.numpy())
    for got, want in zip(caches, keys + values):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want.numpy(), rtol=close(dtype, 1e-4), atol=1e-4)


def test_greedy_decode_steps_refuse_tokens_without_a_column():
    f32, i32 = float32, int32
    layer = [(8,), (8,), (8, 6), (8, 16), (16,), (2, 8), (16, 8), (8,)]  # one head of 2 features

    def build(token, position, column, mask, tokens, step, embedding, *rest):
        weights, (k0, v0, *head) = rest[:8], rest[8:]
        sin, cos = (constant(np.zeros((8, 1), np.float32)) for _ in range(2))
        greedy_decode_steps(token, position, column, mask, tokens, step, embedding, [weights], sin, cos, [k0], [v0],
                            *head, eps=1e-5, n_positions=8, steps=1)
    specs = ([TensorSpec((2, 1), i32), TensorSpec((2, 1), i32), TensorSpec((1,), i32), TensorSpec((2, 1, 1, 3), f32),
              TensorSpec((2, 0), i32), TensorSpec((1,), i32), TensorSpec((10, 8), f32)]
             + [TensorSpec(s, f32) for s in layer] + [TensorSpec((2, 1, 2, 3), f32), TensorSpec((2, 1, 3, 2), f32)]
             + [TensorSpec(s, f32) for s in [(8,), (8,), (8, 10), (10,)]])
    with pytest.raises(ValueError, match=r"greedy_decode_steps: tokens must be \(2, chunk\) int32 with chunk >= 1"):
        Ir().create_graph(build, *specs)


def test_greedy_decode_steps_name_a_mismatched_layer_weight():
    f32, i32 = float32, int32
    layer = [(8,), (8,), (8, 6), (8, 16), (16,), (2, 8), (16, 8), (8,)]  # one head of 2 features
    bad = layer[:3] + [(8, 15)] + layer[4:]

    def build(token, position, column, mask, tokens, step, embedding, *rest):
        weights, (k0, k1, v0, v1, *head) = rest[:16], rest[16:]
        sin, cos = (constant(np.zeros((8, 1), np.float32)) for _ in range(2))
        greedy_decode_steps(token, position, column, mask, tokens, step, embedding, [weights[:8], weights[8:]], sin,
                            cos, [k0, k1], [v0, v1], *head, eps=1e-5, n_positions=8, steps=2)
    specs = ([TensorSpec((2, 1), i32), TensorSpec((2, 1), i32), TensorSpec((1,), i32), TensorSpec((2, 1, 1, 3), f32),
              TensorSpec((2, 4), i32), TensorSpec((1,), i32), TensorSpec((10, 8), f32)]
             + [TensorSpec(s, f32) for s in layer + bad]
             + [TensorSpec((2, 1, 2, 3), f32)] * 2 + [TensorSpec((2, 1, 3, 2), f32)] * 2
             + [TensorSpec(s, f32) for s in [(8,), (8,), (8, 10), (10,)]])
    with pytest.raises(ValueError, match=r"greedy_decode_steps: layers\[1\] w_in must be \(8, 16\) float32"):
        Ir().create_graph(build, *specs)


LAYER_SHAPES = [(8,), (8,), (8, 6), (8, 16), (16,), (2, 8), (16, 8), (8,)]  # a layer's weights: one head of 2


def _ways(build, specs) -> dict:
    """``{op name: the ways its Fastest may take}`` for the decode ops of ``build``'s graph, lowered
    by a session."""
    ir = Ir()
    with ir.main_graph:
        inputs = [ops.init(s.shape, s.dtype, f"in{i}") for i, s in enumerate(specs)]
        build(*inputs)
    with Session(ir):
        return {name: (set(chooser.ways), chooser.chosen) for chooser, (name, owner) in list(_CHOOSERS.items())
                if owner is ir}


@pytest.mark.parametrize("wanted", [None, "blas", "streamed"])
def test_float16_layer_ops_offer_blas_only_to_the_prefill(monkeypatch, wanted):
    """A float16 decode step's few rows are read faster streamed than widened for sgemm: its layer
    ops never take BLAS, even under ``blas``; a float16 prefill's many rows may."""
    if wanted is None:
        monkeypatch.delenv(PRODUCTS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(PRODUCTS_VARIABLE, wanted)
    if not blas_sgemm():
        pytest.skip("this torch build carries no BLAS sgemm")

    def build(x, xs, *tensors):
        *weights, k_cache, v_cache, mask, prefill_mask, positions, prefill_positions, write = tensors
        sin, cos = (constant(np.zeros((8, 1), np.float32)) for _ in range(2))
        decode_layer(x, *weights, positions, sin, cos, k_cache, v_cache, write, mask, eps=1e-5)
        prefill_layer(xs, *weights, prefill_positions, sin, cos, prefill_mask, eps=1e-5, heads=1)
    specs = ([TensorSpec((2, 1, 8), float16), TensorSpec((2, 3, 8), float16)] +
             [TensorSpec(s, float16) for s in LAYER_SHAPES + [(2, 1, 2, 3), (2, 1, 3, 2)]] +
             [TensorSpec((2, 1, 1, 3), float32), TensorSpec((2, 1, 3, 3), float32), TensorSpec((2, 1), int32),
              TensorSpec((2, 3), int32), TensorSpec((1,), int32)])
    ways = _ways(build, specs)
    streamed = f"streamed on {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}"
    # left to timing unless wanted, or there is one way only (streaming on one thread, on a 1-thread machine)
    assert ways["decode_layer"][1] == (None if wanted is None and len(ways["decode_layer"][0]) > 1 else streamed)
    assert "blas" not in ways["decode_layer"][0]
    assert ways["prefill_layer"][1] == {None: None, "blas": "blas", "streamed": streamed}[wanted]
    assert ("blas" in ways["prefill_layer"][0]) == (wanted != "streamed")


def test_decode_layer_names_a_mismatched_weight():
    shapes = [(2, 1, 8), (8,), (8,), (8, 12), (8, 16), (16,), (4, 8), (16, 8), (8,),  # x and the weights
              (2, 1, 2, 3), (2, 1, 3, 2), (2, 1, 1, 3)]  # k_cache (one head of 2), v_cache, mask

    def build(*tensors):
        x, *weights, k_cache, v_cache, mask, positions, write = tensors
        sin, cos = (constant(np.zeros((8, 1), np.float32)) for _ in range(2))
        decode_layer(x, *weights, positions, sin, cos, k_cache, v_cache, write, mask, eps=1e-5)
    specs = [TensorSpec(s, float32) for s in shapes] + [TensorSpec((2, 1), int32), TensorSpec((1,), int32)]
    with pytest.raises(ValueError, match=r"decode_layer: w_qkv must be \(8, 6\) float32"):
        Ir().create_graph(build, *specs)


@pytest.mark.parametrize("x_dtype,weights_dtype,error,message", [
    (float32, float16, ValueError, r"decode_layer: x must be \(2, 1, 8\) float16 .*got 'x' \(2, 1, 8\) float32"),
    (float16, float32, ValueError, r"decode_layer: x must be \(2, 1, 8\) float32 .*got 'x' \(2, 1, 8\) float16"),
    (float64, float64, TypeError, r"decode_layer: the model's tensors must be float32 or float16, got 'w_qkv' float64"),
])
def test_decode_layer_names_the_tensor_off_the_models_dtype(x_dtype, weights_dtype, error, message):
    """The model's type is its weights': an activation of another type is the tensor named."""
    def build(x, ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, k_cache, v_cache, mask, positions,
              write):
        sin, cos = (constant(np.zeros((8, 1), np.float32)) for _ in range(2))
        decode_layer(x, ln_weight, ln_bias, w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out, positions, sin, cos,
                     k_cache, v_cache, write, mask, eps=1e-5)
    weights = [(8,), (8,), (8, 6), (8, 16), (16,), (2, 8), (16, 8), (8,), (2, 1, 2, 3), (2, 1, 3, 2)]  # and caches
    specs = ([TensorSpec((2, 1, 8), x_dtype)] + [TensorSpec(s, weights_dtype) for s in weights] +
             [TensorSpec((2, 1, 1, 3), float32), TensorSpec((2, 1), int32), TensorSpec((1,), int32)])
    with pytest.raises(error, match=message):
        Ir().create_graph(build, *specs)


def test_prefill_layer_names_a_mismatched_mask():
    shapes = [(2, 3, 8), (8,), (8,), (8, 6), (8, 16), (16,), (2, 8), (16, 8), (8,),  # x and the weights (one head)
              (2, 1, 3, 4)]  # a mask of 4 columns for 3 tokens

    def build(*tensors):
        x, *weights, mask, positions = tensors
        sin, cos = (constant(np.zeros((8, 1), np.float32)) for _ in range(2))
        prefill_layer(x, *weights, positions, sin, cos, mask, eps=1e-5, heads=1)
    specs = [TensorSpec(s, float32) for s in shapes] + [TensorSpec((2, 3), int32)]
    with pytest.raises(ValueError, match=r"prefill_layer: mask must be \(2, 1, 3, 3\) float32"):
        Ir().create_graph(build, *specs)


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_greedy_head_matches_torch_argmax(products, dtype):
    rng = np.random.default_rng(2)
    batch, n_embd, vocab = 3, 24, 50
    x = rng.standard_normal((batch, n_embd)).astype(dtype)
    ln_w = (1 + 0.1 * rng.standard_normal(n_embd)).astype(dtype)
    ln_b = rng.standard_normal(n_embd).astype(dtype)
    w, bias = rng.standard_normal((n_embd, vocab)).astype(dtype), rng.standard_normal(vocab).astype(dtype)
    # Columns 7 and 30 are the same logit, the largest: the first one wins, as torch.argmax.
    w[:, 30], bias[30] = w[:, 7], bias[7] = 0.0, 100.0
    (tokens,), _ = run_graph(lambda *a: greedy_head(*a, eps=1e-5), x, ln_w, ln_b, w, bias)
    h = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (n_embd,), torch.from_numpy(ln_w).double(),
                                       torch.from_numpy(ln_b).double())
    expected = torch.argmax(h.double() @ torch.from_numpy(w).double() + torch.from_numpy(bias).double(), dim=-1)
    np.testing.assert_array_equal(tokens, expected.numpy())
    assert (tokens == 7).all()
    x[1, 0] = np.nan  # a NaN logit counts as largest, as in torch.argmax
    (tokens,), _ = run_graph(lambda *a: greedy_head(*a, eps=1e-5), x, ln_w, ln_b, w, bias)
    assert tokens[1] == 0 and tokens[0] == tokens[2] == 7
