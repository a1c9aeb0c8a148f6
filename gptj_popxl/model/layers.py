"""GPT-J layers as addons Modules, tensor parallel over ``tp`` replicas.

Variable names and shard layouts are those of ``hf_mapping`` (see its module docstring):
sharded variables use ``TPGroups.sharded`` (host data ``(tp, *shard)``), replicated ones
the default grouping, and the collectives between shards run over ``TPGroups.tp_group``.
A column-sharded layer needs its input identical on every shard and leaves each shard
with a slice of the output features; a row-sharded layer takes such a slice and
all-reduces its partial products. Hidden states between blocks are ``(batch, seq, n_embd)``,
identical on every shard.
"""
import dataclasses
import math
from typing import List, Optional, Tuple

import numpy as np

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl
from gptj_popxl.model.config import GPTJConfig, TPLayout, is_positive_int, tp_layout
from gptj_popxl.model.rotary import cast_to, rotary_embedding, trig_tables
from gptj_popxl.model.weight_maps import FusedHeads, Replicated, Sharded, WeightMap

# Std of the normal initial weights when a layer is made from scratch (transformers' GPT-J default).
INIT_STD = 0.02
# Label value that the loss skips (transformers' convention).
IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class TPGroups:
    """Replica groupings of a tensor-parallel program with ``tp`` shards and ``dp = R / tp`` copies.

    Attributes:
        tp: tensor-parallel degree.
        sharded: grouping of sharded variables: replica ``r`` holds shard ``r % tp`` and each
            group is one shard's ``dp`` replicas, so host data is ``(tp, *shard)``.
        tp_group: grouping of tensor-parallel collectives: the ``tp`` shards of one copy.
    """

    tp: int
    sharded: object
    tp_group: object


def tp_groups(ir, tp: int) -> TPGroups:
    """The ``TPGroups`` of ``ir`` for ``tp`` shards.

    Raises:
        ValueError: ``tp`` does not divide ``ir.replication_factor``.
    """
    replicas = ir.replication_factor
    if not is_positive_int(tp) or replicas % tp:
        raise ValueError(f"tensor-parallel degree {tp!r} must be a positive divisor of the IR's replication "
                         f"factor {replicas}")
    sharded = ir.replica_grouping(stride=tp, group_size=replicas // tp)
    return TPGroups(tp, sharded, sharded.transpose())


def _sharded_weight(module: addons.Module, shape, dtype, groups: TPGroups) -> popxl.Tensor:
    """``module``'s variable input ``weight``: one ``shape`` block per shard, normal initial values."""
    draw = addons.DeferredData(shape, dtype.as_numpy(),
                               lambda: np.random.normal(0.0, INIT_STD, shape).astype(dtype.as_numpy()))
    return module.add_variable_input("weight", draw, dtype, replica_grouping=groups.sharded)


def _bias(module: addons.Module, size: int, dtype, replica_grouping=None) -> popxl.Tensor:
    """``module``'s variable input ``bias`` of ``size`` zeros (one block per shard with a sharded grouping)."""
    return module.add_variable_input("bias", lambda: np.zeros(size, dtype.as_numpy()), dtype,
                                     replica_grouping=replica_grouping)


def identical_inputs(x: popxl.Tensor, groups: TPGroups) -> popxl.Tensor:
    """Enter a sharded region: identity forward, gradients summed over the shards backward."""
    if groups.tp == 1:
        return x  # one shard: nothing to sum, and no op to run at every step
    return addons.ops.replicated_all_reduce_identical_inputs(x, group=groups.tp_group)


def sum_shards(x: popxl.Tensor, groups: TPGroups) -> popxl.Tensor:
    """Leave a sharded region: partial results summed over the shards, gradient passed unchanged."""
    if groups.tp == 1:
        return x
    return addons.ops.replicated_all_reduce_identical_grad_inputs(x, group=groups.tp_group)


class ColumnShardedLinear(addons.Module):
    """``x @ W + b`` with ``W``'s columns (output features) and ``b`` sharded.

    ``x`` must be identical on every shard; each shard computes its slice of the output
    features, and the gradient of ``x`` is summed over the shards. ``inplace_bias`` adds the
    bias into the product's buffer, saving a large allocation (e.g. the LM head's logits)
    where the graph is not differentiated. ``product(x, w)`` computes ``x @ w`` (a class or instance
    attribute, so that inference graphs can pick a kernel for their shapes).
    """

    product = staticmethod(ops.matmul)

    def __init__(self, out_features: int, groups: TPGroups, bias: bool = True, inplace_bias: bool = False):
        super().__init__()
        self.out_features = out_features
        self.groups = groups
        self.bias = bias
        self.inplace_bias = inplace_bias

    def variables(self, in_features: int, dtype) -> Tuple[popxl.Tensor, Optional[popxl.Tensor]]:
        """Declares this layer's weight shard (in_features, out_features / tp) and bias shard (None
        without bias)."""
        w = _sharded_weight(self, (in_features, self.out_features), dtype, self.groups)
        return w, _bias(self, self.out_features, dtype, self.groups.sharded) if self.bias else None

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        w, b = self.variables(x.shape[-1], x.dtype)
        y = self.product(identical_inputs(x, self.groups), w)
        if b is not None:
            y = ops.add_(y, b) if self.inplace_bias else y + b
        return y


class RowShardedLinear(addons.Module):
    """``x @ W (+ b)`` with ``W``'s rows (input features) sharded and ``b`` replicated.

    Each shard multiplies its slice of the input features by its rows of ``W``; the partial
    products are summed over the shards, then the bias is added once. ``product`` as
    ``ColumnShardedLinear``'s.
    """

    product = staticmethod(ops.matmul)

    def __init__(self, out_features: int, groups: TPGroups, bias: bool = True):
        super().__init__()
        self.out_features = out_features
        self.groups = groups
        self.bias = bias

    def variables(self, in_features: int, dtype) -> Tuple[popxl.Tensor, Optional[popxl.Tensor]]:
        """Declares this layer's weight shard (in_features / tp, out_features) and replicated bias (None
        without bias)."""
        w = _sharded_weight(self, (in_features, self.out_features), dtype, self.groups)
        return w, _bias(self, self.out_features, dtype) if self.bias else None

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        w, b = self.variables(x.shape[-1], x.dtype)
        y = sum_shards(self.product(x, w), self.groups)
        return y if b is None else y + b


class Embedding(addons.Module):
    """The embedding stage: ``word`` embeddings (GPT-J has no learned positions), vocabulary sharded.

    Each shard looks up the ids in its range ``[offset, offset + vocab_per_shard)`` and gives zeros
    for the others; summing over the shards gives every token's row.
    """

    def __init__(self, config: GPTJConfig, groups: TPGroups, dtype=popxl.float32):
        super().__init__()
        self.groups = groups
        # Its shard size is tp_layout's vocab_per_shard.
        self.word = addons.layers.Embedding(dtype, config.vocab_size, config.n_embd, replica_grouping=groups.sharded)

    def build(self, input_ids: popxl.Tensor, shard_offset: popxl.Tensor) -> popxl.Tensor:
        return sum_shards(self.word(input_ids - shard_offset), self.groups)

    @staticmethod
    def weight_maps(config: GPTJConfig, tp: int) -> List[WeightMap]:
        """This module's weights from HF's ``transformer.*``: ``wte`` rows, vocabulary sharded."""
        vocab = tp_layout(config, tp).vocab_padded
        return [Sharded("word.weight", "wte.weight", (config.vocab_size, config.n_embd), 0, vocab, tp)]


def causal_mask(rows: range, seq: int) -> np.ndarray:
    """Additive float32 mask of query positions ``rows`` over ``seq`` keys: 0 where a query may
    attend (key <= query), the float32 minimum above the diagonal (as transformers)."""
    q = np.arange(rows.start, rows.stop)[:, None]
    return np.where(np.arange(seq)[None, :] <= q, 0.0, np.finfo(np.float32).min).astype(np.float32)


def attend(q: popxl.Tensor, k_t: popxl.Tensor, v: popxl.Tensor, mask: popxl.Tensor) -> popxl.Tensor:
    """``softmax(q @ k_t / sqrt(head_dim) + mask) @ v`` per head.

    ``q`` (batch, heads, queries, head_dim), ``k_t`` (batch, heads, head_dim, keys), ``v``
    (batch, heads, keys, head_dim), ``mask`` (queries, keys) float32. Scores and softmax are
    float32 whatever the dtype of ``v``; the probabilities are cast back to it before ``@ v``.
    """
    q, k_t = cast_to(q, popxl.float32), cast_to(k_t, popxl.float32)
    scores = (q @ k_t) / popxl.constant(math.sqrt(q.shape[-1]), popxl.float32, name="scale")
    probs = ops.softmax(scores + mask, axis=-1)
    return cast_to(probs, v.dtype) @ v


def causal_attention(q: popxl.Tensor, k_t: popxl.Tensor, v: popxl.Tensor, blocks: int = 1) -> popxl.Tensor:
    """Causal self-attention (shapes as ``attend``), the queries taken in ``blocks`` blocks.

    With ``blocks > 1`` one graph computing a block of queries against all keys is called once
    per block, one after another, so only a block's scores are live at a time; the results
    are the same.

    Raises:
        ValueError: ``blocks`` does not divide the sequence length.
    """
    seq = q.shape[2]
    if not is_positive_int(blocks) or seq % blocks:
        raise ValueError(f"attention serialisation: {blocks!r} query blocks must be a positive divisor of the "
                         f"sequence length {seq}")
    if blocks == 1:
        return attend(q, k_t, v, popxl.constant(causal_mask(range(seq), seq), name="causal_mask"))
    size = seq // blocks
    q_block = popxl.TensorSpec(q.shape[:2] + (size,) + q.shape[3:], q.dtype)
    graph = popxl.gir().create_graph(attend, q_block, k_t, v, popxl.TensorSpec((size, seq), popxl.float32))
    outs = []
    for b in range(blocks):
        rows = range(b * size, (b + 1) * size)
        mask = popxl.constant(causal_mask(rows, seq), name=f"causal_mask_{b}")
        outs.append(ops.call(graph, q[:, :, rows.start:rows.stop], k_t, v, mask)[0])
    return ops.concat(outs, axis=2)


class Attention(addons.Module):
    """GPT-J self-attention with the heads sharded: ``heads_per_shard`` heads per shard.

    Fused ``qkv`` projection (column sharded, per shard ``[q | k | v]`` of its heads), rotary
    position embedding on ``q`` and ``k``, causal softmax attention and the row-sharded ``out``
    projection, summed over the shards.
    """

    def __init__(self, config: GPTJConfig, groups: TPGroups, attention_serialisation: int = 1):
        super().__init__()
        self.config = config
        self.groups = groups
        self.layout: TPLayout = tp_layout(config, groups.tp)
        self.attention_serialisation = attention_serialisation
        self.qkv = ColumnShardedLinear(3 * self.layout.heads_per_shard * config.head_dim, groups, bias=False)
        self.out = RowShardedLinear(config.n_embd, groups, bias=False)

    def trig_constants(self, dtype) -> Tuple[popxl.Tensor, popxl.Tensor]:
        """The rotary ``sin`` and ``cos`` tables (n_positions, rotary_dim / 2) as constants of ``dtype``."""
        return tuple(popxl.constant(table, dtype, name=name) for table, name in
                     zip(trig_tables(self.config.n_positions, self.config.rotary_dim), ("sin", "cos")))

    def rotated_qkv(self, x: popxl.Tensor, positions: popxl.Tensor):
        """This shard's ``(q, k, v)``, each (batch, seq, heads_per_shard, head_dim), ``q`` and ``k``
        rotated to ``positions``."""
        batch, seq, _ = x.shape
        heads, head_dim, rotary_dim = self.layout.heads_per_shard, self.config.head_dim, self.config.rotary_dim
        qk, v = ops.split(self.qkv(x), [2 * heads * head_dim, heads * head_dim], axis=-1)
        sin, cos = self.trig_constants(x.dtype)
        # Queries and keys rotate as one tensor of twice the heads: one table lookup and one rotation.
        qk = rotary_embedding(qk.reshape((batch, seq, 2 * heads, head_dim)), sin, cos, positions, rotary_dim)
        q, k = ops.split(qk, 2, axis=2)
        return q, k, v.reshape((batch, seq, heads, head_dim))

    def build(self, x: popxl.Tensor, positions: popxl.Tensor) -> popxl.Tensor:
        batch, seq, _ = x.shape
        heads, head_dim = self.layout.heads_per_shard, self.config.head_dim
        q, k, v = self.rotated_qkv(x, positions)
        z = causal_attention(q.transpose((0, 2, 1, 3)), k.transpose((0, 2, 3, 1)), v.transpose((0, 2, 1, 3)),
                             self.attention_serialisation)
        z = z.transpose((0, 2, 1, 3)).reshape((batch, seq, heads * head_dim))
        return self.out(z)


class MLP(addons.Module):
    """GPT-J feed-forward: column-sharded ``fc_in`` (+ bias), tanh GELU, row-sharded ``fc_out``."""

    def __init__(self, config: GPTJConfig, groups: TPGroups):
        super().__init__()
        self.fc_in = ColumnShardedLinear(tp_layout(config, groups.tp).inner_per_shard, groups)
        self.fc_out = RowShardedLinear(config.n_embd, groups, bias=True)

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        return self.fc_out(ops.gelu(self.fc_in(x)))


class DecoderBlock(addons.Module):
    """One GPT-J block with its parallel residual: ``x + attn(ln_1(x)) + mlp(ln_1(x))``.

    ``build(x, positions)``: ``x`` (batch, seq, n_embd) identical on every shard, ``positions``
    (batch, seq) int32 token positions (for the rotary embedding). Returns the new hidden states.
    Positions must lie in ``[0, n_positions)``: the rotary tables are gathered at them, which a graph
    cannot check as it runs (popxl_cpu reads the nearest row; on an IPU the result is undefined).
    """

    def __init__(self, config: GPTJConfig, groups: TPGroups, attention_serialisation: int = 1):
        super().__init__()
        self.eps = config.layer_norm_epsilon
        self.ln_1 = addons.layers.LayerNorm()
        self.attn = Attention(config, groups, attention_serialisation)
        self.mlp = MLP(config, groups)

    def build(self, x: popxl.Tensor, positions: popxl.Tensor) -> popxl.Tensor:
        h = self.ln_1(x, eps=self.eps)
        # transformers' order of the sums, so rounding matches too.
        return self.attn(h, positions) + self.mlp(h) + x

    @staticmethod
    def weight_maps(config: GPTJConfig, tp: int) -> List[WeightMap]:
        """This module's weights from one HF block's (``transformer.h.{i}.*``): per shard the fused
        ``[q | k | v]`` columns and ``out_proj`` rows of its heads, and its ``fc_in`` columns and
        ``fc_out`` rows."""
        lay = tp_layout(config, tp)
        e, i, d = config.n_embd, config.inner_size, config.head_dim
        return [
            Replicated("ln_1.weight", "ln_1.weight", (e,)),
            Replicated("ln_1.bias", "ln_1.bias", (e,)),
            FusedHeads("attn.qkv.weight", tuple(f"attn.{n}_proj.weight" for n in "qkv"), e, config.n_head, d,
                       lay.heads_per_shard, tp),
            Sharded("attn.out.weight", "attn.out_proj.weight", (e, e), 0, lay.heads_padded * d, tp, transpose=True),
            Sharded("mlp.fc_in.weight", "mlp.fc_in.weight", (i, e), 1, lay.inner_padded, tp, transpose=True),
            Sharded("mlp.fc_in.bias", "mlp.fc_in.bias", (i,), 0, lay.inner_padded, tp),
            Sharded("mlp.fc_out.weight", "mlp.fc_out.weight", (e, i), 0, lay.inner_padded, tp, transpose=True),
            Replicated("mlp.fc_out.bias", "mlp.fc_out.bias", (e,)),
        ]


class LMHead(addons.Module):
    """The head phase: ``ln_f`` and the vocab-sharded LM head.

    ``build(x)``: decoder output ``x`` (..., n_embd) -> this shard's logits (..., vocab_per_shard);
    padded vocabulary columns take the head's bias. ``inplace_bias`` as ``ColumnShardedLinear``'s
    (only where the graph is not differentiated). Variables ``ln_f.*`` and ``lm_head.*``.
    """

    def __init__(self, config: GPTJConfig, groups: TPGroups, inplace_bias: bool = False):
        super().__init__()
        self.config = config
        self.groups = groups
        self.ln_f = addons.layers.LayerNorm()
        self.lm_head = ColumnShardedLinear(tp_layout(config, groups.tp).vocab_per_shard, groups,
                                           inplace_bias=inplace_bias)

    def logits(self, hidden: popxl.Tensor) -> popxl.Tensor:
        """This shard's logits of ``hidden`` (after ``ln_f``)."""
        return self.lm_head(hidden)

    def token_loss(self, x: popxl.Tensor, shard_offset: popxl.Tensor, labels: popxl.Tensor,
                   reduction: str) -> popxl.Tensor:
        """transformers' shifted cross entropy of ``labels`` (batch, seq) given decoder output ``x``
        (batch, seq, n_embd): position ``t``'s logits scored against ``labels[:, t + 1]``, labels equal
        to ``IGNORE_INDEX`` skipped, reduced by ``reduction`` ("mean" or "sum"). float32 over the sharded
        logits, never gathered."""
        batch, seq = labels.shape
        hidden = self.ln_f(x, eps=self.config.layer_norm_epsilon)[:, : seq - 1]
        logits = self.logits(hidden.reshape((batch * (seq - 1), self.config.n_embd)))
        targets = labels[:, 1:].reshape((batch * (seq - 1),))
        return sharded_cross_entropy(logits, targets, shard_offset, self.groups, reduction)

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        return self.logits(self.ln_f(x, eps=self.config.layer_norm_epsilon))

    @staticmethod
    def weight_maps(config: GPTJConfig, tp: int) -> List[WeightMap]:
        """This module's weights from HF's ``transformer.ln_f`` and ``lm_head``: vocabulary sharded."""
        e, v, padded = config.n_embd, config.vocab_size, tp_layout(config, tp).vocab_padded
        return [
            Replicated("ln_f.weight", "transformer.ln_f.weight", (e,)),
            Replicated("ln_f.bias", "transformer.ln_f.bias", (e,)),
            Sharded("lm_head.weight", "lm_head.weight", (v, e), 1, padded, tp, transpose=True),
            Sharded("lm_head.bias", "lm_head.bias", (v,), 0, padded, tp),
        ]


class LMHeadLoss(LMHead):
    """The head phase with the weighted token loss instead of the logits.

    ``build(x, shard_offset, labels, loss_weight)``: decoder output ``x`` (batch, seq, n_embd); returns
    ``loss_weight`` times the summed ``token_loss`` of ``labels``, as ``GPTJLMWeightedLoss``.
    """

    def build(self, x: popxl.Tensor, shard_offset: popxl.Tensor, labels: popxl.Tensor,
              loss_weight: popxl.Tensor) -> popxl.Tensor:
        return self.token_loss(x, shard_offset, labels, "sum") * loss_weight


class GPTJLM(LMHead):
    """GPT-J causal LM: embedding, ``n_layer`` decoder blocks, then the head phase.

    An ``LMHead`` extended by the phases before it, so that the head's variables keep their names
    (``ln_f.*``, ``lm_head.*``) at the top level. One decoder-block graph is built and called once
    per layer with that layer's variables (``layers.{i}.*``). ``build(input_ids, shard_offset)``:
    ``input_ids`` (batch, seq) int32, ``shard_offset`` the first vocabulary entry of this replica's
    shard (scalar int32). Returns this shard's logits ``(batch, seq, vocab_per_shard)``.
    """

    # Whether autodiff runs over the graph (ops with no gradient rule, such as in-place adds, are avoided).
    differentiated = False

    def __init__(self, config: GPTJConfig, groups: TPGroups, dtype=popxl.float32, attention_serialisation: int = 1):
        super().__init__(config, groups, inplace_bias=not self.differentiated)
        self.dtype = dtype
        self.attention_serialisation = attention_serialisation
        self.embedding = Embedding(config, groups, dtype)

    def decoder_output(self, input_ids: popxl.Tensor, shard_offset: popxl.Tensor) -> popxl.Tensor:
        """Hidden states after the last decoder block, before ``ln_f``: ``(batch, seq, n_embd)``."""
        batch, seq = input_ids.shape
        positions = popxl.constant(np.tile(np.arange(seq, dtype=np.int32), (batch, 1)), name="positions")
        x = self.embedding(input_ids, shard_offset)
        block = DecoderBlock(self.config, self.groups, self.attention_serialisation)
        facts, graph = block.create_graph(x, positions)
        for i in range(self.config.n_layer):
            x, = graph.bind(self.add_variable_inputs(f"layers.{i}", facts)).call(x, positions)
        return x

    def build(self, input_ids: popxl.Tensor, shard_offset: popxl.Tensor) -> popxl.Tensor:
        return super().build(self.decoder_output(input_ids, shard_offset))


class GPTJLMLoss(GPTJLM):
    """``GPTJLM`` with transformers' causal-LM loss instead of the logits.

    ``build(input_ids, shard_offset, labels)``: the mean ``token_loss`` of ``labels``.
    """

    differentiated = True

    def build(self, input_ids: popxl.Tensor, shard_offset: popxl.Tensor, labels: popxl.Tensor) -> popxl.Tensor:
        return self.token_loss(self.decoder_output(input_ids, shard_offset), shard_offset, labels, "mean")


class GPTJLMWeightedLoss(GPTJLMLoss):
    """``GPTJLMLoss`` summed over the non-ignored tokens and multiplied by ``loss_weight``.

    ``build(input_ids, shard_offset, labels, loss_weight)``: with ``loss_weight`` one over the
    token count of a whole batch split into parts, the parts' losses (and gradients) add up to the
    batch's mean loss whatever the split.
    """

    def build(self, input_ids: popxl.Tensor, shard_offset: popxl.Tensor, labels: popxl.Tensor,
              loss_weight: popxl.Tensor) -> popxl.Tensor:
        x = self.decoder_output(input_ids, shard_offset)
        return self.token_loss(x, shard_offset, labels, "sum") * loss_weight


def sharded_cross_entropy(logits: popxl.Tensor, labels: popxl.Tensor, shard_offset: popxl.Tensor,
                          groups: TPGroups, reduction: str = "mean") -> popxl.Tensor:
    """Mean (or, with ``reduction="sum"``, summed) float32 cross entropy of ``labels`` (full-vocabulary
    ids, ``IGNORE_INDEX`` skipped) over vocab-sharded ``logits`` ``(tokens, vocab_per_shard)``."""
    # The loss op takes labels relative to the shard, and the ignore index in the same frame.
    ignore = popxl.constant(IGNORE_INDEX, popxl.int32, name="ignore_index") - shard_offset
    return addons.ops.cross_entropy_sharded_loss(cast_to(logits, popxl.float32), labels - shard_offset,
                                                 ignore_index=ignore, replica_grouping=groups.tp_group,
                                                 reduction=reduction)
