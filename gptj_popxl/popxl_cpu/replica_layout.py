"""How replicated values are laid out over the replica axis: groups as index tensors, and the layouts
that map a full tensor to the chunks the replicas of a group own.

Every runtime value carries the replica axis first, so a collective is an index over that axis:
each group's members, each replica's peers and position become index tensors once, and a run is
one gather plus one reduction, with no loop over replicas. The session uses the same layouts to
place replica-sharded variables.

Layouts map a full tensor to ``size`` chunks:

* ``new_axis``: chunk k is ``full[k]`` (the group axis is a new leading axis);
* ``concat``: chunk k is the k-th equal slice of ``full`` along ``axis``;
* ``flat``: ``full`` flattened and zero-padded to a multiple of ``size`` elements, chunk k is the
  k-th 1-D piece (replicated tensor sharding; merging drops the padding again).
"""
from typing import Optional

import numpy as np
import torch

from .replica_grouping import ReplicaGrouping
from .tensor import flat_shard_shape

# Reductions over axis `d` of a stacked (…, group, …) tensor, keeping the dtype. ('mul' is not here:
# popxl's collectives compute a mean for it, see ops.collectives.replicated.check_op.)
REDUCE = {
    "add": lambda x, d: x.sum(d, dtype=x.dtype),
    "mean": lambda x, d: (x.sum(d, dtype=torch.float32 if x.dtype.is_floating_point else None)
                          / x.shape[d]).to(x.dtype),
    "min": lambda x, d: x.amin(d),
    "max": lambda x, d: x.amax(d),
    "and": lambda x, d: x.bool().all(d).to(x.dtype),
    "or": lambda x, d: x.bool().any(d).to(x.dtype),
    "square_add": lambda x, d: (x * x).sum(d, dtype=x.dtype),
}

# The reductions that can write into given memory (``out``), with the same bits as ``REDUCE``'s.
REDUCE_INTO = {
    "add": lambda x, d, out: torch.sum(x, d, dtype=x.dtype, out=out),
    "min": lambda x, d, out: torch.amin(x, d, out=out),
    "max": lambda x, d, out: torch.amax(x, d, out=out),
}

_OF_ONE_IS_ITSELF = ("add", "mean", "min", "max")


def reduces_into(op: str, dtype: torch.dtype) -> bool:
    """Whether ``GroupIndex.reduce_scatter`` can write reduction ``op`` of ``dtype`` values into given memory
    (a float32 mean is a sum divided in place, as ``REDUCE``'s float32 sum divided)."""
    return op in REDUCE_INTO or (op == "mean" and dtype == torch.float32)


class GroupIndex:
    """Index tensors of a grouping over the replica axis, made once per lowering.

    ``size``: work in consecutive blocks of ``size`` members of each group (default: whole groups).
    """

    def __init__(self, group: ReplicaGrouping, size: Optional[int] = None):
        self.members = torch.as_tensor(group._member_matrix())        # (groups, group_size)
        self.assignment = torch.as_tensor(group.assignment)            # (R,)
        peers, position = group._peers(size)
        self.peers = torch.as_tensor(peers)                            # (R, size)
        self.position = torch.as_tensor(position)                      # (R,)
        self.replicas = torch.arange(len(position))
        # Row r * size + position[r] of the (R * size, ...) chunks: replica r's own (see ``own``).
        self.own_rows = self.replicas * self.peers.shape[1] + self.position
        self.peer_rows = self.peers.reshape(-1)
        self.singletons = self.members.shape[1] == 1
        self.strided = _strided_blocks(group)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """Each replica gets the reduction of its group's values."""
        if self.singletons:
            # Every replica is its own group: no gathers over the replica axis, and a copy where the
            # reduction of one value is that value (torch's reduction over an axis of one is far slower).
            return x.clone() if op in _OF_ONE_IS_ITSELF else REDUCE[op](x.unsqueeze(1), 1)
        if self.strided is not None:
            # The replica axis viewed (blocks, group_size, stride): a group is an axis-1 line, so the
            # reduction reads x in place and one broadcast copy gives every member its group's value.
            shape = self.strided + tuple(x.shape[1:])
            reduced = REDUCE[op](x.reshape(shape), 1)
            return reduced.unsqueeze(1).expand(shape).reshape(x.shape)
        return REDUCE[op](x[self.members], 1)[self.assignment]

    def own(self, chunks: torch.Tensor) -> torch.Tensor:
        """``(R, size, *chunk)`` -> each replica's chunk at its position."""
        if chunks.is_contiguous() and chunks.numel():
            # A row gather by index_select: 3-4x faster than advanced indexing over two axes (53 against
            # 190 us for (4, 2, 65536) float32 on a 2-core VM).
            rows = chunks.view(chunks.shape[0] * chunks.shape[1], -1)
            return torch.index_select(rows, 0, self.own_rows).view((chunks.shape[0],) + chunks.shape[2:])
        return chunks[self.replicas, self.position]

    @property
    def scatters_into(self) -> bool:
        """Whether ``reduce_scatter`` reduces straight into place (groups of several members on strided
        lines), and so may be given the memory to write (``out``)."""
        return not self.singletons and self.strided is not None

    def reduce_scatter(self, chunks: torch.Tensor, op: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(R, size, *chunk)`` (``size``: the group's) -> each replica's chunk at its position,
        reduced over its group. Where groups are strided lines (``scatters_into``), only the chunks
        replicas keep are reduced, straight into their places (into ``out``, a contiguous ``(R, *chunk)``,
        when given and ``reduces_into(op, dtype)``), with no group-wide result for every member first."""
        if not self.scatters_into:
            return self.own(self.reduce(chunks, op))
        blocks, size, stride = self.strided
        chunk = tuple(chunks.shape[2:])
        # [block, member, stride, chunk position]: replica (b, p, s) keeps the reduction over the
        # members of their chunk p.
        lines = chunks.reshape((blocks, size, stride, size) + chunk)
        if out is None:
            return REDUCE[op](lines, 1).transpose(1, 2).reshape((blocks * size * stride,) + chunk)
        places = out.view((blocks, size, stride) + chunk).transpose(1, 2)
        if op == "mean":
            REDUCE_INTO["add"](lines, 1, places).div_(size)
        else:
            REDUCE_INTO[op](lines, 1, places)
        return out

    def peer_values(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(R, *shape)`` -> ``(R, size, *shape)``: each replica's peers' values, in group order
        (written into ``out``, contiguous memory of as many elements, when given)."""
        rows = None if out is None else out.view((len(self.peer_rows),) + tuple(x.shape[1:]))
        return torch.index_select(x, 0, self.peer_rows, out=rows).view(self.peers.shape + x.shape[1:])


def _strided_blocks(group: ReplicaGrouping) -> Optional[tuple]:
    """``(blocks, group_size, stride)`` when viewing the replica axis so shaped puts each group on one
    line of its middle axis (a const grouping: members ``base + stride * j``), else None."""
    if not group.is_const:
        return None
    size, stride = group.group_size, group.stride
    replicas = len(group.assignment)
    if replicas % (size * stride):
        return None
    shape = (replicas // (size * stride), size, stride)
    lines = np.asarray(group.assignment).reshape(shape)
    if not (lines == lines[:, :1]).all() or len(np.unique(lines[:, 0])) != shape[0] * stride:
        return None
    return shape


# ---------------------------------------------------------------- layouts

def chunk_shape_of(full_shape, layout: str, axis: int, size: int):
    """The shape of one of ``size`` chunks of a ``full_shape`` tensor under ``layout``."""
    full_shape = tuple(full_shape)
    if layout == "flat":
        return flat_shard_shape(full_shape, size)
    if layout == "new_axis":
        if not full_shape or full_shape[0] != size:
            raise ValueError(f"axis 0 of {full_shape} must equal the replica group size {size}")
        return full_shape[1:]
    if not full_shape:
        raise ValueError(f"cannot split a scalar along axis {axis}")
    if full_shape[axis] % size:
        raise ValueError(f"axis {axis} of {full_shape} (size {full_shape[axis]}) does not divide into "
                         f"replica group size {size}")
    return full_shape[:axis] + (full_shape[axis] // size,) + full_shape[axis + 1:]


def gathered_shape(chunk_shape, layout: str, axis: int, size: int, meta_shape):
    """The shape gathered from ``size`` chunks of ``chunk_shape`` under ``layout``."""
    chunk_shape = tuple(chunk_shape)
    if layout == "flat":
        meta_shape = tuple(meta_shape)
        if chunk_shape_of(meta_shape, "flat", axis, size) != chunk_shape:
            raise ValueError(f"a {chunk_shape} shard is not one of {size} flat shards of {meta_shape}")
        return meta_shape
    if layout == "new_axis":
        return (size,) + chunk_shape
    if not chunk_shape:
        raise ValueError(f"cannot concatenate scalars along axis {axis}; use output_shape='new_axis'")
    return chunk_shape[:axis] + (chunk_shape[axis] * size,) + chunk_shape[axis + 1:]


def splitter(layout: str, axis: int, size: int, full_shape, replicas: int):
    """Runtime ``(R, *full)`` -> ``(R, size, *chunk)``."""
    if layout == "new_axis":
        return lambda x: x
    if layout == "flat":
        nelms = int(np.prod(full_shape, dtype=np.int64))
        padded = -(-nelms // size) * size

        def split_flat(x):
            flat = x.reshape(replicas, nelms)
            if padded != nelms:
                flat = torch.nn.functional.pad(flat, (0, padded - nelms))
            return flat.reshape(replicas, size, padded // size)
        return split_flat
    pieces = (replicas,) + tuple(full_shape[:axis]) + (size, full_shape[axis] // size) + tuple(full_shape[axis + 1:])
    return lambda x: x.reshape(pieces).movedim(axis + 1, 1)


def merger(layout: str, axis: int, size: int, full_shape, replicas: int):
    """Runtime ``(R, size, *chunk)`` -> ``(R, *full)``."""
    full = (replicas,) + tuple(full_shape)
    if layout == "new_axis":
        return lambda g: g
    if layout == "flat":
        nelms = int(np.prod(full_shape, dtype=np.int64))
        return lambda g: g.reshape(replicas, -1)[:, :nelms].reshape(full)
    return lambda g: g.movedim(1, axis + 1).reshape(full)
