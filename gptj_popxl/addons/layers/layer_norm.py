"""Layer normalisation over the last axis."""
from functools import partial
from typing import Dict, Tuple

import numpy as np

from ...backend import ops, popxl
from ..module import Module


class LayerNorm(Module):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (biased variance).

    Variables ``weight`` (ones) and ``bias`` (zeros), shaped (x.shape[-1],), of ``x``'s dtype.
    popxl's ``layer_norm`` normalises over every axis after the first, so inputs of rank > 2 are
    flattened to (-1, hidden) around it.
    """

    def __init__(self, replica_grouping=None):
        super().__init__()
        self.replica_grouping = replica_grouping

    def variables(self, hidden: int, dtype) -> Tuple[popxl.Tensor, popxl.Tensor]:
        """Declares the ``weight`` (ones) and ``bias`` (zeros) of ``hidden`` features (an addition to
        popxl-addons' class, for fused kernels that take the layer's variables)."""
        w = self.add_variable_input("weight", partial(np.ones, (hidden,)), dtype, replica_grouping=self.replica_grouping)
        b = self.add_variable_input("bias", partial(np.zeros, (hidden,)), dtype, replica_grouping=self.replica_grouping)
        return w, b

    def build(self, x: popxl.Tensor, eps: float = 1e-5) -> popxl.Tensor:
        hidden = x.shape[-1]
        w, b = self.variables(hidden, x.dtype)
        if x.rank == 2:
            return ops.layer_norm(x, w, b, eps)
        return ops.layer_norm(x.reshape((-1, hidden)), w, b, eps).reshape(x.shape)

    @staticmethod
    def torch_mapping(variables, nn_layer, dtype=popxl.float32) -> Dict[popxl.Tensor, np.ndarray]:
        """``{variable: host data}`` copying a ``torch.nn.LayerNorm``."""
        np_dtype = dtype.as_numpy()
        return {variables.weight: nn_layer.weight.detach().numpy().astype(np_dtype),
                variables.bias: nn_layer.bias.detach().numpy().astype(np_dtype)}
