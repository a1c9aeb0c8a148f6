"""Throughput of our GPT-J against transformers' eager GPT-J on the same CPU: the forward (logits)
and the training step's loss and gradients (``loss_and_grads`` against transformers' forward with
labels, backward, and the gradients as numpy arrays).

A 4-layer GPT-J with hidden size 512, 8 heads, GPT-J's vocabulary and random float32 weights,
on one sequence of 256 tokens (goal: ours >= 1.25x transformers' tokens/s for both).
"""
import numpy as np
import pytest
import torch

import gptj_popxl
from conftest import compare
from gptj_popxl.golden import random_hf_checkpoint
from gptj_popxl.model.config import GPTJConfig

CONFIG = GPTJConfig(vocab_size=50400, n_positions=256, n_embd=512, n_layer=4, n_head=8, rotary_dim=32)
BATCH, SEQ = 1, 256
SHAPE = f"{CONFIG.n_layer} layers, hidden {CONFIG.n_embd}, {BATCH}x{SEQ} tokens"
COMPARISON = f"GPT-J forward {SHAPE}"
TRAINING = f"GPT-J loss_and_grads {SHAPE}"
GOAL = 1.25


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our model and transformers' on the same random checkpoint, and the token ids."""
    import transformers
    path = random_hf_checkpoint(str(tmp_path_factory.mktemp("bench") / "bench-gptj"), CONFIG, seed=0)
    ours = gptj_popxl.from_pretrained(path)
    hf = transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(BATCH, SEQ))
    np.testing.assert_allclose(ours.logits(ids), hf_forward(hf, ids), atol=1e-3)
    loss, grads = ours.loss_and_grads(ids, ids)
    hf_loss, hf_grads = hf_loss_and_grads(hf, ids)
    np.testing.assert_allclose(loss, hf_loss, rtol=1e-4)
    np.testing.assert_allclose(grads["lm_head.weight"], hf_grads["lm_head.weight"], atol=1e-5)
    return ours, hf, ids


def hf_forward(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def hf_loss_and_grads(model, ids):
    """transformers' training step up to the optimizer: loss, backward, gradients on the host."""
    model.zero_grad(set_to_none=True)
    t = torch.from_numpy(ids)
    loss = model(t, labels=t).loss
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in model.named_parameters()}


def test_ours_forward(benchmark, models):
    ours, _, ids = models
    compare(benchmark, COMPARISON, "ours", ours.logits, ids, goal=GOAL, items=BATCH * SEQ)


def test_transformers_forward(benchmark, models):
    _, hf, ids = models
    compare(benchmark, COMPARISON, "peer", hf_forward, hf, ids, items=BATCH * SEQ)


def test_ours_loss_and_grads(benchmark, models):
    ours, _, ids = models
    compare(benchmark, TRAINING, "ours", ours.loss_and_grads, ids, ids, goal=GOAL, items=BATCH * SEQ)


def test_transformers_loss_and_grads(benchmark, models):
    _, hf, ids = models
    compare(benchmark, TRAINING, "peer", hf_loss_and_grads, hf, ids, items=BATCH * SEQ)
