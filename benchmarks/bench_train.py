"""Training-step throughput: our Trainer (phased and resident) against transformers' GPT-J trained with
torch.optim.AdamW (+ clip_grad_norm_ and the linear schedule) on the same CPU, same config, same run.

A 4-layer GPT-J with hidden size 512, 8 heads, GPT-J's vocabulary and random float32 weights, one
global batch of 2 x 128 tokens per step. Goals: ours (resident) >= 1.25x transformers' tokens/s;
phased at most 15% slower than resident (>= 0.87x).
"""
import numpy as np
import pytest
import torch

import gptj_popxl
from conftest import compare
from gptj_popxl.golden import random_hf_checkpoint
from gptj_popxl.model.config import GPTJConfig

CONFIG = GPTJConfig(vocab_size=50400, n_positions=128, n_embd=512, n_layer=4, n_head=8, rotary_dim=32)
ROWS, SEQ = 2, 128
TRAINING = dict(learning_rate=1e-5, warmup_steps=10, total_steps=100000, weight_decay=0.01, micro_batch_size=ROWS)
VS_TORCH = f"training step {CONFIG.n_layer} layers, hidden {CONFIG.n_embd}, {ROWS}x{SEQ} tokens (resident vs torch)"
PHASED = f"training step {CONFIG.n_layer} layers, hidden {CONFIG.n_embd}, {ROWS}x{SEQ} tokens (phased vs resident)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers
    path = random_hf_checkpoint(str(tmp_path_factory.mktemp("bench") / "bench-train-gptj"), CONFIG, seed=0)
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(ROWS, SEQ))
    trainers = {phased: gptj_popxl.Trainer(path, gptj_popxl.TrainingConfig(phased=phased, **TRAINING))
                for phased in (True, False)}
    model = transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    opt = torch.optim.AdamW(model.parameters(), lr=TRAINING["learning_rate"], eps=1e-6,
                            weight_decay=TRAINING["weight_decay"])
    schedule = transformers.get_linear_schedule_with_warmup(opt, TRAINING["warmup_steps"], TRAINING["total_steps"])
    torch_step = TorchStep(model, opt, schedule, torch.from_numpy(ids))
    # Same first loss: the two sides train the same model.
    np.testing.assert_allclose(trainers[False].step(ids, ids), torch_step(), rtol=1e-4)
    trainers[True].step(ids, ids)
    return trainers, torch_step, ids


class TorchStep:
    """One transformers + torch.optim.AdamW training step, as transformers' Trainer runs it."""

    def __init__(self, model, opt, schedule, ids):
        self.model, self.opt, self.schedule, self.ids = model, opt, schedule, ids

    def __call__(self) -> float:
        self.opt.zero_grad()
        loss = self.model(self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.schedule.step()
        return loss.item()


def test_ours_resident_step(benchmark, setup):
    trainers, _, ids = setup
    compare(benchmark, VS_TORCH, "ours", trainers[False].step, ids, ids, goal=1.25, items=ROWS * SEQ)


def test_transformers_adamw_step(benchmark, setup):
    _, torch_step, _ = setup
    compare(benchmark, VS_TORCH, "peer", torch_step, items=ROWS * SEQ)


def test_ours_phased_step(benchmark, setup):
    trainers, _, ids = setup
    compare(benchmark, PHASED, "ours", trainers[True].step, ids, ids, goal=0.87, items=ROWS * SEQ)


def test_ours_resident_step_for_phased(benchmark, setup):
    trainers, _, ids = setup
    compare(benchmark, PHASED, "peer", trainers[False].step, ids, ids, items=ROWS * SEQ)
