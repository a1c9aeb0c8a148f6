"""The runtime's static device-memory report (``popxl_cpu.memory.memory_report``) against live bytes counted
by hand on small graphs: 1 MiB values (256 x 1024 float32), what the lowering allocates and frees, and
what shares storage (in-place ops, views, subgraph calls)."""
import numpy as np

from gptj_popxl import popxl_cpu as popxl
from gptj_popxl.popxl_cpu import ops
from gptj_popxl.popxl_cpu.memory import memory_report

F = popxl.float32
SHAPE = (256, 1024)
MIB = 2 ** 20
SCALAR = 4  # bytes of a float32 constant or scalar


def peak(ir) -> int:
    return memory_report(ir).peak_device_bytes


def loaded(name: str = "x"):
    """A 1 MiB value loaded from the host in the current graph."""
    return ops.host_load(popxl.h2d_stream(SHAPE, F, name))


def stored(t) -> None:
    ops.host_store(popxl.d2h_stream(t.shape, t.dtype, t.name + "_out"), t)


def test_in_place_updates_and_views_of_a_variable_are_the_variable():
    ir = popxl.Ir()
    with ir.main_graph:
        w = popxl.variable(np.zeros(SHAPE, np.float32), F, "w")
        ops.var_updates.accumulate_(w, loaded())
    assert peak(ir) == 2 * MIB + SCALAR  # w, resident, and x (accumulate_ writes w in place); its factor

    ir = popxl.Ir()
    with ir.main_graph:
        w = popxl.variable(np.zeros((512, 512), np.float32), F, "w")
        x = ops.host_load(popxl.h2d_stream((512, 512), F, "x"))
        stored(x @ ops.transpose(w, (1, 0)))
    assert peak(ir) == 3 * MIB  # w, x and the product; the transpose is a view of w


def test_a_calls_outputs_are_its_graphs_values_counted_once():
    ir = popxl.Ir()
    with ir.main_graph:
        x = loaded()
        graph = ir.create_graph(lambda a: a * 2.0, x)
        (y,) = ops.call(graph, x)
        stored(y)
    report = memory_report(ir)
    assert report.peak_device_bytes == 2 * MIB + SCALAR  # x and y (the graph's own output), the constant 2
    assert report.phases[0].peak_bytes == 2 * MIB + SCALAR


def test_a_loop_holds_the_previous_iterations_output_beside_the_next():
    ir = popxl.Ir()
    with ir.main_graph:
        x = loaded()
        graph = ir.create_graph(lambda a: a * 2.0, x)
        (y,) = ops.repeat(graph, 3, x)
        stored(y)
    # From the second iteration: x, the carried output of the one before, and the new output.
    assert peak(ir) == 3 * MIB + SCALAR


def test_a_view_the_lowering_copies_is_its_own_memory():
    ir = popxl.Ir()
    with ir.main_graph:
        x_stream = popxl.h2d_stream(SHAPE, F, "x")
        x = ops.host_load(x_stream)
        v = ops.reshape(x, (1024, 256))  # read after x is written: the lowering copies it
        stored(ops.add_(x, popxl.constant(1.0, F)))
        stored(v)
    assert peak(ir) == 2 * MIB + SCALAR
    with popxl.Session(ir) as session:  # and the run indeed holds both values
        out = session.run({x_stream: np.zeros(SHAPE, np.float32)})
    assert {float(a.flat[0]) for a in out.values()} == {0.0, 1.0}


def test_an_input_a_graph_writes_but_is_handed_by_value_is_copied_in():
    ir = popxl.Ir()
    with ir.main_graph:
        x = loaded()

        def body(a):
            ops.add_(a, popxl.constant(1.0, F))
            return ops.sum(a)

        graph = ir.create_graph(body, x)
        (total,) = ops.call(graph, x)
        stored(total)
        stored(x)  # unchanged: the call wrote its own copy
    assert peak(ir) == 2 * MIB + 2 * SCALAR  # x and its copy; the constant and the sum


def test_a_call_writing_a_captured_value_does_not_keep_it_alive_through_its_output():
    ir = popxl.Ir()
    with ir.main_graph:
        acc = loaded("acc")

        def body():
            ops.add_(acc, popxl.constant(1.0, F))  # written by reference
            return ops.sum(acc)

        (total,) = ops.call(ir.create_graph(body))
        stored(loaded("b"))  # acc is dead by now; only the 4-byte sum lives on
        stored(total)
    assert peak(ir) == MIB + 2 * SCALAR


def test_a_graph_returning_its_input_returns_a_copy():
    ir = popxl.Ir()
    with ir.main_graph:
        x = loaded()

        def body(a):
            doubled = a * 2.0
            return a, doubled * 3.0  # doubled is freed before the graph returns its copy of a

        outputs = ops.call(ir.create_graph(body, x), x)
        for t in outputs:
            stored(t)
    # In the call: x, doubled and its triple; then x, the triple and the copy of x.
    assert peak(ir) == 3 * MIB + 2 * SCALAR


def test_a_loop_run_once_or_never_holds_no_previous_iteration():
    for count in (0, 1):
        ir = popxl.Ir()
        with ir.main_graph:
            x = loaded()
            (y,) = ops.repeat(ir.create_graph(lambda a: a * 2.0, x), count, x)
            stored(y)
        assert peak(ir) == 2 * MIB + SCALAR, count  # x and the loop's output (a copy of x when it never runs)


def test_a_loop_returning_its_inputs_holds_their_copies_beside_the_previous_iteration():
    ir = popxl.Ir()
    with ir.main_graph:
        x, z = loaded("x"), loaded("z")
        (a, b) = ops.repeat(ir.create_graph(lambda a, b: (b, a), x, z), 3, x, z)  # a swap: no ops
        stored(a)
        stored(b)
    # At a return from the second iteration on: x, z, the previous iteration's two outputs and the two copies.
    assert peak(ir) == 6 * MIB


def test_a_written_input_handed_by_value_and_returned_is_copied_in_and_out():
    ir = popxl.Ir()
    with ir.main_graph:
        x, z = loaded("x"), loaded("z")

        def body(a, b):
            ops.add_(a, popxl.constant(1.0, F))
            return a, b * 2.0

        outputs = ops.call(ir.create_graph(body, x, z), x, z)
        for t in outputs:
            stored(t)
    # At the return: x, z, the copy of x handed in, and the two outputs (a copy of it, and b * 2).
    assert peak(ir) == 5 * MIB + 2 * SCALAR
