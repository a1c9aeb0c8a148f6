"""Linear layer: ``y = x @ weight + bias`` with ``weight`` shaped (in_features, out_features)."""
from functools import partial
from typing import Dict

import numpy as np

from ...backend import popxl
from ..module import Module
from ..variable_factory import DeferredData
from ._init import truncated_normal


class Linear(Module):
    """Fully connected layer over the last axis of ``x``.

    Variables: ``weight`` (in, out) drawn from Normal(0, 0.02) truncated at two standard deviations,
    ``bias`` (out,) zeros (if ``bias``), both of ``x``'s dtype. ``replica_grouping``: the variables'
    grouping; with several groups each group holds its own values (e.g. tensor-parallel shards), host
    data ``(num_groups, ...)``.
    """

    def __init__(self, out_features: int, bias: bool = True, replica_grouping=None):
        super().__init__()
        self.out_features = out_features
        self.bias = bias
        self.replica_grouping = replica_grouping

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        shape = (x.shape[-1], self.out_features)
        draw = DeferredData(shape, np.float64, partial(truncated_normal, shape))
        w = self.add_variable_input("weight", draw, x.dtype, replica_grouping=self.replica_grouping)
        y = x @ w
        if self.bias:
            b = self.add_variable_input("bias", partial(np.zeros, (self.out_features,)), x.dtype,
                                        replica_grouping=self.replica_grouping)
            y = y + b
        return y

    @staticmethod
    def torch_mapping(variables, nn_layer, dtype=popxl.float32) -> Dict[popxl.Tensor, np.ndarray]:
        """``{variable: host data}`` copying a ``torch.nn.Linear`` (its weight is (out, in): transposed)."""
        np_dtype = dtype.as_numpy()
        data = {variables.weight: nn_layer.weight.detach().numpy().T.astype(np_dtype)}
        if nn_layer.bias is not None and "bias" in variables:
            data[variables.bias] = nn_layer.bias.detach().numpy().astype(np_dtype)
        return data
