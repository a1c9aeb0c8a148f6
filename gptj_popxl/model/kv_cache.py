"""GPT-J layers that read and write a key/value cache, for generation.

They reuse ``layers``' classes and variable names (``layers.{i}.attn.qkv.weight``, ...), so the
same host weights bind. The cache of one layer is a pair of tensors ``(batch, heads_per_shard,
cache_len, head_dim)`` per shard: keys (rotated) and values, sharded over heads like the
attention. A row's cache columns are addressed by the host: the prompt fills columns
``[0, prompt_bucket)`` (left padded), and decode step ``t`` writes one column per row.

Masks are additive float32 ``(batch, 1, queries, keys)``: 0 where a query may attend, the
float32 minimum where not (never summed, so fully masked rows stay finite).
"""
from typing import List, Optional, Sequence, Tuple

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl
from gptj_popxl.model.layers import Attention, DecoderBlock, GPTJLM, attend


class CachedAttention(Attention):
    """``Attention`` over all cache columns, returning this call's keys and values too.

    ``build(x, positions, mask, k_cache=None, v_cache=None, write=None)``:

    - prefill (no cache): ``x`` (batch, seq, n_embd) attends to itself under ``mask``
      (batch, 1, seq, seq); returns ``(out, k, v)`` with ``k``, ``v`` (batch, heads, seq, head_dim).
    - decode: ``x`` (batch, 1, n_embd); its key and value are written into the caches at column
      ``write`` (batch, heads_per_shard, 1, head_dim) int32 (each row's column, repeated; columns
      past the cache are dropped), then the query attends to the cache under ``mask``
      (batch, 1, 1, cache_len); returns ``(out, new_k_cache, new_v_cache)``.
    """

    def build(self, x: popxl.Tensor, positions: popxl.Tensor, mask: popxl.Tensor,
              k_cache: Optional[popxl.Tensor] = None, v_cache: Optional[popxl.Tensor] = None,
              write: Optional[popxl.Tensor] = None):
        batch, seq, _ = x.shape
        q, k, v = (t.transpose((0, 2, 1, 3)) for t in self.rotated_qkv(x, positions))
        if k_cache is not None:
            # A scatter copies the cache once; a broadcasting where would be several times slower.
            k = ops.scatter(k_cache, write, k, axis=2)
            v = ops.scatter(v_cache, write, v, axis=2)
        z = attend(q, k.transpose((0, 1, 3, 2)), v, mask)
        z = z.transpose((0, 2, 1, 3)).reshape((batch, seq, self.layout.heads_per_shard * self.config.head_dim))
        return self.out(z), k, v


class CachedDecoderBlock(DecoderBlock):
    """``DecoderBlock`` whose attention is a ``CachedAttention``; ``build`` takes and returns its
    arguments and results (hidden states, then keys and values)."""

    def __init__(self, config, groups, attention_serialisation: int = 1):
        super().__init__(config, groups, attention_serialisation)
        self.attn = CachedAttention(config, groups)

    def build(self, x: popxl.Tensor, positions: popxl.Tensor, mask: popxl.Tensor, *cache: popxl.Tensor):
        h = self.ln_1(x, eps=self.eps)
        a, k, v = self.attn(h, positions, mask, *cache)
        return a + self.mlp(h) + x, k, v


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

    def _layer_variables(self, i: int, facts):
        if not self.offload:
            return self.add_variable_inputs(f"layers.{i}", facts)
        if self.layer_buffers is None:
            self.layer_factories = facts
            self.layer_buffers = addons.named_variable_buffers(facts, entries=self.config.n_layer,
                                                               shard_over_dict=False)
        return addons.load_remote(self.layer_buffers, entry=i)

    def _blocks(self, x, positions, mask, *per_layer_args
                ) -> Tuple[popxl.Tensor, List[popxl.Tensor], List[popxl.Tensor]]:
        """Every layer on ``x``; ``per_layer_args`` are lists with one extra block argument per layer.
        Returns the final hidden states after ``ln_f`` and each layer's keys and values."""
        block = CachedDecoderBlock(self.config, self.groups)
        facts, graph = block.create_graph(x, positions, mask, *[a[0] for a in per_layer_args])
        ks, vs = [], []
        for i in range(self.config.n_layer):
            variables = self._layer_variables(i, facts)
            x, k, v = graph.bind(variables).call(x, positions, mask, *[a[i] for a in per_layer_args])
            ks.append(k)
            vs.append(v)
        return self.ln_f(x, eps=self.config.layer_norm_epsilon), ks, vs

    def prefill(self, input_ids: popxl.Tensor, positions: popxl.Tensor, mask: popxl.Tensor,
                shard_offset: popxl.Tensor):
        """Last position's logits shard (batch, vocab_per_shard) and every layer's keys and values."""
        batch, seq = input_ids.shape
        hidden, ks, vs = self._blocks(self.embedding(input_ids, shard_offset), positions, mask)
        last = hidden[:, seq - 1:seq].reshape((batch, self.config.n_embd))
        return self.logits(last), ks, vs

    def decode(self, token: popxl.Tensor, position: popxl.Tensor, mask: popxl.Tensor, write: popxl.Tensor,
               shard_offset: popxl.Tensor, k_caches: Sequence[popxl.Tensor], v_caches: Sequence[popxl.Tensor]):
        """One token per row: its logits shard (batch, vocab_per_shard) and the updated caches."""
        batch = token.shape[0]
        writes = [write] * self.config.n_layer
        hidden, ks, vs = self._blocks(self.embedding(token, shard_offset), position, mask, k_caches, v_caches, writes)
        return self.logits(hidden.reshape((batch, self.config.n_embd))), ks, vs
