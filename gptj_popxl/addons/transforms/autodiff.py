"""Autodiff of GraphWithNamedArgs, optionally accumulating some gradients into by-reference inputs."""
from functools import partial
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..dot_tree import DotTree, sanitise
from ..graph import GraphWithNamedArgs, _normalise_grad_infos
from ..named_tensors import NamedTensors
from ..variable_factory import NamedVariableFactories, VariableFactory
from ...backend import ops, popxl


def _grad_info(graph: GraphWithNamedArgs, grads_provided, grads_required, called_graphs_grad_info):
    infos = {**_normalise_grad_infos(called_graphs_grad_info), **graph.called_graphs_grad_info}
    return popxl.transforms.autodiff(graph.graph, grads_provided=grads_provided, grads_required=grads_required,
                                     called_graphs_grad_info=infos)


def autodiff(graph: GraphWithNamedArgs, grads_provided: Optional[Iterable[popxl.Tensor]] = None,
             grads_required: Optional[Iterable[popxl.Tensor]] = None,
             called_graphs_grad_info: Optional[Mapping] = None) -> GraphWithNamedArgs:
    """The gradient graph of ``graph`` (``popxl.transforms.autodiff``) with its ``grad_graph_info``.

    ``grads_provided`` default all outputs, ``grads_required`` default all inputs (they must all be
    floating point). Call the result with the output gradients positionally and
    ``args=grad.grad_graph_info.inputs_dict(forward_call_info)``.
    """
    return GraphWithNamedArgs.from_grad_graph(_grad_info(graph, grads_provided, grads_required,
                                                         called_graphs_grad_info))


class ExpectedConnection:
    """A gradient-graph input or output: the forward tensor it stands for, or whose gradient it is."""

    def __init__(self, fwd_tensor: popxl.Tensor, connection_type):
        self._fwd_tensor = fwd_tensor
        self._type = connection_type

    @property
    def fwd_tensor(self) -> popxl.Tensor:
        return self._fwd_tensor

    @property
    def connection_type(self):
        """A ``popxl.transforms.ExpectedConnectionType``."""
        return self._type

    def __repr__(self):
        return f"({self._type}, {self._fwd_tensor})"


class RemappedGradGraphInfo:
    """GradGraphInfo of a gradient graph that the addons transforms made or rewired.

    Public popxl cannot make a GradGraphInfo, so this one answers the same questions: expected
    input i is ``graph.inputs[i]`` (the graph may have further inputs after them), expected output
    i is ``graph.outputs[i]``; connections refer to ``forward_graph``'s tensors.
    """

    def __init__(self, graph, forward_graph, expected_inputs: Sequence, expected_outputs: Sequence):
        self._graph = graph
        self._forward_graph = forward_graph
        self._expected_inputs = tuple(expected_inputs)
        self._expected_outputs = tuple(expected_outputs)

    @property
    def graph(self):
        return self._graph

    @property
    def forward_graph(self):
        return self._forward_graph

    @property
    def expected_inputs(self) -> Tuple:
        return self._expected_inputs

    @property
    def expected_outputs(self) -> Tuple:
        return self._expected_outputs

    @property
    def inputs(self) -> Tuple[popxl.Tensor, ...]:
        return tuple(c.fwd_tensor for c in self._expected_inputs)

    @property
    def outputs(self) -> Tuple[popxl.Tensor, ...]:
        return tuple(c.fwd_tensor for c in self._expected_outputs)

    def inputs_dict(self, fwd_call_info) -> Dict[popxl.Tensor, popxl.Tensor]:
        """Gradient-graph inputs of forward values -> the tensors at ``fwd_call_info``'s call site."""
        Fwd = popxl.transforms.ExpectedConnectionType.Fwd
        ins = self._graph.inputs
        return {ins[i]: fwd_call_info.graph_to_parent(c.fwd_tensor)
                for i, c in enumerate(self._expected_inputs) if c.connection_type == Fwd}

    def fwd_graph_ins_to_grad_parent_outs(self, grad_call_info) -> Dict[popxl.Tensor, popxl.Tensor]:
        return {c.fwd_tensor: grad_call_info.graph_to_parent(out)
                for c, out in zip(self._expected_outputs, self._graph.outputs)}

    def fwd_parent_ins_to_grad_parent_outs(self, fwd_call_info, grad_call_info) -> Dict[popxl.Tensor, popxl.Tensor]:
        return {fwd_call_info.graph_to_parent(c.fwd_tensor): grad_call_info.graph_to_parent(out)
                for c, out in zip(self._expected_outputs, self._graph.outputs)}


class AccumulatingGradGraphInfo(RemappedGradGraphInfo):
    """GradGraphInfo of a gradient graph wrapped so that some of its gradients are accumulated.

    The wrapper graph takes the wrapped gradient graph's inputs first, in the same order, followed by
    the accumulators; its outputs are the gradients that are not accumulated.
    """

    def __init__(self, inner, graph, kept_outputs: List[int]):
        outs = inner.expected_outputs
        super().__init__(graph, inner.forward_graph, inner.expected_inputs, [outs[i] for i in kept_outputs])


def remap_grad_info(grad_info, forward_graph: popxl.Graph, backward_graph: popxl.Graph) -> RemappedGradGraphInfo:
    """``grad_info`` moved to another forward graph and gradient graph of the same signature.

    Each connection keeps its position: a connection to forward input (or output) k of
    ``grad_info.forward_graph`` becomes one to input (or output) k of ``forward_graph``; the
    gradient graph becomes ``backward_graph``.
    """
    old = grad_info.forward_graph
    old_ins, old_outs = list(old.inputs), list(old.outputs)
    new_ins, new_outs = forward_graph.inputs, forward_graph.outputs

    def moved(c, outputs_allowed: bool):
        t = c.fwd_tensor
        if t in old_ins:
            return ExpectedConnection(new_ins[old_ins.index(t)], c.connection_type)
        if outputs_allowed and t in old_outs:
            return ExpectedConnection(new_outs[old_outs.index(t)], c.connection_type)
        raise ValueError(f"remap_grad_info: '{t.name}' is not an {'input or output' if outputs_allowed else 'input'} "
                         f"of forward graph '{old.name}'")

    return RemappedGradGraphInfo(backward_graph, forward_graph, [moved(c, True) for c in grad_info.expected_inputs],
                                 [moved(c, False) for c in grad_info.expected_outputs])


def _grouping_lookup(replica_groupings):
    if replica_groupings is None:
        return {}
    if isinstance(replica_groupings, DotTree):
        return replica_groupings.to_dict()
    return dict(replica_groupings)


def autodiff_with_accumulation(graph: GraphWithNamedArgs, tensors_to_accumulate_grads: Iterable[popxl.Tensor],
                               grads_provided: Optional[Iterable[popxl.Tensor]] = None,
                               grads_required: Optional[Iterable[popxl.Tensor]] = None,
                               called_graphs_grad_info: Optional[Mapping] = None,
                               replica_groupings=None) -> Tuple[NamedVariableFactories, GraphWithNamedArgs]:
    """Autodiff whose gradient graph keeps a running mean of the gradients of ``tensors_to_accumulate_grads``.

    The gradient graph gains by-reference named inputs ``mean_accum_counter`` (float32 scalar, the
    number of gradients accumulated so far) and ``accum.<name>`` per accumulated tensor (``name`` =
    its name in ``graph.args``, else its sanitised tensor name). Each call does
    ``accum = accum * c/(c+1) + grad/(c+1)`` then ``c += 1``; zero the counter to restart the mean.
    Accumulated gradients are not outputs; the remaining ``grads_required`` are, in order.
    ``replica_groupings``: replica grouping per name (a DotTree such as
    ``NamedVariableFactories.replica_groupings``, or a mapping), for the accumulator variables.
    Returns the accumulators' factories (zeros) and the gradient graph with them as named args.
    """
    accumulate = list(tensors_to_accumulate_grads)
    required = list(grads_required or [])
    required += [t for t in accumulate if not any(t is r for r in required)]
    inner = _grad_info(graph, grads_provided, required, called_graphs_grad_info)
    names = {t: name for name, t in graph.args.to_dict().items()}
    groupings = _grouping_lookup(replica_groupings)

    wrapper = graph.graph.ir.create_empty_graph(inner.graph.name + "_accumulate")
    factories: Dict[str, VariableFactory] = {}
    named: Dict[str, popxl.Tensor] = {}

    def add_input(name: str, shape, dtype, replica_grouping=None) -> popxl.Tensor:
        f = VariableFactory(partial(np.zeros, shape, dtype.as_numpy()), dtype, name, by_ref=True,
                            replica_grouping=replica_grouping)
        factories[name] = f
        named[name] = t = f.create_input()
        return t

    kept = []
    with wrapper, popxl.in_sequence(True):
        ins = [popxl.graph_input(t.shape, t.dtype, t.name.rpartition("/")[2], meta_shape=t.meta_shape or None)
               for t in inner.graph.inputs]
        counter = add_input("mean_accum_counter", (), popxl.float32)
        accums = {}
        for t in accumulate:
            name = names.get(t, sanitise(t.name))
            accums[id(t)] = add_input("accum." + name, t.shape, t.dtype, groupings.get(name))
        grads = ops.call(inner.graph, *ins)
        for i, (fwd, grad) in enumerate(zip(inner.outputs, grads)):
            if id(fwd) in accums:
                ops.var_updates.accumulate_mean_(accums[id(fwd)], grad, counter)
            else:
                kept.append(i)
                popxl.graph_output(grad)
        ops.var_updates.accumulate_(counter, popxl.constant(1.0, popxl.float32))
    info = AccumulatingGradGraphInfo(inner, wrapper, kept)
    return (NamedVariableFactories.from_dict(factories),
            GraphWithNamedArgs.from_grad_graph(info, NamedTensors.from_dict(named)))
