"""Linear layer whose weight is stored 4-bit group-quantised (decompressed on the fly; inference)."""
from functools import partial
from typing import Dict

import numpy as np

from ...backend import popxl
from ..module import Module
from ..ops.group_quantize_decompress import group_quantize_compress_numpy, group_quantize_decompress
from ..utils import WeightsDict


class LinearGQ(Module):
    """``x @ weight + bias`` with ``weight`` (in, out) quantised along axis ``dim`` in groups of
    ``group_size`` (see ``ops.group_quantize_decompress``).

    Variables (zeros until written, e.g. from ``torch_mapping``): ``weight_compressed`` uint16
    ``(other, n / group_size, group_size / 4)``, ``weight_decompression_scale`` and
    ``weight_decompression_bias`` ``(other, n / group_size, 1)`` of ``x``'s dtype, where ``n`` is
    the length of axis ``dim`` and ``other`` that of the other axis; ``bias`` (out,) if ``bias``.
    """

    def __init__(self, out_features: int, bias: bool = True, replica_grouping=None, group_size: int = 0,
                 dim: int = -1):
        super().__init__()
        self.out_features = out_features
        self.bias = bias
        self.replica_grouping = replica_grouping
        self.group_size = group_size
        self.dim = dim

    def build(self, x: popxl.Tensor) -> popxl.Tensor:
        shape = (x.shape[-1], self.out_features)
        axis = self.dim % 2
        n, other = shape[axis], shape[1 - axis]
        if self.group_size < 4 or self.group_size % 4 or n % self.group_size:
            raise ValueError(f"LinearGQ: group_size {self.group_size} must be a multiple of 4 dividing the "
                             f"quantised weight axis {axis} of length {n} (weight {shape})")
        groups = n // self.group_size

        def add(name, var_shape, dtype):
            return self.add_variable_input(name, partial(np.zeros, var_shape), dtype,
                                           replica_grouping=self.replica_grouping)
        codes = add("weight_compressed", (other, groups, self.group_size // 4), popxl.uint16)
        scale = add("weight_decompression_scale", (other, groups, 1), x.dtype)
        shift = add("weight_decompression_bias", (other, groups, 1), x.dtype)
        y = x @ group_quantize_decompress(codes, scale, shift, dim=axis if axis == 0 else -1)
        if self.bias:
            y = y + add("bias", (self.out_features,), x.dtype)
        return y

    @staticmethod
    def torch_mapping(variables, nn_layer, dtype=popxl.float32, group_size: int = 64,
                      dim: int = -1) -> Dict[popxl.Tensor, np.ndarray]:
        """``{variable: host data}`` quantising a ``torch.nn.Linear``'s weight (transposed to (in, out))."""
        np_dtype = dtype.as_numpy()
        weight = nn_layer.weight.detach().numpy().T.astype(np.float16)
        codes, scale, shift = group_quantize_compress_numpy(weight, group_size, dim)
        data = {variables.weight_compressed: codes, variables.weight_decompression_scale: scale.astype(np_dtype),
                variables.weight_decompression_bias: shift.astype(np_dtype)}
        if nn_layer.bias is not None and "bias" in variables:
            data[variables.bias] = nn_layer.bias.detach().numpy().astype(np_dtype)
        return WeightsDict(data)
