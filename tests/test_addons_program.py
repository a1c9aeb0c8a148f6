"""A program written only against popxl and popxl-addons runs unmodified on the CPU runtime and
trains like torch: tests/programs/tp_ffn_addons.py (tensor-parallel feed-forward layer, TaskSession,
host_load, apply_pre_alias_patterns)."""
import json

import numpy as np
import torch
from test_popxl_program import PROGRAMS, run_popxl


def torch_step(saved):
    """Loss and weights after one SGD step of the unsharded layer, in float64 torch."""
    p = {k: torch.tensor(saved[k], dtype=torch.float64, requires_grad=True) for k in ("W1", "b1", "W2")}
    x, target = (torch.tensor(saved[k], dtype=torch.float64) for k in ("x", "target"))
    y = torch.nn.functional.gelu(x @ p["W1"] + p["b1"], approximate="tanh") @ p["W2"]
    loss = torch.mean((y - target) ** 2)
    grads = torch.autograd.grad(loss, list(p.values()))
    return loss.item(), {k: (v - 0.1 * g).detach().numpy() for (k, v), g in zip(p.items(), grads)}


def test_tensor_parallel_ffn_program_matches_torch(tmp_path):
    proc = run_popxl(PROGRAMS / "tp_ffn_addons.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = np.load(tmp_path / "result.npz")
    loss, final = torch_step(saved)
    np.testing.assert_allclose(saved["loss"], [loss, loss], rtol=1e-5)  # one loss per TP replica, equal
    for k, v in final.items():
        np.testing.assert_allclose(saved[f"final_{k}"], v, rtol=1e-4, atol=1e-6, err_msg=k)
    assert int(saved["steps"]) == 1
    # The TaskSession checkpoint holds the updated shards and the step count.
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "session_info.json").read_text()) == {"steps": 1}
    with np.load(ckpt / "model" / "ffn.fc1.weight.npz") as f:
        w1 = f["ffn.fc1.weight"]
    np.testing.assert_allclose(np.concatenate(list(w1), axis=1), final["W1"], rtol=1e-4, atol=1e-6)
