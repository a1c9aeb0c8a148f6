"""Tiny random GPT-J checkpoints for the model tests.

The default shape pads everywhere tensor parallelism can: 6 heads (tp=4 pads to 8),
vocab 101 (tp=2 and 4 pad), MLP width 50 (tp=4 pads) and rotary_dim 4 < head_dim 6.
"""
import os

from gptj_popxl.golden import random_hf_checkpoint
from gptj_popxl.model.config import GPTJConfig

TINY = dict(vocab_size=101, n_positions=16, n_embd=36, n_layer=2, n_head=6, rotary_dim=4, n_inner=50)


def tiny_config(**overrides) -> GPTJConfig:
    """``TINY`` with ``overrides`` applied."""
    return GPTJConfig(**{**TINY, **overrides})


def tiny_checkpoint(directory, seed: int = 0, **overrides) -> str:
    """Write a random HF checkpoint of ``tiny_config(**overrides)`` under ``directory``; return its path."""
    name = "gptj-" + "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) + f"-s{seed}"
    return random_hf_checkpoint(os.path.join(os.fspath(directory), name), tiny_config(**overrides), seed=seed)
