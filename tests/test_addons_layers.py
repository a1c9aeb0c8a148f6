"""popxl-addons layers against torch modules, with weights copied by their ``torch_mapping``."""
import numpy as np
import pytest
import torch
from test_addons_ops import quantise_reference

from gptj_popxl import addons
from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.addons.layers import Embedding, LayerNorm, LayerNormDistributed, Linear, LinearGQ


def run_layer(make_layer, x: np.ndarray, weights=None, replication: int = 1, dtype=None):
    """Output of ``make_layer()`` on ``x`` (leading replica axis when replicated). ``weights(variables)``
    returns ``{variable: host data}`` written before running."""
    ir = popxl.Ir(replication=replication)
    shape = x.shape[1:] if replication > 1 else x.shape
    with ir.main_graph:
        stream = popxl.h2d_stream(shape, dtype or popxl.dtypes.dtype.as_dtype(x.dtype), "x")
        xt = popxl.ops.host_load(stream)
        facts, graph = make_layer().create_graph(xt)
        variables = facts.init()
        (y,) = graph.bind(variables).call(xt)
        out = addons.host_store(y)
    session = popxl.Session(ir)
    if weights is not None:
        session.write_variables_data(dict(weights(variables)))
    with session:
        return session.run({stream: x})[out]


def test_linear_matches_torch():
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 5)
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    y = run_layer(lambda: Linear(5), x, lambda v: Linear.torch_mapping(v, ref))
    np.testing.assert_allclose(y, ref(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_torch():
    torch.manual_seed(1)
    ref = torch.nn.LayerNorm(6, eps=1e-5)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    x = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
    y = run_layer(lambda: LayerNorm(), x, lambda v: LayerNorm.torch_mapping(v, ref))
    np.testing.assert_allclose(y, ref(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_embedding_matches_torch_and_shards():
    torch.manual_seed(2)
    ref = torch.nn.Embedding(10, 4)
    idx = np.array([[0, 9, 3], [3, 5, 1]], np.int32)
    table = ref.weight.detach().numpy()
    y = run_layer(lambda: Embedding(popxl.float32, 10, 4), idx, lambda v: {v.weight: table})
    np.testing.assert_allclose(y, ref(torch.tensor(idx).long()).detach().numpy(), rtol=1e-6)
    assert Embedding.get_vocab_shard_size(10, 4) == 3
    np.testing.assert_array_equal(Embedding.get_offsets(10, 4), [0, 3, 6, 9])


@pytest.mark.parametrize("dim", [-1, 0])
def test_linear_gq_matches_torch_with_dequantised_weight(dim):
    torch.manual_seed(3)
    ref = torch.nn.Linear(16, 8)
    x = np.random.default_rng(3).normal(size=(3, 16)).astype(np.float32)
    y = run_layer(lambda: LinearGQ(8, group_size=8, dim=dim), x,
                  lambda v: LinearGQ.torch_mapping(v, ref, popxl.float32, group_size=8, dim=dim))
    w = ref.weight.detach().numpy().T.astype(np.float16)  # (in, out)
    w_q = np.moveaxis(quantise_reference(np.moveaxis(w, dim, -1), 8), -1, dim)
    expected = x @ w_q + ref.bias.detach().numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)


def test_layer_norm_distributed_matches_torch():
    rng = np.random.default_rng(4)
    x, w, b = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=8), rng.normal(size=8)
    halves = lambda a, axis: np.stack(np.split(a, 2, axis)).astype(np.float32)  # noqa: E731
    y = run_layer(lambda: LayerNormDistributed(), halves(x, 1),
                  lambda v: {v.weight: halves(w, 0), v.bias: halves(b, 0)}, replication=2)
    ref = torch.nn.functional.layer_norm(torch.tensor(x, dtype=torch.float64), (8,), torch.tensor(w),
                                         torch.tensor(b), 1e-5)
    np.testing.assert_allclose(np.concatenate(list(y), 1), ref.numpy(), rtol=1e-5, atol=1e-5)
