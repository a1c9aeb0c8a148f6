"""In-place variable updates: accumulators, scaling, copies and the Adam/LAMB weight step.

Each op writes its first input ``t`` and returns an alias of it. ``t`` and the update ``X`` have the
same shape (no broadcasting) but may differ in dtype; factors are python numbers (constants) or
scalar tensors. Half-precision values are combined in float32 and rounded once into ``t``: either
in float32 copies, or, for the formulas that are one torch in-place op whose half-precision kernel
computes in float32 from a float factor (``rounds_once``), on ``t`` itself, which gives the same bits
without the copies (tests/test_var_updates.py checks each such formula against the copies).
"""
from typing import Optional, Union

import numpy as np
import torch

from ... import dtypes
from ...primitive import Primitive
from ...tensor import Constant, Tensor, constant
from .._util import shares_memory

Factor = Union[float, Tensor]


def factor(f: Factor, what: str, name: str) -> Tensor:
    """A scalar factor as a tensor: python numbers become float32 constants."""
    if isinstance(f, Tensor):
        if f.nelms != 1:
            raise ValueError(f"{what}: {name} must be a scalar, got '{f.name}' {f.shape}")
        return f
    return constant(np.float32(f), dtypes.float32, name=name)


def check_same_shape(t: Tensor, x: Tensor, what: str, name: str = "X") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: {name} must be a Tensor, got {type(x).__name__}")
    if x.shape != t.shape:
        raise ValueError(f"{what}: {name} '{x.name}' {x.shape} must have the shape of t '{t.name}' {t.shape} "
                         f"(no broadcasting)")


def apart_from(t: torch.Tensor, values):
    """``values``, each copied if it is ``t``'s memory: a formula writing ``t`` in place step by step
    (``t *= f`` then ``t += x * x``) would otherwise read what it has already written."""
    return [x.clone() if shares_memory(t, x) else x for x in values]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class VarUpdate(Primitive):
    """``t <- formula(t, *full, *scalars)`` in place.

    ``full`` inputs (``num_full`` of them, ``t`` first) have ``t``'s shape; the rest are scalar
    factors, broadcast over ``t``: python floats where they are constants, else tensors shaped to
    broadcast. ``formula`` writes its first value (``t``, or its float32 copy) with torch's in-place
    ops, so that no tensor of ``t``'s size is made (above glibc's mmap threshold each fresh one
    costs a map, page faults and an unmap).
    """
    modifies = (0,)
    num_full = 2

    @staticmethod
    def formula(*values):
        raise NotImplementedError

    @staticmethod
    def rounds_once(constants) -> bool:
        """Whether ``formula`` on half-precision ``t`` and ``X`` with python-float factors (``constants``:
        the constant factors' values, None for a tensor's) computes in float32 and rounds once."""
        return False

    @staticmethod
    def infer(t, *others, **attrs):
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        rank, num_full, formula = op.inputs[0].rank, cls.num_full, cls.formula
        dtype = compute_dtype(op.inputs[0].dtype.as_torch())
        widen = dtype != op.inputs[0].dtype.as_torch()
        constants = [float(s._data.reshape(-1)[0]) if isinstance(s, Constant) else None
                     for s in op.inputs[num_full:]]
        if widen and cls.rounds_once(constants) and all(x.dtype == op.inputs[0].dtype for x in op.inputs[1:num_full]) \
                and (runtime.replicas == 1 or None not in constants):
            def update_in_place(t, *others):
                # One replica: a scalar tensor's value is the python float the formula takes.
                scalars = [float(s.reshape(-1)[0]) if c is None else c
                           for c, s in zip(constants, others[num_full - 1:])]
                formula(t, *apart_from(t, others[:num_full - 1]), *scalars)
                return t
            return update_in_place

        def update(t, *others):
            full, scalars = apart_from(t, others[:num_full - 1]), others[num_full - 1:]
            scalars = [s.reshape((s.shape[0],) + (1,) * rank).to(dtype) if c is None else c
                       for c, s in zip(constants, scalars)]
            into = t.to(dtype) if widen else t
            formula(into, *(x.to(dtype) for x in full), *scalars)
            return t.copy_(into) if widen else t
        return update


def _var_update(name: str, formula, num_full: int = 2, rounds_once=None):
    """A ``VarUpdate`` named ``name``; ``rounds_once(constants)`` as ``VarUpdate.rounds_once`` (default: never)."""
    attrs = {"name": name, "formula": staticmethod(formula), "num_full": num_full}
    if rounds_once is not None:
        attrs["rounds_once"] = staticmethod(rounds_once)
    return type(name.title().replace("_", ""), (VarUpdate,), attrs)


def _always(constants) -> bool:
    return True


def _float_factor(constants) -> bool:
    """A constant factor: ``addcmul_(x, x, value=f)`` is one op. A tensor factor's formula is another,
    ``addcmul_(x * f, x)``, whose product ``x * f`` on float16 would round before the sum."""
    return None not in constants


def _add_scaled(t, x, f):
    """``t += f * x`` in place, for a float or a broadcast tensor ``f``."""
    return t.add_(x, alpha=f) if isinstance(f, float) else t.addcmul_(x, f)


def _add_scaled_square(t, x, f):
    """``t += f * x * x`` in place (a temporary only for a tensor ``f``)."""
    return t.addcmul_(x, x, value=f) if isinstance(f, float) else t.addcmul_(x * f, x)


def _accumulate_mean(t, x, step):
    # t + (x - t) / (step + 1) in one pass. At step 0 torch's lerp computes x - (x - t) * 0: x where t is
    # finite and NaN where it is not, as PopART's (step / (step + 1)) t + x / (step + 1); unlike PopART
    # also NaN where x - t overflows (float32 values beyond half the largest float).
    return t.lerp_(x, 1 / (step + 1))


def _lamb_ratio(r1sq, r2sq, mwn):
    """``min(sqrt(r1sq), mwn) / sqrt(r2sq)``, or 1 where ``r1sq``, ``r2sq`` or ``mwn`` is 0 (PopART's)."""
    r1sq, r2sq, mwn = torch.as_tensor(r1sq), torch.as_tensor(r2sq), torch.as_tensor(mwn)
    ratio = torch.minimum(torch.sqrt(r1sq), mwn.to(r1sq.dtype)) / torch.sqrt(r2sq)
    return torch.where((r1sq == 0) | (r2sq == 0) | (mwn == 0), torch.ones_like(ratio), ratio)


# torch's half-precision add_ rounds its alpha to half first, so only a plain sum rounds once.
Accumulate = _var_update("accumulate", _add_scaled, rounds_once=lambda constants: constants == [1.0])
AccumulateSquare = _var_update("accumulate_square", _add_scaled_square, rounds_once=_float_factor)
AccumulateMean = _var_update("accumulate_mean", _accumulate_mean, rounds_once=_always)
# One pass, as torch.optim.AdamW updates its first moment.
AccumulateMovingAverage = _var_update("accumulate_moving_average", lambda t, x, f: t.lerp_(x, 1 - f),
                                      rounds_once=_always)
AccumulateMovingAverageSquare = _var_update("accumulate_moving_average_square",
                                            lambda t, x, f: _add_scaled_square(t.mul_(f), x, 1 - f))
AccumulatorScale = _var_update("accumulator_scale", lambda t, f: t.mul_(f), num_full=1, rounds_once=_always)
AccumulatorZero = _var_update("accumulator_zero", lambda t: t.zero_(), num_full=1, rounds_once=_always)
CopyVarUpdate = _var_update("copy_var_update", lambda t, x: t.copy_(x), rounds_once=_always)
Increment = _var_update("increment", lambda t: t.add_(1), num_full=1, rounds_once=_always)
AdamVarUpdate = _var_update("adam_var_update",
                            lambda t, x, r1sq, r2sq, lr, mwn: _add_scaled(t, x, -lr * _lamb_ratio(r1sq, r2sq, mwn)))


def _accumulate(prim, t: Tensor, X: Tensor, f: Factor, what: str) -> Tensor:
    check_same_shape(t, X, what)
    return prim.create(t, X, factor(f, what, "f"), name=f"{what}_{t.name}")


def accumulate_(t: Tensor, X: Tensor, f: Optional[Factor] = None) -> Tensor:
    """``t += f * X`` in place (``t += X`` when ``f`` is None)."""
    return _accumulate(Accumulate, t, X, 1.0 if f is None else f, "accumulate_")


def accumulate_square_(t: Tensor, X: Tensor, f: Factor = 1.0) -> Tensor:
    """``t += f * X**2`` in place."""
    return _accumulate(AccumulateSquare, t, X, f, "accumulate_square_")


def accumulate_mean_(t: Tensor, X: Tensor, step: Factor) -> Tensor:
    """Running mean in place: ``t = step/(step+1) * t + X/(step+1)``.

    ``step`` is the number of values accumulated so far; the op does not increment it. At step 0
    ``t`` becomes ``X`` where it held a finite value and NaN where it held an infinity or NaN (``0 * t``
    is NaN there), as on the IPU: a restarted mean needs no zeroing only if ``t`` is finite. (Here, not
    on the IPU, also NaN where ``X - t`` overflows: float32 values beyond half the largest float.)
    """
    return _accumulate(AccumulateMean, t, X, step, "accumulate_mean_")


def accumulate_moving_average_(t: Tensor, X: Tensor, f: Factor) -> Tensor:
    """``t = f * t + (1 - f) * X`` in place."""
    return _accumulate(AccumulateMovingAverage, t, X, f, "accumulate_moving_average_")


def accumulate_moving_average_square_(t: Tensor, X: Tensor, f: Factor) -> Tensor:
    """``t = f * t + (1 - f) * X**2`` in place."""
    return _accumulate(AccumulateMovingAverageSquare, t, X, f, "accumulate_moving_average_square_")


def accumulator_scale_(t: Tensor, f: Factor) -> Tensor:
    """``t *= f`` in place; a constant 0 zeroes ``t`` outright (non-finite values too)."""
    if not isinstance(f, Tensor) and float(f) == 0.0:
        return accumulator_zero_(t)
    return AccumulatorScale.create(t, factor(f, "accumulator_scale_", "f"), name=f"accumulator_scale_{t.name}")


def accumulator_zero_(t: Tensor) -> Tensor:
    """Zeroes ``t`` in place."""
    return AccumulatorZero.create(t, name=f"accumulator_zero_{t.name}")


def copy_var_update_(t: Tensor, X: Tensor) -> Tensor:
    """``t = X`` in place."""
    check_same_shape(t, X, "copy_var_update_")
    return CopyVarUpdate.create(t, X, name=f"copy_var_update_{t.name}")


def increment_(t: Tensor) -> Tensor:
    """``t += 1`` in place (the time step of bias-corrected optimizers)."""
    return Increment.create(t, name=f"increment_{t.name}")


class SparseAccumulate(Primitive):
    """``t[..., indices[i], ...] += f * X[..., i, ...]`` along ``axis``, in place (repeated indices add up;
    indices outside ``[0, size)``, negative ones included, add nothing)."""
    name = "sparse_accumulate"
    modifies = (0,)

    @staticmethod
    def infer(t, X, indices, f, axis):
        expected = t.shape[:axis] + indices.shape + t.shape[axis + 1:]
        if X.shape != expected:
            raise ValueError(f"X '{X.name}' {X.shape} must be {expected}: t's shape with axis "
                             f"{axis} replaced by the indices' shape {indices.shape}")
        if not indices.dtype.is_int:
            raise TypeError(f"indices '{indices.name}' must be integers, got {indices.dtype.name}")
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        t_in, _, indices, _ = op.inputs
        axis, rank, r = op.attrs["axis"], t_in.rank, runtime.replicas
        count, size = max(indices.nelms, 1), t_in.shape[axis]
        replicas = torch.arange(r).unsqueeze(1).expand(r, count)
        rows_shape = (r,) + t_in.shape[:axis] + (count,) + t_in.shape[axis + 1:]
        dtype = compute_dtype(t_in.dtype.as_torch())
        widen = dtype != t_in.dtype.as_torch()

        def sparse_accumulate(t, x, idx, f):
            # Index axis `axis` (moved next to the replica axis) with one row of indices per replica.
            rows = x.reshape(rows_shape).movedim(axis + 1, 1).to(dtype)
            scaled = rows * f.reshape((r,) + (1,) * rank).to(dtype)
            # Half-precision rows sharing an index are summed in float32 and rounded once into t.
            acc = t.to(dtype) if widen else t
            idx = idx.reshape(r, count).long()
            valid = (idx >= 0) & (idx < size)
            if not bool(valid.all()):  # as popops' multiUpdateAdd, which reads indices as unsigned: skipped
                scaled = torch.where(valid.reshape(valid.shape + (1,) * (scaled.dim() - 2)), scaled, 0)
                idx = torch.where(valid, idx, 0)
            acc.movedim(axis + 1, 1).index_put_((replicas, idx), scaled, accumulate=True)
            return t.copy_(acc) if widen else t
        return sparse_accumulate


def sparse_accumulate_(t: Tensor, X: Tensor, indices: Tensor, axis: int = 0, f: Optional[Factor] = None,
                       W: Optional[Tensor] = None) -> Tensor:
    """Adds the slices of ``X`` into ``t`` at ``indices`` along ``axis`` (scaled by ``f``), in place.

    ``X`` is shaped like ``t`` with ``axis`` replaced by ``indices.shape`` (the gradient of a gather).
    ``W`` only guides tile mapping on the IPU and is not used here.
    """
    what = "sparse_accumulate_"
    if not isinstance(indices, Tensor):
        raise TypeError(f"{what}: indices must be a Tensor, got {type(indices).__name__}")
    if not -t.rank <= axis < t.rank:
        raise ValueError(f"{what}: axis {axis} is out of range for t '{t.name}' {t.shape}")
    return SparseAccumulate.create(t, X, indices, factor(1.0 if f is None else f, what, "f"), axis=axis % t.rank,
                                   name=f"{what}{t.name}")
