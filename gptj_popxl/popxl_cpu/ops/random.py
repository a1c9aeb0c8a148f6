"""Random numbers from seed tensors: seed splitting, dropout and random tensors.

A seed is a ``(2,)`` uint32 tensor. Every random op draws from a torch generator seeded with a hash
of the seed and the op's seed modifier, a number the IR gives each random op as it is made, as PopART
does: a seed always gives the same numbers, ops fed one seed draw apart, and a gradient rule can
regenerate a dropout mask from the seed and the forward op's modifier. As on the IPU, where a replica's
draws depend on its seed and not on its index, replicas fed the same seed draw the same numbers
(tensor-parallel shards keep identical activations); give each replica its own seed
(``random_seed.create_seeds(..., replicas=R)``) for replica-specific draws. The exact bits differ
from Poplar's.
"""
from typing import Sequence, Tuple

import torch

from .. import dtypes
from ..context import get_current_graph
from ..primitive import Primitive, spec
from ..tensor import Tensor, constant
from ._util import check_float

__all__ = ["split_random_seed", "create_random_seed", "dropout", "shaped_dropout", "random_normal",
           "random_uniform"]

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijective hash spreading every input bit over the output."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _seed64(pair) -> int:
    lo, hi = (int(v) for v in pair)
    return (hi << 32) | lo


def _generators(seed: torch.Tensor, modifier: int):
    """One generator per replica, from that replica's ``(2,)`` seed and the op's seed modifier."""
    gens = []
    for pair in seed.reshape(seed.shape[0], 2).tolist():
        g = torch.Generator()
        g.manual_seed(_mix(_seed64(pair) ^ _mix(modifier)))
        gens.append(g)
    return gens


def _draw(seed: torch.Tensor, modifier: int, shape: Sequence[int], normal: bool) -> torch.Tensor:
    """``(R, *shape)`` float32 samples, uniform in [0, 1) or standard normal."""
    sample = torch.randn if normal else torch.rand
    return torch.stack([sample(tuple(shape), generator=g) for g in _generators(seed, modifier)])


def _next_seed_modifier() -> int:
    return next(get_current_graph().ir._seed_modifiers)


def _check_seed(seed: Tensor, what: str) -> None:
    if not isinstance(seed, Tensor):
        raise TypeError(f"{what}: seed must be a Tensor, got {type(seed).__name__}")
    if seed.shape != (2,) or seed.dtype != dtypes.uint32:
        raise ValueError(f"{what}: seed '{seed.name}' must be a (2,) uint32 tensor, got {seed.shape} {seed.dtype.name}")


# ---------------------------------------------------------------- seeds

class ModifyRandomSeed(Primitive):
    """A new seed: the seed's first word, then a hash of the seed and a uint32 modifier (PopART keeps the
    first word too)."""
    name = "modify_random_seed"

    @staticmethod
    def infer(seed, modifier):
        return seed.spec

    @staticmethod
    def kernel(seed, modifier):
        out = []
        for pair, m in zip(seed.reshape(seed.shape[0], 2).tolist(), modifier.reshape(-1).tolist()):
            h = _mix(_seed64(pair) ^ _mix(int(m) + (1 << 32)))
            out.append([pair[0], h & 0xFFFFFFFF])
        return torch.tensor(out, dtype=torch.uint32)


def create_random_seed(seed: Tensor, modifier: Tensor) -> Tensor:
    """A seed derived from ``seed`` and the uint32 scalar ``modifier`` (different modifiers, unrelated seeds)."""
    _check_seed(seed, "create_random_seed")
    if not isinstance(modifier, Tensor):
        modifier = constant(int(modifier), dtypes.uint32, name="modifier")
    if modifier.nelms != 1 or not modifier.dtype.is_int:
        raise ValueError(f"create_random_seed: modifier '{modifier.name}' must be an integer scalar, got "
                         f"{modifier.shape} {modifier.dtype.name}")
    return ModifyRandomSeed.create(seed, modifier)


def split_random_seed(seed: Tensor, n: int = 2) -> Tuple[Tensor, ...]:
    """``n`` seeds derived from ``seed``: the i-th is ``create_random_seed(seed, i)``."""
    _check_seed(seed, "split_random_seed")
    if int(n) < 1:
        raise ValueError(f"split_random_seed: n must be >= 1, got {n}")
    return tuple(create_random_seed(seed, i) for i in range(int(n)))


# ---------------------------------------------------------------- dropout

def _keep(seed: torch.Tensor, modifier: int, mask_shape, p: float) -> torch.Tensor:
    """``(R, *mask_shape)`` float32 mask scaled by ``1/(1-p)``: elements survive with probability ``1-p``."""
    return (_draw(seed, modifier, mask_shape, normal=False) >= p).float() / (1.0 - p)


class Dropout(Primitive):
    """``t * mask / (1 - p)``; the mask has ``mask_shape`` (broadcast over ``t``) and comes from the seed."""
    name = "dropout"

    @staticmethod
    def infer(t, seed, p, mask_shape, modifier):
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        p, mask_shape, modifier = op.attrs["p"], op.attrs["mask_shape"], op.attrs["modifier"]
        view = (runtime.replicas,) + (1,) * (op.inputs[0].rank - len(mask_shape)) + tuple(mask_shape)
        return lambda x, seed: (x.float() * _keep(seed, modifier, mask_shape, p).reshape(view)).to(x.dtype)

    @staticmethod
    def grad(g):
        # The same mask, regenerated from the seed and the forward op's modifier: dropout is linear in t.
        return [Dropout.create(g.dy, g.x(1), **g.attrs), None]


def _dropout(t: Tensor, seed_tensor: Tensor, p: float, mask_shape, what: str) -> Tensor:
    check_float(t, what)
    _check_seed(seed_tensor, what)
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{what}: p must be in [0, 1), got {p}")
    mask_shape = tuple(int(s) for s in mask_shape)
    if len(mask_shape) > t.rank or any(m not in (1, n) for m, n in zip(mask_shape[::-1], t.shape[::-1])):
        raise ValueError(f"{what}: mask shape {mask_shape} does not broadcast to '{t.name}' {t.shape}")
    return Dropout.create(t, seed_tensor, p=float(p), mask_shape=mask_shape, modifier=_next_seed_modifier())


def dropout(t: Tensor, seed_tensor: Tensor, p: float) -> Tensor:
    """Zeroes each element with probability ``p`` and scales survivors by ``1/(1-p)``."""
    return _dropout(t, seed_tensor, p, t.shape, "dropout")


def shaped_dropout(t: Tensor, seed_tensor: Tensor, shape: Sequence[int], ratio: float) -> Tensor:
    """Dropout with one mask of ``shape`` broadcast over ``t`` (e.g. dropping whole rows)."""
    return _dropout(t, seed_tensor, ratio, shape, "shaped_dropout")


# ---------------------------------------------------------------- random tensors

class RandomTensor(Primitive):
    """``offset + scale * sample`` with standard normal or [0, 1) uniform samples."""
    name = "random"

    @staticmethod
    def infer(seed, shape, dtype, normal, offset, scale, modifier):
        return spec(shape, dtype)

    @staticmethod
    def kernel(seed, shape, dtype, normal, offset, scale, modifier):
        return (offset + scale * _draw(seed, modifier, shape, normal)).to(dtype.as_torch())


def _random(seed_tensor, shape, dtype, normal, offset, scale, what) -> Tensor:
    _check_seed(seed_tensor, what)
    dtype = dtypes.dtype.as_dtype(dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"{what}: dtype must be floating point, got {dtype.name}")
    return RandomTensor.create(seed_tensor, shape=tuple(int(s) for s in shape), dtype=dtype, normal=normal,
                               offset=float(offset), scale=float(scale), modifier=_next_seed_modifier(), name=what)


def random_normal(seed_tensor: Tensor, shape: Tuple[int, ...], mean: float = 0.0, std: float = 1.0,
                  dtype=dtypes.float32) -> Tensor:
    """Normal samples with ``mean`` and ``std``."""
    return _random(seed_tensor, shape, dtype, True, mean, std, "random_normal")


def random_uniform(seed_tensor: Tensor, shape: Tuple[int, ...], low: float = 0.0, high: float = 1.0,
                   dtype=dtypes.float32) -> Tensor:
    """Uniform samples in ``[low, high)``."""
    if not low <= high:
        raise ValueError(f"random_uniform: low {low} must not exceed high {high}")
    return _random(seed_tensor, shape, dtype, False, low, high - low, "random_uniform")
