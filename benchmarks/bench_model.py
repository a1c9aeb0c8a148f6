"""Forward throughput: our GPT-J logits against transformers' eager GPT-J on the same CPU.

A 4-layer GPT-J with hidden size 512, 8 heads, GPT-J's vocabulary and random float32 weights,
on one sequence of 256 tokens. Run ``python benchmarks/bench_model.py`` for tokens/s of both and
their ratio (goal: ours >= 1.0x transformers), or collect it with pytest-benchmark. Nothing is
asserted about the timings.
"""
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gptj_popxl  # noqa: E402
from gptj_popxl.golden import random_hf_checkpoint  # noqa: E402
from gptj_popxl.model.config import GPTJConfig  # noqa: E402

CONFIG = GPTJConfig(vocab_size=50400, n_positions=256, n_embd=512, n_layer=4, n_head=8, rotary_dim=32)
BATCH, SEQ = 1, 256
REPEATS = 10


def setup(directory: str):
    """Our model and transformers' on the same random checkpoint, and the token ids."""
    import transformers
    path = random_hf_checkpoint(os.path.join(directory, "bench-gptj"), CONFIG, seed=0)
    ours = gptj_popxl.from_pretrained(path)
    hf = transformers.GPTJForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(BATCH, SEQ))
    return ours, hf, ids


def ours_forward(model, ids) -> np.ndarray:
    return model.logits(ids)


def hf_forward(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def median_seconds(fn, *args) -> float:
    fn(*args)  # warm up (our first call also compiles the program)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, ids = setup(tmp)
        np.testing.assert_allclose(ours_forward(ours, ids), hf_forward(hf, ids), atol=1e-3)
        t_ours, t_hf = median_seconds(ours_forward, ours, ids), median_seconds(hf_forward, hf, ids)
    tokens = BATCH * SEQ
    print(f"GPT-J forward, {CONFIG.n_layer} layers, hidden {CONFIG.n_embd}, vocab {CONFIG.vocab_size}, "
          f"{BATCH}x{SEQ} tokens, float32, {torch.get_num_threads()} threads (median of {REPEATS})")
    print(f"  gptj-popxl    {tokens / t_ours:10.0f} tokens/s  ({t_ours * 1e3:.1f} ms)")
    print(f"  transformers  {tokens / t_hf:10.0f} tokens/s  ({t_hf * 1e3:.1f} ms)")
    print(f"  ratio         {t_hf / t_ours:10.2f}x")


# pytest-benchmark entry points (`pytest benchmarks/bench_model.py --benchmark-only`).
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return setup(str(tmp_path_factory.mktemp("bench")))


def test_ours_forward(benchmark, models):
    ours, _, ids = models
    ours_forward(ours, ids)
    benchmark(ours_forward, ours, ids)


def test_transformers_forward(benchmark, models):
    _, hf, ids = models
    benchmark(hf_forward, hf, ids)


if __name__ == "__main__":
    main()
