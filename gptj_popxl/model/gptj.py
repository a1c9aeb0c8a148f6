"""GPT-J causal LM as popxl programs: ``from_pretrained`` and the model's public API.

The model compiles one popxl program (an ``Ir`` and its ``Session``) per kind of run
("logits" or "loss_and_grads") and input shape, on first use, and reuses it afterwards.
Each program holds its own copy of the weights, made from the host arrays in our layout.
"""
import dataclasses
from typing import Dict, Mapping, Tuple

import numpy as np

from gptj_popxl import addons
from gptj_popxl.backend import IS_CPU, ops, popxl
from gptj_popxl.checkpoint import PathLike
from gptj_popxl.model.config import GPTJConfig, is_positive_int, tp_layout
from gptj_popxl.model.hf_mapping import hf_to_popxl, load_hf_state_dict, popxl_param_shapes, popxl_to_hf
from gptj_popxl.model.layers import IGNORE_INDEX, GPTJLM, GPTJLMLoss, tp_groups

DTYPES = {"float32": popxl.float32, "float16": popxl.float16}

# Bias of the padded vocabulary columns of the LM head: their logits never win a softmax or argmax
# and add exactly 0 to a softmax's sum (exp(-1e4) underflows), in float16 as in float32.
PAD_LOGIT_BIAS = -1e4


def create_variables(factories: addons.NamedVariableFactories, weights: Mapping[str, np.ndarray],
                     prefix: str = "", make=popxl.variable) -> addons.NamedTensors:
    """A main-graph variable per factory, holding ``weights[prefix + name]``.

    ``make(data, dtype, name, replica_grouping=...)`` creates each variable (default
    ``popxl.variable``; e.g. a ``popxl.remote_variable`` partial for offloaded weights).

    ``weights`` are in our layout (``hf_to_popxl``): sharded tensors carry a leading axis of
    one entry per shard, which is the variable's host data when its replica grouping has
    several groups and is dropped when it has one (``tp == 1``).

    Raises:
        KeyError: a factory has no entry in ``weights``.
        ValueError: an entry's shape fits neither layout.
    """
    made = {}
    for name, f in factories.to_dict().items():
        key = prefix + name
        if key not in weights:
            raise KeyError(f"no weights for variable {key!r}")
        data = np.asarray(weights[key])
        groups = f.replica_grouping.num_groups if f.replica_grouping is not None else 1
        expected = ((groups,) if groups > 1 else ()) + tuple(f.shape)
        if data.shape != expected:
            if data.shape == (1,) + expected:
                data = data[0]
            else:
                raise ValueError(f"weights {key!r} have shape {data.shape}; variable needs {expected} "
                                 f"({groups} replica group(s) of {tuple(f.shape)})")
        made[name] = make(data, f.dtype, key, replica_grouping=f.replica_grouping)
    return addons.NamedTensors.from_dict(made)


@dataclasses.dataclass
class Program:
    """A compiled popxl program of the model.

    Attributes:
        ir, session: the program and its (attached) session.
        variables: the model's variables by our parameter name.
        inputs: host-to-device streams by name (``input_ids``, and ``labels`` for a loss).
        outputs: device-to-host streams by name (``logits``; or ``loss`` and one per parameter gradient).
    """

    ir: object
    session: object
    variables: addons.NamedTensors
    inputs: Dict[str, object]
    outputs: Dict[str, object]

    def run(self, **host_inputs: np.ndarray) -> Dict[str, np.ndarray]:
        """Run once; ``host_inputs`` by stream name (same data on every replica).

        Returns host arrays by output name, each ``(replicas, *shape)`` when replicated.
        """
        replicas = self.ir.replication_factor
        feed = {}
        for name, stream in self.inputs.items():
            data = np.asarray(host_inputs[name], dtype=stream.dtype.as_numpy())
            feed[stream] = np.broadcast_to(data, (replicas,) + data.shape) if replicas > 1 else data
        results = self.session.run(feed)
        return {name: results[stream] for name, stream in self.outputs.items()}


def _check_options(tensor_parallel, dtype, attention_serialisation) -> None:
    if not is_positive_int(tensor_parallel):
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {tensor_parallel!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not is_positive_int(attention_serialisation):
        raise ValueError(f"attention_serialisation must be an integer >= 1, got {attention_serialisation!r}")


def _check_ids(what: str, ids, config: GPTJConfig, allow_ignore: bool) -> np.ndarray:
    """``ids`` as a 2-D int64 array after checking its type, shape and values."""
    a = np.asarray(ids)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {a.dtype} (shape {a.shape})")
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{what} must be a non-empty 2-D array (batch, seq), got shape {a.shape}")
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
        tensor_parallel: number of shards (= replicas) the model is split over.
        dtype: "float32" or "float16".
        attention_serialisation: query blocks the attention is computed in.
        offload: generation loads the decoder layers' weights from remote buffers, one layer at a time.
    """

    def __init__(self, config: GPTJConfig, weights: Mapping[str, np.ndarray], *, tensor_parallel: int = 1,
                 dtype: str = "float32", attention_serialisation: int = 1, offload: bool = False):
        _check_options(tensor_parallel, dtype, attention_serialisation)
        expected = popxl_param_shapes(config, tensor_parallel)
        shapes = {k: np.shape(v) for k, v in weights.items()}
        if shapes != expected:
            wrong = sorted(k for k in set(expected) | set(shapes) if shapes.get(k) != expected.get(k))
            raise ValueError(f"weights do not match the tp={tensor_parallel} layout of this config at: "
                             + ", ".join(f"{k} {shapes.get(k)} (expected {expected.get(k)})" for k in wrong[:5]))
        self.config = config
        self.tensor_parallel = tensor_parallel
        self.dtype = dtype
        self.attention_serialisation = attention_serialisation
        self._weights = dict(weights)
        self._programs: Dict[Tuple[str, int, int], Program] = {}
        self.offload = offload
        self._generator = None

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
            ..., ``lm_head.bias``) as float32 arrays of the HF parameters' shapes.
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
        ours = self._to_layout({name: np.asarray(g, dtype=np.float32) for name, g in out.items()})
        return loss, popxl_to_hf(ours, self.config, self.tensor_parallel)

    def generate(self, input_ids, **options) -> np.ndarray:
        """Generate as transformers' ``GPTJForCausalLM.generate``, with a KV cache.

        Args:
            input_ids: integer array (batch, seq), rows left padded.
            attention_mask: 0/1 array of the same shape (default: all ones, or ``input_ids !=
                pad_token_id`` when that pad token occurs and differs from eos); positions count
                only the real tokens.
            max_new_tokens: tokens to generate per row (at most).
            do_sample, temperature, top_k, top_p: sampling, warped in transformers' order
                (temperature, top-k, top-p); greedy when ``do_sample`` is False.
            eos_token_id, pad_token_id: a row that emits eos is padded with pad (default eos)
                from then on; generation stops when every row has finished.
            seed: seed of the sampling (the same seed gives the same tokens).

        Returns:
            int64 array (batch, seq + generated): the prompt followed by the new tokens.
        """
        return self.generator.generate( input_ids, **options)

    def generate_many(self, prompts, **options):
        """New tokens (up to and including eos) for each of ``prompts`` (1-D token id sequences of
        any lengths), generated in ``batch_size`` slots with continuous batching: a finished
        slot is refilled with the next prompt. Keyword options: ``batch_size=8, max_new_tokens=20,
        eos_token_id=None, do_sample=False, temperature=1.0, top_k=None, top_p=None, seed=None``.

        Returns:
            a list of int64 arrays, one per prompt, in order.
        """
        return self.generator.generate_many( prompts, **options)

    def stream(self, prompt_ids, **options):
        """Yield one row's new tokens (ints) as they are generated; ``prompt_ids`` is 1-D. Options
        as ``generate`` (no ``attention_mask``/``pad_token_id``); stops after eos."""
        return self.generator.stream( prompt_ids, **options)

    @property
    def generator(self):
        """The model's ``generation.Generator``: its generation programs, compiled on first use."""
        if self._generator is None:
            from gptj_popxl.generation import Generator  # generation builds on this module
            self._generator = Generator(self)
        return self._generator

    def program(self, kind: str, batch: int, seq: int) -> Program:
        """The compiled program of ``kind`` ("logits" or "loss_and_grads") for (batch, seq) inputs,
        built on first use."""
        key = (kind, batch, seq)
        program = self._programs.get(key)
        if program is None:
            builders = {"logits": self._build_logits, "loss_and_grads": self._build_loss_and_grads}
            if kind not in builders:
                raise ValueError(f"program kind must be one of {sorted(builders)}, got {kind!r}")
            if not (is_positive_int(batch) and is_positive_int(seq) and seq <= self.config.n_positions):
                raise ValueError(f"program ({kind!r}, batch={batch!r}, seq={seq!r}): batch and seq must be integers "
                                 f">= 1 with seq <= n_positions ({self.config.n_positions})")
            program = self._programs[key] = builders[kind](batch, seq)
        return program

    # --- program construction
    def _to_layout(self, host: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Per-replica host values ``(R, *shape)`` (no R axis when R == 1) -> our layout."""
        shapes = popxl_param_shapes(self.config, self.tensor_parallel)
        tp = self.tensor_parallel
        out = {}
        for name, value in host.items():
            if tp == 1:
                out[name] = value.reshape(shapes[name])
            elif value.shape == shapes[name]:
                out[name] = value  # sharded: replica r holds shard r
            else:
                out[name] = value[0]  # replicated: every replica holds the same value
        return out

    def _inputs(self, batch: int, seq: int, names):
        streams = {name: popxl.h2d_stream((batch, seq), popxl.int32, name) for name in names}
        return streams, [ops.host_load(s, name) for name, s in streams.items()]

    def _shard_offset(self, groups) -> popxl.Tensor:
        """Scalar int32 variable: the first vocabulary id of each replica's shard."""
        vps = tp_layout(self.config, self.tensor_parallel).vocab_per_shard
        offsets = np.arange(self.tensor_parallel, dtype=np.int32) * vps
        return popxl.variable(offsets if self.tensor_parallel > 1 else offsets[0], popxl.int32, "vocab_shard_offset",
                              replica_grouping=groups.sharded)

    def _session(self, ir):
        session = popxl.Session(ir, "cpu" if IS_CPU else "ipu_hw")
        # Kept attached for the model's lifetime: the weights never change between runs.
        session.__enter__()
        return session

    def _build_logits(self, batch: int, seq: int) -> Program:
        ir = popxl.Ir(replication=self.tensor_parallel)
        with ir.main_graph:
            groups = tp_groups(ir, self.tensor_parallel)
            streams, (ids,) = self._inputs(batch, seq, ["input_ids"])
            offset = self._shard_offset(groups)
            model = GPTJLM(self.config, groups, DTYPES[self.dtype], self.attention_serialisation)
            facts, graph = model.create_graph(ids, offset)
            variables = create_variables(facts, self._weights)
            logits, = graph.bind(variables).call(ids, offset)
            out = popxl.d2h_stream(logits.shape, logits.dtype, "logits")
            ops.host_store(out, logits)
        return Program(ir, self._session(ir), variables, streams, {"logits": out})

    def _build_loss_and_grads(self, batch: int, seq: int) -> Program:
        ir = popxl.Ir(replication=self.tensor_parallel)
        with ir.main_graph:
            groups = tp_groups(ir, self.tensor_parallel)
            streams, (ids, labels) = self._inputs(batch, seq, ["input_ids", "labels"])
            offset = self._shard_offset(groups)
            model = GPTJLMLoss(self.config, groups, DTYPES[self.dtype], self.attention_serialisation)
            facts, fwd = model.create_graph(ids, offset, labels)
            names = list(fwd.args.to_dict())
            grad = fwd.autodiff(grads_required=[fwd.args.to_dict()[n] for n in names])
            variables = create_variables(facts, self._weights)
            info = fwd.bind(variables).call_with_info(ids, offset, labels)
            loss = info.outputs[0]
            grads = grad.call(popxl.constant(1.0, popxl.float32, name="loss_grad"),
                              args=grad.grad_graph_info.inputs_dict(info))
            outputs = {"loss": popxl.d2h_stream(loss.shape, loss.dtype, "loss")}
            ops.host_store(outputs["loss"], loss)
            for name, g in zip(names, grads):
                outputs[name] = popxl.d2h_stream(g.shape, g.dtype, "grad." + name)
                ops.host_store(outputs[name], g)
        return Program(ir, self._session(ir), variables, streams, outputs)


def from_pretrained(path: PathLike, *, tensor_parallel: int = 1, dtype: str = "float32",
                    attention_serialisation: int = 1, offload: bool = False) -> GPTJ:
    """Load a local Hugging Face GPT-J checkpoint directory as our model.

    Args:
        path: directory with ``config.json`` and the weights (safetensors or PyTorch, sharded or not).
        tensor_parallel: number of shards (replicas) to split heads, MLP columns and vocabulary over.
        dtype: "float32" or "float16" (weights and activations; attention scores, softmax and the
            loss are float32 either way).
        attention_serialisation: compute the attention in this many blocks of queries, one after
            another (less memory, same numbers); must divide the sequence lengths used.
        offload: generation keeps the decoder layers' weights in remote buffers and loads them
            one layer at a time (phased inference), for models larger than device memory.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: an invalid option, config or checkpoint.
    """
    _check_options(tensor_parallel, dtype, attention_serialisation)  # before the (possibly long) load
    config = GPTJConfig.from_pretrained_dir(path)
    weights = hf_to_popxl(load_hf_state_dict(path), config, tensor_parallel, np.dtype(dtype))
    weights["lm_head.bias"].reshape(-1)[config.vocab_size:] = PAD_LOGIT_BIAS
    return GPTJ(config, weights, tensor_parallel=tensor_parallel, dtype=dtype,
                attention_serialisation=attention_serialisation, offload=offload)
