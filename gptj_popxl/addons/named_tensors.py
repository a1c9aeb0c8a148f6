"""NamedTensors: a DotTree of popxl tensors (graph inputs, variables, call outputs)."""
from typing import Dict, Mapping, Tuple

import numpy as np

from ..backend import ops, popxl
from .dot_tree import DotTree

TensorMap = Mapping[popxl.Tensor, popxl.Tensor]


class NamedTensors(DotTree[popxl.Tensor]):
    """Tensors by dotted name, e.g. ``{"fc.weight": t0, "fc.bias": t1}``."""

    @property
    def tensors(self) -> Tuple[popxl.Tensor, ...]:
        """The tensors, sorted by tensor name."""
        return tuple(sorted(self.to_dict().values(), key=lambda t: t.name))

    @property
    def named_tensors(self) -> Dict[str, popxl.Tensor]:
        """Flat ``{dotted name: tensor}``."""
        return self.to_dict()

    @property
    def variables(self) -> Tuple[popxl.Tensor, ...]:
        return tuple(t for t in self.tensors if isinstance(t, popxl.Variable))

    @property
    def named_variables(self) -> Dict[str, popxl.Tensor]:
        return {k: t for k, t in self.to_dict().items() if isinstance(t, popxl.Variable)}

    def remap(self, mapping: TensorMap) -> "NamedTensors":
        """The same names, each tensor replaced by ``mapping[tensor]`` (every tensor must be a key)."""
        return self.map(lambda t: mapping[t])


class NamedTensorData(DotTree[np.ndarray]):
    """Host arrays by dotted name (e.g. the weights of a checkpoint)."""


def print_named_tensors(named_tensors: NamedTensors) -> NamedTensors:
    """The tensors, each passed through ``ops.print_tensor`` titled by its dotted name: their values
    are printed whenever the program runs. Use the returned tensors so the prints run where they are."""
    return NamedTensors.from_dict({name: ops.print_tensor(t, name) for name, t in named_tensors.to_dict().items()})
