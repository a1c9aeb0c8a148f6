"""The runtime's own C++ kernels, for ops where one pass over memory beats torch's composition.

``fused_ops.cpp`` (float32 tanh-GELU and its gradient, the attention's scaled and masked softmax, Adam's
updater) is compiled by cppimport on first use for this processor (into this folder, git-ignored, or the
kernel cache, ``$GPTJ_POPXL_KERNEL_CACHE``; see ``popxl_cpu/native.py``). ``vector_math.h`` and
``parallel_for.h`` are shared with the custom ops' and decode kernels' C++.
"""
import functools
import os
from typing import Optional

import torch

from .. import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused_ops.cpp")


@functools.lru_cache(maxsize=None)
def fused_ops():
    """The compiled kernel module, built by cppimport on first call."""
    return native.build(_SOURCE, "fused_ops")


def gelu_tanh(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` of a float32 tensor, into ``out`` (contiguous,
    x's shape) when given. One pass: torch's kernel and a chain of in-place torch passes were 2.4-4x
    slower on 2 threads (0.25-2M elements)."""
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    fused_ops().gelu_tanh(x.numpy(), out.numpy(), torch.get_num_threads())
    return out


def gelu_tanh_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy * gelu_tanh'(x)`` for float32 ``dy`` and ``x`` of one shape, in one pass."""
    dy, x = dy.contiguous(), x.contiguous()
    out = torch.empty_like(x)
    fused_ops().gelu_tanh_grad(dy.numpy(), x.numpy(), out.numpy(), torch.get_num_threads())
    return out


def adam_updater(m: torch.Tensor, v: torch.Tensor, w: Optional[torch.Tensor], bc1: float, bc2: float, eps: float,
                 wd: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Adam's updater ``m / bc1 / (sqrt(v / bc2) + eps) (+ wd * w)`` of float32 tensors of one shape, into
    ``out`` (contiguous) when given, in one pass: torch's six passes took 125 ms of a 77M-parameter
    training step on 2 threads (its sqrt alone 100 ms)."""
    m, v = m.contiguous(), v.contiguous()
    out = torch.empty_like(m) if out is None else out
    fused_ops().adam_updater(m.numpy(), v.numpy(), None if w is None else w.contiguous().numpy(), bc1, bc2, eps, wd,
                             out.numpy(), torch.get_num_threads())
    return out


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor, scale: float,
                          out: Optional[torch.Tensor] = None, inner: Optional[int] = None,
                          repeat: int = 1) -> torch.Tensor:
    """``softmax(x / scale + mask)`` over x's last axis, float32, in one pass. The mask's rows (all but
    its last axis, flattened) go in blocks of ``inner`` (default: all of them), each block serving
    ``repeat`` consecutive blocks of x's rows, and the whole mask repeats: a mask whose shape is a
    suffix of x's (the attention's (queries, keys) under batch and heads) is the default, a (batch, 1,
    queries, keys) mask under (batch, heads, queries, keys) is ``inner=queries, repeat=heads``. torch's
    three kernels took 0.44 ms on (1, 8, 256, 256) on 2 threads."""
    x, mask = x.contiguous(), mask.contiguous()
    out = torch.empty_like(x) if out is None else out
    mask_rows = mask.numel() // max(mask.shape[-1], 1) if mask.dim() else 0
    fused_ops().scaled_masked_softmax(x.numpy(), mask.numpy(), scale, mask_rows if inner is None else inner, repeat,
                                      out.numpy(), torch.get_num_threads())
    return out
