"""Neural-network ops: matmul, softmax, normalisation."""
import functools
from typing import Optional

import numpy as np
import torch

from .. import dtypes, products
from ..primitive import Primitive, spec
from ..tensor import Tensor
from ._util import broadcast_shape, check_float, norm_axis, replica_view_shape, unbroadcast


def _matmul_shape(a, b):
    if a.rank == 0 or b.rank == 0:
        raise ValueError("matmul needs inputs of rank >= 1")
    sa = (1,) + a.shape if a.rank == 1 else a.shape
    sb = b.shape + (1,) if b.rank == 1 else b.shape
    if sa[-1] != sb[-2]:
        raise ValueError(f"contraction dimensions differ: '{a.name}' {a.shape} @ '{b.name}' {b.shape}")
    batch = broadcast_shape(sa[:-2], sb[:-2])
    out = batch + (sa[-2], sb[-1])
    if a.rank == 1:
        out = out[:-2] + out[-1:]
    if b.rank == 1:
        out = out[:-1]
    return out


@functools.lru_cache(maxsize=None)
def native_half_matmul() -> bool:
    """Whether torch multiplies float16 matrices natively here: oneDNN's float16 kernels (processors
    with AVX512-FP16 or AMX-FP16), which accumulate in float32 as the products of float32 copies do,
    at a fraction of their cost (a (1, 4096) x (4096, 16384) product: 13 against 99 ms, the copies
    of the weight being most of it). Elsewhere torch's float16 product is a slow generic loop, and
    the copies win."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
    return bool(supported is not None and supported())


def half_product_operands(x: torch.Tensor, y: torch.Tensor, half_output: bool):
    """The float16 operands ``x``, ``y`` as their product takes them, summing in float32 either way:
    themselves for a float16 output where ``native_half_matmul``; else float32 copies (a float32
    output keeps every bit of the float32 sums)."""
    if half_output and native_half_matmul():
        return x, y
    return x.float(), y.float()


class MatMul(Primitive):
    """Batched, broadcasting matmul; float16 inputs accumulate in float32 (for a float16 output
    natively where ``native_half_matmul``, else as float32 copies)."""
    name = "matmul"

    @staticmethod
    def infer(a, b, output_type):
        if a.dtype != b.dtype:
            raise TypeError(f"matmul inputs must share a dtype, got {a.dtype.name} and {b.dtype.name}")
        return spec(_matmul_shape(a, b), output_type or a.dtype)

    @classmethod
    def lower(cls, op, runtime):
        weight_like = cls.lower_out(op, runtime)
        if weight_like is not None:
            return weight_like
        a, b = op.inputs
        out = op.outputs[0].dtype.as_torch()
        # Align ranks so the leading replica axis lines up with the other operand's.
        ra, rb = max(a.rank, 2), max(b.rank, 2)
        rank = max(ra, rb)
        sa = replica_view_shape(a.shape if a.rank > 1 else (1,) + a.shape, rank, runtime.replicas)
        sb = replica_view_shape(b.shape if b.rank > 1 else b.shape + (1,), rank, runtime.replicas)
        out_shape = (runtime.replicas,) + op.outputs[0].shape
        if a.rank > 1 and all(d == 1 for d in sb[1:-2]):
            # One matrix per replica on the right: fold the left batch axes into its rows, so the
            # matrix is read once rather than once per batch entry (torch would broadcast it).
            sa, sb = (runtime.replicas, -1, sa[-1]), (runtime.replicas,) + sb[-2:]
        half, half_output = a.dtype == dtypes.float16, op.outputs[0].dtype == dtypes.float16

        def matmul(x, y):
            if half:
                x, y = half_product_operands(x, y, half_output)
            return torch.matmul(x.reshape(sa), y.reshape(sb)).reshape(out_shape).to(out)
        return matmul

    @classmethod
    def lower_out(cls, op, runtime):
        """float32 with a weight-like rhs (rank <= 2): every row of lhs in one (replica-batched) product,
        as torch.matmul does for a 2-D rhs; the replica axis would otherwise make it a broadcast bmm."""
        a, b = op.inputs
        if not (a.dtype == dtypes.float32 and op.outputs[0].dtype == dtypes.float32 and a.rank >= 2 and b.rank <= 2):
            return None
        rows, k = int(np.prod(a.shape[:-1], dtype=np.int64)), a.shape[-1]
        n = b.shape[-1] if b.rank == 2 else 1
        out_shape = (runtime.replicas,) + op.outputs[0].shape
        if runtime.replicas == 1:
            onednn = products.takes_onednn(rows, k, n)

            def matmul(x, y, out=None):
                x, y = x.reshape(rows, k), y.reshape(k, n)
                if onednn:
                    w_rows = y.t() if y.t().is_contiguous() else products.read_only_copy(runtime.read_only, y)
                    if w_rows is not None:
                        return products.linear(x, w_rows).view(out_shape)
                product = torch.mm(x, y, out=None if out is None else out.view(rows, n))
                return product.view(out_shape)
        else:
            def matmul(x, y, out=None):
                product = torch.bmm(x.reshape(-1, rows, k), y.reshape(-1, k, n),
                                    out=None if out is None else out.view(-1, rows, n))
                return product.view(out_shape)
        return matmul

    @staticmethod
    def grad(g):
        from .elementwise import cast
        from .shape import reshape, transpose
        a, b = g.in_spec(0), g.in_spec(1)
        # With output_type the gradient arrives in that dtype; the inputs' gradients are in theirs.
        dy = g.dy if g.dy.dtype == a.dtype else cast(g.dy, a.dtype)
        dy2 = reshape(dy, _matmul_shape_2d(a.shape, b.shape, dy.shape))
        # Each operand's gradient reads only the other operand, so autodiff keeps only what is needed.
        x_shape = a.shape if len(a.shape) > 1 else (1,) + a.shape
        y_shape = b.shape if len(b.shape) > 1 else b.shape + (1,)
        da = db = None
        if g.needs(0):
            y = reshape(g.x(1), y_shape) if y_shape != b.shape else g.x(1)
            da = matmul(dy2, transpose(y, _swap_last(y.rank)))
            da = reshape(unbroadcast(da, x_shape), a.shape)
        if g.needs(1):
            x = reshape(g.x(0), x_shape) if x_shape != a.shape else g.x(0)
            if len(a.shape) > 2 and len(b.shape) == 2:
                # Batch axes of lhs summed in the product itself: one (k, rows) @ (rows, n) matmul.
                rows = int(np.prod(a.shape[:-1], dtype=np.int64))
                db = matmul(transpose(reshape(x, (rows, a.shape[-1])), (1, 0)), reshape(dy2, (rows, b.shape[-1])))
            else:
                db = matmul(transpose(x, _swap_last(x.rank)), dy2)
                db = reshape(unbroadcast(db, y_shape), b.shape)
        return [da, db]


def _swap_last(rank):
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def _matmul_shape_2d(sa, sb, sy):
    """The output shape with the matrix axes that rank-1 operands dropped put back."""
    sy = tuple(sy)
    if len(sa) == 1:
        sy = sy[:-1] + (1,) + sy[-1:] if len(sb) > 1 else sy + (1,)
    if len(sb) == 1:
        sy = sy + (1,)
    return sy


def lowering_fusions(graph, runtime, classes, written):
    """Lowering's pattern rewrites for ``runtime`` (a session's: its replicas, its read-only variables):
    ``{op: (kernel, inputs)}`` for ops whose step computes what they and
    the ops they absorb (the second result) would have, from other inputs. A rewritten op's absorbed
    producers have no other use and are no graph output, so no step can see them missing; and no op
    between the first of them and the rewritten op writes the step's inputs, which it reads later than
    they would have (``classes`` and ``written``: the graph's storage classes and the written ones).

    * ``x @ w`` whose only use is ``+ b`` (``add`` or ``add_``) with a 1-D bias, float32 on one replica:
      one ``torch.addmm`` at the add (or oneDNN's product with the bias, ``products``).
    * ``softmax(s / c + mask)`` over the last axis (the attention's scores), float32, with ``c`` a scalar
      constant and ``mask`` broadcasting over ``s`` with its shape a suffix of ``s``'s but for leading
      1s and one run of 1s (e.g. (batch, 1, queries, keys), the same for every head): one pass of the
      runtime's C++ kernel at the softmax (``kernels.scaled_masked_softmax``).
    """
    uses = {}
    for op in graph._ops:
        for t in op.inputs:
            uses.setdefault(t.id, []).append(op)
    outputs = {t.id for t in graph._outputs}

    def only_use(t: Tensor, prims):
        """``t``'s producer when it is one of ``prims`` in this graph and ``t`` has no other use."""
        op = t._producer
        if op is None or op.prim not in prims or op.graph is not graph or t.id in outputs or len(uses[t.id]) != 1:
            return None
        return op

    position = {op: k for k, op in enumerate(graph._ops)}
    writes = None  # per op, the storage classes it writes: only worked out once a pattern matches

    def written_between(producers, op, inputs) -> bool:
        nonlocal writes
        if writes is None:
            writes = [{classes.find(o.inputs[i].id) for i in o.modified_inputs} for o in graph._ops]
        read = {classes.find(t.id) for t in inputs}
        return any(writes[k] & read for k in range(min(position[p] for p in producers) + 1, position[op]))

    fused, absorbed = {}, set()
    for op in graph._ops:
        rewrite = (_bias_matmul(op, only_use, runtime)
                   or _attention_softmax(op, only_use, runtime.replicas, classes, written))
        if rewrite is not None and not written_between(rewrite[2], op, rewrite[1]):
            fused[op] = rewrite[:2]
            absorbed.update(rewrite[2])
    return fused, absorbed


def _bias_matmul(op, only_use, runtime):
    from .elementwise import Add, AddInplace
    if runtime.replicas != 1 or op.prim not in (Add, AddInplace):
        return None
    for i in ((0, 1) if op.prim is Add else (0,)):
        product, bias = op.inputs[i], op.inputs[1 - i]
        mm = only_use(product, (MatMul,))
        if mm is None or mm.attrs["output_type"] not in (None, product.dtype):
            continue
        x, w = mm.inputs
        if (x.rank < 2 or w.rank != 2 or bias.shape != (w.shape[1],)
                or any(t.dtype != dtypes.float32 for t in (x, w, bias))):
            continue
        return _addmm_kernel(x.shape, w.shape, runtime), (x, w, bias), (mm,)
    return None


def _attention_softmax(op, only_use, replicas: int, classes, written):
    from ..tensor import Constant
    from .elementwise import Add, Div
    if op.prim is not Softmax or op.attrs["axis"] != op.inputs[0].rank - 1 or op.inputs[0].dtype != dtypes.float32:
        return None
    add = only_use(op.inputs[0], (Add,))
    if add is None:
        return None
    for i in (0, 1):
        quotient, mask = add.inputs[i], add.inputs[1 - i]
        div = only_use(quotient, (Div,))
        if div is None:
            continue
        scores, scale = div.inputs
        if (not isinstance(scale, Constant) or scale.nelms != 1 or scale.dtype != dtypes.float32
                or classes.find(scale.id) in written  # the kernel takes the constant's value once
                or scores.shape != op.inputs[0].shape or scores.nelms == 0 or mask.dtype != dtypes.float32
                or mask.rank == 0 or mask.rank > scores.rank or mask.shape[-1] != scores.shape[-1]):
            continue
        # A constant is the same on every replica; another mask is each replica's own, its leading axis,
        # which lines up with the scores' only once the mask has their rank.
        same_everywhere = isinstance(mask, Constant)
        lead = () if same_everywhere else (replicas,)
        mask_rows = (1,) * (scores.rank - mask.rank) + mask.shape[:-1]
        blocks = _mask_row_blocks(lead + scores.shape[:-1], lead + mask_rows)
        if blocks is None:
            continue
        return _softmax_kernel(float(scale._data.reshape(())), same_everywhere, *blocks), (scores, mask), (div, add)
    return None


def _mask_row_blocks(rows_shape, mask_rows_shape):
    """``(inner, repeat)`` for the kernel (``kernels.scaled_masked_softmax``) when a mask with rows of shape
    ``mask_rows_shape`` broadcasts over rows of shape ``rows_shape`` as one repeats: its axes, after the
    leading ones it lacks or has as 1 (the whole mask repeats), equal the rows' except for one run of
    1s (each block of the axes after it repeats); None for other broadcasts."""
    kept = list(mask_rows_shape)
    while kept and kept[0] == 1:
        kept.pop(0)
    rows = list(rows_shape[len(rows_shape) - len(kept):]) if kept else []
    differ = [i for i, (m, s) in enumerate(zip(kept, rows)) if m != s]
    if any(kept[i] != 1 for i in differ) or (differ and differ != list(range(differ[0], differ[-1] + 1))):
        return None
    if not differ:
        return int(np.prod(kept, dtype=np.int64)), 1
    return (int(np.prod(kept[differ[-1] + 1:], dtype=np.int64)),
            int(np.prod(rows[differ[0]:differ[-1] + 1], dtype=np.int64)))


def _softmax_kernel(scale: float, same_everywhere: bool, inner: int, repeat: int):
    from .. import kernels

    def scaled_masked_softmax(scores, mask, out=None):
        return kernels.scaled_masked_softmax(scores, mask[0] if same_everywhere else mask, scale, out, inner, repeat)
    return scaled_masked_softmax


def _addmm_kernel(x_shape, w_shape, runtime):
    rows, (k, n) = int(np.prod(x_shape[:-1], dtype=np.int64)), w_shape
    out_shape = (1,) + tuple(x_shape[:-1]) + (n,)
    with_bias_row = _BiasRow(k, n) if rows * n * 4 >= _BIAS_ROW_FROM_BYTES else lambda w, b: None
    onednn = products.takes_onednn(rows, k, n)

    def addmm(x, w, b, out=None):
        if onednn:
            w_rows = products.read_only_copy(runtime.read_only, w[0])
            if w_rows is not None:
                return products.linear(x.reshape(rows, k), w_rows, b[0]).view(out_shape)
        out = None if out is None else out.view(rows, n)
        w_b = with_bias_row(w[0], b[0])
        if w_b is None:
            product = torch.addmm(b[0], x.reshape(rows, k), w[0], out=out)
        else:
            x_1 = torch.empty((rows, k + 1), dtype=x.dtype)
            x_1[:, :k] = x.reshape(rows, k)
            x_1[:, k] = 1
            product = torch.mm(x_1, w_b, out=out)
        return product.view(out_shape)
    return addmm


# Smallest float32 output for which the product with a bias row is used (measured on 2 threads against
# addmm: 5.7% faster at 256 x 50400, about even at 64 x 50400 and at 256 x 4096, and 2-5% slower from
# 128 x 4096 down, where writing the bias first costs little and the odd depth of k + 1 costs more).
_BIAS_ROW_FROM_BYTES = 16 << 20


class _BiasRow:
    """``[w; b]`` (k + 1, n) for a contiguous weight ``w`` (k, n) whose bias ``b`` (n,) is stored right
    after it (a model may lay its weights out so), else None. Then ``[x, 1] @ [w; b]`` is ``x @ w + b``
    in one product: addmm would first write the bias into every output row (4 ms of a 70 ms LM head
    product of 256 rows and 50400 columns), then have the product read and write them again.
    """

    def __init__(self, k: int, n: int):
        self.k, self.n = k, n
        self.known = {}  # (w's address, b's address) -> the (k + 1, n) view of their memory

    def __call__(self, w: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
        address = w.data_ptr()
        if (b.data_ptr() != address + w.numel() * w.element_size() or not w.is_contiguous()
                or not b.is_contiguous() or w.dtype != b.dtype):
            return None
        key = (address, b.data_ptr())
        if key not in self.known:
            # torch bounds a view by its own storage, which ends at w: numpy takes the two as one block.
            rows = np.lib.stride_tricks.as_strided(w.numpy(), (self.k + 1, self.n))
            self.known = {key: torch.from_numpy(rows)}  # the last pair seen: a weight's memory is kept
        return self.known[key]


def matmul(lhs: Tensor, rhs: Tensor, available_memory_proportion=None, output_type=None, partials_type=None):
    """Numpy-style matmul; ``output_type`` casts the result."""
    output_type = dtypes.dtype.as_dtype(output_type) if output_type is not None else None
    return MatMul.create(lhs, rhs, output_type=output_type)


class Softmax(Primitive):
    name = "softmax"

    @staticmethod
    def infer(t, axis):
        check_float(t, "softmax")
        return t.spec

    @classmethod
    def lower(cls, op, runtime):
        axis = op.attrs["axis"] + 1
        if op.inputs[0].dtype == dtypes.float16:
            return lambda x: torch.softmax(x.float(), axis).half()
        return lambda x: torch.softmax(x, axis)

    @staticmethod
    def grad(g):
        return [SoftmaxGrad.create(g.dy, g.y(0), axis=g.attrs["axis"])]


class SoftmaxGrad(Primitive):
    name = "softmax_grad"

    @staticmethod
    def infer(dy, y, axis):
        return dy.spec

    @classmethod
    def lower(cls, op, runtime):
        axis = op.attrs["axis"] + 1
        if op.inputs[0].dtype == dtypes.float16:  # in float32, as the forward
            return lambda dy, y: _softmax_grad(dy.float(), y.float(), axis).half()
        return lambda dy, y: _softmax_grad(dy, y, axis)


def _softmax_grad(dy, y, axis):
    """``y * (dy - sum(dy * y))`` along ``axis``: torch's fused kernel (one pass, 2.8x the four ops' speed
    on (1, 8, 256, 256) on 2 threads)."""
    return torch._softmax_backward_data(dy, y, axis, dy.dtype)


def softmax(t: Tensor, axis: int) -> Tensor:
    """Numerically stable softmax along ``axis``."""
    return Softmax.create(t, axis=norm_axis(axis, t))
