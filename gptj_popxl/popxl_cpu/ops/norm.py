"""Normalisation: group norm (layer norm is its one-group case) and inference batch norm.

popxl treats axis 1 as the channel axis: group norm takes statistics per sample over the channels of
a group and every axis after the channels, and scales/shifts per channel. For a 2-D ``(N, H)`` input
``layer_norm`` is the usual last-axis layer norm. float16 inputs are normalised in float32.
"""
import torch

from ..primitive import Primitive
from ..tensor import Tensor
from ._util import check_float, scalar_like
from .elementwise import add, div, mul, sqrt, sub
from .shape import reshape

__all__ = ["group_norm", "layer_norm", "batch_norm_inference"]


def _normalised(x: torch.Tensor, groups: int, eps: float):
    """``(x - mean) / sqrt(var + eps)`` in float32 per (replica, sample, group), and ``1/sqrt(var + eps)``."""
    grouped = x.float().reshape(x.shape[0], x.shape[1], groups, -1)
    # torch's layer norm kernel without weights: 7x faster than var_mean then the arithmetic, whose
    # reduction over a short last axis is not vectorised (285 against 40 us on (4, 64, 1, 256)).
    xhat, _, rstd = torch.native_layer_norm(grouped, grouped.shape[-1:], None, None, eps)
    return xhat, rstd


def _is_layer_norm(x: torch.Tensor, weight: torch.Tensor, num_groups: int) -> bool:
    """Whether torch's fused layer norm kernels compute this group norm: one group over the last axis
    of a float32 ``(N, C)`` input, on one replica (torch takes one weight)."""
    return num_groups == 1 and x.dim() == 3 and weight.shape[0] == 1 and x.dtype == torch.float32


def _per_channel(v: torch.Tensor, rank: int) -> torch.Tensor:
    """A ``(R, C)`` weight viewed to broadcast over ``(R, N, C, *spatial)``."""
    return v.float().reshape((v.shape[0], 1, v.shape[1]) + (1,) * (rank - 3))


class GroupNorm(Primitive):
    name = "group_norm"

    @classmethod
    def infer(cls, t, weight, bias, num_groups, eps):
        check_float(t, cls.name)
        if t.rank < 2:
            raise ValueError(f"'{t.name}' {t.shape} needs rank >= 2: (batch, channels, ...)")
        channels = t.shape[1]
        for what, v in (("weight", weight), ("bias", bias)):
            if v.shape != (channels,) or v.dtype != t.dtype:
                raise ValueError(f"{what} '{v.name}' must be ({channels},) {t.dtype.name}, one per channel of "
                                 f"'{t.name}' {t.shape}; got {v.shape} {v.dtype.name}")
        if num_groups < 1 or channels % num_groups:
            raise ValueError(f"num_groups {num_groups} must divide the {channels} channels of '{t.name}' {t.shape}")
        return t.spec

    @staticmethod
    def kernel(x, weight, bias, num_groups, eps):
        if _is_layer_norm(x, weight, num_groups):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], weight[0], bias[0], eps)
        xhat, _ = _normalised(x, num_groups, eps)
        xhat = xhat.reshape(x.shape)
        return (xhat * _per_channel(weight, x.dim()) + _per_channel(bias, x.dim())).to(x.dtype)

    @staticmethod
    def grad(g):
        return list(GroupNormGrad.create(g.dy, g.x(0), g.x(1), **g.attrs))


class LayerNorm(GroupNorm):
    """:class:`GroupNorm` with one group, under its own name (for error messages)."""
    name = "layer_norm"


class GroupNormGrad(Primitive):
    """Gradients of group norm for the input, weight and bias, recomputing the statistics."""
    name = "group_norm_grad"

    @staticmethod
    def infer(dy, x, weight, num_groups, eps):
        return dy.spec, weight.spec, weight.spec

    @staticmethod
    def kernel(dy, x, weight, num_groups, eps):
        if _is_layer_norm(x, weight, num_groups) and dy.dtype == torch.float32:
            var, mean = torch.var_mean(x, -1, correction=0, keepdim=True)
            # The bias argument only tells torch to compute its gradient (which needs no bias value).
            dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
                dy, x, x.shape[-1:], mean, torch.rsqrt(var + eps), weight[0], weight[0], [True, True, True])
            return dx, dweight[None], dbias[None]
        xhat, rstd = _normalised(x, num_groups, eps)
        dyf = dy.float()
        dxhat = (dyf * _per_channel(weight, x.dim())).reshape(xhat.shape)
        dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        reduce = (1,) + tuple(range(3, x.dim()))
        dweight = (dyf * xhat.reshape(x.shape)).sum(reduce)
        dbias = dyf.sum(reduce)
        return dx.reshape(x.shape).to(dy.dtype), dweight.to(weight.dtype), dbias.to(weight.dtype)


def group_norm(t: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-05) -> Tensor:
    """Group norm over axis 1 split into ``num_groups`` groups (biased variance), then ``* weight + bias``."""
    return GroupNorm.create(t, weight, bias, num_groups=int(num_groups), eps=float(eps))


def layer_norm(t: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-05) -> Tensor:
    """:func:`group_norm` with one group: for ``(N, H)`` inputs, layer norm over ``H``."""
    return LayerNorm.create(t, weight, bias, num_groups=1, eps=float(eps))


def batch_norm_inference(t: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor, epsilon: float = 1e-05,
                         momentum: float = 0.9) -> Tensor:
    """``(t - mean) / sqrt(var + epsilon) * scale + bias`` with per-channel (axis 1) statistics."""
    if t.rank < 2:
        raise ValueError(f"batch_norm_inference: '{t.name}' {t.shape} needs rank >= 2: (batch, channels, ...)")
    channels = t.shape[1]
    view = (channels,) + (1,) * (t.rank - 2)
    params = []
    for what, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
        if v.shape != (channels,):
            raise ValueError(f"batch_norm_inference: {what} '{v.name}' must have shape ({channels},), one per channel "
                             f"of '{t.name}' {t.shape}; got {v.shape}")
        params.append(reshape(v, view))
    scale, bias, mean, var = params
    factor = div(scale, sqrt(add(var, scalar_like(epsilon, var))))
    return add(mul(sub(t, mean), factor), bias)
