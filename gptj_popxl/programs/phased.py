"""The phased training step: weights, gradients and optimizer state in remote buffers, one phase
(an outlined graph) per stage and layer, micro-batches looped inside each phase.

Phases, in order (as Graphcore's GPT-J app runs them):

1. embedding forward;
2. decoder forward, layer 0 to L-1 (one graph, called with the layer index);
3. head: ``ln_f``, LM head and loss forward and backward, in one loop (its gradient's recomputed
   forward gives the loss);
4. decoder backward, layer L-1 to 0, recomputing the layer's forward from its stored input;
5. embedding backward;
6. optimizer: embedding, each decoder layer, head.

Each compute phase loads its weights from remote buffer entry ``layer`` once, and loops over the
micro-batches with ``addons.transforms.batch_serialise``: activations go between phases in two
``batch_serial_buffer``s of ``L + 1`` rows by ``gradient_accumulation`` micro-batches, ``x`` (row 0
the embedding output, row ``n + 1`` decoder ``n``'s output) and ``dx`` (the head writes row ``L``,
decoder ``n`` reads row ``n + 1`` and writes row ``n``), each tensor-parallel shard holding a slice. Backward phases accumulate the gradients
(``autodiff_with_accumulation``, a mean over the micro-batches, restarted at the phase's start) in
the gradient buffer's entry itself where the gradient is whole and float32 (else in a fresh
accumulator), sum them over the data-parallel group, add their squares to the global norm and store
them, float32, in a gradient buffer. The optimizer phases then scale them by the number of micro-batches,
unscale, clip with the global norm in one factor, and apply AdamW
(``training.adamw``) per layer, loading and storing weights, moments and float32 master weights.

With data parallel, the optimizer's tensors (gradients, moments, master weights) are replica
sharded (``addons.rts``): a backward phase reduce-scatters each gradient over the data-parallel group
(tensors identical on every replica: all-reduce, then each replica's slice of all replicas), the
optimizer phase updates the replica's shard and all-gathers the new weights.
"""
from typing import Dict, List, Mapping, Optional, Set

import numpy as np

from gptj_popxl import addons
from gptj_popxl.backend import ops, popxl
from gptj_popxl.model.config import GPTJConfig
from gptj_popxl.model.hf_mapping import popxl_param_shapes
from gptj_popxl.model.layers import DecoderBlock, Embedding, LMHeadLoss, tp_groups
from gptj_popxl.programs.common import attached_session, input_streams, output_stream, shard_offset, variable_data
from gptj_popxl.programs.execution import ExecutionConfig
from gptj_popxl.programs.training import (STEP_SCALARS, OptimizerConstants, TrainingProgram, adamw, clip_factor,
                                          decays)

F32 = popxl.float32
# Replicas over which parts of the gradients' sum of squares are added up (see ``_Stage.norm_group``).
NORM_GROUPS = ("all", "tp", "none")
# Scalars each optimizer phase takes, in order.
OPTIMIZER_SCALARS = ("decay_factor", "update_scale", "scaled_eps", "grad_factor", "finite")


class _Stage:
    """One phase module's variables in remote buffers: its weights (compute dtype), float32 master weights
    (float16 only), moments and gradient buffers, one entry per layer; remote variables by our name."""

    KINDS = ("weights", "master", "first_order", "second_order")

    def __init__(self, facts: addons.NamedVariableFactories, prefixes: List[str], weights: Mapping[str, np.ndarray],
                 keep_master: bool, groups, data_parallel: int):
        self.facts = facts
        self.prefixes = prefixes
        entries = len(prefixes)
        self.names = list(facts.to_dict())
        self.buffers: Dict[str, Dict[str, popxl.RemoteBuffer]] = {kind: {} for kind in self.KINDS + ("grads",)}
        self.variables: Dict[str, Dict[str, popxl.Tensor]] = {kind: {} for kind in self.KINDS}
        self.sharded: Dict[str, bool] = {}
        self.shard_group: Dict[str, Optional[popxl.ReplicaGrouping]] = {}
        # The gradients that accumulate in their buffer's entry itself (set by the backward phase).
        self.accumulated_in_entry: Set[str] = set()
        ir = popxl.gcg().ir
        for name, f in facts.to_dict().items():
            grouping = f.replica_grouping if f.replica_grouping is not None else ir.replica_grouping()
            groups_count = grouping.num_groups
            self.sharded[name] = groups_count > 1
            # Replicated tensor sharding of the optimizer's tensors: tensor-parallel shards over their
            # data-parallel group, tensors identical on every replica over all replicas; tensors that do
            # not split evenly stay whole.
            shard_group = groups.sharded if groups_count > 1 else ir.replica_grouping()
            if data_parallel == 1 or int(np.prod(f.shape)) % shard_group.group_size:
                shard_group = None
            self.shard_group[name] = shard_group
            host_shape = ((groups_count,) if groups_count > 1 else ()) + tuple(f.shape)
            for kind in self.KINDS + ("grads",):
                if kind == "master" and not keep_master:
                    continue
                if kind == "weights" or shard_group is None:
                    dtype = f.dtype if kind == "weights" else F32
                    self.buffers[kind][name] = popxl.remote_buffer(tuple(f.shape), dtype, entries)
                else:
                    self.buffers[kind][name] = popxl.replica_sharded_buffer(
                        host_shape, F32, None if groups_count == 1 else grouping, shard_group.group_size, entries)
            for entry, prefix in enumerate(prefixes):
                key = prefix + name
                data = variable_data(key, weights, groups_count, f.shape).astype(np.float32, copy=False)
                zeros = np.broadcast_to(np.float32(0), data.shape)
                values = {"weights": data, "master": data, "first_order": zeros, "second_order": zeros}
                for kind in self.KINDS:
                    if name not in self.buffers[kind]:
                        continue
                    buffer = self.buffers[kind][name]
                    make = popxl.remote_variable if kind == "weights" or shard_group is None \
                        else popxl.remote_replica_sharded_variable
                    self.variables[kind][key] = make(values[kind], buffer, entry, buffer.tensor_dtype, f"{kind}.{key}",
                                                     replica_grouping=None if groups_count == 1 else grouping)
        if not keep_master:
            self.variables["master"] = self.variables["weights"]

    def norm_group(self, name: str) -> str:
        """Over which replicas the squares of ``name``'s stored gradient add up to the model's: "all"
        (sharded over replicas), "tp" (a tensor-parallel shard, whole) or "none" (whole, replicated)."""
        if self.shard_group[name] is not None:
            return "all"
        return "tp" if self.sharded[name] else "none"

    def load(self, kind: str, entry) -> Dict[str, popxl.Tensor]:
        """This stage's tensors of ``kind`` at ``entry``, loaded in the current graph."""
        return {name: ops.remote_load(b, entry, f"{kind}.{name}") for name, b in self.buffers[kind].items()}

    def store(self, kind: str, entry, tensors: Mapping[str, popxl.Tensor]) -> None:
        for name, t in tensors.items():
            ops.remote_store(self.buffers[kind][name], entry, t)


def _with_args(graph: addons.GraphWithNamedArgs, extra: Mapping[str, popxl.Tensor]) -> None:
    """Adds graph inputs ``extra`` to ``graph``'s named args (so they are passed by name, not stored)."""
    graph.args = addons.NamedTensors.from_dict({**graph.args.to_dict(), **extra})


def _grad_input(grad_graph: addons.GraphWithNamedArgs) -> popxl.Tensor:
    """The gradient graph's input taking its forward output's gradient."""
    fwd_grad = popxl.transforms.ExpectedConnectionType.FwdGrad
    index = next(i for i, c in enumerate(grad_graph.grad_graph_info.expected_inputs)
                 if c.connection_type == fwd_grad)
    return grad_graph.graph.inputs[index]


class _Builder:
    """Builds the phases of one program (state shared by the phase graphs)."""

    def __init__(self, ir, config: GPTJConfig, ex: ExecutionConfig, constants: OptimizerConstants, seq: int):
        self.ir, self.config, self.ex, self.constants = ir, config, ex, constants
        self.groups = tp_groups(ir, ex.tensor_parallel)
        self.steps = ex.gradient_accumulation
        self.micro = popxl.TensorSpec((ex.micro_batch_size, seq), popxl.int32)
        self.hidden = popxl.TensorSpec((ex.micro_batch_size, seq, config.n_embd), ex.popxl_dtype)

    def backward_phase(self, name: str, stage: _Stage, bwd: addons.BatchSerialResult, accum_facts, named_extra):
        """A graph (layer index) -> the gradients' sums of squares per ``NORM_GROUPS``: loads the weights,
        restarts the accumulators, runs the backward loop, then reduces (reduce-scatters where the optimizer state is sharded), unscales and stores the
        gradients, still scaled by the loss scale and averaged over the micro-batches (the optimizer's
        factor undoes both). Its other inputs: the tensors of ``named_extra``."""
        graph = self.ir.create_empty_graph(name)
        with graph, popxl.in_sequence(True):
            entry = popxl.graph_input((), popxl.int32, "layer")
            extra = {k: popxl.graph_input(t.shape, t.dtype, k) for k, t in named_extra.items()}
            weights = stage.load("weights", entry)
            # A whole float32 gradient accumulates in its gradient buffer's entry itself: no fresh
            # accumulator, and its store finds it already there. The mean's first micro-batch
            # multiplies the entry by 0, so it needs no zeroing as long as it is finite (the
            # optimizer phase sees to that).
            facts = accum_facts.to_dict()
            in_buffer = {"accum." + key: key for key in stage.names
                         if stage.shard_group[key] is None and facts["accum." + key].dtype == F32}
            stage.accumulated_in_entry = set(in_buffer.values())
            accums = addons.NamedVariableFactories.from_dict(
                {k: f for k, f in facts.items() if k not in in_buffer}).init_zero().to_dict()
            accums.update({k: ops.remote_load(stage.buffers["grads"][key], entry, f"grads.{key}")
                           for k, key in in_buffer.items()})
            bwd.graph.bind(addons.NamedTensors.from_dict({**weights, **extra, **accums})).call(entry)
            squares = {group: popxl.constant(0.0, F32, "zero") for group in NORM_GROUPS}
            grads = {}
            for key in stage.names:
                g = accums["accum." + key]
                g = g if g.dtype == F32 else ops.cast(g, F32)
                if stage.shard_group[key] is not None:
                    g = addons.rts.reduce_replica_sharded_tensor(g, "add", self.groups.sharded, stage.shard_group[key])
                elif self.ex.data_parallel > 1:
                    g = ops.collectives.replicated_all_reduce_(g, "add", self.groups.sharded)
                grads[key] = g
                squares[stage.norm_group(key)] = squares[stage.norm_group(key)] + ops.sumsquare(g)
            stage.store("grads", entry, grads)
            for group in NORM_GROUPS:
                popxl.graph_output(squares[group])
        return graph

    def optimizer_phase(self, name: str, stage: _Stage):
        """A graph (layer index, ``OPTIMIZER_SCALARS``) applying AdamW to one entry of ``stage``."""
        graph = self.ir.create_empty_graph(name)
        with graph, popxl.in_sequence(True):
            entry = popxl.graph_input((), popxl.int32, "layer")
            scalars = {k: popxl.graph_input((), popxl.bool if k == "finite" else F32, k) for k in OPTIMIZER_SCALARS}
            keep_master = bool(stage.buffers["master"])
            weights = stage.load("weights", entry)
            master = stage.load("master", entry) if keep_master else {
                key: w if stage.shard_group[key] is None else ops.collectives.replica_sharded_slice(
                    w, group=stage.shard_group[key]) for key, w in weights.items()}
            grads, first, second = stage.load("grads", entry), stage.load("first_order", entry), \
                stage.load("second_order", entry)
            finite = scalars["finite"] if self.constants.skip_nonfinite else None
            # Scaled in place (a pass, no fresh tensor), and stored back: the buffer is then left as it is.
            scaled = {key: ops.var_updates.accumulator_scale_(g, scalars["grad_factor"]) for key, g in grads.items()}
            new = {key: adamw(master[key], first[key], second[key], scaled[key], scalars,
                              self.constants, decays(stage.prefixes[0] + key), finite) for key in stage.names}
            if finite is not None:
                # A skipped step's gradients hold infinities or NaN. The next step's backward restarts its
                # running mean on the entries it accumulates in, which (as PopART computes it) multiplies
                # the old value by 0: those entries must be finite (a pass and a fresh tensor each).
                zero = popxl.constant(0.0, F32, "zero")
                scaled = {key: ops.where(finite, g, zero) if key in stage.accumulated_in_entry else g
                          for key, g in scaled.items()}
            stage.store("grads", entry, scaled)
            if keep_master:
                stage.store("master", entry, {k: v[0] for k, v in new.items()})
            stage.store("first_order", entry, {k: v[1] for k, v in new.items()})
            stage.store("second_order", entry, {k: v[2] for k, v in new.items()})
            # The new weights, all-gathered from the shards (which split them evenly), in the compute dtype.
            full = {k: v[0] if stage.shard_group[k] is None else ops.collectives.replicated_all_gather(
                v[0], group=stage.shard_group[k], output_shape="concat").reshape(weights[k].shape)
                for k, v in new.items()}
            # No cast where the dtypes match: the runtime can then update the weights in their buffer.
            stage.store("weights", entry, {k: v if v.dtype == weights[k].dtype else ops.cast(v, weights[k].dtype)
                                           for k, v in full.items()})
        return graph


def build_phased_training_step(config: GPTJConfig, execution: ExecutionConfig, weights: Mapping[str, np.ndarray],
                               seq: int, constants: OptimizerConstants, attach: bool = True) -> TrainingProgram:
    """The phased training step for ``(global rows, seq)`` batches (see the module docstring); same
    inputs, outputs and numbers as ``training.build_training_step``. Without ``attach`` it has no
    session (``session`` None): a program to analyse, not to run (``common.shape_only_weights``)."""
    ex = execution
    L, S = config.n_layer, ex.gradient_accumulation
    ir = popxl.Ir(replication=ex.replicas)
    keep_master = ex.popxl_dtype != F32
    T = addons.transforms
    with ir.main_graph, popxl.in_sequence(True):
        b = _Builder(ir, config, ex, constants, seq)
        streams, (ids, labels) = input_streams((S, ex.micro_batch_size, seq), ["input_ids", "labels"])
        scalar_streams, scalar_values = input_streams((), STEP_SCALARS, F32)
        streams.update(scalar_streams)
        scalars = dict(zip(STEP_SCALARS, scalar_values))
        offset = shard_offset(config, ex.tensor_parallel, b.groups)
        positions = popxl.constant(np.tile(np.arange(seq, dtype=np.int32), (ex.micro_batch_size, 1)),
                                   name="positions")

        # Per-micro-batch token ids, labels and loss seeds, read by every phase's loop.
        token_buffers = {}
        for name, rows in (("input_ids", ids), ("labels", labels)):
            token_buffers[name] = popxl.remote_buffer(b.micro.shape, popxl.int32, S)
            for s in range(S):
                ops.remote_store(token_buffers[name], s, rows[s])
        seed_buffer = popxl.remote_buffer((), F32, S)
        loss_buffer = popxl.remote_buffer((), F32, S)
        for s in range(S):
            ops.remote_store(seed_buffer, s, scalars["loss_scaling"])
        ids_handle = T.RemoteHandle(token_buffers["input_ids"], None)
        labels_handle = T.RemoteHandle(token_buffers["labels"], None)

        # Forward graphs and their (recomputing, accumulating) gradient graphs.
        emb_facts, emb_fwd = Embedding(config, b.groups, ex.popxl_dtype).create_graph(b.micro, offset)
        decoder = DecoderBlock(config, b.groups, ex.attention_serialisation)
        dec_facts, dec_fwd = decoder.create_graph(b.hidden, positions)
        head_facts, head_fwd = LMHeadLoss(config, b.groups).create_graph(b.hidden, offset, b.micro,
                                                                         scalars["loss_weight"])
        grads = {}
        # The head's phase runs only its (recomputing) gradient loop, which also returns the loss.
        for key, fwd, required in (("emb", emb_fwd, []), ("dec", dec_fwd, [dec_fwd.graph.inputs[0]]),
                                   ("head", head_fwd, [head_fwd.graph.inputs[0]])):
            accum_facts, bwd = addons.autodiff_with_accumulation(fwd, fwd.args.tensors, grads_required=required)
            recompute = addons.recompute_graph_with_forward_outputs if key == "head" else addons.recompute_graph
            grads[key] = (accum_facts, recompute(bwd))
        head_loss = grads["head"][1].graph.outputs[len(grads["head"][1].grad_graph_info.expected_outputs)]
        _with_args(emb_fwd, {"shard_offset": emb_fwd.graph.inputs[1]})
        _with_args(dec_fwd, {"positions": dec_fwd.graph.inputs[1]})
        _with_args(head_fwd, {"shard_offset": head_fwd.graph.inputs[1], "loss_weight": head_fwd.graph.inputs[3]})

        # Hidden states and their gradients are identical on a copy's tensor-parallel shards: each shard
        # stores its slice and a load all-gathers them, so the buffers take 1 / tp of the space.
        tp_group = b.groups.tp_group
        x_buffer = T.batch_serial_buffer(dec_fwd.graph.outputs[0], steps=S, rows=L + 1, shard_group=tp_group)
        dx_buffer = T.batch_serial_buffer(dec_fwd.graph.inputs[0], steps=S, rows=L + 1, shard_group=tp_group)

        def x_at(row):
            return T.RemoteHandle(x_buffer, row, tp_group)

        def dx_at(row):
            return T.RemoteHandle(dx_buffer, row, tp_group)

        emb_fwd_bs, emb_bwd_bs = T.batch_serialise_fwd_and_grad(
            emb_fwd, grads["emb"][1], emb_fwd.args, S,
            load_handles={emb_fwd.graph.inputs[0]: ids_handle,
                          _grad_input(grads["emb"][1]): dx_at(0)},
            store_streams={}, store_buffers={emb_fwd.graph.outputs[0]: x_at(0)},
            io_mode="compute")
        dec_fwd_bs, dec_bwd_bs = T.batch_serialise_fwd_and_grad(
            dec_fwd, grads["dec"][1], dec_fwd.args, S,
            load_handles={dec_fwd.graph.inputs[0]: x_at(0),
                          _grad_input(grads["dec"][1]): dx_at(1)},
            store_streams={}, store_buffers={dec_fwd.graph.outputs[0]: x_at(1),
                                             grads["dec"][1].graph.outputs[0]: dx_at(0)},
            rows=L, io_mode="compute")
        _, head_bwd_bs = T.batch_serialise_fwd_and_grad(
            head_fwd, grads["head"][1], head_fwd.args, S,
            load_handles={head_fwd.graph.inputs[0]: x_at(L),
                          head_fwd.graph.inputs[2]: labels_handle,
                          _grad_input(grads["head"][1]): T.RemoteHandle(seed_buffer, None)},
            store_streams={}, store_buffers={head_loss: T.RemoteHandle(loss_buffer, None),
                                             grads["head"][1].graph.outputs[0]: dx_at(L)},
            io_mode="compute")

        stages = {key: _Stage(facts, prefixes, weights, keep_master, b.groups, ex.data_parallel)
                  for key, facts, prefixes in (("emb", emb_facts, ["embedding."]),
                                               ("dec", dec_facts, [f"layers.{n}." for n in range(L)]),
                                               ("head", head_facts, [""]))}
        extras = {"emb": {"shard_offset": offset}, "dec": {"positions": positions},
                  "head": {"shard_offset": offset, "loss_weight": scalars["loss_weight"]}}

        def forward_phase(name, stage, fwd_bs, extra):
            graph = ir.create_empty_graph(name)
            with graph, popxl.in_sequence(True):
                entry = popxl.graph_input((), popxl.int32, "layer")
                inputs = {k: popxl.graph_input(t.shape, t.dtype, k) for k, t in extra.items()}
                fwd_bs.graph.bind(addons.NamedTensors.from_dict({**stage.load("weights", entry), **inputs})).call(entry)
            return graph

        def run_forward(name, key, fwd_bs, entries):
            graph = forward_phase(name, stages[key], fwd_bs, extras[key])
            for n in entries:
                ops.call(graph, popxl.constant(n, popxl.int32, f"{name}_{n}"), *extras[key].values())

        squares = []

        def run_backward(name, key, bwd_bs, entries):
            graph = b.backward_phase(name, stages[key], bwd_bs, grads[key][0], extras[key])
            for n in entries:
                squares.append(ops.call(graph, popxl.constant(n, popxl.int32, f"{name}_{n}"), *extras[key].values()))

        run_forward("embedding_fwd", "emb", emb_fwd_bs, [0])
        run_forward("decoder_fwd", "dec", dec_fwd_bs, range(L))
        run_backward("head", "head", head_bwd_bs, [0])
        run_backward("decoder_bwd", "dec", dec_bwd_bs, reversed(range(L)))
        run_backward("embedding_bwd", "emb", emb_bwd_bs, [0])

        totals = list(squares[0])
        for more in squares[1:]:
            totals = [a + c for a, c in zip(totals, more)]
        totals = dict(zip(NORM_GROUPS, totals))
        if ex.replicas > 1:
            totals["all"] = ops.collectives.replicated_all_reduce(totals["all"], "add")
        if ex.tensor_parallel > 1:
            totals["tp"] = ops.collectives.replicated_all_reduce(totals["tp"], "add", b.groups.tp_group)
        # The stored gradients are micro-batch means, loss-scaled: the step's are S / loss_scaling times them.
        unscale = scalars["inverse_loss_scaling"] * popxl.constant(float(S), F32, "micro_batches")
        norm = ops.sqrt(totals["all"] + totals["tp"] + totals["none"]) * unscale
        finite = ops.isfinite(norm)
        step = {**scalars, "grad_factor": clip_factor(norm, constants.max_grad_norm) * unscale, "finite": finite}
        for key, entries in (("emb", [0]), ("dec", range(L)), ("head", [0])):
            graph = b.optimizer_phase(f"{key}_optimizer", stages[key])
            for n in entries:
                ops.call(graph, popxl.constant(n, popxl.int32, f"{key}_optimizer_{n}"),
                         *(step[k] for k in OPTIMIZER_SCALARS))

        loss = ops.remote_load(loss_buffer, 0, "loss_0")
        for s in range(1, S):
            loss = loss + ops.remote_load(loss_buffer, s, f"loss_{s}")
        if ex.data_parallel > 1:
            loss = ops.collectives.replicated_all_reduce(loss, "add", b.groups.sharded)
        outputs = {"loss": output_stream("loss", loss), "grad_norm": output_stream("grad_norm", norm),
                   "finite": output_stream("finite", ops.cast(finite, popxl.int32))}

    def merged(kind):
        return addons.NamedTensors.from_dict({k: v for st in stages.values() for k, v in st.variables[kind].items()})

    kinds = {"weights": "weights", "master": "optimizer", "first_order": "optimizer", "second_order": "optimizer",
             "grads": "gradients"}
    buffer_kinds = {b.remote_buffer_id: kinds[kind] for st in stages.values() for kind, bufs in st.buffers.items()
                    for b in bufs.values()}
    buffer_kinds.update({b.remote_buffer_id: "activations" for b in (x_buffer, dx_buffer)})
    buffer_kinds.update({b.remote_buffer_id: "io" for b in (*token_buffers.values(), seed_buffer, loss_buffer)})
    return TrainingProgram(ir, attached_session(ir, attach), ex, merged("weights"), merged("master"),
                           merged("first_order"), merged("second_order"), streams, outputs,
                           popxl_param_shapes(config, ex.tensor_parallel), buffer_kinds)
