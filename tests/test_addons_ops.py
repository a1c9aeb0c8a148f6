"""popxl-addons ops against numpy / torch: cross entropy, group-quantised decompression, distributed
layer norm, the strided collectives, within-replica sharded cross entropy, gradient sums of squares."""
import numpy as np
import pytest
import torch
from ops_check import run_graph

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.addons import ops as aops


def quantise_reference(w: np.ndarray, group_size: int) -> np.ndarray:
    """What 4-bit min/max group quantisation along the last axis gives back, computed directly."""
    out = np.empty(w.shape, np.float32)
    for idx in np.ndindex(*w.shape[:-1]):
        for g in range(0, w.shape[-1], group_size):
            x = w[idx][g:g + group_size]
            lo, hi = np.float16(x.min()), np.float16(x.max())
            step = np.float16((hi - lo) / np.float16(15))
            levels = np.clip(np.round((x - lo) / step), 0, 15)
            out[idx][g:g + group_size] = np.float16(np.float16(levels) * step + lo)
    return out


@pytest.mark.parametrize("dim", [-1, 0])
def test_group_quantize_round_trip_and_graph_decompress(dim):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 16)).astype(np.float16)
    codes, scale, bias = aops.group_quantize_compress_numpy(w, 8, dim)
    other, groups = w.shape[1 - (dim % 2)], w.shape[dim] // 8
    assert codes.dtype == np.uint16 and codes.shape == (other, groups, 2) and scale.shape == (other, groups, 1)
    expected = quantise_reference(np.moveaxis(w, dim, -1), 8)
    expected = np.moveaxis(expected, -1, dim)
    host = aops.group_quantize_decompress_numpy(codes, scale, bias, dim)
    np.testing.assert_allclose(host.astype(np.float32), expected, atol=1e-3)
    assert np.abs(host.astype(np.float32) - w).max() <= np.abs(scale).max() / 2 + 1e-3  # within half a step
    (graph,), _ = run_graph(lambda c, s, b: aops.group_quantize_decompress(c, s, b, dim), codes, scale, bias)
    assert graph.dtype == np.float16
    np.testing.assert_allclose(graph.astype(np.float32), host.astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(reduction):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3)).astype(np.int32)
    labels[0, 1] = -1
    outs, grads = run_graph(lambda x, l: aops.cross_entropy(x, l, ignore_index=-1, reduction=reduction), x, labels,
                            dys=[np.ones(() if reduction != "none" else (6,), np.float32)])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(xt.reshape(6, 5), torch.tensor(labels).long().reshape(6),
                                            ignore_index=-1, reduction=reduction)
    ref.sum().backward()
    np.testing.assert_allclose(outs[0], ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[0], xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_with_grad_matches_torch():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    labels = np.array([1, 5, -1, 0], np.int32)
    (loss, dx), _ = run_graph(lambda x, l: aops.cross_entropy_with_grad(x, l, loss_scaling=8.0, ignore_index=-1),
                              x, labels)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(xt, torch.tensor(labels).long(), ignore_index=-1)
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)  # the loss is not scaled
    np.testing.assert_allclose(dx, 8.0 * xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_grad_reduce_square_add_and_linear_layout():
    g = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float16)
    (sumsq, same), _ = run_graph(lambda t: (aops.grad_reduce_square_add(t, 4), aops.linear_layout(t, 2)), g)
    np.testing.assert_allclose(sumsq, (g.astype(np.float64) ** 2).sum() / 16, rtol=1e-5)
    assert sumsq.dtype == np.float32
    np.testing.assert_array_equal(same, g)


def test_layer_norm_distributed_matches_torch_layer_norm():
    """Two replicas each hold half of the hidden axis; together they equal torch's layer norm."""
    rng = np.random.default_rng(4)
    x, w, b, dy = (rng.normal(size=s).astype(np.float32) for s in [(3, 8), (8,), (8,), (3, 8)])
    halves = lambda a, axis: np.stack(np.split(a, 2, axis))  # noqa: E731
    outs, grads = run_graph(lambda x, w, b: aops.layer_norm_distributed(x, w, b, 1e-5), halves(x, 1), halves(w, 0),
                            halves(b, 0), replication=2, dys=[halves(dy, 1)])
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b)]
    y = torch.nn.functional.layer_norm(ts[0], (8,), ts[1], ts[2], 1e-5)
    (y * torch.tensor(dy, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(np.concatenate(list(outs[0]), 1), y.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(list(grads[0]), 1), ts[0].grad.numpy(), rtol=1e-4, atol=1e-5)


def test_strided_collectives_match_numpy():
    """Groups {0, 2} and {1, 3} of 4 replicas (stride 2)."""
    x = np.random.default_rng(5).normal(size=(4, 2, 3)).astype(np.float32)

    def fn(t):
        group = popxl.gcg().ir.replica_grouping(stride=2, group_size=2)
        return (aops.replicated_all_reduce_strided(t, "add", group),
                aops.replicated_all_gather_strided(t, group),
                aops.replicated_reduce_scatter_strided(t, "add", group),
                aops.replicated_all_reduce_strided_identical_inputs(t, "add", group),
                aops.replicated_all_reduce_strided_identical_grad_inputs(t, "add", group))
    (reduced, gathered, scattered, ident, ident_grad), _ = run_graph(fn, x, replication=4)
    for r in range(4):
        peers = [r % 2, r % 2 + 2]
        total = x[peers].sum(0)
        np.testing.assert_allclose(reduced[r], total, rtol=1e-6)
        np.testing.assert_allclose(ident_grad[r], total, rtol=1e-6)
        np.testing.assert_array_equal(ident[r], x[r])
        np.testing.assert_array_equal(gathered[r], np.concatenate([x[p].ravel() for p in peers]))
        np.testing.assert_allclose(scattered[r], total.ravel()[3 * (r // 2):3 * (r // 2) + 3], rtol=1e-6)


def test_cross_entropy_sharded_wr_loss_matches_torch():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    labels = np.array([0, 3, 4, 6, 2], np.int32)
    a, b = logits[:, :3], logits[:, 3:]
    (loss,), grads = run_graph(lambda a, b, i, j: aops.cross_entropy_sharded_wr_loss([a, b], [i, j]),
                               a, b, labels, labels, dys=[np.ones(5, np.float32)])
    xt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(xt, torch.tensor(labels).long(), reduction="none")
    ref.sum().backward()
    np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(grads[:2], 1), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="IPUs"):
        run_graph(lambda a, i: aops.cross_entropy_sharded_wr_loss([a], [i], ipus=[0, 1]), a, labels)
