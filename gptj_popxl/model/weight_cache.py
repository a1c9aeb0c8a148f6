"""Loading a HF checkpoint into our layout without holding it twice, and the offload weight cache.

``load_layerwise`` converts a safetensors checkpoint one decoder layer at a time, so loading
needs the converted model plus one layer, never the checkpoint and the conversion together.

``open_offload_cache`` keeps the converted weights in memory-mapped ``.npy`` files instead, one
per parameter (the decoder layers' stacked, ``(n_layer, *shape)``), written once layer by layer
and reused while the checkpoint's files are unchanged. Offloaded generation backs its remote
buffers with the stacked files, so a layer's weights are read from disk (the page cache) only
when the layer is loaded, and the operating system may drop those pages again at any time.
"""
import dataclasses
import json
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

from gptj_popxl.checkpoint import PathLike, atomic_directory
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.hf_mapping import (LazyHFCheckpoint, hf_layer_to_popxl, hf_outer_to_popxl, hf_to_popxl,
                                         lazy_hf_checkpoint, load_hf_state_dict, popxl_param_shapes)

_META_FILE = "meta.json"


def _converted_parts(checkpoint: LazyHFCheckpoint, config: GPTJConfig, tp: int, dtype
                     ) -> Iterator[Dict[str, np.ndarray]]:
    """Our-layout tensors: the outer ones, then each decoder layer's, converted one part at a time."""
    yield hf_outer_to_popxl(checkpoint.get, config, tp, dtype)
    for layer in range(config.n_layer):
        yield hf_layer_to_popxl(checkpoint.get, config, tp, layer, dtype)


def load_layerwise(path: PathLike, config: GPTJConfig, tp: int, dtype) -> Dict[str, np.ndarray]:
    """The checkpoint at ``path`` in our layout (``hf_to_popxl``), converted layer by layer when it is
    safetensors (PyTorch pickles are read whole)."""
    checkpoint = lazy_hf_checkpoint(path)
    if checkpoint is None:
        return hf_to_popxl(load_hf_state_dict(path), config, tp, dtype)
    checkpoint.check_names(config)
    weights: Dict[str, np.ndarray] = {}
    try:
        for part in _converted_parts(checkpoint, config, tp, dtype):
            weights.update(part)
    finally:
        checkpoint.close()
    return weights


def _layer_param(name: str) -> Optional[Tuple[int, str]]:
    """``(layer, name within the layer)`` of a decoder-layer parameter, else None."""
    if not name.startswith("layers."):
        return None
    layer, rest = name[len("layers."):].split(".", 1)
    return int(layer), rest


def _source_stamp(checkpoint: LazyHFCheckpoint, config: GPTJConfig, tp: int, dtype) -> Dict:
    """What the cache was made from: the checkpoint files' sizes and times, the model config (its heads
    decide the tensor-parallel layout), tp and dtype."""
    files = {os.path.basename(f): [os.path.getsize(f), os.stat(f).st_mtime_ns] for f in checkpoint.files}
    return {"files": files, "config": dataclasses.asdict(config), "tensor_parallel": tp,
            "dtype": np.dtype(dtype).name}


def _write_cache(directory: str, checkpoint: LazyHFCheckpoint, config: GPTJConfig, tp: int, dtype, stamp) -> None:
    """One ``.npy`` file per parameter, filled part by part with plain writes (not through a map, whose
    pages would all count as this process's memory)."""
    shapes = popxl_param_shapes(config, tp)
    data_offsets: Dict[str, int] = {}

    def write(file_name: str, shape, index: int, array: np.ndarray) -> None:
        path = os.path.join(directory, f"{file_name}.npy")
        if file_name not in data_offsets:
            # open_memmap writes the header and sizes the file (sparse) without touching its data.
            data_offsets[file_name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype),
                                                                shape=shape).offset
        with open(path, "r+b") as f:
            f.seek(data_offsets[file_name] + index * array.nbytes)
            f.write(np.ascontiguousarray(array).data)

    for part in _converted_parts(checkpoint, config, tp, dtype):
        for name, array in part.items():
            layer = _layer_param(name)
            if layer is None:
                write(name, shapes[name], 0, array)
            else:
                write(layer[1], (config.n_layer,) + shapes[name], layer[0], array)
    with open(os.path.join(directory, _META_FILE), "w", encoding="utf-8") as f:
        json.dump(stamp, f, indent=2, sort_keys=True)


def offload_cache_dir(path: PathLike, tp: int, dtype) -> str:
    """Where ``open_offload_cache`` keeps the cache of the checkpoint at ``path`` by default."""
    return os.path.join(os.fspath(path), f"popxl-offload-{np.dtype(dtype).name}-tp{tp}")


def open_offload_cache(path: PathLike, config: GPTJConfig, tp: int, dtype, cache_dir: Optional[PathLike] = None,
                       log: Callable[[str], None] = lambda message: None
                       ) -> Tuple[Dict[str, np.ndarray], Dict[str, np.memmap]]:
    """The checkpoint at ``path`` in our layout, memory-mapped from a cache in ``cache_dir`` (default
    ``offload_cache_dir``), which is (re)written first, atomically, unless it matches the checkpoint.

    Returns ``(weights, layer_storage)``: ``weights`` by our name (each a memory-mapped view, mapped
    copy-on-write so writes never reach the file) and, by the name within a layer, each decoder
    parameter's stacked ``(n_layer, *shape)`` map, which the layers' entries of ``weights`` view.

    Raises:
        ValueError: the checkpoint is not safetensors, cannot be read, or holds tensors ``config`` has no
            place for.
    """
    checkpoint = lazy_hf_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"offload needs a safetensors checkpoint; {os.fspath(path)} has PyTorch pickles only")
    checkpoint.check_names(config)
    directory = os.fspath(cache_dir) if cache_dir is not None else offload_cache_dir(path, tp, dtype)
    stamp = _source_stamp(checkpoint, config, tp, dtype)
    meta = os.path.join(directory, _META_FILE)
    try:
        with open(meta, encoding="utf-8") as f:
            fresh = json.load(f) == stamp
    except (OSError, json.JSONDecodeError):
        fresh = False
    if not fresh:
        log(f"writing the offload weight cache {directory} (once per checkpoint, layer by layer)")
        try:
            with atomic_directory(directory, _META_FILE) as tmp:
                _write_cache(tmp, checkpoint, config, tp, dtype, stamp)
        finally:
            checkpoint.close()
    weights: Dict[str, np.ndarray] = {}
    layer_storage: Dict[str, np.memmap] = {}
    for name in popxl_param_shapes(config, tp):
        layer = _layer_param(name)
        if layer is None:
            weights[name] = np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="c")
        else:
            if layer[1] not in layer_storage:
                layer_storage[layer[1]] = np.lib.format.open_memmap(os.path.join(directory, f"{layer[1]}.npy"),
                                                                    mode="c")
            weights[name] = layer_storage[layer[1]][layer[0]]
    return weights, layer_storage
