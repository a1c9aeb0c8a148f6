"""Program builders of the forward model: next-token logits, and the loss with every parameter's
gradient (one batch, no update)."""
from typing import Mapping, Optional

import numpy as np

from gptj_popxl.backend import popxl
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.layers import GPTJLM, GPTJLMLoss, tp_groups
from gptj_popxl.programs.common import (Program, WeightMemory, attached_session, create_variables, input_streams,
                                        output_stream, shard_offset, share_weight_memory)
from gptj_popxl.programs.execution import ExecutionConfig


def build_logits(config: GPTJConfig, execution: ExecutionConfig, weights: Mapping[str, np.ndarray],
                 batch: int, seq: int, attach: bool = True, weight_memory: Optional[WeightMemory] = None) -> Program:
    """Logits of ``(batch, seq)`` int32 ``input_ids``: output ``logits``, this replica's vocabulary
    shard ``(batch, seq, vocab_per_shard)`` (padded columns hold the head's bias). Without ``attach``
    it has no session (``session`` None): a program to analyse, not to run. ``weight_memory``: where
    the weights live, shared with other programs (``share_weight_memory``)."""
    tp = execution.tensor_parallel
    ir = popxl.Ir(replication=tp)
    with ir.main_graph:
        groups = tp_groups(ir, tp)
        streams, (ids,) = input_streams((batch, seq), ["input_ids"])
        offset = shard_offset(config, tp, groups)
        model = GPTJLM(config, groups, execution.popxl_dtype, execution.attention_serialisation)
        facts, graph = model.create_graph(ids, offset)
        variables = create_variables(facts, weights)
        shared = share_weight_memory(variables, weight_memory, tp, attach)
        logits, = graph.bind(variables).call(ids, offset)
        outputs = {"logits": output_stream("logits", logits)}
    return Program(ir, attached_session(ir, attach), variables, streams, outputs, shared_weights=shared)


def build_loss_and_grads(config: GPTJConfig, execution: ExecutionConfig, weights: Mapping[str, np.ndarray],
                         batch: int, seq: int, weight_memory: Optional[WeightMemory] = None) -> Program:
    """transformers' causal-LM loss of ``labels`` given ``input_ids`` (both ``(batch, seq)`` int32) and
    its gradient: outputs ``loss`` and one per parameter (our names, each replica's shard).
    ``weight_memory`` as in ``build_logits``."""
    tp = execution.tensor_parallel
    ir = popxl.Ir(replication=tp)
    with ir.main_graph:
        groups = tp_groups(ir, tp)
        streams, (ids, labels) = input_streams((batch, seq), ["input_ids", "labels"])
        offset = shard_offset(config, tp, groups)
        model = GPTJLMLoss(config, groups, execution.popxl_dtype, execution.attention_serialisation)
        facts, fwd = model.create_graph(ids, offset, labels)
        names = list(fwd.args.to_dict())
        grad = fwd.autodiff(grads_required=[fwd.args.to_dict()[n] for n in names])
        variables = create_variables(facts, weights)
        shared = share_weight_memory(variables, weight_memory, tp, True)
        info = fwd.bind(variables).call_with_info(ids, offset, labels)
        loss = info.outputs[0]
        grads = grad.call(popxl.constant(1.0, popxl.float32, name="loss_grad"),
                          args=grad.grad_graph_info.inputs_dict(info))
        outputs = {"loss": output_stream("loss", loss)}
        outputs.update({name: output_stream("grad." + name, g) for name, g in zip(names, grads)})
    return Program(ir, attached_session(ir), variables, streams, outputs, shared_weights=shared)
