"""Runs a function of popxl ops as a subgraph on host data, and checks it against a torch reference.

``run_graph`` is the harness: it builds an Ir whose main graph loads each array from an h2d stream,
calls the subgraph made from ``fn``, optionally calls its autodiff gradient graph with given output
gradients, and returns the outputs and input gradients as numpy arrays. ``check`` runs the same
computation with torch (float64, autograd for gradients) per replica and compares.
"""
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from gptj_popxl.popxl_cpu import Ir, Session, TensorSpec, d2h_stream, h2d_stream, ops, transforms
from gptj_popxl.popxl_cpu import dtypes

TOLERANCE = {np.dtype(np.float32): (1e-5, 1e-5), np.dtype(np.float16): (1e-2, 1e-2)}


def _as_tuple(out):
    if out is None:
        return ()
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def run_graph(fn: Callable, *arrays: np.ndarray, replication: int = 1, dys: Optional[Sequence] = None):
    """``fn``'s outputs on ``arrays`` (and, given ``dys``, the gradients of its floating inputs).

    Arrays carry a leading replica axis when ``replication > 1``. ``dys`` holds one gradient per
    floating output (same layout); gradients come back per input, None for integer inputs.
    """
    ir = Ir(replication=replication)
    lead = 1 if replication > 1 else 0
    arrays = [np.asarray(a) for a in arrays]
    with ir.main_graph:
        specs = [TensorSpec(a.shape[lead:], dtypes.dtype.as_dtype(a.dtype)) for a in arrays]
        streams = [h2d_stream(s.shape, s.dtype, f"in{i}") for i, s in enumerate(specs)]
        graph = ir.create_graph(fn, *specs)
        n_out = len(graph.outputs)
        floats = [t for t in graph.outputs if t.dtype.is_floating_point]
        site = ops.call_with_info(graph, *[ops.host_load(s) for s in streams])
        results = list(site.outputs[:n_out])
        grad_streams, wanted = [], []
        if dys is not None:
            wanted = [t for t in graph.inputs if t.dtype.is_floating_point]
            info = transforms.autodiff(graph, grads_provided=floats, grads_required=wanted)
            grad_streams = [h2d_stream(t.shape, t.dtype, f"dy{i}") for i, t in enumerate(floats)]
            grads = ops.call(info.graph, *[ops.host_load(s) for s in grad_streams],
                             inputs_dict=info.inputs_dict(site))
            results += list(grads)
        out_streams = []
        for i, t in enumerate(results):
            s = d2h_stream(t.shape, t.dtype, f"out{i}")
            ops.host_store(s, t)
            out_streams.append(s)
    feed = dict(zip(streams, arrays))
    if dys is not None:
        feed.update((s, np.asarray(d, s.dtype.as_numpy())) for s, d in zip(grad_streams, dys))
    with Session(ir) as session:
        out = session.run(feed)
    values = [out[s] for s in out_streams]
    if dys is None:
        return values[:n_out], None
    by_input = iter(values[n_out:])
    return values[:n_out], [next(by_input) if t in wanted else None for t in graph.inputs]


def reference(torch_fn: Callable, arrays: Sequence[np.ndarray], dys: Optional[Sequence], replication: int):
    """``torch_fn`` per replica in float64 (int arrays as int64): outputs and input gradients."""
    per_replica = [arrays] if replication == 1 else [[a[r] for a in arrays] for r in range(replication)]
    outs, grads = [], []
    for r, xs in enumerate(per_replica):
        ts = [torch.tensor(np.asarray(x, np.float64), requires_grad=True) if np.asarray(x).dtype.kind == "f"
              else torch.tensor(np.asarray(x).astype(np.int64)) for x in xs]
        ys = _as_tuple(torch_fn(*ts))
        outs.append([y.detach().numpy() for y in ys])
        if dys is not None:
            fy = [y for y in ys if y.is_floating_point()]
            dy = [torch.tensor(np.asarray(d, np.float64) if replication == 1 else np.asarray(d[r], np.float64))
                  for d in dys]
            diff = [t for t in ts if t.requires_grad]
            gs = iter(torch.autograd.grad(fy, diff, dy, allow_unused=True))
            grads.append([(lambda g: np.zeros(t.shape) if g is None else g.numpy())(next(gs)) if t.requires_grad
                          else None for t in ts])
    stack = (lambda vs: vs[0]) if replication == 1 else np.stack
    out = [stack([o[i] for o in outs]) for i in range(len(outs[0]))]
    if dys is None:
        return out, None
    return out, [None if grads[0][i] is None else stack([g[i] for g in grads]) for i in range(len(grads[0]))]


def check(popxl_fn: Callable, torch_fn: Callable, *arrays, grad: bool = True, replication: int = 1,
          tol=None, seed: int = 0):
    """Asserts ``popxl_fn`` matches ``torch_fn`` on ``arrays``, forward and (with ``grad``) backward.

    Tolerances follow the dtype of the first floating array unless ``tol=(rtol, atol)`` is given.
    Returns the popxl outputs.
    """
    arrays = [np.asarray(a) for a in arrays]
    dys = None
    ref_out, _ = reference(torch_fn, arrays, None, replication)
    float_dtype = next((a.dtype for a in arrays if a.dtype.kind == "f"), np.dtype(np.float32))
    rtol, atol = tol or TOLERANCE[float_dtype]
    if grad:
        rng = np.random.default_rng(seed)
        dys = [rng.standard_normal(o.shape).astype(float_dtype) for o in ref_out if o.dtype.kind == "f"]
        ref_out, ref_grads = reference(torch_fn, arrays, dys, replication)
    out, grads = run_graph(popxl_fn, *arrays, replication=replication, dys=dys)
    assert len(out) == len(ref_out), f"{len(out)} outputs, reference has {len(ref_out)}"
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert o.shape == r.shape, f"output {i}: shape {o.shape}, reference {r.shape}"
        if r.dtype.kind == "f":
            np.testing.assert_allclose(o.astype(np.float64), r, rtol, atol, err_msg=f"output {i}")
        else:
            np.testing.assert_array_equal(o, r, err_msg=f"output {i}")
    if grad:
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            if r is None:
                continue
            assert g is not None and g.shape == r.shape, f"gradient {i}: {None if g is None else g.shape}, {r.shape}"
            np.testing.assert_allclose(g.astype(np.float64), r, rtol, atol, err_msg=f"gradient of input {i}")
    return out


def build_error(fn: Callable, *specs: TensorSpec):
    """Builds ``fn`` as a subgraph of a fresh Ir (for tests expecting a build-time error)."""
    ir = Ir()
    with ir.main_graph:
        return ir.create_graph(fn, *specs)


def spec(shape, dtype=dtypes.float32) -> TensorSpec:
    return TensorSpec(tuple(shape), dtype)


def rand(rng, *shape, dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


FLOATS = [np.float32, np.float16]


def run_and_read(ir: Ir, tensors: Sequence, variables: Sequence = (), runs: int = 1):
    """Stores ``tensors`` of the main graph to the host and runs ``runs`` times; returns the last run's
    values of ``tensors`` and, after it, the values of ``variables``."""
    with ir.main_graph:
        streams = []
        for t in tensors:
            streams.append(d2h_stream(t.shape, t.dtype, name=f"out{len(streams)}"))
            ops.host_store(streams[-1], t)
    with Session(ir) as session:
        for _ in range(runs):
            out = session.run()
        return [out[s] for s in streams], [session.get_tensor_data(v) for v in variables]


def fetch(ir: Ir, tensors: Sequence, runs: int = 1):
    """The values of ``tensors`` after ``runs`` runs (see :func:`run_and_read`)."""
    return run_and_read(ir, tensors, runs=runs)[0]
