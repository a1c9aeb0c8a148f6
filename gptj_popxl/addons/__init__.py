"""popxl-addons' API (the parts GPT-J uses), written against the public popxl API only.

Use ``from gptj_popxl import addons`` and ``from gptj_popxl.backend import popxl, ops``. Names and
signatures follow popxl-addons 3.4; differences are noted.

Trees of named things (``dot_tree``, ``named_tensors``)
    ``DotTree(**kw)``: keys are identifiers or non-negative ints, dotted keys nest ("a.b.0").
    ``get/[]/.attr``, ``insert(key, value, overwrite=False)``, ``update(tree, overwrite=False)``,
    ``pop``, ``copy`` (structure copied, leaves shared), ``filter_keys(keys)``, ``keys/values``,
    ``keys_flat/values_flat``, ``len/len_flat``, ``to_dict()`` (flat ``{"a.b": leaf}``),
    ``from_dict(d)``, ``unpack()`` -> (names, leaves) sorted by name, ``pack(names, leaves)``,
    ``map(fn)``, ``to_mapping(other)`` -> ``{leaf: other's leaf}`` for shared names.
    ``NamedTensors`` (tensors; ``.tensors`` sorted by tensor name, ``.named_tensors`` flat dict,
    ``.variables``, ``remap(mapping)``), ``NamedTensorData`` (host arrays).

Variables (``variable_factory``)
    ``VariableFactory(data_iter, dtype=None, name=None, by_ref=False, replica_grouping=None, shard_over=1)``:
    ``data_iter`` is a callable (called once at construction to learn shape/dtype, then once per
    instance and per replica group) or an iterable. ``create_input(prefix=None)`` -> graph input;
    ``create_tensor(name=None)`` -> ``popxl.variable`` (host data ``(num_groups, *shape)`` when the
    grouping has several groups); ``create_remote_tensor(buffer, entry, name=None)``.
    ``DeferredData(shape, dtype, make)`` (an addition): a callable data_iter that states its shape
    and dtype, so building a graph never calls it.
    ``NamedVariableFactories``: ``init(prefix=None)`` -> NamedTensors of variables (made in sorted
    name order), ``init_remote(buffers, entry=0, prefix=None)``, ``init_zero()`` / ``init_undef()``
    (``ops.init`` in the current graph), ``replica_groupings``.

Modules and graphs (``module``, ``graph``)
    ``Module(cache=False)``: subclass, define ``build(...)``; inside it
    ``self.add_variable_input(name, data_iter, dtype=None, by_ref=False, replica_grouping=None, overwrite=False)``
    returns the graph input. A Module stored as an attribute is a sub-module: calling it inlines
    its build; its variables are named ``<attr>.<name>`` and tensors scoped ``<attr>/``.
    ``create_graph(*args, **kwargs)`` -> ``(NamedVariableFactories, GraphWithNamedArgs)``; tensor /
    TensorSpec args become the first graph inputs. ``add_variable_inputs(name, factories)`` ->
    NamedTensors; ``call_module(module, name=None, autodiff="auto")(*args)`` outlines a sub-graph
    and calls it (outputs tuple). ``Module.from_list([...])`` holds modules as "0", "1", ...
    No ``build_grad``/``create_grad_graph`` (custom gradients go in popxl_cpu primitives).
    ``GraphWithNamedArgs(graph, args=None)``: ``.graph``, ``.args`` (NamedTensors of inputs),
    ``bind(named_tensors)`` -> ``BoundGraph`` (matched by name), ``call(*targs, args=None)`` ->
    outputs tuple, ``call_with_info``, ``autodiff(grads_provided=None, grads_required=None,
    called_graphs_grad_info=None)`` (once; ``force=True`` to repeat), ``grad_graph_info``.
    ``BoundGraph(graph, {input: tensor})``: ``call``, ``call_with_info``, ``bind(more)``.

Autodiff (``transforms``)
    ``autodiff(graph_wna, grads_provided=None, grads_required=None, called_graphs_grad_info=None)``
    -> GraphWithNamedArgs of the gradient graph with ``.grad_graph_info`` (call it with the output
    gradients positionally and ``args=info.inputs_dict(fwd_call_info)``).
    ``autodiff_with_accumulation(graph, tensors_to_accumulate_grads, grads_provided=None,
    grads_required=None, called_graphs_grad_info=None, replica_groupings=None)`` ->
    (factories, grad graph) whose by-ref named args ``mean_accum_counter`` and ``accum.<name>``
    keep running means of those gradients (not outputs). Its grad_graph_info is an
    ``AccumulatingGradGraphInfo`` with GradGraphInfo's interface (public popxl cannot remove graph
    outputs, so the gradient graph is wrapped).

Phased execution (``transforms``, ``rts``)
    ``batch_serial_buffer(t, steps=1, rows=1, shard_group=None)``: a remote buffer of rows x steps
    entries (entry ``row * steps + step``), replica-sharded over ``shard_group``.
    ``RemoteHandle(buffer, row_offset=0, shard_group=None)``: where a tensor is loaded from / stored
    to (``row_offset`` rows added to the row; None: always row 0).
    ``batch_serialise(graph, steps, load_handles, store_streams, store_buffers, seed_input=None,
    rows=1, io_mode="io")`` -> ``BatchSerialResult`` (``.graph`` takes the row index, then the seed
    if any, then the inputs not loaded, named args remapped; ``.stored_buffers``;
    ``.remap_tensors``). ``batch_serialise_fwd_and_grad(fwd, grad, named_inputs_for_grad_graph,
    steps, load_handles, store_streams, store_buffers, seed_input=None, rows=1, io_mode="io")`` ->
    (fwd result, grad result): the forward loop stores what the gradient needs, the gradient loop
    loads it; ``named_inputs_for_grad_graph`` (the weights) become the gradient graph's named args.
    io modes 'compute' / 'io' / 'io_overlapped' give the same values.
    ``recompute_graph(grad)``: a gradient graph recomputing the forward from its inputs (expected
    inputs: output gradients and forward inputs only); ``add_recompute_inputs(info)``.
    ``recompute_graph_with_forward_outputs(grad)`` (ours): the same, the recomputed forward's outputs
    returned after the gradients.
    ``remap_grad_info(info, forward_graph, backward_graph)``: connections moved by position.
    ``transforms.repeat_graph(graph, n)``: the graph's ops moved into a loop run n times (CPU only;
    on the SDK use popxl-addons'). ``set_(graph_)available_memory_proportion_by_ipu``: recorded only.
    ``rts``: ``replica_sharded_spec(t, shard_over)``, ``gather_replica_sharded_tensor(t,
    use_io_tiles=False, replica_group=None)``, ``reduce_replica_sharded_tensor(t, op="add",
    replica_group=None, shard_group=None)`` (reduce-scatter when both groups match, else all-reduce
    then slice), ``all_gather_replica_sharded_graph(tensors, use_io_tiles=False, replica_groups=None)``,
    ``reduce_replica_sharded_graph(tensors, op="add", use_io_tiles=False, shard_groups=None,
    replica_group=None)`` -> ``(graph, names)``. One instance: no cross-instance stages.

Sessions and checkpoints (``task_session``)
    ``TaskSession(inputs, outputs, state, max_checkpoints=1, *session_args, **session_kwargs)``:
    ``run`` counts ``session_state["steps"]``; ``get_named_tensors_data()``;
    ``save_checkpoint(dir)`` / ``load_checkpoint(dir, report_missing="warn", skip_memmap=False)``
    (``model/<name>.npz``, memmapped ``model/<name>.npy``, ``session_info.json``,
    ``dataloader.bin``; written atomically); ``add_session_state_info``; ``dataloader`` (needs
    ``save``/``resume``); ``load_from_session``. ``initialise_memmap_dir_from_checkpoint``.
    Memory-mapped variables: ``factories.init(memmap_dir=...)`` / ``VariableFactory.next_memmap``.
    ``seed_variable(seed, replica_grouping=None)`` -> (variable, tensor).

Replica groupings (``named_replica_grouping``)
    ``NamedReplicaGrouping.build_groups``, ``fill_none_group``, ``get_instance_replica_grouping``,
    ``get_ild_replica_grouping``, ``is_cross_instance``, ``is_cross_ild``,
    ``get_ild_size_from_popdist`` (one instance; ILD size from ``POPLAR_TARGET_OPTIONS`` else min(R, 64)).

Misc: ``patterns.apply_pre_alias_patterns(ir, level)`` (no-op on the CPU), ``route_tensor``
    (``route_tensor_into_graph`` into already-called graphs), ``utils`` (``timer``, ``WeightsDict``,
    ``OrderedDict``, ``null_context``, ``suffix_graph_name``, ``overrides``, ``duplicate_items``),
    ``debugging`` (``print_tensor``/``print_text`` gated by ``MODEL_LOG_LEVEL``).

Layers (``layers``)
    ``Linear(out_features, bias=True, replica_grouping=None)``: ``x @ weight + bias``, weight
    (in, out); ``Linear.torch_mapping(variables, nn_linear, dtype)`` -> ``{variable: array}``.
    ``LayerNorm(replica_grouping=None)``, ``build(x, eps=1e-5)``: last axis, any rank.
    ``Embedding(dtype, vocab_size, hidden_size, axis=0, replica_grouping=None)``: vocab sharded
    over ``replica_grouping.num_groups`` shards of ``get_vocab_shard_size(V, n) = ceil(V / n)``
    rows (NOT rounded to 16 as popxl-addons does); ``get_offsets(V, n)``; callers pass indices
    minus their shard's offset (host helper ``Embedding.offset_input``); out-of-shard -> zero rows.
    ``LayerNormDistributed(replica_grouping=None)``: hidden axis sharded over the group.
    ``LinearGQ(out_features, bias=True, replica_grouping=None, group_size=0, dim=-1)``: 4-bit
    group-quantised weight, ``torch_mapping(..., group_size=64, dim=-1)`` quantises.

Ops (``ops``)
    ``replicated_all_reduce_identical_inputs(t, op="add", group=None)``: identity forward,
    all-reduce of the gradient. ``replicated_all_reduce_identical_grad_inputs(t, op="add",
    group=None)``: all-reduce forward, identity gradient (on the CPU: the collectives' primitives;
    on the SDK: popxl-addons' custom ops). ``cross_entropy_sharded_loss(logits, indices,
    ignore_index=None, replica_grouping=None, reduction="mean")``: logits (n, classes_per_shard);
    ``indices`` AND ``ignore_index`` relative to each shard's first class (``labels - offset``,
    ``IGNORE - offset``), as popxl-addons requires; loss identical on all shards.
    ``cross_entropy`` / ``cross_entropy_with_grad``, ``cross_entropy_sharded_wr_loss`` (shards on
    IPUs of one replica), ``grad_reduce_square_add``, ``layer_norm_distributed``, ``linear_layout``
    (identity), ``group_quantize_decompress`` (+ numpy ``group_quantize_compress_numpy`` /
    ``group_quantize_decompress_numpy``), ``replicated_{all_gather,all_reduce,reduce_scatter}_strided``
    (+ identical-inputs forms, ``replicated_all_reduce_strided_graph``), ``streams.host_load(t, dtype,
    name)`` -> (array, stream, tensor) / ``host_store(t)`` -> stream (also ``addons.host_load``).

Optimiser (``optimizers``)
    ``AdamOptimizerStep().create_graph(var, grad_spec, replica_grouping=None, *, lr, beta1=0.9,
    beta2=0.999, eps=1e-5, weight_decay=0.01, first_order_dtype=popxl.float16, bias_correction=True,
    loss_scaling=1, global_norm=None, global_norm_max=None)``: in-place AdamW (== torch.optim.AdamW)
    on the by-reference ``var``; named args ``first_order``, ``second_order``, ``step``.

Remote buffers and streams (``remote``, ``streams``)
    ``named_variable_buffers(factories, entries=1, shard_over_dict=True)`` -> ``NamedRemoteBuffers``
    (replica-sharded where ``shard_over`` > 1; False/1: plain); ``factories.init_remote(buffers, i)``;
    ``load_remote_graph(buffers, entries=1)`` -> (graph taking an int32 entry index, output names);
    ``store_remote_graph(buffers, entries=1)`` -> graph taking the index, tensors as named args;
    ``load_remote(buffers, entry)``, ``store_remote(buffers, tensors, entry)``,
    ``create_remote_buffer(spec, entries=1, replica_group=None, shard_over=None)``, ``named_buffers``.
    ``InputStreams(x=((2, 4), popxl.float32))`` / ``OutputStreams(...)``: host streams by name;
    ``from_streams(streams)`` keys existing streams by ``tensor_id``.

Host arrays (``array_munging``)
    ``shard(x, n, axis)`` -> (n, ...) contiguous blocks; ``unshard(x, axis)``; ``repeat(x, n, axis=0)``
    (new axis); ``repeat_axis``; ``repeat_shard``; ``pad_axis(x, n, axis, value=0)``; ``squeeze_safe``;
    ``tensor_parallel_input(data, tp, rf)``, ``tensor_parallel_output``; ``shard2D``/``split2D``/``unshard2D``.
"""
from . import (array_munging, debugging, graph_cache, layers, named_replica_grouping, ops, optimizers, patterns, remote,
               route_tensor, rts, streams, task_session, transforms, utils)
from .dot_tree import DotTree, sanitise, to_mapping
from .graph import BoundGraph, GraphWithNamedArgs
from .graph_cache import GraphCache
from .module import Module
from .named_replica_grouping import NamedReplicaGrouping
from .named_tensors import NamedTensorData, NamedTensors
from .ops.streams import host_load, host_store
from .remote import (NamedRemoteBuffers, create_remote_buffer, load_remote, load_remote_graph, named_buffers,
                     named_variable_buffers, store_remote, store_remote_graph)
from .rts import (all_gather_replica_sharded_graph, gather_replica_sharded_tensor, reduce_replica_sharded_graph,
                  reduce_replica_sharded_tensor, replica_sharded_spec)
from .seed_variable import seed_variable
from .streams import InputStreams, OutputStreams
from .task_session import TaskSession
from .transforms import (AccumulatingGradGraphInfo, BatchSerialResult, RemoteHandle, add_recompute_inputs, autodiff,
                         autodiff_with_accumulation, batch_serial_buffer, batch_serialise, batch_serialise_fwd_and_grad,
                         recompute_graph, recompute_graph_with_forward_outputs, remap_grad_info, set_available_memory_proportion_by_ipu,
                         set_graph_available_memory_proportion_by_ipu)
from .variable_factory import (DeferredData, NamedVariableFactories, VariableFactory,
                               add_replica_sharded_variable_input, add_variable_input)
