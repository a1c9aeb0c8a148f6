"""Hugging Face GPT-J checkpoints: reading, writing, and conversion to and from our layout.

Our layout (``hf_to_popxl`` output, ``popxl_to_hf`` input) is composed of the phase modules'
(``layers.Embedding``, ``DecoderBlock`` once per layer, ``LMHead``): each lists in ``weight_maps``
how its variables are made from HF tensors, tensor-parallel sharding and padding included (see
``weight_maps``). Names: ``embedding.*`` (HF ``transformer.wte``), ``layers.{i}.*`` (HF
``transformer.h.{i}``), ``ln_f.*`` and ``lm_head.*``. Linear weights are ``(in_features,
out_features)``; sharded tensors have a leading axis of ``tp`` blocks, replicated ones none.
"""
import dataclasses
import json
import os
from typing import Callable, Dict, Iterator, List, Mapping, Tuple

import numpy as np
import safetensors
import safetensors.numpy
import torch

from gptj_popxl.checkpoint import PathLike, atomic_directory
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.layers import DecoderBlock, Embedding, LMHead
from gptj_popxl.model.weight_maps import Shape, WeightMap

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"

# Causal-mask buffers that old transformers versions saved alongside the weights.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _phases(config: GPTJConfig, tp: int) -> Iterator[Tuple[str, str, List[WeightMap]]]:
    """Each phase module's weight maps with the name prefixes they sit under in the HF model and in
    ours, in HF order: ``(hf_prefix, prefix, maps)``."""
    yield "transformer.", "embedding.", Embedding.weight_maps(config, tp)
    block = DecoderBlock.weight_maps(config, tp)
    for layer in range(config.n_layer):
        yield f"transformer.h.{layer}.", f"layers.{layer}.", block
    yield "", "", LMHead.weight_maps(config, tp)


def hf_param_shapes(config: GPTJConfig) -> Dict[str, Shape]:
    """HF GPT-J parameter names, in ``hf_param_names`` order, mapped to their shapes."""
    return {hf_prefix + name: shape for hf_prefix, _, maps in _phases(config, 1)
            for m in maps for name, shape in m.hf_shapes.items()}


def hf_param_names(config: GPTJConfig) -> List[str]:
    """Names of all parameters of ``transformers.GPTJForCausalLM`` for ``config``, in order."""
    return list(hf_param_shapes(config))


def popxl_param_shapes(config: GPTJConfig, tp: int) -> Dict[str, Shape]:
    """Names and shapes of our parameters (the ``hf_to_popxl`` output) for ``tp`` shards."""
    return {prefix + m.name: m.shape for _, prefix, maps in _phases(config, tp) for m in maps}


def _checked_arrays(
    tensors: Mapping[str, np.ndarray], expected: Mapping[str, Shape], what: str
) -> Dict[str, np.ndarray]:
    """``tensors`` as numpy arrays after checking names and shapes against ``expected``."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{what} is missing {len(missing)} tensor(s): {', '.join(missing)}")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise ValueError(f"{what} has unexpected tensor(s): {', '.join(unexpected)}")
    arrays = {}
    for name, shape in expected.items():
        a = np.asarray(tensors[name])
        if a.shape != shape:
            raise ValueError(f"{what}: tensor {name} has shape {a.shape}, expected {shape}")
        if a.dtype.kind != "f":
            raise ValueError(f"{what}: tensor {name} has dtype {a.dtype}, expected a floating-point dtype")
        arrays[name] = a
    return arrays


def hf_to_popxl(
    state_dict: Mapping[str, np.ndarray], config: GPTJConfig, tp: int, dtype=np.float32
) -> Dict[str, np.ndarray]:
    """Convert a HF GPT-J state dict to our layout for ``tp`` shards (see module doc).

    Args:
        state_dict: HF parameter name -> array (e.g. from ``load_hf_state_dict``);
            exactly the names of ``hf_param_names(config)``.
        config: the model's config.
        tp: tensor-parallel degree.
        dtype: floating-point dtype of the returned arrays.

    Returns:
        Our parameter name -> new C-contiguous array of ``dtype``, shaped as in
        ``popxl_param_shapes(config, tp)``; padding is zero.

    Raises:
        ValueError: a parameter is missing, unexpected, wrongly shaped or not floating point.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    sd = _checked_arrays(state_dict, hf_param_shapes(config), "HF state dict")
    out = {}
    for hf_prefix, prefix, maps in _phases(config, tp):
        for m in maps:
            # Always copied, so the result never aliases the caller's arrays.
            out[prefix + m.name] = np.array(m.from_hf(*(sd[hf_prefix + n] for n in m.hf_shapes)), dtype=dtype,
                                            order="C")
    return out


def popxl_to_hf(params: Mapping[str, np.ndarray], config: GPTJConfig, tp: int,
                copy: bool = True) -> Dict[str, np.ndarray]:
    """Convert arrays in our layout back to HF GPT-J names and shapes (inverse of ``hf_to_popxl``).

    Padding entries are dropped whatever their values, so this also turns gradients
    in our layout (whose padding need not be zero) into HF-shaped gradients.

    Args:
        params: our name -> array, shaped as in ``popxl_param_shapes(config, tp)``.
        config: the model's config.
        tp: tensor-parallel degree ``params`` were sharded for.
        copy: False when the caller hands ``params`` over: results may then be views of them, in
            any memory order (a linear weight's is the transpose of ours), instead of copies.

    Returns:
        HF parameter name -> array (dtype unchanged), in ``hf_param_names`` order; C-contiguous
        copies when ``copy``.

    Raises:
        ValueError: a tensor is missing, unexpected, wrongly shaped or not floating point.
    """
    p = _checked_arrays(params, popxl_param_shapes(config, tp), f"tp={tp} parameters")
    out = {}
    for hf_prefix, prefix, maps in _phases(config, tp):
        for m in maps:
            for name, a in zip(m.hf_shapes, m.to_hf(p[prefix + m.name])):
                out[hf_prefix + name] = np.array(a, order="C") if copy else a
    return out


def _to_numpy(t: torch.Tensor, name: str, file: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{file}: entry {name} is a {type(t).__name__}, expected a tensor")
    # numpy has no bfloat16; float32 holds every bf16 value exactly.
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


def _read_safetensors(file: str) -> Dict[str, np.ndarray]:
    try:
        # framework="pt" rather than "numpy" because numpy cannot represent bf16.
        with safetensors.safe_open(file, framework="pt") as f:
            return {name: _to_numpy(f.get_tensor(name), name, file) for name in f.keys()}
    except (OSError, safetensors.SafetensorError) as e:
        raise ValueError(f"could not read safetensors file {file}: {e}") from e


def _read_torch(file: str) -> Dict[str, np.ndarray]:
    try:
        # weights_only=True: a checkpoint must never be able to run code on load.
        sd = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"could not read PyTorch checkpoint {file} (loaded with weights_only=True): {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{file} holds a {type(sd).__name__}, expected a state dict")
    return {name: _to_numpy(t, name, file) for name, t in sd.items()}


def _read_weight_map(index_path: str) -> Dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of an HF ``*.index.json``.

    Raises:
        ValueError: the index is not valid, or names a shard outside its directory.
    """
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is not a valid checkpoint index (needs a 'weight_map'): {e}") from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    for shard_file in sorted(set(weight_map.values())):
        # Shards live next to the index; refuse paths that would read elsewhere.
        if os.path.basename(shard_file) != shard_file:
            raise ValueError(f"{index_path} names shard {shard_file!r}, which is not a plain file name")
    return weight_map


def _read_sharded(index_path: str, read: Callable[[str], Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """Read the shards an HF ``*.index.json`` names, each with ``read``."""
    directory = os.path.dirname(index_path)
    weight_map = _read_weight_map(index_path)
    shard_files = sorted(set(weight_map.values()))
    for shard_file in shard_files:
        if not os.path.isfile(os.path.join(directory, shard_file)):
            raise FileNotFoundError(f"shard {shard_file} named in {index_path} does not exist")
    tensors: Dict[str, np.ndarray] = {}
    for shard_file in shard_files:
        for name, a in read(os.path.join(directory, shard_file)).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one shard of {index_path} (again in {shard_file})")
            tensors[name] = a
    absent = [f"{name} (in {file})" for name, file in weight_map.items() if name not in tensors]
    if absent:
        raise ValueError(f"tensors listed in {index_path} are missing from their shards: {', '.join(absent)}")
    return tensors


def load_hf_state_dict(path: PathLike) -> Dict[str, np.ndarray]:
    """Read the weights of a local Hugging Face checkpoint directory as numpy arrays.

    Looks, in this order, for ``model.safetensors``, ``model.safetensors.index.json``
    (sharded), ``pytorch_model.bin`` and ``pytorch_model.bin.index.json`` (sharded).
    PyTorch pickles are read with ``torch.load(weights_only=True)`` only. Arrays keep
    their stored dtype except bfloat16, which becomes float32. Causal-mask buffers
    (``*.attn.bias``, ``*.attn.masked_bias``) that old checkpoints contain are skipped.

    Raises:
        FileNotFoundError: ``path`` is not a directory, holds none of the files above,
            or a shard named in an index is missing.
        ValueError: a file cannot be read or an index is inconsistent.
    """
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    readers = (
        (SAFETENSORS_FILE, _read_safetensors),
        (SAFETENSORS_INDEX_FILE, lambda f: _read_sharded(f, _read_safetensors)),
        (TORCH_FILE, _read_torch),
        (TORCH_INDEX_FILE, lambda f: _read_sharded(f, _read_torch)),
    )
    for name, read in readers:
        file = os.path.join(directory, name)
        if os.path.isfile(file):
            tensors = read(file)
            return {k: a for k, a in tensors.items() if not k.endswith(_BUFFER_SUFFIXES)}
    raise FileNotFoundError(
        f"no weights in checkpoint directory {directory}: expected one of {', '.join(n for n, _ in readers)}"
    )


def save_hf_checkpoint(
    path: PathLike, config: GPTJConfig, state_dict: Mapping[str, np.ndarray], *, safe_serialization: bool = True
) -> None:
    """Write a HF GPT-J checkpoint directory loadable by ``GPTJForCausalLM.from_pretrained``.

    Writes ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin`` via
    ``torch.save`` when ``safe_serialization`` is False). The directory is built in a
    temporary sibling and swapped in only when complete, so an existing checkpoint at
    ``path`` is replaced whole or, on failure, left untouched.

    Args:
        path: target directory.
        config: the model's config.
        state_dict: HF parameter name -> array, exactly ``hf_param_names(config)``
            (e.g. from ``popxl_to_hf``).
        safe_serialization: write safetensors (default) rather than a torch pickle.

    Raises:
        ValueError: a parameter is missing, unexpected, wrongly shaped or not floating point.
    """
    with atomic_directory(path, "config.json") as tmp:
        write_hf_files(tmp, config, state_dict, safe_serialization=safe_serialization)


def write_hf_files(directory: str, config: GPTJConfig, state_dict: Mapping[str, np.ndarray], *,
                   safe_serialization: bool = True) -> None:
    """Write ``config.json`` and the weights of a HF checkpoint into an existing ``directory`` (not
    atomically: call it inside ``atomic_directory``).

    Raises:
        ValueError: a parameter is missing, unexpected, wrongly shaped or not floating point.
    """
    sd = _checked_arrays(state_dict, hf_param_shapes(config), "HF state dict")
    sd = {k: np.ascontiguousarray(a) for k, a in sd.items()}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
    if safe_serialization:
        # transformers refuses safetensors files without format metadata.
        safetensors.numpy.save_file(sd, os.path.join(directory, SAFETENSORS_FILE), metadata={"format": "pt"})
    else:
        torch.save({k: torch.from_numpy(a) for k, a in sd.items()}, os.path.join(directory, TORCH_FILE))


class LazyHFCheckpoint:
    """The tensors of a local HF safetensors checkpoint (one file or sharded), read one at a time.

    ``get(name)`` reads a tensor from its file (bfloat16 as float32, as ``load_hf_state_dict``);
    nothing else is held in memory. Use ``lazy_hf_checkpoint`` to open one.
    """

    def __init__(self, directory: str, weight_map: Dict[str, str]):
        self.directory = directory
        self.weight_map = weight_map
        self._handles: Dict[str, object] = {}

    @property
    def files(self) -> List[str]:
        """The checkpoint's weight files, sorted."""
        return sorted(os.path.join(self.directory, f) for f in set(self.weight_map.values()))

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise ValueError(f"checkpoint {self.directory} has no tensor {name}")
        file = os.path.join(self.directory, self.weight_map[name])
        try:
            if file not in self._handles:
                # One file open at a time: an open file's pages that were read stay mapped in this process.
                self._handles = {file: safetensors.safe_open(file, framework="pt")}
            return _to_numpy(self._handles[file].get_tensor(name), name, file)
        except (OSError, safetensors.SafetensorError) as e:
            raise ValueError(f"could not read {name} from safetensors file {file}: {e}") from e

    def check_names(self, config: GPTJConfig) -> None:
        """Refuse tensors ``config`` has no place for, as ``hf_to_popxl`` does: a ``config.json`` that
        does not match its weights (say, fewer layers) would otherwise run a truncated model silently."""
        unexpected = sorted(set(self.weight_map) - set(hf_param_shapes(config)))
        if unexpected:
            raise ValueError(f"checkpoint {self.directory} has unexpected tensor(s): {', '.join(unexpected)}")

    def close(self) -> None:
        """Release the open files."""
        self._handles.clear()


def lazy_hf_checkpoint(path: PathLike):
    """A ``LazyHFCheckpoint`` of the safetensors checkpoint at ``path``, or None when it holds PyTorch
    pickles only (those can only be read whole, with ``load_hf_state_dict``).

    Raises:
        ValueError: an index that is not valid or names a shard outside the directory.
    """
    directory = os.fspath(path)
    single = os.path.join(directory, SAFETENSORS_FILE)
    index = os.path.join(directory, SAFETENSORS_INDEX_FILE)
    if os.path.isfile(single):
        try:
            with safetensors.safe_open(single, framework="pt") as f:
                names = list(f.keys())
        except (OSError, safetensors.SafetensorError) as e:
            raise ValueError(f"could not read safetensors file {single}: {e}") from e
        weight_map = dict.fromkeys(names, SAFETENSORS_FILE)
    elif os.path.isfile(index):
        weight_map = _read_weight_map(index)
    else:
        return None
    return LazyHFCheckpoint(directory, {k: v for k, v in weight_map.items() if not k.endswith(_BUFFER_SUFFIXES)})


def _zeros(shape: Shape, dtype) -> np.ndarray:
    """Read-only zeros of ``shape`` that take no memory: stand-ins for tensors a conversion drops."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def hf_layer_to_popxl(get: Callable[[str], np.ndarray], config: GPTJConfig, tp: int, layer: int,
                      dtype=np.float32) -> Dict[str, np.ndarray]:
    """Decoder layer ``layer`` of a HF checkpoint in our layout (``layers.{layer}.*``), reading only its
    tensors with ``get(hf_name)``: ``hf_to_popxl`` applied to that one layer."""
    one = dataclasses.replace(config, n_layer=1, vocab_size=1)
    src, dst = f"transformer.h.{layer}.", f"layers.{layer}."
    sd = {name: (get(src + name[len("transformer.h.0."):]) if name.startswith("transformer.h.0.")
                 else _zeros(shape, dtype))
          for name, shape in hf_param_shapes(one).items()}
    out = hf_to_popxl(sd, one, tp, dtype)
    return {dst + k[len("layers.0."):]: a for k, a in out.items() if k.startswith("layers.0.")}


def hf_outer_to_popxl(get: Callable[[str], np.ndarray], config: GPTJConfig, tp: int,
                      dtype=np.float32) -> Dict[str, np.ndarray]:
    """The tensors outside the decoder layers (embedding, ``ln_f``, LM head) of a HF checkpoint in our
    layout, reading only those with ``get(hf_name)``."""
    one = dataclasses.replace(config, n_layer=1)
    sd = {name: (_zeros(shape, dtype) if name.startswith("transformer.h.") else get(name))
          for name, shape in hf_param_shapes(one).items()}
    return {k: a for k, a in hf_to_popxl(sd, one, tp, dtype).items() if not k.startswith("layers.")}
