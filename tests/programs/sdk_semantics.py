"""Behaviours of the SDK's popxl that programs rely on, exercised as a popxl program would.

Written for the Poplar SDK's popxl; run it with ``python -m gptj_popxl.popxl_cpu
tests/programs/sdk_semantics.py OUT.npz MEMMAP_PATH``. It saves what it observed to OUT.npz; the
test compares that with numpy.
"""
import sys

import numpy as np
import popxl
import popxl.ops as ops
from popxl.transforms.autodiff import ExpectedConnection  # noqa: F401 - must not shadow transforms.autodiff

out_path, memmap_path = sys.argv[1], sys.argv[2]
saved = {}


def run_main(build, inputs=None, runs=1):
    """Builds ``build() -> {name: tensor}`` in a fresh IR's main graph and runs it ``runs`` times."""
    ir = popxl.Ir()
    with ir.main_graph:
        made = build()
        streams = {}
        for name, t in made.items():
            streams[name] = popxl.d2h_stream(t.shape, t.dtype, name=name)
            ops.host_store(streams[name], t)
    results = []
    with popxl.Session(ir) as session:
        for _ in range(runs):
            got = session.run(inputs() if callable(inputs) else inputs)
            results.append({name: got[s] for name, s in streams.items()})
    return results


# 1. Session.run copies its inputs: an in-place op on a loaded value never reaches the caller's array.
ir = popxl.Ir()
with ir.main_graph:
    stream = popxl.h2d_stream((3,), popxl.float32, "x")
    x = ops.host_load(stream)
    ops.add_(x, popxl.constant(np.ones(3, np.float32)))
    out = popxl.d2h_stream((3,), popxl.float32, "out")
    ops.host_store(out, x)
batch = np.zeros(3, np.float32)
with popxl.Session(ir) as session:
    saved["inputs_run1"] = session.run({stream: batch})[out]
    saved["inputs_run2"] = session.run({stream: batch})[out]
saved["inputs_batch_after"] = batch

# 2. variable and constant copy their data when made.
buf = np.zeros(2, np.float32)
ir = popxl.Ir()
with ir.main_graph:
    v1 = popxl.variable(buf, name="v1")
    c1 = popxl.constant(buf, name="c1")
    buf[:] = 7
    out = popxl.d2h_stream((2,), popxl.float32)
    ops.host_store(out, c1 + 0.0)
with popxl.Session(ir) as session:
    saved["creation_constant"] = session.run()[out]
    saved["creation_variable"] = session.get_tensor_data(v1)

# 3. A call output that is the callee's constant is a fresh value every run.
table = np.arange(3, dtype=np.float32)


def callee_outputs():
    g = popxl.gcg().ir.create_graph(lambda: popxl.constant(table, name="table"))
    (y,) = ops.call(g)
    ops.add_(y, popxl.constant(np.full(3, 10, np.float32)))
    return {"y": y}


runs = run_main(callee_outputs, runs=2)
saved["call_run1"], saved["call_run2"], saved["call_table_after"] = runs[0]["y"], runs[1]["y"], table

# 4. `+=` adds in place; the reflected operators and host-array indexing.
ir = popxl.Ir()
with ir.main_graph:
    v = popxl.variable(np.array([1.0, 2.0, 3.0], np.float32), name="v")
    same = v
    v += 1.0
    assert v is same
    w = popxl.variable(np.array([1.0, 2.0, 3.0], np.float32), name="w")
    w_before = w
    w -= 1.0  # Python's default: a new tensor; the variable keeps its value
    assert w is not w_before
    results = {"rpow": 2.0 ** v, "rmod": 7.0 % v, "list_index": v[[2, 0]], "array_index": v[np.array([1])],
               "mask": v[np.array([True, False, True])]}
    streams = {k: popxl.d2h_stream(t.shape, t.dtype, name=k) for k, t in results.items()}
    for k, t in results.items():
        ops.host_store(streams[k], t)
with popxl.Session(ir) as session:
    got = session.run()
    saved.update({f"ops_{k}": got[s] for k, s in streams.items()})
    saved["ops_iadd_variable"] = session.get_tensor_data(v)
    saved["ops_isub_variable"] = session.get_tensor_data(w_before)

# 5. autodiff keeps the grads_provided order.
ir = popxl.Ir()
with ir.main_graph:
    fwd = ir.create_graph(lambda t: (t * 2.0, t * 3.0), popxl.TensorSpec((2,), popxl.float32))
    a, b = fwd.outputs
    info = popxl.transforms.autodiff(fwd, grads_provided=[b, a])
    site = ops.call_with_info(fwd, popxl.constant(np.ones(2, np.float32)))
    (dx,) = ops.call(info.graph, popxl.constant(np.array([1.0, 1.0], np.float32)),
                     popxl.constant(np.array([100.0, 100.0], np.float32)), inputs_dict=info.inputs_dict(site))
    out = popxl.d2h_stream((2,), popxl.float32)
    ops.host_store(out, dx)
with popxl.Session(ir) as session:
    saved["grads_provided_dx"] = session.run()[out]

# 7. Integer reductions keep int32 and wrap around.
big = np.array([2 ** 31 - 1, 1], np.int32)
runs = run_main(lambda: {"sum": ops.sum(popxl.constant(big)), "prod": ops.prod(popxl.constant(np.array([2 ** 16, 2 ** 16], np.int32)))})
saved["int_sum"], saved["int_prod"] = runs[0]["sum"], runs[0]["prod"]

# 9. Seed helpers.
saved["seeds"] = popxl.create_seeds(5, offset=2, replicas=3)

# 10 and 11. uint64 data becomes uint32; unsigned arithmetic wraps around.
top = np.array([2 ** 32 - 1, 5], np.uint64)


def unsigned():
    s = popxl.constant(top)
    one = popxl.constant(np.array([1, 2], np.uint32))
    return {"dtype_probe": s, "add": s + one, "sub": one - s, "div": ops.div(s, one), "max": ops.max(s),
            "increment_mod": ops.increment_mod(one, 3, 4)}


runs = run_main(unsigned)
saved.update({f"uint_{k}": v for k, v in runs[0].items()})

# 13. A single-group remote variable whose data has a leading axis of 1, in a buffer of the plain shape.
ir = popxl.Ir()
with ir.main_graph:
    buffer = popxl.remote_buffer((4,), popxl.float32, 1)
    rv = popxl.remote_variable(np.arange(4, dtype=np.float32).reshape(1, 4), buffer, 0, name="rv")
    loaded = ops.remote_load(buffer, 0)
    out = popxl.d2h_stream(loaded.shape, loaded.dtype)
    ops.host_store(out, loaded * 2.0)
with popxl.Session(ir) as session:
    saved["remote_loaded"] = session.run()[out]
    saved["remote_variable"] = session.get_tensor_data(rv)

# 14. Errors of the SDK's types and messages.
messages = []
ir = popxl.Ir()
with ir.main_graph:
    v = popxl.variable(np.zeros(2, np.float32), name="v")
    c = popxl.constant(np.zeros(2, np.float32), name="c")
    t = v + 1.0
session = popxl.Session(ir)
for call, kind in ((lambda: session.get_tensor_data(t), TypeError), (lambda: session.write_variable_data(c, np.zeros(2)), TypeError),
                   (lambda: session.write_variable_data(v, np.zeros(2, np.float64)), TypeError),
                   (lambda: session.write_variable_data(v, np.zeros(3, np.float32)), ValueError),
                   (lambda: session.run(), ValueError), (lambda: popxl.remote_buffer((2,), popxl.float32, 0), ValueError)):
    try:
        with ir.main_graph:
            call()
    except kind as e:
        messages.append(str(e))
saved["errors"] = np.array(messages)

# 15. A memmap variable keeps the memmap as its storage; weights_to_host writes it back.
mm = np.memmap(memmap_path, dtype=np.float32, mode="w+", shape=(3,))
mm[:] = [1, 2, 3]
ir = popxl.Ir()
with ir.main_graph:
    mv = popxl.variable(mm, name="mv")
    ops.var_updates.accumulate_(mv, popxl.constant(np.full(3, 10, np.float32)))
with popxl.Session(ir) as session:
    session.run()
saved["memmap_after"] = np.array(mm)
saved["transforms_autodiff_callable"] = np.array(callable(popxl.transforms.autodiff))

np.savez(out_path, **saved)
