"""The runtime's own C++ kernels, for ops where one pass over memory beats torch's composition.

``elementwise.cpp`` (tanh-GELU and its gradient, float32) is compiled by cppimport on first use for
this processor (into this folder, git-ignored; see ``popxl_cpu/native.py``). ``vector_math.h`` and
``parallel_for.h`` are shared with the custom ops' and decode kernels' C++.
"""
import functools
import os
from typing import Optional

import torch

from .. import native

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "elementwise.cpp")


@functools.lru_cache(maxsize=None)
def elementwise():
    """The compiled elementwise kernel module, built by cppimport on first call."""
    return native.build(_SOURCE, "elementwise")


def gelu_tanh(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` of a float32 tensor, into ``out`` (contiguous,
    x's shape) when given. One pass: torch's kernel and a chain of in-place torch passes were 2.4-4x
    slower on 2 threads (0.25-2M elements)."""
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    elementwise().gelu_tanh(x.numpy(), out.numpy(), torch.get_num_threads())
    return out


def gelu_tanh_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``dy * gelu_tanh'(x)`` for float32 ``dy`` and ``x`` of one shape, in one pass."""
    dy, x = dy.contiguous(), x.contiguous()
    out = torch.empty_like(x)
    elementwise().gelu_tanh_grad(dy.numpy(), x.numpy(), out.numpy(), torch.get_num_threads())
    return out
