"""Training against transformers + torch.optim.AdamW + clip_grad_norm_ + transformers' schedule."""
import dataclasses

import numpy as np
import pytest
import torch
import transformers

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
    "mix": dict(tensor_parallel=2, data_parallel=2, gradient_accumulation=2, micro_batch_size=1,
                attention_serialisation=2),
}


# Phased for every split; resident (whose data-parallel and accumulation code the mix covers) for three.
CASES = [(split, True) for split in SPLITS] + [(split, False) for split in ("tp1", "tp2", "mix")]


@pytest.mark.parametrize("split, phased", CASES, ids=[f"{s}-{'phased' if p else 'resident'}" for s, p in CASES])
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


# float16 computes in float16 with float32 master weights and moments: after 3 steps its losses stay
# within 1e-4 relative of the float32 reference (measured 4e-5) and its weights within 1e-2 of the
# reference's scale (measured 4.7e-3, against an update of 8e-3 of that scale).
FP16_LOSS_TOL = 1e-4
FP16_WEIGHT_TOL = 1e-2


@pytest.mark.parametrize("phased", [True, False], ids=["phased", "resident"])
def test_float16_follows_float32_and_overflow_skips_the_step(phased, checkpoint, batches, reference, tmp_path):
    trainer = gptj_popxl.Trainer(checkpoint, dataclasses.replace(BASE, phased=phased, dtype="float16",
                                                                 loss_scaling="dynamic"))
    assert trainer.loss_scale == 2.0 ** 16  # GradScaler's initial scale
    trainer.loss_scale = 1024.0
    losses = [trainer.step(ids, labels) for ids, labels in batches]
    np.testing.assert_allclose(losses, reference.losses, rtol=FP16_LOSS_TOL)
    trainer.save(tmp_path / "out")
    ours = {n: p.detach().numpy() for n, p in load_hf(tmp_path / "out").named_parameters()}
    assert max(max_relative_error(ours, reference.state_dict).values()) < FP16_WEIGHT_TOL

    # A scale that overflows float16 gradients: the step is skipped and the scale halved.
    before = {k: v.copy() for k, v in trainer.weights.items()}
    trainer.loss_scale = 3e38
    trainer.step(*batches[0])
    assert trainer.loss_scale == 1.5e38
    assert trainer.optimizer_steps == STEPS and trainer.step_count == STEPS + 1
    assert all(np.array_equal(before[k], trainer.weights[k]) for k in before)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("phased", [True, False], ids=["phased", "resident"])
def test_a_skipped_step_leaves_no_infinities_behind(phased, dtype, checkpoint, batches):
    # Phased float32 accumulates the gradients in their remote-buffer entries, whose restarted mean
    # reads the old value times 0 (as on the IPU): a skipped step's infinities must not stay there.
    trainer = gptj_popxl.Trainer(checkpoint, dataclasses.replace(BASE, phased=phased, dtype=dtype,
                                                                 loss_scaling="dynamic"))
    trainer.loss_scale = 3e38
    trainer.step(*batches[0])
    assert trainer.optimizer_steps == 0 and trainer.loss_scale == 1.5e38
    before = {k: v.copy() for k, v in trainer.weights.items()}
    trainer.loss_scale = 1024.0
    loss = trainer.step(*batches[1])
    assert np.isfinite(loss) and np.isfinite(trainer.grad_norm) and trainer.optimizer_steps == 1
    trainer.step(*batches[2])  # the first update's learning rate is the warm-up's 0
    assert all(np.isfinite(w).all() and not np.array_equal(before[k], w) for k, w in trainer.weights.items())
    # The schedule did not advance on the skipped step: transformers' Trainer steps its scheduler only
    # after an update that was not skipped.
    optimizer = torch.optim.SGD([torch.zeros(1)], lr=BASE.learning_rate)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, BASE.warmup_steps, BASE.total_steps)
    optimizer.step()  # the one update applied
    schedule.step()
    assert trainer.learning_rate == pytest.approx(schedule.get_last_lr()[0]) and trainer.learning_rate > 0


def test_a_checkpoint_trained_from_float16_loads_in_transformers_as_its_float32_weights(checkpoint, batches, tmp_path):
    """The saved config names the saved weights' float32, not the float16 source's dtype, so transformers'
    default load gives the trained weights exactly."""
    source = transformers.GPTJForCausalLM.from_pretrained(checkpoint, dtype=torch.float16)
    source.save_pretrained(tmp_path / "half")
    trainer = gptj_popxl.Trainer(tmp_path / "half", dataclasses.replace(BASE, dtype="float16", loss_scaling=1024.0))
    trainer.step(*batches[0])
    trainer.save(tmp_path / "out")
    loaded = transformers.GPTJForCausalLM.from_pretrained(tmp_path / "out")
    exact = load_hf(tmp_path / "out", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for (name, p), q in zip(loaded.named_parameters(), exact.parameters()):
        assert torch.equal(p, q), name


def test_resume_is_bit_exact(checkpoint, batches, tmp_path):
    # Sharded optimizer state (data parallel), tensor shards, float16 master weights and accumulation.
    cfg = dataclasses.replace(BASE, phased=True, tensor_parallel=2, data_parallel=2, gradient_accumulation=2,
                              micro_batch_size=1, dtype="float16", loss_scaling=512.0)
    straight = gptj_popxl.Trainer(checkpoint, cfg)
    straight_losses = [straight.step(ids, labels) for ids, labels in batches]

    first = gptj_popxl.Trainer(checkpoint, cfg)
    resumed_losses = [first.step(*batches[0])]
    first.save(tmp_path / "ckpt", data_state={"epoch": 0, "position": 4})
    resumed = gptj_popxl.Trainer.resume(tmp_path / "ckpt")
    assert resumed.config == cfg and resumed.step_count == 1 and resumed.data_state == {"epoch": 0, "position": 4}
    resumed_losses += [resumed.step(ids, labels) for ids, labels in batches[1:]]

    assert resumed_losses == straight_losses
    assert resumed.grad_norm == straight.grad_norm and resumed.learning_rate == straight.learning_rate
    assert all(np.array_equal(straight.weights[k], resumed.weights[k]) for k in straight.weights)


def test_bad_config_and_batch_shape_name_the_culprit(checkpoint):
    with pytest.raises(ValueError, match="lr_schedule"):
        gptj_popxl.TrainingConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="loss_scaling"):
        gptj_popxl.TrainingConfig(loss_scaling="auto")
    with pytest.raises(ValueError, match="tensor_parallel"):
        gptj_popxl.TrainingConfig(tensor_parallel=0)
    trainer = gptj_popxl.Trainer(checkpoint, dataclasses.replace(BASE, micro_batch_size=2, data_parallel=2))
    ids = np.zeros((3, SEQ), np.int64)
    with pytest.raises(ValueError, match=r"\(3, 8\).*2 \* 1 \* 2 = 4 rows"):
        trainer.step(ids, ids)
    with pytest.raises(ValueError, match="ignore every token"):
        trainer.step(np.zeros((4, SEQ), np.int64), np.full((4, SEQ), -100))


def test_model_programs_read_the_trained_weights(checkpoint, batches, tmp_path):
    # One host copy of the weights: the logits program built before training, run through a handle on
    # the model taken then, sees the updates.
    trainer = gptj_popxl.Trainer(checkpoint, dataclasses.replace(BASE, tensor_parallel=2))
    model = trainer.model
    ids = batches[0][0]
    before = model.logits(ids)
    for step_ids, labels in batches[:2]:  # the first step's learning rate is 0 (warmup)
        trainer.step(step_ids, labels)
    after = model.logits(ids)
    trainer.save(tmp_path / "out")
    with torch.no_grad():
        reference = load_hf(tmp_path / "out")(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(after, reference, atol=1e-4)
    assert np.abs(after - before).max() > 1e-2


def test_the_host_copy_is_brought_up_to_date_once_per_step(checkpoint, batches, monkeypatch):
    """After a step, reading the model (which pulls the device's newer weights) and saving fetch the
    device state once, not once per path to it."""
    trainer = gptj_popxl.Trainer(checkpoint, BASE)
    trainer.step(*batches[0])
    program = trainer._program
    fetched = []
    to_host = program.state_to_host
    monkeypatch.setattr(program, "state_to_host", lambda: fetched.append(1) or to_host())
    version = trainer.model.weights_version
    assert len(fetched) == 1 and version == trainer.model.weights_version
    trainer.step(*batches[1])
    trainer.model.logits(batches[0][0][:1])
    assert len(fetched) == 2 and trainer.model.weights_version == version + 1


def test_generation_reads_the_trained_weights(checkpoint, batches, tmp_path):
    # Generation programs built before training reload the one host copy after it, as the logits program does.
    trainer = gptj_popxl.Trainer(checkpoint, dataclasses.replace(BASE, tensor_parallel=2))
    prompt = batches[0][0][:2, :4]
    model = trainer.model  # a handle taken before training
    before = model.generate(prompt, max_new_tokens=4)
    for step_ids, labels in batches[:2]:  # the first step's learning rate is 0 (warmup)
        trainer.step(step_ids, labels)
    after = model.generate(prompt, max_new_tokens=4)
    trainer.save(tmp_path / "out")
    with torch.no_grad():
        hf_ids = torch.from_numpy(prompt)
        reference = load_hf(tmp_path / "out").generate(hf_ids, attention_mask=torch.ones_like(hf_ids), do_sample=False,
                                                       max_new_tokens=4, pad_token_id=0).numpy()
        untrained = load_hf(checkpoint).generate(hf_ids, attention_mask=torch.ones_like(hf_ids), do_sample=False,
                                                 max_new_tokens=4, pad_token_id=0).numpy()
    np.testing.assert_array_equal(before, untrained)
    np.testing.assert_array_equal(after, reference)
    assert (reference != untrained).any()  # training changed the greedy tokens
