"""The training step program: one optimizer step on one global batch, all on the device.

Each replica runs ``gradient_accumulation`` micro-batches of ``micro_batch_size`` rows through the
loss and its gradient, accumulating float32 gradients. Each micro-batch's loss is its summed token
cross entropy times ``loss_weight`` (one over the token count of the whole global batch, from the
host), so the sum over micro-batches and data-parallel replicas is exactly transformers' mean loss
of the global batch, and so are its gradients. Then: gradients summed over the data-parallel group,
unscaled (``1 / loss_scaling``) and clipped by their global norm as ``torch.nn.utils.clip_grad_norm_``
does, and applied by AdamW as ``torch.optim.AdamW`` computes it (decoupled weight decay, bias
correction, eps outside the square root). float16 programs keep float32 master weights and moments
and copy the updated masters into the float16 weights. With ``skip_nonfinite`` (dynamic loss
scaling) a step whose gradients hold an inf or NaN changes nothing.

The per-step scalars come from the host (``STEP_SCALARS``), so the learning-rate schedule and the
bias corrections follow the step counter kept there.
"""
import dataclasses
from typing import Dict, Mapping

import numpy as np

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl
from gptj_popxl.popxl_cpu.memory import MemoryReport, memory_report
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.hf_mapping import popxl_param_shapes
from gptj_popxl.model.layers import GPTJLMWeightedLoss, tp_groups
from gptj_popxl.programs.common import attached_session, create_variables, input_streams, output_stream, shard_offset
from gptj_popxl.programs.execution import ExecutionConfig

# Host-computed float32 scalars of one step: ``loss_weight`` (1 / tokens of the global batch),
# ``loss_scaling`` (the gradient seed), ``inverse_loss_scaling``, and AdamW's ``decay_factor``
# (1 - lr * weight_decay), ``update_scale`` (-lr / (1 - beta1^t) * sqrt(1 - beta2^t)) and ``scaled_eps``
# (eps * sqrt(1 - beta2^t)) at step t.
STEP_SCALARS = ("loss_weight", "loss_scaling", "inverse_loss_scaling", "decay_factor", "update_scale", "scaled_eps")

# clip_grad_norm_'s guard against a zero norm.
CLIP_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class OptimizerConstants:
    """AdamW and clipping constants baked into the program."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    max_grad_norm: float
    skip_nonfinite: bool


def decays(name: str) -> bool:
    """Whether parameter ``name`` (our layout) takes weight decay: all but biases and LayerNorm weights,
    as transformers' Trainer groups them."""
    return not (name.endswith(".bias") or name.startswith("ln_") or ".ln_" in name)


@dataclasses.dataclass
class TrainingProgram:
    """A compiled training step.

    Attributes:
        ir, session: the program and its attached session.
        execution: its execution config.
        weights: the model's (compute-dtype) variables by our parameter name.
        master: the float32 weights the optimizer updates (``weights`` itself for float32).
        first_order, second_order: AdamW's moments, float32, by parameter name.
        inputs: streams ``input_ids``, ``labels`` ``(gradient_accumulation, micro_batch_size, seq)``
            and one scalar per ``STEP_SCALARS`` name.
        outputs: ``loss`` (the global batch's), ``grad_norm`` (unscaled, before clipping) and
            ``finite`` (1 when every gradient is finite).
        layout_shapes: our layout's shape of each parameter.
        buffer_kinds: kind of each remote buffer by id ("weights", "optimizer", "gradients",
            "activations", "io"); the phased program's.
    """

    ir: object
    session: object
    execution: ExecutionConfig
    weights: addons.NamedTensors
    master: addons.NamedTensors
    first_order: addons.NamedTensors
    second_order: addons.NamedTensors
    inputs: Dict[str, object]
    outputs: Dict[str, object]
    layout_shapes: Dict[str, tuple]
    buffer_kinds: Dict[int, str] = dataclasses.field(default_factory=dict)

    def memory_report(self) -> MemoryReport:
        """Static per-replica device memory of the step (``popxl_cpu.memory``): peak, per phase by kind
        (weights, gradients, optimizer state, activations), resident variables and remote buffers."""
        kinds = self.buffer_kinds

        def kind_of(t):
            op = t._producer
            if op.prim.name == "remote_load":
                kind = kinds.get(op.attrs["buffer"].remote_buffer_id)
                return kind if kind in ("weights", "optimizer", "gradients") else None
            return "gradients" if op.prim.name == "init" and "accum" in t.name else None

        def variable_kind(v):
            return "optimizer" if v.name.split(".", 1)[0] in ("first_order", "second_order", "master") else "weights"

        return memory_report(self.ir, kind_of, variable_kind, lambda b: kinds.get(b.remote_buffer_id, "other"))

    def run(self, input_ids: np.ndarray, labels: np.ndarray, scalars: Mapping[str, float]) -> Dict[str, float]:
        """One step on a global batch ``(rows, seq)`` split over the data-parallel replicas (row blocks
        in replica order), then over micro-batches. Returns ``loss``, ``grad_norm`` and ``finite``."""
        ex = self.execution
        feed = {}
        for name, rows in (("input_ids", input_ids), ("labels", labels)):
            per_copy = np.asarray(rows, np.int32).reshape(
                (ex.data_parallel, ex.gradient_accumulation, ex.micro_batch_size, -1))
            # Replica r is tensor shard r % tp of data-parallel copy r // tp.
            feed[self.inputs[name]] = np.repeat(per_copy, ex.tensor_parallel, axis=0) if ex.replicas > 1 \
                else per_copy[0]
        for name in STEP_SCALARS:
            value = np.float32(scalars[name])
            feed[self.inputs[name]] = np.full((ex.replicas,), value) if ex.replicas > 1 else value
        out = self.session.run(feed)
        return {name: float(np.asarray(out[stream]).reshape(-1)[0]) for name, stream in self.outputs.items()}

    def state_to_host(self) -> Dict[str, Dict[str, np.ndarray]]:
        """``weights`` (float32 masters), ``first_order`` and ``second_order`` in our layout."""
        self.session.weights_to_host()
        state = {}
        for kind, tensors in (("weights", self.master), ("first_order", self.first_order),
                              ("second_order", self.second_order)):
            by_name = tensors.to_dict()
            data = self.session.get_tensors_data(list(by_name.values()))
            state[kind] = {name: data[v].reshape(self.layout_shapes[name]) for name, v in by_name.items()}
        return state

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Write ``state`` (as ``state_to_host`` returns it) into the device."""
        data = {}
        kinds = {"weights": self.master, "first_order": self.first_order, "second_order": self.second_order}
        for kind, tensors in kinds.items():
            for name, v in tensors.to_dict().items():
                data[v] = np.asarray(state[kind][name], dtype=np.float32).reshape(v.shape_on_host)
        if self.master is not self.weights:
            for name, v in self.weights.to_dict().items():
                data[v] = np.asarray(state["weights"][name], dtype=np.float32).reshape(v.shape_on_host).astype(
                    v.dtype.as_numpy())
        self.session.write_variables_data(data)


def _state_like(v: popxl.Tensor, name: str) -> popxl.Tensor:
    """A float32 zero variable shaped and grouped as ``v``."""
    return popxl.variable(np.broadcast_to(np.float32(0), v.shape_on_host), popxl.float32, name,
                          replica_grouping=v.replica_grouping)


def _global_norm_squared(grads: Mapping[str, popxl.Tensor], sharded: Mapping[str, bool], groups) -> popxl.Tensor:
    """Sum of squares of every gradient over the whole model: tensor-parallel shards summed over the
    tensor-parallel group, replicated tensors counted once."""
    zero = popxl.constant(0.0, popxl.float32, name="zero")
    totals = {True: zero, False: zero}
    for name, g in grads.items():
        totals[sharded[name]] = totals[sharded[name]] + ops.sumsquare(g)
    across_shards = totals[True]
    if groups.tp > 1:
        across_shards = ops.collectives.replicated_all_reduce(across_shards, "add", groups.tp_group)
    return across_shards + totals[False]


def adamw(master, m, v, grad, scalars, constants: OptimizerConstants, decay: bool, finite):
    """AdamW's new ``(master, m, v)`` from float32 ``master``, moments ``m``, ``v`` and float32 ``grad``: as
    ``torch.optim.AdamW`` computes ``w * (1 - lr wd) - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``, with
    ``sqrt(bc2)`` moved into the step and eps (``update_scale``, ``scaled_eps``) so that it runs as
    popxl's in-place variable updates. ``scalars``: the step's tensors (``STEP_SCALARS``).

    ``finite``: None, to update ``master``, ``m`` and ``v`` in place and return them; or a bool scalar,
    to return new tensors, equal to the old ones where it is false (a skipped step).
    """
    c = constants
    a = scalars["decay_factor"] if decay else 1.0
    if finite is None:
        ops.var_updates.accumulate_moving_average_(m, grad, f=c.beta1)
        ops.var_updates.accumulate_moving_average_square_(v, grad, f=c.beta2)
        updater = ops.var_updates.adam_updater(m, v, epsilon=scalars["scaled_eps"])
        ops.scaled_add_(master, updater, a=a, b=scalars["update_scale"])
        return master, m, v

    def const(value, name):
        return popxl.constant(value, popxl.float32, name=name)

    m_new = m * const(c.beta1, "beta1") + grad * const(1 - c.beta1, "one_minus_beta1")
    v_new = v * const(c.beta2, "beta2") + grad * grad * const(1 - c.beta2, "one_minus_beta2")
    w_new = ops.scaled_add(master, m_new / (ops.sqrt(v_new) + scalars["scaled_eps"]), a=a, b=scalars["update_scale"])
    return tuple(ops.where(finite, n, old) for n, old in zip((w_new, m_new, v_new), (master, m, v)))


def clip_factor(norm: popxl.Tensor, max_grad_norm: float) -> popxl.Tensor:
    """``clip_grad_norm_``'s factor: ``min(max_norm / (norm + 1e-6), 1)``."""
    max_norm = popxl.constant(max_grad_norm, popxl.float32, name="max_grad_norm")
    return ops.clip(max_norm / (norm + popxl.constant(CLIP_EPS, popxl.float32, name="clip_eps")), max=1.0)


def build_training_step(config: GPTJConfig, execution: ExecutionConfig, weights: Mapping[str, np.ndarray],
                        seq: int, constants: OptimizerConstants, attach: bool = True) -> TrainingProgram:
    """The resident training step for ``(global rows, seq)`` batches, its variables loaded from ``weights``
    (float32, our layout); without ``attach``, no session (as ``phased.build_phased_training_step``)."""
    ex = execution
    ir = popxl.Ir(replication=ex.replicas)
    with ir.main_graph, popxl.in_sequence():
        groups = tp_groups(ir, ex.tensor_parallel)
        batch_shape = (ex.gradient_accumulation, ex.micro_batch_size, seq)
        streams, (ids, labels) = input_streams(batch_shape, ["input_ids", "labels"])
        scalar_streams, scalar_values = input_streams((), STEP_SCALARS, popxl.float32)
        streams.update(scalar_streams)
        scalars = dict(zip(STEP_SCALARS, scalar_values))
        offset = shard_offset(config, ex.tensor_parallel, groups)

        model = GPTJLMWeightedLoss(config, groups, ex.popxl_dtype, ex.attention_serialisation)
        micro_spec = popxl.TensorSpec((ex.micro_batch_size, seq), popxl.int32)
        facts, fwd = model.create_graph(micro_spec, offset, micro_spec, scalars["loss_weight"])
        names = list(fwd.args.to_dict())
        grad_graph = fwd.autodiff(grads_required=[fwd.args.to_dict()[n] for n in names])
        variables = create_variables(facts, weights)
        bound = fwd.bind(variables)

        loss, grads = None, None
        for micro in range(ex.gradient_accumulation):
            info = bound.call_with_info(ids[micro], offset, labels[micro], scalars["loss_weight"])
            micro_grads = grad_graph.call(scalars["loss_scaling"], args=grad_graph.grad_graph_info.inputs_dict(info))
            micro_grads = [g if g.dtype == popxl.float32 else ops.cast(g, popxl.float32) for g in micro_grads]
            loss = info.outputs[0] if loss is None else loss + info.outputs[0]
            # Summed into the first micro-batch's gradients, in place: no fresh tensor per micro-batch.
            grads = micro_grads if grads is None else [ops.var_updates.accumulate_(a, b)
                                                       for a, b in zip(grads, micro_grads)]
        if ex.data_parallel > 1:
            loss = ops.collectives.replicated_all_reduce(loss, "add", groups.sharded)
            grads = [ops.collectives.replicated_all_reduce_(g, "add", groups.sharded) for g in grads]
        grads = dict(zip(names, grads))  # still scaled by loss_scaling

        var_by_name = variables.to_dict()
        sharded = {name: var_by_name[name].replica_grouping.num_groups > 1 for name in names}
        norm = ops.sqrt(_global_norm_squared(grads, sharded, groups)) * scalars["inverse_loss_scaling"]
        finite = ops.isfinite(norm)
        grad_factor = clip_factor(norm, constants.max_grad_norm) * scalars["inverse_loss_scaling"]

        master, first, second = {}, {}, {}
        for name in names:
            w = var_by_name[name]
            master[name] = w if w.dtype == popxl.float32 else popxl.variable(
                np.asarray(weights[name], np.float32).reshape(w.shape_on_host), popxl.float32, "master." + name,
                replica_grouping=w.replica_grouping)
            first[name] = _state_like(w, "first_order." + name)
            second[name] = _state_like(w, "second_order." + name)
            # Scaled in place: the gradient is not needed unscaled any more.
            grad = ops.var_updates.accumulator_scale_(grads[name], grad_factor)
            updated = adamw(master[name], first[name], second[name], grad, scalars, constants,
                            decays(name), finite if constants.skip_nonfinite else None)
            for target, value in zip((master[name], first[name], second[name]), updated):
                if value is not target:
                    ops.var_updates.copy_var_update_(target, value)
            if w is not master[name]:
                ops.var_updates.copy_var_update_(w, ops.cast(master[name], w.dtype))

        outputs = {"loss": output_stream("loss", loss), "grad_norm": output_stream("grad_norm", norm),
                   "finite": output_stream("finite", ops.cast(finite, popxl.int32))}
    named = addons.NamedTensors.from_dict
    return TrainingProgram(ir, attached_session(ir, attach), ex, variables, named(master), named(first),
                           named(second), streams, outputs, popxl_param_shapes(config, ex.tensor_parallel))
