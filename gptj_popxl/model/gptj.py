"""GPT-J causal LM as popxl programs: ``from_pretrained`` and the model's public API.

The model builds one popxl program (see ``gptj_popxl.programs``) per kind of run ("logits" or
"loss_and_grads") and input shape, on first use, and reuses it afterwards. Every program is loaded
from the model's one host copy of the weights, ``GPTJ.weights``.
"""
import os
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from gptj_popxl.checkpoint import PathLike
from gptj_popxl.model.config import GPTJConfig, is_positive_int
from gptj_popxl.model.hf_mapping import lazy_hf_checkpoint, popxl_param_shapes, popxl_to_hf
from gptj_popxl.model.weight_cache import load_layerwise, open_offload_cache
from gptj_popxl.model.layers import IGNORE_INDEX
from gptj_popxl.programs.common import Program, create_variables  # noqa: F401 - create_variables: public here too
from gptj_popxl.programs.execution import DTYPES, ExecutionConfig  # noqa: F401 - DTYPES: public here too
from gptj_popxl.programs.inference import build_logits, build_loss_and_grads

# Bias of the padded vocabulary columns of the LM head: their logits never win a softmax or argmax
# and add exactly 0 to a softmax's sum (exp(-1e4) underflows), in float16 as in float32.
PAD_LOGIT_BIAS = -1e4


_LM_HEAD_WEIGHT, _LM_HEAD_BIAS = "lm_head.weight", "lm_head.bias"


def _aligned_empty(shape: Tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array aligned to a cache line, as torch allocates: the kernels stream weights in
    64-byte vectors."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _check_ids(what: str, ids, config: GPTJConfig, allow_ignore: bool) -> np.ndarray:
    """``ids`` as a 2-D int64 array after checking its type, shape and values."""
    a = np.asarray(ids)
    if a.ndim != 2 or 0 in a.shape:  # first: an empty list is a float array
        raise ValueError(f"{what} must be a non-empty 2-D array (batch, seq), got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {a.dtype} (shape {a.shape})")
    if a.shape[1] > config.n_positions:
        raise ValueError(f"{what} has shape {a.shape}: sequence length {a.shape[1]} exceeds the model's "
                         f"n_positions ({config.n_positions})")
    a = a.astype(np.int64)
    bad = (a < 0) | (a >= config.vocab_size)
    if allow_ignore:
        bad &= a != IGNORE_INDEX
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = f"[0, {config.vocab_size})" + (f" or {IGNORE_INDEX}" if allow_ignore else "")
        raise ValueError(f"{what} (shape {a.shape}) must hold values in {allowed}; found {a[where]} at {where}")
    return a


class GPTJ:
    """GPT-J causal LM run as tensor-parallel popxl programs. Make one with ``from_pretrained``.

    Attributes:
        config: the model's ``GPTJConfig``.
        execution: the ``ExecutionConfig`` its programs are built with.
        weights: the one host copy of the weights (our layout, see ``hf_mapping``). Every program is
            loaded from it; a program that changes the weights (training) writes them back here and
            calls ``weights_changed`` before another program runs.
        tensor_parallel, dtype, attention_serialisation: the execution config's fields.
        offload: generation loads the decoder layers' weights from remote buffers, one layer at a time.
        layer_storage: with offload, optionally each decoder parameter's weights of every layer stacked,
            ``(n_layer, *shape)`` by the name within a layer, typically memory-mapped files (see
            ``weight_cache.open_offload_cache``) that the layers' entries of ``weights`` view; the CPU
            runtime then keeps the remote buffers in them instead of in memory.
    """

    def __init__(self, config: GPTJConfig, weights: Mapping[str, np.ndarray], *, tensor_parallel: int = 1,
                 dtype: str = "float32", attention_serialisation: int = 1,
                 execution: Optional[ExecutionConfig] = None, offload: bool = False,
                 layer_storage: Optional[Mapping[str, np.ndarray]] = None):
        execution = execution_config(execution, tensor_parallel=tensor_parallel, dtype=dtype,
                                     attention_serialisation=attention_serialisation)
        expected = popxl_param_shapes(config, execution.tensor_parallel)
        shapes = {k: np.shape(v) for k, v in weights.items()}
        if shapes != expected:
            wrong = sorted(k for k in set(expected) | set(shapes) if shapes.get(k) != expected.get(k))
            raise ValueError(f"weights do not match the tp={execution.tensor_parallel} layout of this config at: "
                             + ", ".join(f"{k} {shapes.get(k)} (expected {expected.get(k)})" for k in wrong[:5]))
        self.config = config
        self.execution = execution
        self._host_weights: Dict[str, np.ndarray] = dict(weights)
        self._pull_weights: Optional[Callable[[], None]] = None
        self._weights_version = 0
        self._programs: Dict[Tuple[str, int, int], Program] = {}
        self.offload = offload
        self.layer_storage = layer_storage
        self._generator = None
        self._weight_memory: Dict[Tuple[str, Tuple[int, ...], str], np.ndarray] = {}
        # The weights version each shared weight memory holds, by variable name.
        self._memory_versions: Dict[str, int] = {}

    @property
    def tensor_parallel(self) -> int:
        return self.execution.tensor_parallel

    @property
    def dtype(self) -> str:
        return self.execution.dtype

    @property
    def attention_serialisation(self) -> int:
        return self.execution.attention_serialisation

    @property
    def weights(self) -> Dict[str, np.ndarray]:
        """The host copy of the weights, in our layout (the one every program loads from and writes
        back to), first brought up to date where a newer copy is elsewhere (``weights_ahead_in``)."""
        if self._pull_weights is not None:
            self._pull_weights()  # may read ``weights`` again: a pull that has nothing left to do returns
            self._pull_weights = None  # only now: a pull that failed is tried again
        return self._host_weights

    def weights_ahead_in(self, pull: Callable[[], None]) -> None:
        """Note that a newer copy of the weights is elsewhere (a trainer's device): ``pull`` brings it into
        ``weights`` (and calls ``weights_changed``) before they are next read or a program runs."""
        self._pull_weights = pull

    @property
    def weights_version(self) -> int:
        """Version of ``weights``: ``weights_changed`` increments it; a program loaded from an older one
        reloads them before its next run (see ``with_current_weights``)."""
        return self._weights_version

    def weight_memory(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        """The memory that this model's programs (``logits`` and ``loss_and_grads`` of every shape, and
        generation's) keep the weight variable ``name`` (of ``shape`` and numpy ``dtype``) in, one
        for all of them (``programs.common.share_weight_memory``), made on first use. Each program
        loads ``weights`` into it as into its own variables, so a program that reloads changes the
        memory of the others too (all reload the same ``weights``)."""
        key = (name, tuple(shape), np.dtype(dtype).name)
        if key not in self._weight_memory:
            if name == _LM_HEAD_WEIGHT and len(shape) == 2:
                self._lm_head_memory(tuple(shape), dtype)
            elif name == _LM_HEAD_BIAS and len(shape) == 1:
                self._lm_head_memory((self.config.n_embd,) + tuple(shape), dtype)
            else:
                self._weight_memory[key] = _aligned_empty(tuple(shape), dtype)
        return self._weight_memory[key]

    def _lm_head_memory(self, weight_shape: Tuple[int, int], dtype) -> None:
        """The LM head's weight (k, n) with its bias (n,) as the row after it: the runtime then computes
        ``x @ w + b`` as one product, ``[x, 1] @ [w; b]``, instead of first writing the bias into every
        row of the logits (``popxl_cpu.ops.nn._BiasRow``)."""
        k, n = weight_shape
        rows = _aligned_empty((k + 1, n), dtype)
        self._weight_memory[(_LM_HEAD_WEIGHT, (k, n), np.dtype(dtype).name)] = rows[:k]
        self._weight_memory[(_LM_HEAD_BIAS, (n,), np.dtype(dtype).name)] = rows[k]

    def weights_changed(self) -> None:
        """Mark ``weights`` as changed: each program reloads them before its next run."""
        self._weights_version += 1

    def with_current_weights(self, program: Program) -> Program:
        """``program`` (any of this model's, generation's included) holding the current ``weights``:
        reloaded when they changed since it was loaded, except the weights in shared memory that
        another program has already reloaded."""
        weights = self.weights  # first: it may bring newer weights in
        version = self._weights_version
        if program.weights_version != version:
            loaded = frozenset(n for n in program.shared_weights if self._memory_versions.get(n) == version)
            program.load_weights(weights, version, loaded)
        # A current program's shared memory holds the current weights: it wrote them when it was
        # built or reloaded, and every write since was of the same version.
        self._memory_versions.update(dict.fromkeys(program.shared_weights, version))
        return program

    # --- public API
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Next-token logits of ``input_ids``.

        Args:
            input_ids: integer array (batch, seq) of token ids in ``[0, vocab_size)``,
                ``seq <= n_positions``.

        Returns:
            float32 array (batch, seq, vocab_size).
        """
        ids = _check_ids("input_ids", input_ids, self.config, allow_ignore=False)
        batch, seq = ids.shape
        shards = self.program("logits", batch, seq).run(input_ids=ids)["logits"]
        shards = shards.reshape((self.tensor_parallel, batch, seq, -1))
        # Shards hold consecutive vocabulary blocks; the padding at the end is dropped. The run's
        # output array is fresh, so with one shard it is returned without a copy.
        full = shards[0] if self.tensor_parallel == 1 else np.concatenate(list(shards), axis=-1)
        return full[..., : self.config.vocab_size].astype(np.float32, copy=False)

    def loss_and_grads(self, input_ids: np.ndarray, labels: np.ndarray) -> Tuple[float, Dict[str, np.ndarray]]:
        """Causal-LM loss of ``labels`` given ``input_ids`` and its gradient for every parameter.

        The loss is transformers' ``GPTJForCausalLM`` loss: logits at position ``t`` are scored
        against ``labels[:, t + 1]``, labels equal to -100 are ignored, and the loss is the
        mean cross entropy over the rest.

        Args:
            input_ids: integer array (batch, seq), values in ``[0, vocab_size)``, ``2 <= seq <= n_positions``.
            labels: integer array of the same shape, values in ``[0, vocab_size)`` or -100.

        Returns:
            ``(loss, grads)``: grads by Hugging Face parameter name (``transformer.h.0.attn.q_proj.weight``,
            ..., ``lm_head.bias``) as float32 arrays of the HF parameters' shapes; a linear weight's
            is a transposed view of the run's output (``np.ascontiguousarray`` gives C order).
        """
        ids = _check_ids("input_ids", input_ids, self.config, allow_ignore=False)
        lab = _check_ids("labels", labels, self.config, allow_ignore=True)
        if lab.shape != ids.shape:
            raise ValueError(f"labels shape {lab.shape} differs from input_ids shape {ids.shape}")
        batch, seq = ids.shape
        if seq < 2:
            raise ValueError(f"input_ids has shape {ids.shape}: the loss needs seq >= 2 (each position predicts "
                             f"the next token)")
        program = self.program("loss_and_grads", batch, seq)
        out = program.run(input_ids=ids, labels=lab)
        loss = float(np.asarray(out.pop("loss")).reshape(-1)[0])  # identical on every replica
        ours = self._to_layout({name: np.asarray(g, dtype=np.float32) for name, g in out.items()},
                               program.variables.to_dict())
        # The run's outputs are ours to hand over: gradients in HF's shapes are views of them, not copies.
        return loss, popxl_to_hf(ours, self.config, self.tensor_parallel, copy=False)

    def generate(self, input_ids, **options) -> np.ndarray:
        """Generate as transformers' ``GPTJForCausalLM.generate``, with a KV cache.

        Args:
            input_ids: integer array (batch, seq), rows left padded.
            attention_mask: 0/1 array of the same shape (default: all ones, or ``input_ids !=
                pad_token_id`` when that pad token occurs and differs from eos); positions count
                only the real tokens.
            max_new_tokens: tokens to generate per row (at most).
            do_sample, temperature, top_k, top_p: sampling, warped in transformers' order
                (temperature, top-k, top-p) with its defaults (1.0, 50, None; ``top_k`` 0 or None
                switches top-k off); greedy when ``do_sample`` is False.
            eos_token_id, pad_token_id: a row that emits eos (an id, or any of a list of ids) is
                padded with pad (default: the first eos) from then on; generation stops when every
                row has finished.
            seed: seed of the sampling (the same seed gives the same tokens).

        Returns:
            int64 array (batch, seq + generated): the prompt followed by the new tokens.
        """
        return self.generator.generate(input_ids, **options)

    def generate_many(self, prompts, **options):
        """New tokens (up to and including eos) for each of ``prompts`` (1-D token id sequences of
        any lengths), generated in ``batch_size`` slots with continuous batching: a finished
        slot is refilled with the next prompt. Keyword options: ``batch_size=8, max_new_tokens=20,
        eos_token_id=None, do_sample=False, temperature=1.0, top_k=50, top_p=None, seed=None``.

        Returns:
            a list of int64 arrays, one per prompt, in order.
        """
        return self.generator.generate_many(prompts, **options)

    def stream(self, prompt_ids, **options):
        """Yield one row's new tokens (ints) as they are generated; ``prompt_ids`` is 1-D. Options
        as ``generate`` (no ``attention_mask``/``pad_token_id``); stops after eos."""
        return self.generator.stream(prompt_ids, **options)

    @property
    def generator(self):
        """The model's ``generation.Generator``: its generation programs, compiled on first use."""
        if self._generator is None:
            from gptj_popxl.generation import Generator  # generation builds on this module
            self._generator = Generator(self)
        return self._generator

    def program(self, kind: str, batch: int, seq: int) -> Program:
        """The compiled program of ``kind`` ("logits" or "loss_and_grads") for (batch, seq) inputs,
        built on first use and holding the current ``weights``."""
        key = (kind, batch, seq)
        program = self._programs.get(key)
        if program is None:
            builders = {"logits": build_logits, "loss_and_grads": build_loss_and_grads}
            if kind not in builders:
                raise ValueError(f"program kind must be one of {sorted(builders)}, got {kind!r}")
            if not (is_positive_int(batch) and is_positive_int(seq) and seq <= self.config.n_positions):
                raise ValueError(f"program ({kind!r}, batch={batch!r}, seq={seq!r}): batch and seq must be integers "
                                 f">= 1 with seq <= n_positions ({self.config.n_positions})")
            program = builders[kind](self.config, self.execution, self.weights, batch, seq,
                                     weight_memory=self.weight_memory)
            program.weights_version = self._weights_version
            self._programs[key] = program
        return self.with_current_weights(program)

    def _to_layout(self, host: Mapping[str, np.ndarray], variables) -> Dict[str, np.ndarray]:
        """Per-replica host values ``(R, *shape)`` (no R axis when R == 1) of ``variables``' names -> our
        layout: a tensor-parallel shard per replica, or one value when the variable is replicated."""
        shapes = popxl_param_shapes(self.config, self.tensor_parallel)
        out = {}
        for name, value in host.items():
            if variables[name].replica_grouping.num_groups == 1 and self.tensor_parallel > 1:
                value = value[0]  # replicated: every replica holds the same value
            out[name] = value.reshape(shapes[name])
        return out


def execution_config(execution: Optional[ExecutionConfig] = None, *, tensor_parallel: int = 1,
                     dtype: str = "float32", attention_serialisation: int = 1) -> ExecutionConfig:
    """The ``ExecutionConfig`` of a model's programs: ``execution`` when given, else one of the options.

    Raises:
        ValueError: an invalid option, or an option other than its default given with an ``execution``
            that disagrees with it.
    """
    options = dict(tensor_parallel=tensor_parallel, dtype=dtype, attention_serialisation=attention_serialisation)
    if execution is None:
        return ExecutionConfig(**options)
    if not isinstance(execution, ExecutionConfig):
        raise TypeError(f"execution must be an ExecutionConfig, got {type(execution).__name__}")
    defaults = ExecutionConfig()
    conflicts = [f"{name}={value!r}" for name, value in options.items()
                 if value != getattr(defaults, name) and value != getattr(execution, name)]
    if conflicts:
        raise ValueError(f"{', '.join(conflicts)} disagree(s) with execution {execution}: give one or the other")
    return execution


def from_pretrained(path: PathLike, *, tensor_parallel: int = 1, dtype: str = "float32",
                    attention_serialisation: int = 1, offload: bool = False,
                    execution: Optional[ExecutionConfig] = None,
                    offload_cache_dir: Optional[PathLike] = None) -> GPTJ:
    """Load a local Hugging Face GPT-J checkpoint directory as our model.

    Args:
        path: directory with ``config.json`` and the weights (safetensors or PyTorch, sharded or not).
        tensor_parallel: number of shards (replicas) to split heads, MLP columns and vocabulary over.
        dtype: "float32" or "float16" (weights and activations; attention scores, softmax and the
            loss are float32 either way).
        attention_serialisation: compute the attention in this many blocks of queries, one after
            another (less memory, same numbers); must divide the sequence lengths used.
        offload: generation keeps the decoder layers' weights in remote buffers and loads them
            one layer at a time (phased inference), for models larger than device memory. A
            safetensors checkpoint is then converted once into memory-mapped files in
            ``offload_cache_dir`` (default: a ``popxl-offload-*`` folder inside ``path``) that back
            the remote buffers, so the model need not fit in host memory either.
        execution: the execution config as a whole, instead of ``tensor_parallel``, ``dtype`` and
            ``attention_serialisation``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: an invalid option, config or checkpoint.
    """
    # Checked before the (possibly long) load.
    execution = execution_config(execution, tensor_parallel=tensor_parallel, dtype=dtype,
                                 attention_serialisation=attention_serialisation)
    config = GPTJConfig.from_pretrained_dir(path)
    storage = None
    if offload_cache_dir is not None and not offload:
        raise ValueError(f"offload_cache_dir {os.fspath(offload_cache_dir)!r} needs offload=True")
    if offload and lazy_hf_checkpoint(path) is not None:
        weights, storage = open_offload_cache(path, config, execution.tensor_parallel, np.dtype(execution.dtype),
                                              offload_cache_dir)
        _bias_padded_vocab(weights, config)
    else:
        weights = load_weights(path, config, execution)
    return GPTJ(config, weights, execution=execution, offload=offload, layer_storage=storage)


def _bias_padded_vocab(weights: Dict[str, np.ndarray], config: GPTJConfig) -> None:
    weights["lm_head.bias"].reshape(-1)[config.vocab_size:] = PAD_LOGIT_BIAS


def load_weights(path: PathLike, config: GPTJConfig, execution: ExecutionConfig) -> Dict[str, np.ndarray]:
    """The HF checkpoint at ``path`` in our layout for ``execution`` (its tensor parallel and dtype),
    converted layer by layer (``load_layerwise``), padded vocabulary columns of the LM head biased
    away (``PAD_LOGIT_BIAS``)."""
    weights = load_layerwise(path, config, execution.tensor_parallel, np.dtype(execution.dtype))
    _bias_padded_vocab(weights, config)
    return weights
