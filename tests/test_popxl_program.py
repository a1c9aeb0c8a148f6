"""Programs written for the SDK's popxl, run unmodified with ``python -m gptj_popxl.popxl_cpu``."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = Path(__file__).resolve().parent / "programs"


def run_popxl(*args, cwd=None):
    """``python -m gptj_popxl.popxl_cpu *args`` with the repository importable; returns the process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "gptj_popxl.popxl_cpu", *map(str, args)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def torch_mlp_sgd(saved):
    """The training of tests/programs/mlp_sgd.py, done in torch from the program's data and initial weights."""
    params = {k: torch.tensor(saved[f"init_{k}"], dtype=torch.float64, requires_grad=True)
              for k in ("W1", "b1", "W2", "b2")}
    lr = 0.1
    losses = []
    for x, labels in zip(saved["xs"], saved["labels"]):
        x = torch.tensor(x, dtype=torch.float64)
        h = torch.nn.functional.gelu(x @ params["W1"] + params["b1"], approximate="tanh")
        loss = torch.nn.functional.cross_entropy(h @ params["W2"] + params["b2"], torch.tensor(labels).long())
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= lr * g
        losses.append(loss.item())
    return np.array(losses), {k: v.detach().numpy() for k, v in params.items()}


def test_mlp_sgd_program_matches_torch(tmp_path):
    out = tmp_path / "mlp.npz"
    proc = run_popxl(PROGRAMS / "mlp_sgd.py", out)
    assert proc.returncode == 0, proc.stderr
    saved = np.load(out)
    losses, final = torch_mlp_sgd(saved)
    assert proc.stdout.count("loss") == len(losses)
    np.testing.assert_allclose(saved["losses"], losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for k, v in final.items():
        np.testing.assert_allclose(saved[f"final_{k}"], v, rtol=1e-4, atol=1e-6, err_msg=k)


SCRIPT = """
    import sys
    import numpy as np
    import popxl
    import popxl.ops as ops
    import popxl.ops.var_updates
    import popxl.transforms
    from popxl import dtypes
    from popxl.ops import collectives
    from popxl.transforms import autodiff
    import helper  # next to the script, as with `python script.py`

    values = np.array([float(a) for a in sys.argv[1:]], np.float32)
    ir = popxl.Ir()
    with ir.main_graph:
        v = popxl.variable(values, dtypes.float32)
        out = popxl.d2h_stream((), popxl.float32)
        ops.host_store(out, helper.sum_of_squares(v))
    with popxl.Session(ir) as session:
        result = session.run()[out]
    print(__name__, popxl.ops.var_updates.__name__, collectives.__name__, result)
"""


def test_script_and_module_modes(tmp_path):
    (tmp_path / "prog.py").write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "helper.py").write_text("import popxl.ops as ops\n\ndef sum_of_squares(t):\n    return ops.sum(t * t)\n")
    expected = f"{1.5 ** 2 + 2.0 ** 2 + 3.0 ** 2}"
    for args, cwd in (([tmp_path / "prog.py"], ROOT), (["-m", "prog"], tmp_path)):
        proc = run_popxl(*args, "1.5", "-2", "3", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        name, var_updates, collectives, result = proc.stdout.split()
        assert name == "__main__"
        assert var_updates == "gptj_popxl.popxl_cpu.ops.var_updates"
        assert collectives == "gptj_popxl.popxl_cpu.ops.collectives"
        assert result == expected


def test_module_mode_runs_an_sdk_test_suite(tmp_path):
    (tmp_path / "test_sdk_style.py").write_text(textwrap.dedent("""
        import numpy as np
        import popxl
        from popxl import ops

        def test_graph_runs():
            ir = popxl.Ir()
            with ir.main_graph:
                x = popxl.variable(np.arange(4, dtype=np.float32))
                out = popxl.d2h_stream((4,), popxl.float32)
                ops.host_store(out, ops.relu(x - 1.0))
            with popxl.Session(ir) as session:
                np.testing.assert_array_equal(session.run()[out], [0, 0, 1, 2])

        def test_failing_is_reported():
            assert popxl.Ir().replication_factor == 2
    """))
    proc = run_popxl("-m", "pytest", "-q", "-p", "no:cacheprovider", tmp_path, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in proc.stdout


def test_usage_errors(tmp_path):
    proc = run_popxl()
    assert proc.returncode == 2 and "usage: python -m gptj_popxl.popxl_cpu script.py" in proc.stderr
    proc = run_popxl(tmp_path / "missing.py")
    assert proc.returncode == 2 and "missing.py" in proc.stderr
