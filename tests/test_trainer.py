"""Training against transformers + torch.optim.AdamW + clip_grad_norm_ + transformers' schedule."""
import dataclasses

import numpy as np
import pytest

import gptj_popxl
from helpers_gptj import tiny_checkpoint
from train_reference import load_hf, max_relative_error, reference_training, train_batches

SEQ = 8
ROWS = 4
STEPS = 3
BASE = gptj_popxl.TrainingConfig(learning_rate=2e-3, lr_schedule="linear", warmup_steps=1, total_steps=5,
                                 weight_decay=0.1, max_grad_norm=1.0, micro_batch_size=ROWS, phased=False)
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("train"), seed=3)


@pytest.fixture(scope="module")
def batches():
    return train_batches(101, ROWS, SEQ, STEPS, seed=1)


@pytest.fixture(scope="module")
def reference(checkpoint, batches):
    return reference_training(checkpoint, BASE, batches)


SPLITS = {
    "tp1": dict(),
    "tp2": dict(tensor_parallel=2),
    "tp4": dict(tensor_parallel=4),
    "dp2": dict(data_parallel=2, micro_batch_size=2),
    "ga2": dict(gradient_accumulation=2, micro_batch_size=2),
    "mix": dict(tensor_parallel=2, data_parallel=2, gradient_accumulation=2, micro_batch_size=1),
}


@pytest.mark.parametrize("phased", [True, False], ids=["phased", "resident"])
@pytest.mark.parametrize("split", SPLITS)
def test_training_matches_torch(split, phased, checkpoint, batches, reference, tmp_path):
    cfg = dataclasses.replace(BASE, phased=phased, **SPLITS[split])
    trainer = gptj_popxl.Trainer(checkpoint, cfg)
    losses, norms = [], []
    for ids, labels in batches:
        losses.append(trainer.step(ids, labels))
        norms.append(trainer.grad_norm)
    np.testing.assert_allclose(losses, reference.losses, rtol=TOL)
    np.testing.assert_allclose(norms, reference.grad_norms, rtol=TOL)
    assert max(reference.grad_norms) > cfg.max_grad_norm  # clipping was exercised
    trainer.save(tmp_path / "out")
    ours = {n: p.detach().numpy() for n, p in load_hf(tmp_path / "out").named_parameters()}
    errors = max_relative_error(ours, reference.state_dict)
    assert max(errors.values()) < TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    assert trainer.step_count == STEPS
    assert trainer.learning_rate == pytest.approx(BASE.learning_rate * (BASE.total_steps - 2) / (BASE.total_steps - 1))
