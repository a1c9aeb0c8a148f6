"""GPT-J layers that read and write a key/value cache, for generation.

They reuse ``layers``' classes and variable names (``layers.{i}.attn.qkv.weight``, ...), so the
same host weights bind. The cache of one layer is a pair of tensors per shard, sharded over heads
like the attention: the rotated keys transposed, ``(batch, heads_per_shard, head_dim,
cache_len)`` (as the attention reads them: a view of a tensor written in place would be a copy),
and the values ``(batch, heads_per_shard, cache_len, head_dim)``. Its columns are a ring
addressed by the host: at a decode step every row writes the same column, in place (the cache
is never copied); a refilled row's prompt fills the columns just before it, and the mask says
which columns each row attends to.

Every linear layer here multiplies with ``streamed_matmul``: a decode step has one row per
sequence, and that op forms few-row products by BLAS or by reading each weight once for all rows,
whichever it timed faster (larger products stay ``ops.matmul``). On the CPU runtime a float32 or
float16 decode step on one shard runs each layer as one ``decode_layer`` op (``decode_kernels``), which also
writes the new key and value into the caches, and a prefill of up to ``MAX_ROWS`` tokens as one
``prefill_layer`` op; with every layer resident a greedy run of the decode loop (its steps and their
bookkeeping) is one ``greedy_decode_steps`` op.

Masks are additive float32 ``(batch, 1, queries, keys)``: 0 where a query may attend, the
float32 minimum where not (never summed, so fully masked rows stay finite).
"""
from typing import List, Optional, Sequence, Tuple

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl
from gptj_popxl.model.decode_kernels import (MAX_ROWS, can_decode_layer, decode_layer, greedy_decode_steps,
                                             greedy_head, prefill_layer, streamed_matmul)
from gptj_popxl.model.layers import Attention, DecoderBlock, GPTJLM, attend


def _streamed(*linears) -> None:
    """Makes the linear layers ``linears`` multiply with ``streamed_matmul``."""
    for linear in linears:
        linear.product = streamed_matmul


class CachedAttention(Attention):
    """``Attention`` over all cache columns, returning this call's keys and values too.

    ``build(x, positions, mask, k_cache=None, v_cache=None, write=None)``:

    - prefill (no cache): ``x`` (batch, seq, n_embd) attends to itself under ``mask``
      (batch, 1, seq, seq); returns ``(out, k, v)`` with ``k``, ``v`` (batch, heads, seq, head_dim).
    - decode: ``x`` (batch, 1, n_embd); its key and value are written in place into the caches
      (layouts in the module doc) at column ``write`` (1,) int32, the same for every row, then the
      query attends to the cache under ``mask`` (batch, 1, 1, cache_len); returns ``out``.
    """

    def __init__(self, config, groups, attention_serialisation: int = 1):
        super().__init__(config, groups, attention_serialisation)
        _streamed(self.qkv, self.out)

    def build(self, x: popxl.Tensor, positions: popxl.Tensor, mask: popxl.Tensor,
              k_cache: Optional[popxl.Tensor] = None, v_cache: Optional[popxl.Tensor] = None,
              write: Optional[popxl.Tensor] = None):
        batch, seq, _ = x.shape
        q, k, v = (t.transpose((0, 2, 1, 3)) for t in self.rotated_qkv(x, positions))
        k_t = k.transpose((0, 1, 3, 2))
        if k_cache is not None:
            k_t = ops.dynamic_update_(k_cache, write, k_t, axes=[3], sizes=[1], no_overlap=True)
            v = ops.dynamic_update_(v_cache, write, v, axes=[2], sizes=[1], no_overlap=True)
        z = attend(q, k_t, v, mask)
        z = z.transpose((0, 2, 1, 3)).reshape((batch, seq, self.layout.heads_per_shard * self.config.head_dim))
        out = self.out(z)
        return out if k_cache is not None else (out, k, v)


class CachedDecoderBlock(DecoderBlock):
    """``DecoderBlock`` whose attention is a ``CachedAttention``; ``build`` takes its arguments and
    returns the hidden states, with the keys and values in prefill. The caches are passed by
    reference, so the decode writes reach the caller's tensors."""

    def __init__(self, config, groups, attention_serialisation: int = 1):
        super().__init__(config, groups, attention_serialisation)
        self.attn = CachedAttention(config, groups)
        _streamed(self.mlp.fc_in, self.mlp.fc_out)

    def build(self, x: popxl.Tensor, positions: popxl.Tensor, mask: popxl.Tensor,
              k_cache: popxl.TensorByRef = None, v_cache: popxl.TensorByRef = None, write: popxl.Tensor = None):
        # The C++ kernels for a decode step, and for a prefill of few rows: at 256 tokens the kernel's
        # attention (a head at a time, 1.55 ms a layer) is slower than the graph's batched one.
        few_rows = k_cache is not None or x.shape[0] * x.shape[1] <= MAX_ROWS
        if can_decode_layer(x.dtype, self.attn.groups.tp) and few_rows:
            weights, sin, cos = self._kernel_weights(x)
            if k_cache is not None:
                return decode_layer(x, *weights, positions, sin, cos, k_cache, v_cache, write, mask, self.eps)
            return prefill_layer(x, *weights, positions, sin, cos, mask, self.eps, self.attn.layout.heads_per_shard)
        h = self.ln_1(x, eps=self.eps)
        if k_cache is None:
            a, k, v = self.attn(h, positions, mask)
            return a + self.mlp(h) + x, k, v
        return self.attn(h, positions, mask, k_cache, v_cache, write) + self.mlp(h) + x

    # A layer's variables in decode_layer's argument order, by the names this block gives them.
    DECODE_WEIGHTS = ("ln_1.weight", "ln_1.bias", "attn.qkv.weight", "mlp.fc_in.weight", "mlp.fc_in.bias",
                      "attn.out.weight", "mlp.fc_out.weight", "mlp.fc_out.bias")

    @classmethod
    def decode_weights(cls, variables: addons.NamedTensors) -> Tuple[popxl.Tensor, ...]:
        """A layer's variables (named as this block's build names them) in ``decode_layer``'s order."""
        named = variables.to_dict()
        return tuple(named[name] for name in cls.DECODE_WEIGHTS)

    def _kernel_weights(self, x):
        """``(weights, sin, cos)`` for the C++ layer kernels (``decode_layer``, ``prefill_layer``): the
        sub-modules' variables in the kernels' order, declared as their own builds declare them (same
        names, shapes, groupings and initial values), and the rotary tables."""
        attn, mlp, n_embd, dtype = self.attn, self.mlp, x.shape[-1], x.dtype
        w_qkv, _ = attn.qkv.variables(n_embd, dtype)
        w_in, b_in = mlp.fc_in.variables(n_embd, dtype)
        w_out, _ = attn.out.variables(w_qkv.shape[-1] // 3, dtype)
        w_fc_out, b_fc_out = mlp.fc_out.variables(w_in.shape[-1], dtype)
        weights = (*self.ln_1.variables(n_embd, dtype), w_qkv, w_in, b_in, w_out, w_fc_out, b_fc_out)
        return (weights, *attn.trig_constants(popxl.float32))


class CachedLM(GPTJLM):
    """``GPTJLM`` run over a KV cache: embedding, cached blocks, ``ln_f`` and the sharded head.

    Not a graph by itself: ``prefill`` and ``decode`` are called inside a program module's
    ``build`` (they add the model's variable inputs to that graph).

    With ``offload``, the decoder layers' weights are not variable inputs: they are loaded from
    remote buffers one layer at a time, just before the layer runs. After the build,
    ``layer_factories`` describes one layer's variables and ``layer_buffers`` holds their
    buffers (entry ``i``: layer ``i``), for the program to create the remote variables.
    """

    def __init__(self, config, groups, dtype=popxl.float32, offload: bool = False):
        super().__init__(config, groups, dtype)
        self.offload = offload
        self.layer_factories = self.layer_buffers = None
        _streamed(self.lm_head)

    def _layer_variables(self, i: int, facts):
        if not self.offload:
            return self.add_variable_inputs(f"layers.{i}", facts)
        if self.layer_buffers is None:
            self.layer_factories = facts
            self.layer_buffers = addons.named_variable_buffers(facts, entries=self.config.n_layer,
                                                               shard_over_dict=False)
        return addons.load_remote(self.layer_buffers, entry=i)

    def _blocks(self, x, positions, mask, *per_layer_args) -> Tuple[popxl.Tensor, List[Tuple[popxl.Tensor, ...]]]:
        """Every layer on ``x``; ``per_layer_args`` are lists with one extra block argument per layer.
        Returns the last layer's hidden states (before ``ln_f``) and each layer's other outputs."""
        block = CachedDecoderBlock(self.config, self.groups)
        facts, graph = block.create_graph(x, positions, mask, *[a[0] for a in per_layer_args])
        others = []
        for i in range(self.config.n_layer):
            variables = self._layer_variables(i, facts)
            x, *rest = graph.bind(variables).call(x, positions, mask, *[a[i] for a in per_layer_args])
            others.append(rest)
        return x, others

    def prefill(self, input_ids: popxl.Tensor, positions: popxl.Tensor, mask: popxl.Tensor,
                shard_offset: popxl.Tensor):
        """Last position's logits shard (batch, vocab_per_shard) and every layer's keys and values."""
        batch, seq = input_ids.shape
        hidden, kvs = self._blocks(self.embedding(input_ids, shard_offset), positions, mask)
        last = hidden[:, seq - 1:seq].reshape((batch, self.config.n_embd))
        logits = self.logits(self.ln_f(last, eps=self.config.layer_norm_epsilon))
        return logits, [k for k, _ in kvs], [v for _, v in kvs]

    def decode(self, token: popxl.Tensor, position: popxl.Tensor, mask: popxl.Tensor, write: popxl.Tensor,
               shard_offset: popxl.Tensor, k_caches: Sequence[popxl.Tensor], v_caches: Sequence[popxl.Tensor]):
        """One token per row: its logits shard (batch, vocab_per_shard); the caches are written in place."""
        hidden = self._decode_hidden(token, position, mask, write, shard_offset, k_caches, v_caches)
        hidden = hidden.reshape((token.shape[0], self.config.n_embd))
        return self.logits(self.ln_f(hidden, eps=self.config.layer_norm_epsilon))

    def decode_greedy(self, token: popxl.Tensor, position: popxl.Tensor, mask: popxl.Tensor, write: popxl.Tensor,
                      shard_offset: popxl.Tensor, k_caches: Sequence[popxl.Tensor],
                      v_caches: Sequence[popxl.Tensor]) -> popxl.Tensor:
        """As ``decode``, but the greedy next token (batch,) int32 of each row, by the layers then one
        ``greedy_head`` op (``ln_f``, the LM head and the argmax; their variables declared as their own
        builds declare them). Only where ``can_decode_layer`` holds; with every layer resident, a run
        of the decode loop is one op (``greedy_steps``)."""
        n_embd, dtype, eps = self.config.n_embd, self.dtype, self.config.layer_norm_epsilon
        hidden = self._decode_hidden(token, position, mask, write, shard_offset, k_caches, v_caches)
        return greedy_head(hidden, *self.ln_f.variables(n_embd, dtype), *self.lm_head.variables(n_embd, dtype), eps)

    def greedy_steps(self, token, position, column, mask, tokens, step, k_caches, v_caches, steps: int) -> Tuple:
        """``steps`` iterations of the greedy decode loop with every layer resident, as one
        ``greedy_decode_steps`` op (the steps and the loop's bookkeeping: see that op); returns the
        loop's carried values ``(token, position, column, mask, tokens, step)`` after them. The
        variables are declared as the modules' own builds declare them. Only where
        ``can_decode_layer`` holds and not offloaded."""
        n_embd, dtype, eps = self.config.n_embd, self.dtype, self.config.layer_norm_epsilon
        block = CachedDecoderBlock(self.config, self.groups)
        hidden = popxl.TensorSpec((token.shape[0], 1, n_embd), dtype)
        facts, _ = block.create_graph(hidden, position, mask, k_caches[0], v_caches[0], column)
        layers = [block.decode_weights(self._layer_variables(i, facts)) for i in range(self.config.n_layer)]
        sin, cos = block.attn.trig_constants(popxl.float32)
        return greedy_decode_steps(token, position, column, mask, tokens, step, self.embedding.word.variables(),
                                   layers, sin, cos, k_caches, v_caches, *self.ln_f.variables(n_embd, dtype),
                                   *self.lm_head.variables(n_embd, dtype), eps, self.config.n_positions, steps)

    def _decode_hidden(self, token, position, mask, write, shard_offset, k_caches, v_caches) -> popxl.Tensor:
        """The last layer's hidden states (batch, 1, n_embd) of a decode step."""
        writes = [write] * self.config.n_layer
        hidden, _ = self._blocks(self.embedding(token, shard_offset), position, mask, k_caches, v_caches, writes)
        return hidden
