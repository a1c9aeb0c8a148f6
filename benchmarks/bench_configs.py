"""Training-step throughput per execution layout, at a small size: ours (``gptj-popxl bench``'s
``training_steps``: tensor parallel, data parallel, phased or resident, micro-batches, dtype) against
transformers + ``torch.optim.AdamW`` on the same rows, in the same run.

A 2-layer GPT-J, hidden 256, 8 heads, vocabulary 1024, random weights, sequence 64, global batch
of 4 rows.
"""
import numpy as np
import pytest

from conftest import compare
from gptj_popxl.bench import training_steps
from gptj_popxl.finetune import DEFAULTS
from gptj_popxl.golden import random_hf_checkpoint
from gptj_popxl.model.config import GPTJConfig

CONFIG = GPTJConfig(vocab_size=1024, n_positions=64, n_embd=256, n_layer=2, n_head=8, rotary_dim=16)
SEQ, ROWS = 64, 4
# (tensor parallel, data parallel, phased, micro-batch, dtype): micro-batches accumulate to ROWS rows.
LAYOUTS = [(1, 1, False, 4, "float32"), (1, 1, True, 2, "float32"), (2, 1, True, 2, "float32"),
           (2, 2, True, 1, "float32"), (1, 1, True, 2, "float16")]


def _name(layout) -> str:
    tp, dp, phased, micro, dtype = layout
    return (f"training step tp {tp} dp {dp} {'phased' if phased else 'resident'} micro-batch {micro} {dtype}, "
            f"{CONFIG.n_layer} layers, hidden {CONFIG.n_embd}, {ROWS}x{SEQ} tokens")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return random_hf_checkpoint(str(tmp_path_factory.mktemp("bench") / "bench-configs-gptj"), CONFIG, seed=0)


@pytest.fixture(scope="module")
def steps(checkpoint):
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(ROWS, SEQ))
    made = {}
    for layout in LAYOUTS:
        tp, dp, phased, micro, dtype = layout
        settings = dict(DEFAULTS, tensor_parallel=tp, data_parallel=dp, phased=phased, micro_batch_size=micro,
                        gradient_accumulation=ROWS // (micro * dp), dtype=dtype,
                        loss_scaling=1024.0 if dtype == "float16" else 1.0)
        made[layout] = training_steps(settings, checkpoint, ids)
        for step in made[layout].values():
            step()  # compiles ours; warms up both
    return made


@pytest.mark.parametrize("layout", LAYOUTS, ids=_name)
def test_ours(benchmark, steps, layout):
    compare(benchmark, _name(layout), "ours", steps[layout]["ours"], items=ROWS * SEQ)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_name)
def test_transformers(benchmark, steps, layout):
    compare(benchmark, _name(layout), "peer", steps[layout]["transformers"], items=ROWS * SEQ)
