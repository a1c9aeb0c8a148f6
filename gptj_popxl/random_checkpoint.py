"""``gptj-popxl random-checkpoint``: a random-weight GPT-J checkpoint of any size, written as sharded
safetensors one shard at a time, so a 12 GB GPT-J 6B never has to fit in memory.

The shards are one per decoder layer, then one for the embedding and one for ``ln_f`` and the
LM head, with ``model.safetensors.index.json`` naming them (the layout transformers writes for
sharded checkpoints). Weights are normal with std ``1/sqrt(fan_in)``, LayerNorm weights
``1 + N(0, 0.2)`` and biases ``N(0, 0.2)``, as ``golden.random_hf_checkpoint``.
"""
import json
import os
from typing import Dict, List, Tuple

import numpy as np
import safetensors.numpy

from gptj_popxl.checkpoint import PathLike, atomic_directory
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.hf_mapping import SAFETENSORS_INDEX_FILE, hf_param_shapes

# transformers' GPT-J 6B (EleutherAI/gpt-j-6b config.json): GPTJConfig's defaults.
NAMED_CONFIGS: Dict[str, GPTJConfig] = {
    "gpt-j-6b": GPTJConfig(),
    "tiny": GPTJConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
}
DTYPES = ("float32", "float16")


def resolve_config(name_or_path: str) -> GPTJConfig:
    """A named config (``NAMED_CONFIGS``) or the GPT-J ``config.json`` at a path.

    Raises:
        ValueError: neither a known name nor a readable config file.
    """
    if name_or_path in NAMED_CONFIGS:
        return NAMED_CONFIGS[name_or_path]
    if os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            return GPTJConfig.from_hf_dict(json.load(f))
    raise ValueError(f"--config {name_or_path!r}: expected one of {sorted(NAMED_CONFIGS)} or a config.json path")


def shard_groups(config: GPTJConfig) -> List[List[str]]:
    """HF parameter names grouped into shards: each layer's, the embedding, then ``ln_f`` and the head."""
    names = list(hf_param_shapes(config))
    layers = [[n for n in names if n.startswith(f"transformer.h.{i}.")] for i in range(config.n_layer)]
    head = [n for n in names if n.startswith(("transformer.ln_f.", "lm_head."))]
    return layers + [["transformer.wte.weight"], head]


def random_parameter(name: str, shape: Tuple[int, ...], rng: np.random.Generator, dtype) -> np.ndarray:
    """One random parameter: see the module doc for the distribution."""
    if name.endswith(("ln_1.weight", "ln_f.weight")):
        mean, std = 1.0, 0.2
    elif len(shape) == 1:
        mean, std = 0.0, 0.2
    else:
        mean, std = 0.0, shape[1] ** -0.5
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    values += np.float32(mean)
    return values.astype(dtype, copy=False)


def write_random_checkpoint(path: PathLike, config: GPTJConfig, dtype: str = "float16", seed: int = 0) -> str:
    """Write a random ``GPTJForCausalLM`` checkpoint of ``config`` in ``dtype`` to ``path``, sharded.

    Holds one shard (at most one layer) in memory at a time. The directory is built in a
    temporary sibling and renamed into place when complete (``atomic_directory``). Returns its path.

    Raises:
        ValueError: ``dtype`` is not one of ``DTYPES``.
    """
    import transformers
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    shapes = hf_param_shapes(config)
    groups = shard_groups(config)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    with atomic_directory(path, "config.json") as tmp:
        for k, names in enumerate(groups):
            file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {n: random_parameter(n, shapes[n], rng, np.dtype(dtype)) for n in names}
            safetensors.numpy.save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            total += sum(a.nbytes for a in tensors.values())
            weight_map.update(dict.fromkeys(names, file))
            del tensors
        with open(os.path.join(tmp, SAFETENSORS_INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        hf_config = transformers.GPTJConfig(**config.to_hf_dict(), bos_token_id=0, eos_token_id=0, dtype=dtype)
        hf_config.save_pretrained(tmp)
    return os.fspath(path)
