"""Host-array helpers for laying out sharded / replicated variable data (numpy only)."""
from typing import List, Optional, Sequence, Union

import numpy as np


def handle_negative_axis(x: np.ndarray, axis: int) -> int:
    """``axis`` as a non-negative axis of ``x``; IndexError when out of range."""
    if x.ndim == 0:
        raise IndexError("axis of a 0-dimensional array")
    if not -x.ndim <= axis < x.ndim:
        raise IndexError(f"axis {axis} is out of range for an array of rank {x.ndim}")
    return axis % x.ndim


def shard(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    """``x`` split into ``n`` equal contiguous blocks along ``axis``, stacked on a new axis 0.

    ``shard(x, n, a)[i]`` is block ``i``; ValueError if ``x.shape[a]`` is not divisible by ``n``.
    """
    x = np.asarray(x)
    axis = handle_negative_axis(x, axis)
    if x.shape[axis] % n:
        raise ValueError(f"cannot shard axis {axis} of length {x.shape[axis]} (shape {x.shape}) into {n} equal parts")
    return np.stack(np.split(x, n, axis=axis))


def unshard_arrays(xs: List[np.ndarray], axis: int) -> np.ndarray:
    """Concatenates shards (each without the shard axis) along ``axis``."""
    if len({np.ndim(x) for x in xs}) > 1:
        raise ValueError(f"shards must have the same rank, got ranks {[np.ndim(x) for x in xs]}")
    return np.concatenate(xs, axis=handle_negative_axis(np.asarray(xs[0]), axis))


def unshard(x: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`shard`: the blocks ``x[i]`` concatenated along ``axis`` (an axis of a block)."""
    return unshard_arrays(list(np.asarray(x)), axis)


def repeat(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    """``n`` copies of ``x`` stacked on a new axis inserted at ``axis``."""
    return np.repeat(np.expand_dims(x, axis), n, axis=axis)


def repeat_axis(x: np.ndarray, n: int, axis: int = 0) -> np.ndarray:
    """``x`` tiled ``n`` times along the existing ``axis``."""
    reps = [1] * np.ndim(x)
    reps[axis] = n
    return np.tile(x, reps)


def repeat_shard(x: np.ndarray, n_repeats: int, n_shards: int, shard_axis: int,
                 sharded_tensor: str = "contiguous") -> np.ndarray:
    """``n_shards`` shards of ``x`` repeated ``n_repeats`` times on axis 0.

    ``"contiguous"``: shard order repeated (``s0 s1 s0 s1``); ``"strided"``: each shard repeated in
    place (``s0 s0 s1 s1``).
    """
    shards = shard(x, n_shards, shard_axis)
    if sharded_tensor == "contiguous":
        return repeat_axis(shards, n_repeats, 0)
    if sharded_tensor == "strided":
        return np.repeat(shards, n_repeats, axis=0)
    raise ValueError(f"sharded_tensor must be 'contiguous' or 'strided', got {sharded_tensor!r}")


def pad_axis(x: np.ndarray, n: int, axis: int, value: Union[int, float] = 0) -> np.ndarray:
    """``x`` padded at the end of ``axis`` with ``value`` up to length ``n``."""
    x = np.asarray(x)
    axis = handle_negative_axis(x, axis)
    if x.shape[axis] > n:
        raise ValueError(f"cannot pad axis {axis} of length {x.shape[axis]} (shape {x.shape}) to a shorter {n}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return np.pad(x, widths, constant_values=value)


def squeeze_safe(x: np.ndarray, axis: Optional[Union[int, Sequence[int]]] = None) -> np.ndarray:
    """``np.squeeze`` that skips the given axes which are not of length 1."""
    if axis is None:
        return np.squeeze(x)
    axes = [axis] if isinstance(axis, int) else axis
    axes = sorted({handle_negative_axis(x, a) for a in axes}, reverse=True)
    for a in axes:
        if x.shape[a] == 1:
            x = np.squeeze(x, axis=a)
    return x


def tensor_parallel_input(input_data: np.ndarray, tp: int, rf: int, repeat_fn=None) -> np.ndarray:
    """Host-stream data for ``rf = dp * tp`` replicas, each group of ``tp`` consecutive replicas
    receiving the same sample (``repeat_fn(data, i)`` may alter the copy for TP index ``i``).

    ``input_data`` ``(n, *shape)`` -> ``(n * tp / rf, rf, *shape)`` with axes of length 1 squeezed
    from the first two.
    """
    if tp > rf or rf % tp:
        raise ValueError(f"tensor parallel factor tp={tp} must divide the replication factor rf={rf}")
    data = np.expand_dims(input_data, 1)
    copies = [repeat_fn(data.copy(), i) if repeat_fn else data for i in range(tp)]
    out = np.concatenate(copies, axis=1).reshape(-1, rf, *np.shape(input_data)[1:])
    return squeeze_safe(out, [0, 1])


def split2D(x: np.ndarray, n_1: int, n_2: int, axis_1: int, axis_2: int) -> List[List[np.ndarray]]:
    """``x`` split into ``n_1`` blocks along ``axis_1``, each split into ``n_2`` blocks along ``axis_2``."""
    return [np.split(block, n_2, axis_2) for block in np.split(np.asarray(x), n_1, axis_1)]


def shard2D(x: np.ndarray, n_1: int, n_2: int, axis_1: int, axis_2: int) -> np.ndarray:
    """The ``n_1 * n_2`` blocks of :func:`split2D` stacked on a new axis 0, ``axis_2``'s index varying fastest."""
    return np.stack([b for row in split2D(x, n_1, n_2, axis_1, axis_2) for b in row])


def unshard2D(x: np.ndarray, n_1: int, n_2: int, axis_1: int, axis_2: int) -> np.ndarray:
    """Inverse of :func:`shard2D` (axes are those of a block)."""
    x = np.asarray(x)
    if x.shape[0] != n_1 * n_2:
        raise ValueError(f"unshard2D: axis 0 has {x.shape[0]} blocks, expected n_1 * n_2 = {n_1 * n_2}")
    rows = [unshard_arrays(list(x[i * n_2:(i + 1) * n_2]), axis_2) for i in range(n_1)]
    return np.concatenate(rows, axis=handle_negative_axis(rows[0], axis_1))


def tensor_parallel_output(output_data: np.ndarray, num_host_transfers: int, tp: int, rf: int,
                           data_shape, tp_identical: bool = True,
                           true_num_host_transfers: Optional[int] = None) -> np.ndarray:
    """Inverse of :func:`tensor_parallel_input` for a host output stream.

    ``output_data`` holds ``num_host_transfers`` transfers of ``rf = dp * tp`` replicas, each of
    ``data_shape`` (axes of length 1 may be squeezed, as a session returns them). Returns
    ``(num_host_transfers * dp, *data_shape)`` in sample order (transfer-major) when ``tp_identical``
    (one copy per TP group, all copies equal), else ``(num_host_transfers * dp, tp, *data_shape)``.
    ``true_num_host_transfers``: keep only the first transfers (the rest were padding).
    """
    if tp > rf or rf % tp:
        raise ValueError(f"tensor parallel factor tp={tp} must divide the replication factor rf={rf}")
    data_shape = tuple(data_shape)
    x = np.asarray(output_data).reshape(num_host_transfers, rf // tp, tp, *data_shape)
    if true_num_host_transfers is not None:
        x = x[:true_num_host_transfers]
    x = x[:, :, 0] if tp_identical else x
    return x.reshape(-1, *x.shape[2:])
