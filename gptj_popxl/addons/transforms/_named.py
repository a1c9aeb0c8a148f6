"""Small helpers the graph transforms share."""
from typing import Mapping

from ...backend import popxl
from ..named_tensors import NamedTensors


def graph_input_like(t: popxl.Tensor, by_ref: bool = False) -> popxl.Tensor:
    """An input of the graph being built with ``t``'s shape, dtype, meta shape and (unscoped) name."""
    return popxl.graph_input(t.shape, t.dtype, t.name.rpartition("/")[2], by_ref=by_ref,
                             meta_shape=t.meta_shape or None)


def remap(ts: NamedTensors, mapping: Mapping[popxl.Tensor, popxl.Tensor]) -> NamedTensors:
    """``ts`` with each tensor replaced by ``mapping[tensor]``; names of unmapped tensors are left out."""
    return NamedTensors.from_dict({name: mapping[t] for name, t in ts.to_dict().items() if t in mapping})
