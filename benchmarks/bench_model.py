"""Forward throughput: our GPT-J logits against transformers' eager GPT-J on the same CPU.

A 4-layer GPT-J with hidden size 512, 8 heads, GPT-J's vocabulary and random float32 weights,
on one sequence of 256 tokens (goal: ours >= 1.0x transformers' tokens/s).
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
COMPARISON = f"GPT-J forward {CONFIG.n_layer} layers, hidden {CONFIG.n_embd}, {BATCH}x{SEQ} tokens"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our model and transformers' on the same random checkpoint, and the token ids."""
    import transformers
    path = random_hf_checkpoint(str(tmp_path_factory.mktemp("bench") / "bench-gptj"), CONFIG, seed=0)
    ours = gptj_popxl.from_pretrained(path)
    hf = transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(BATCH, SEQ))
    np.testing.assert_allclose(ours.logits(ids), hf_forward(hf, ids), atol=1e-3)
    return ours, hf, ids


def hf_forward(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_ours_forward(benchmark, models):
    compare(benchmark, COMPARISON, "ours", goal=1.0, items=BATCH * SEQ)
    ours, _, ids = models
    benchmark(ours.logits, ids)


def test_transformers_forward(benchmark, models):
    compare(benchmark, COMPARISON, "peer", items=BATCH * SEQ)
    _, hf, ids = models
    benchmark(hf_forward, hf, ids)
