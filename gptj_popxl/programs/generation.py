"""Generation programs: prefill (prompt -> KV cache + first token) and decode (K tokens per run).

Prefill computes the prompts' keys and values and the first new token. Decode holds the KV
cache in device variables (per layer, sharded over heads), a ring of columns written in place;
one run writes the prompts of freshly prefilled slots into it, then advances every row by
``chunk`` tokens in an ``ops.repeat`` whose loop-carried state is each row's last token and
position, the write column and the mask (the cache variables are captured by reference).

Token selection (:func:`select_tokens`) keeps the logits vocab sharded: each shard computes its
argmax (greedy) or its top-k (sampling) and only those candidates are gathered.
"""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from gptj_popxl import addons
from gptj_popxl.backend import IS_CPU, ops, popxl
from gptj_popxl.model.config import GPTJConfig, tp_layout
from gptj_popxl.model.decode_kernels import can_decode_layer
from gptj_popxl.model.kv_cache import CachedLM
from gptj_popxl.model.layers import TPGroups, tp_groups
from gptj_popxl.model.rotary import cast_to
from gptj_popxl.programs.common import Program, attached_session, create_variables, shard_offset, share_weight_memory
from gptj_popxl.programs.execution import DTYPES

# Additive mask value of a masked key (as transformers).
MASKED = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """transformers' sampling warpers, applied in its order: temperature, top-k, top-p."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def candidates(self, config: GPTJConfig, tp: int) -> Tuple[int, int]:
        """``(per_shard, total)``: candidates each shard contributes and the number kept after gathering."""
        vps = tp_layout(config, tp).vocab_per_shard
        per_shard = vps if self.top_k is None else min(self.top_k, vps)
        total = tp * per_shard if self.top_k is None else min(self.top_k, tp * per_shard)
        return per_shard, total


def _take_per_row(values: popxl.Tensor, index: popxl.Tensor) -> popxl.Tensor:
    """``values[b, index[b, j]]`` for (batch, n) ``values`` and (batch, m) int32 ``index``."""
    batch, n = values.shape
    rows = popxl.constant(np.arange(batch, dtype=np.int32)[:, None] * n, popxl.int32, name="row_starts")
    return ops.gather(values.reshape((batch * n,)), index + rows)


def select_tokens(logits: popxl.Tensor, shard_offset: popxl.Tensor, groups: TPGroups, config: GPTJConfig,
                  sampling: Optional[Sampling], uniforms: Optional[popxl.Tensor]) -> popxl.Tensor:
    """The next token of each row, (batch,) int32, from this shard's logits (batch, vocab_per_shard).

    Greedy (``sampling`` None): the first largest logit, as ``torch.argmax``. Sampling: the
    warped candidates are drawn with the Gumbel-max trick from ``uniforms`` (batch, total)
    in (0, 1), the same on every replica so that every shard picks the same token.
    """
    logits = cast_to(logits, popxl.float32)
    if sampling is None and groups.tp == 1:
        return ops.argmax(logits, dim=-1, keepdim=False)  # the only shard starts at id 0
    if sampling is None:
        values = ops.max(logits, axis=-1, keepdims=True)
        ids = ops.argmax(logits, dim=-1, keepdim=True) + shard_offset
    else:
        per_shard, total = sampling.candidates(config, groups.tp)
        values, ids = ops.topk(logits, per_shard, axis=-1, largest=True, sorted=True)
        ids = ids + shard_offset
    if groups.tp > 1:
        # Shards hold ascending vocabulary blocks, so the gathered candidates stay in id order per value.
        values, ids = (ops.collectives.replicated_all_gather(t, axis=1, group=groups.tp_group, output_shape="concat")
                       for t in (values, ids))
    if sampling is None:
        return _take_per_row(ids, ops.argmax(values, dim=-1, keepdim=True)).reshape((logits.shape[0],))
    if groups.tp > 1:
        values, order = ops.topk(values, total, axis=-1, largest=True, sorted=True)
        ids = _take_per_row(ids, order)
    values = values / popxl.constant(float(sampling.temperature), popxl.float32, name="temperature")
    if sampling.top_p is not None:
        probs = ops.softmax(values, axis=-1)
        before = ops.cumsum(probs, dim=1) - probs  # mass of the more likely candidates
        keep = ops.greater(popxl.constant(float(sampling.top_p), popxl.float32, name="top_p"), before)
        values = ops.where(keep, values, MASKED)
    gumbel = ops.negate(ops.log(ops.negate(ops.log(uniforms))))
    pick = ops.argmax(values + gumbel, dim=-1, keepdim=True)
    return _take_per_row(ids, pick).reshape((logits.shape[0],))


class PrefillModule(CachedLM):
    """``build(input_ids, positions, mask, shard_offset[, uniforms])`` -> ``(token, *keys, *values)``,
    then the logits shard when ``with_logits``."""

    def __init__(self, config, groups, dtype, sampling: Optional[Sampling], offload: bool = False,
                 with_logits: bool = False):
        super().__init__(config, groups, dtype, offload)
        self.sampling = sampling
        self.with_logits = with_logits

    def build(self, input_ids, positions, mask, shard_offset, uniforms=None):
        logits, ks, vs = self.prefill(input_ids, positions, mask, shard_offset)
        token = select_tokens(logits, shard_offset, self.groups, self.config, self.sampling, uniforms)
        return (token, *ks, *vs) + ((cast_to(logits, popxl.float32),) if self.with_logits else ())


class DecodeStep(CachedLM):
    """One decode iteration, the body of the decode loop; or, where ``whole_chunk`` says, all
    ``chunk`` iterations in one op.

    ``build(token, position, column, mask, tokens, step, [scores,] shard_offset[, uniforms])``:
    ``token``/``position`` (batch, 1) int32, ``column`` (1,) int32 (the cache column every row
    writes), ``mask`` (batch, 1, 1, cache_len) float32, ``tokens`` (batch, chunk) int32 (this run's
    tokens so far), ``step`` (1,) int32 and ``scores`` are loop-carried; the outputs are their
    next values. ``scores`` (batch, chunk, vocab_per_shard) float32, when given, collects each
    step's logits shard. ``uniforms`` (chunk, batch, total) feed the sampling. ``caches``, the
    program's cache variables (keys of every layer, then values), are captured by reference and
    written in place.
    """

    def __init__(self, config, groups, dtype, sampling: Optional[Sampling], caches: Sequence[popxl.Tensor],
                 offload: bool = False, chunk: int = 1):
        super().__init__(config, groups, dtype, offload)
        self.sampling = sampling
        self.caches = tuple(caches)
        self.chunk = chunk

    def greedy(self, with_scores: bool) -> bool:
        """Whether a step picks its tokens by the C++ greedy kernels (``can_decode_layer``)."""
        return not with_scores and self.sampling is None and can_decode_layer(self.dtype, self.groups.tp)

    def whole_chunk(self, with_scores: bool) -> bool:
        """Whether one build runs all ``chunk`` steps, as one ``greedy_decode_steps`` op (greedy, every
        layer resident): the program then calls it once instead of repeating it."""
        return self.greedy(with_scores) and not self.offload

    def build(self, token, position, column, mask, tokens, step, scores, shard_offset, uniforms=None):
        batch, cache_len = mask.shape[0], mask.shape[-1]
        n = self.config.n_layer
        caches = (self.caches[:n], self.caches[n:])
        if self.whole_chunk(scores is not None):
            return self.greedy_steps(token, position, column, mask, tokens, step, *caches, steps=self.chunk)
        # The column this step writes is attended from now on (every row writes it).
        unmasked = popxl.constant(np.zeros((batch, 1, 1, 1), np.float32), popxl.float32, name="unmasked")
        mask = ops.dynamic_update_(mask, column, unmasked, axes=[3], sizes=[1], no_overlap=True)
        # The counters' next values come first: an op just after the layers or the head finds the
        # processor's caches full of weights and runs several times slower.
        # Rows past their last useful step keep running; their positions wrap to stay inside the
        # rotary tables (those rows' tokens are discarded). The columns are a ring: after the last
        # comes the first.
        next_position = ops.increment_mod(position, 1, self.config.n_positions)
        next_column = ops.increment_mod(column, 1, cache_len)
        next_step = step + popxl.constant(np.int32(1), popxl.int32, name="one")
        if self.greedy(scores is not None):
            new = self.decode_greedy(token, position, mask, column, shard_offset, *caches)
        else:
            logits = self.decode(token, position, mask, column, shard_offset, *caches)
            if uniforms is not None:
                total = uniforms.shape[-1]
                uniforms = ops.dynamic_slice(uniforms, step, axes=[0], sizes=[1], no_overlap=True)
                uniforms = uniforms.reshape((batch, total))
            new = select_tokens(logits, shard_offset, self.groups, self.config, self.sampling, uniforms)
        new = new.reshape((batch, 1))
        tokens = ops.dynamic_update_(tokens, step, new, axes=[1], sizes=[1], no_overlap=True)
        carried = (new, next_position, next_column, mask, tokens, next_step)
        if scores is None:
            return carried
        step_logits = cast_to(logits, popxl.float32).reshape((batch, 1, -1))
        return carried + (ops.dynamic_update_(scores, step, step_logits, axes=[1], sizes=[1], no_overlap=True),)


@dataclasses.dataclass
class GenerationProgram(Program):
    """A compiled generation program: a ``Program`` (its weight variables reload with ``load_weights``)
    and the decode cache variables."""

    cache: Tuple[object, ...] = ()


def _create_remote_layers(model, module: CachedLM) -> Dict[str, popxl.Tensor]:
    """With offload, the remote variables holding every layer's weights in ``module``'s buffers, by name."""
    made = {}
    if not module.offload:
        return made
    storage = model.layer_storage
    if IS_CPU and storage is not None:
        for name, buffer in module.layer_buffers.to_dict().items():
            # A file backs a buffer when it holds every replica's copy: with tp > 1 the replicated
            # tensors (LayerNorms, biases: small) are stored once per layer and stay in memory.
            if storage[name].size == buffer.entries * model.tensor_parallel * np.prod(buffer.tensor_shape):
                popxl.back_remote_buffer(buffer, storage[name])
    for i in range(model.config.n_layer):
        def remote(data, dtype, name, replica_grouping, entry=i):
            buffer = module.layer_buffers.to_dict()[name[len(f"layers.{entry}."):]]
            return popxl.remote_variable(data, buffer, entry, dtype, name, replica_grouping=replica_grouping)
        layer = create_variables(module.layer_factories, model.weights, prefix=f"layers.{i}.", make=remote)
        made.update({f"layers.{i}.{name}": v for name, v in layer.to_dict().items()})
    return made


def _weight_variables(resident: addons.NamedTensors, remote: Dict[str, popxl.Tensor]) -> addons.NamedTensors:
    """Every weight variable of a program by our name: the resident ones and the offloaded layers'."""
    return addons.NamedTensors.from_dict({**resident.to_dict(), **remote})


def _h2d(streams: Dict[str, object], name: str, shape, dtype) -> popxl.Tensor:
    streams[name] = popxl.h2d_stream(tuple(shape), dtype, name)
    return ops.host_load(streams[name], name)


def _d2h(streams: Dict[str, object], name: str, t: popxl.Tensor) -> None:
    streams[name] = popxl.d2h_stream(t.shape, t.dtype, name)
    ops.host_store(streams[name], t)


def build_prefill(model, batch: int, seq: int, sampling: Optional[Sampling], with_logits: bool = False,
                  attach: bool = True) -> GenerationProgram:
    """Prefill of ``batch`` left-padded prompts of ``seq`` tokens.

    Inputs: ``input_ids``, ``positions`` (batch, seq) int32, ``mask`` (batch, 1, seq, seq)
    float32 additive, ``uniforms`` (batch, total) when sampling. Outputs: ``token`` (batch,)
    and ``k.{i}``/``v.{i}`` (batch, heads_per_shard, seq, head_dim) per layer and shard; with
    ``with_logits`` also ``logits`` (batch, vocab_per_shard) float32 per shard. Without ``attach``
    it has no session: a program to analyse (``gptj_popxl.plan``), not to run.
    """
    config, dtype = model.config, DTYPES[model.dtype]
    ir = popxl.Ir(replication=model.tensor_parallel)
    inputs, outputs = {}, {}
    with ir.main_graph:
        groups = tp_groups(ir, model.tensor_parallel)
        ids = _h2d(inputs, "input_ids", (batch, seq), popxl.int32)
        positions = _h2d(inputs, "positions", (batch, seq), popxl.int32)
        mask = _h2d(inputs, "mask", (batch, 1, seq, seq), popxl.float32)
        args = [ids, positions, mask, shard_offset(model.config, model.tensor_parallel, groups)]
        if sampling is not None:
            args.append(_h2d(inputs, "uniforms", (batch, sampling.candidates(config, groups.tp)[1]), popxl.float32))
        module = PrefillModule(config, groups, dtype, sampling, model.offload, with_logits)
        facts, graph = module.create_graph(*args)
        remote = _create_remote_layers(model, module)
        resident = create_variables(facts, model.weights)
        shared = share_weight_memory(resident, model.weight_memory, model.tensor_parallel, attach)
        token, *kv = graph.bind(resident).call(*args)
        _d2h(outputs, "token", token)
        if with_logits:
            _d2h(outputs, "logits", kv.pop())
        for i, t in enumerate(kv):
            _d2h(outputs, f"{'kv'[i // config.n_layer]}.{i % config.n_layer}", t)
    return GenerationProgram(ir, attached_session(ir, attach), _weight_variables(resident, remote),
                             inputs, outputs, model.weights_version, shared)


def build_decode(model, batch: int, prompt_len: int, cache_len: int, chunk: int, sampling: Optional[Sampling],
                 with_logits: bool = False, attach: bool = True) -> GenerationProgram:
    """Decode of ``batch`` rows, ``chunk`` tokens per run, over a ring of ``cache_len`` cache columns.

    Inputs: ``token``, ``position`` (batch, 1) int32; ``column`` (1,) int32, the column the first
    step writes; ``mask`` (batch, 1, 1, cache_len) float32 additive (the column written by a step
    is unmasked by it); ``refill`` (batch,) bool, ``window`` (1,) int32 and ``k.{i}``
    (batch, heads_per_shard, head_dim, prompt_len) / ``v.{i}`` (batch, heads_per_shard, prompt_len,
    head_dim) per layer and shard: the refilled rows' prompt keys and values (prefill output,
    right-aligned), written into the ``prompt_len`` cache columns from ``window`` (wrapping)
    before decoding; ``uniforms`` (chunk, batch, total) when sampling. Output: ``tokens``
    (batch, chunk), and with ``with_logits`` ``logits`` (batch, chunk, vocab_per_shard) float32
    per shard. Without ``attach`` it has no session (see ``build_prefill``).
    """
    config, dtype = model.config, DTYPES[model.dtype]
    tp = model.tensor_parallel
    heads, head_dim = tp_layout(config, tp).heads_per_shard, config.head_dim
    ir = popxl.Ir(replication=tp)
    inputs, outputs = {}, {}
    with ir.main_graph:
        groups = tp_groups(ir, model.tensor_parallel)
        token = _h2d(inputs, "token", (batch, 1), popxl.int32)
        position = _h2d(inputs, "position", (batch, 1), popxl.int32)
        column = _h2d(inputs, "column", (1,), popxl.int32)
        mask = _h2d(inputs, "mask", (batch, 1, 1, cache_len), popxl.float32)
        refill = _h2d(inputs, "refill", (batch,), popxl.bool).reshape((batch, 1, 1, 1))
        window = _h2d(inputs, "window", (1,), popxl.int32)
        cache = []
        for kind, shape, axis in (("k", (batch, heads, head_dim, cache_len), 3),
                                  ("v", (batch, heads, cache_len, head_dim), 2)):
            for i in range(config.n_layer):
                # One zero broadcast: a session gives the cache its storage, an analysed program none.
                zeros = np.broadcast_to(np.zeros((), dtype.as_numpy()), ((tp,) if tp > 1 else ()) + shape)
                var = popxl.variable(zeros, dtype, f"cache.{kind}.{i}", replica_grouping=groups.sharded)
                fresh_shape = list(shape)
                fresh_shape[axis] = prompt_len
                fresh = _h2d(inputs, f"{kind}.{i}", fresh_shape, dtype)
                # Only the prompt's columns of refilled rows change; the rest of the cache stays in place.
                old = ops.dynamic_slice(var, window, axes=[axis], sizes=[prompt_len], no_overlap=True)
                ops.dynamic_update_(var, window, ops.where(refill, fresh, old), axes=[axis], sizes=[prompt_len],
                                    no_overlap=True)
                cache.append(var)
        offset = shard_offset(model.config, model.tensor_parallel, groups)
        tokens = popxl.constant(np.zeros((batch, chunk), np.int32), popxl.int32, name="tokens")
        step = popxl.constant(np.zeros((1,), np.int32), popxl.int32, name="step")
        scores = None
        if with_logits:
            vps = tp_layout(config, tp).vocab_per_shard
            scores = popxl.constant(np.zeros((batch, chunk, vps), np.float32), popxl.float32, name="scores")
        args = [token, position, column, mask, tokens, step, scores, offset]
        if sampling is not None:
            args.append(_h2d(inputs, "uniforms", (chunk, batch, sampling.candidates(config, tp)[1]), popxl.float32))
        module = DecodeStep(config, groups, dtype, sampling, cache, model.offload, chunk)
        facts, graph = module.create_graph(*args)
        remote = _create_remote_layers(model, module)
        variables = create_variables(facts, model.weights)
        shared = share_weight_memory(variables, model.weight_memory, model.tensor_parallel, attach)
        bound = variables.to_dict()
        loop_inputs = {graph_input: bound[name] for name, graph_input in graph.args.to_dict().items()}
        args = [t for t in args if t is not None]
        if module.whole_chunk(with_logits):
            results = ops.call(graph.graph, *args, inputs_dict=loop_inputs)
        else:
            results = ops.repeat(graph.graph, chunk, *args, inputs_dict=loop_inputs)
        _d2h(outputs, "tokens", results[4])
        if with_logits:
            _d2h(outputs, "logits", results[6])
    return GenerationProgram(ir, attached_session(ir, attach), _weight_variables(variables, remote),
                             inputs, outputs, model.weights_version, shared, tuple(cache))

