"""A popxl-addons program: one SGD step of a tensor-parallel feed-forward layer.

Written for the Poplar SDK's popxl and popxl-addons (as Graphcore's applications are); nothing in it
knows about the CPU runtime. Run it with
``python -m gptj_popxl.popxl_cpu tests/programs/tp_ffn_addons.py OUT_DIR``. The layer's first matmul
is split by columns and the second by rows over TP replicas (Megatron style). It writes
OUT_DIR/result.npz (data, full initial weights, loss, full weights after the step) and a TaskSession
checkpoint OUT_DIR/checkpoint.
"""
import os
import sys

import numpy as np
import popxl
import popxl_addons as addons
from popxl import ops
from popxl_addons import TaskSession, host_load
from popxl_addons.array_munging import shard, unshard
from popxl_addons.layers import Linear
from popxl_addons.ops.replicated_all_reduce_TP import (replicated_all_reduce_identical_grad_inputs,
                                                       replicated_all_reduce_identical_inputs)
from popxl_addons.patterns import apply_pre_alias_patterns

TP, BATCH, HIDDEN, FF, LR = 2, 4, 8, 16, 0.1


class FeedForwardTP(addons.Module):
    def __init__(self, shards):
        super().__init__()
        self.fc1 = Linear(FF // TP, replica_grouping=shards)
        self.fc2 = Linear(HIDDEN, bias=False, replica_grouping=shards)

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        x = replicated_all_reduce_identical_inputs(x)
        y = self.fc2(ops.gelu(self.fc1(x)))
        return replicated_all_reduce_identical_grad_inputs(y)


class MSE(addons.Module):
    def __init__(self, shards):
        super().__init__()
        self.ffn = FeedForwardTP(shards)

    def build(self, x: popxl.Tensor, target: popxl.Tensor) -> popxl.Tensor:
        diff = self.ffn(x) - target
        return ops.mean(diff * diff)


def main(out_dir: str) -> None:
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(BATCH, HIDDEN)).astype(np.float32),
            "target": rng.normal(size=(BATCH, HIDDEN)).astype(np.float32),
            "W1": rng.normal(0, 0.5, (HIDDEN, FF)).astype(np.float32),
            "b1": rng.normal(0, 0.1, FF).astype(np.float32),
            "W2": rng.normal(0, 0.5, (FF, HIDDEN)).astype(np.float32)}

    ir = popxl.Ir(replication=TP)
    with ir.main_graph:
        x_data, x_stream, x = host_load(data["x"], popxl.float32, "x")
        t_data, t_stream, target = host_load(data["target"], popxl.float32, "target")
        shards = ir.replica_grouping(group_size=1)  # every replica holds its own shard
        facts, fwd = MSE(shards).create_graph(x, target)
        grad = addons.autodiff(fwd, grads_required=fwd.args.tensors)
        state = facts.init()
        fwd_info = fwd.bind(state).call_with_info(x, target)
        (loss,) = fwd_info.outputs[:1]
        grads = grad.call(popxl.constant(1.0, popxl.float32), args=grad.grad_graph_info.inputs_dict(fwd_info))
        variables = fwd.args.to_mapping(state)  # graph input -> its variable
        for graph_input, g in zip(fwd.args.tensors, grads):
            ops.scaled_add_(variables[graph_input], g, b=-LR)
        loss_stream = popxl.d2h_stream(loss.shape, loss.dtype, "loss")
        ops.host_store(loss_stream, loss)
    apply_pre_alias_patterns(ir, level="default")

    session = TaskSession([x_stream, t_stream], [loss_stream], state, ir=ir, device_desc="ipu_hw")
    session.write_variables_data({state.ffn.fc1.weight: shard(data["W1"], TP, 1),
                                  state.ffn.fc1.bias: shard(data["b1"], TP, 0),
                                  state.ffn.fc2.weight: shard(data["W2"], TP, 0)})
    with session:
        replicas = lambda a: np.stack([a] * TP)  # noqa: E731 - the same batch on every TP replica
        out = session.run({x_stream: replicas(x_data), t_stream: replicas(t_data)})
        session.save_checkpoint(os.path.join(out_dir, "checkpoint"))
        after = session.get_named_tensors_data()
    np.savez(os.path.join(out_dir, "result.npz"), **data, loss=out[loss_stream],
             final_W1=unshard(after.ffn.fc1.weight, 1), final_b1=unshard(after.ffn.fc1.bias, 0),
             final_W2=unshard(after.ffn.fc2.weight, 0), steps=session.session_state["steps"])


if __name__ == "__main__":
    main(sys.argv[1])
