"""Adam-family updater terms and the weight step that applies them."""
from typing import Optional, Union

import torch

from ... import dtypes, kernels
from ...primitive import Primitive, spec
from ...tensor import Tensor
from .accumulate import AdamVarUpdate, Factor, check_same_shape, compute_dtype, factor, increment_


def weight_decay_is_required(weight_decay: Union[None, float, Tensor]) -> bool:
    """Whether ``weight_decay`` adds a ``wd * w`` term: any tensor, or a non-zero number."""
    if isinstance(weight_decay, Tensor):
        return True
    return weight_decay is not None and weight_decay != 0.0


class AdamUpdater(Primitive):
    """The updater term ``x`` (a new tensor) for Adam, LAMB or AdaMax.

    Inputs: ``m, v, eps``, then ``w, wd`` with weight decay, then the (already incremented) time step
    ``t`` and ``beta1`` (and ``beta2`` unless AdaMax) with bias correction.
    """
    name = "adam_updater"

    @staticmethod
    def infer(m, v, *rest, mode, decay, bias, out_dtype):
        return spec(m.shape, out_dtype)

    @classmethod
    def lower(cls, op, runtime):
        return cls._updater(op)

    @classmethod
    def lower_out(cls, op, runtime):
        # Written into given memory only when no final cast makes a second tensor anyway.
        same_dtype = compute_dtype(op.inputs[0].dtype.as_torch()) == op.attrs["out_dtype"].as_torch()
        return cls._updater(op) if same_dtype else None

    @staticmethod
    def _updater(op):
        a = op.attrs
        rank, decay, bias, adamax = op.inputs[0].rank, a["decay"], a["bias"], a["mode"] == "adamax"
        out_dtype = a["out_dtype"].as_torch()
        dtype = compute_dtype(op.inputs[0].dtype.as_torch())

        # float32 on one replica: the runtime's one-pass kernel, by the same float32 steps.
        fused = (not adamax and dtype == out_dtype == torch.float32
                 and all(t.dtype == dtypes.float32 for t in op.inputs[:2] + op.inputs[3:3 + decay]))

        def updater(m, v, eps, *rest, out=None):
            def scalar(s):
                return s.reshape((s.shape[0],) + (1,) * rank).to(dtype)
            rest = list(rest)
            if fused and m.shape[0] == 1:
                w, wd = (rest.pop(0), float(rest.pop(0))) if decay else (None, 0.0)
                bc1 = bc2 = 1.0
                if bias:
                    step, beta1, beta2 = (scalar(s) for s in rest)
                    bc1, bc2 = float(1 - beta1 ** step), float(1 - beta2 ** step)
                return kernels.adam_updater(m, v, w, bc1, bc2, float(eps), wd, out)
            m, v, eps = m.to(dtype), v.to(dtype), scalar(eps)
            if decay:
                w, wd = rest.pop(0).to(dtype), scalar(rest.pop(0))
            if bias:
                step, beta1 = scalar(rest.pop(0)), scalar(rest.pop(0))
                m = m / (1 - beta1 ** step)
                if not adamax:
                    v = v / (1 - scalar(rest.pop(0)) ** step)
            # The denominator, then the quotient, are written into the output: no full-size temporary.
            x = torch.empty(m.shape, dtype=dtype) if out is None else out
            if adamax:
                torch.add(v, eps, out=x)
            else:
                torch.sqrt(v, out=x).add_(eps)
            torch.div(m, x, out=x)
            if decay:
                x.addcmul_(w, wd)
            return x.to(out_dtype)
        return updater


def _updater(mode: str, m: Tensor, v: Tensor, weight: Optional[Tensor], time_step: Optional[Tensor],
             weight_decay: Optional[Factor], beta1: Optional[Factor], beta2: Optional[Factor],
             epsilon: Factor) -> Tensor:
    what = f"{mode}_updater"
    check_same_shape(m, v, what, "acc_second_order")
    decay = weight_decay_is_required(weight_decay)
    if decay and weight is None:
        raise ValueError(f"{what}: weight decay {weight_decay!r} needs the weight")
    if mode == "adamax" and time_step is None:
        raise ValueError(f"{what}: AdaMax needs time_step")
    if time_step is not None and (beta1 is None or (mode != "adamax" and beta2 is None)):
        raise ValueError(f"{what}: bias correction (time_step given) needs beta1 and beta2")
    inputs = [m, v, factor(epsilon, what, "epsilon")]
    if decay:
        check_same_shape(m, weight, what, "weight")
        inputs += [weight, factor(weight_decay, what, "weight_decay")]
    bias = time_step is not None
    if bias:
        # popxl increments the step first, so the first update corrects with t = 1.
        inputs += [increment_(time_step), factor(beta1, what, "beta1")]
        if mode != "adamax":
            inputs.append(factor(beta2, what, "beta2"))
    out_dtype = weight.dtype if decay else m.dtype
    return AdamUpdater.create(*inputs, mode=mode, decay=decay, bias=bias, out_dtype=out_dtype, name="Updater")


def adam_updater(acc_first_order: Tensor, acc_second_order: Tensor, weight: Optional[Tensor] = None,
                 time_step: Optional[Tensor] = None, weight_decay: Optional[Factor] = None,
                 beta1: Optional[Factor] = None, beta2: Optional[Factor] = None, epsilon: Factor = 1e-07) -> Tensor:
    """Adam's updater ``x = mc / (sqrt(vc) + eps) (+ wd * w)``.

    With ``time_step`` (incremented in place first) ``mc = m / (1 - beta1**t)`` and
    ``vc = v / (1 - beta2**t)``; without it ``mc = m``, ``vc = v``.
    """
    return _updater("adam", acc_first_order, acc_second_order, weight, time_step, weight_decay, beta1, beta2,
                    epsilon)


def lamb_updater(acc_first_order: Tensor, acc_second_order: Tensor, weight: Optional[Tensor] = None,
                 time_step: Optional[Tensor] = None, weight_decay: Optional[Factor] = None,
                 beta1: Optional[Factor] = None, beta2: Optional[Factor] = None, epsilon: Factor = 1e-07) -> Tensor:
    """LAMB's updater: the same term as :func:`adam_updater` (the trust ratio is in ``adam_var_update``)."""
    return _updater("lamb", acc_first_order, acc_second_order, weight, time_step, weight_decay, beta1, beta2,
                    epsilon)


def adamax_updater(acc_first_order: Tensor, acc_second_order: Tensor, weight: Optional[Tensor] = None,
                   time_step: Optional[Tensor] = None, weight_decay: Optional[Factor] = None,
                   beta1: Factor = 0.9, epsilon: Factor = 1e-07) -> Tensor:
    """AdaMax's updater ``x = m / (1 - beta1**t) / (v + eps) (+ wd * w)``; ``time_step`` is incremented first."""
    return _updater("adamax", acc_first_order, acc_second_order, weight, time_step, weight_decay, beta1, None,
                    epsilon)


def adam_var_update(t: Tensor, x: Tensor, r1: Tensor, r2: Tensor, learning_rate: Optional[Factor] = None,
                    max_weight_norm: Optional[Factor] = None) -> Tensor:
    """``t -= lr * ratio * x`` in place, ``ratio = min(sqrt(r1), max_weight_norm) / sqrt(r2)``, or 1
    where ``r1``, ``r2`` or a ``max_weight_norm`` tensor is 0 (PopART's kernel).

    ``r1``/``r2`` are the squared norms of the weight and of the updater (LAMB's trust ratio; pass
    zeros for Adam). ``learning_rate`` None means 0, as popxl. ``max_weight_norm`` None means no cap;
    a constant 0, which PopART refuses, is an error.
    """
    what = "adam_var_update"
    check_same_shape(t, x, what, "x")
    if not isinstance(max_weight_norm, (Tensor, type(None))) and float(max_weight_norm) == 0.0:
        raise ValueError(f"{what} of '{t.name}': max_weight_norm must not be a constant 0 (pass None for no cap, "
                         f"or a tensor)")
    r1, r2 = factor(r1, what, "r1"), factor(r2, what, "r2")
    mwn = factor(float("inf") if max_weight_norm is None else max_weight_norm, what, "max_weight_norm")
    return AdamVarUpdate.create(t, x, r1, r2, factor(0.0 if learning_rate is None else learning_rate, what,
                                                     "learning_rate"), mwn, name=f"{what}_{t.name}")
