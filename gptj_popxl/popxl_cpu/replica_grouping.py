"""Replica groupings: which replicas share a variable's value or take part in one collective."""
from typing import List, Optional, Sequence, Tuple

import numpy as np


class ReplicaGrouping:
    """The replicas split into equally sized groups; ``assignment[r]`` is the group of replica ``r``.

    Made by ``ir.replica_grouping(stride, group_size)`` (a *const* grouping: groups of ``group_size``
    replicas ``stride`` apart) or ``ir.replica_grouping_from_assignments`` (any equal-sized groups).
    """

    def __init__(self):
        raise TypeError("use ir.replica_grouping(stride, group_size) to make a ReplicaGrouping")

    @classmethod
    def _make(cls, replication: int, assignment: Sequence[int], stride: Optional[int],
              group_size: int) -> "ReplicaGrouping":
        self = object.__new__(cls)
        self._replication = replication
        self._assignment = tuple(int(g) for g in assignment)
        self._stride = stride  # None for groupings that no single stride describes
        self._group_size = group_size
        return self

    @classmethod
    def _create(cls, replication: int, stride: int = 1, group_size: Optional[int] = None) -> "ReplicaGrouping":
        stride = int(stride)
        if not 0 < stride <= replication or replication % stride:
            raise ValueError(f"replica grouping: stride={stride} must be in 1..{replication} and divide the "
                             f"replication factor {replication}")
        group_size = replication // stride if group_size is None else int(group_size)
        if not 0 < group_size <= replication:
            raise ValueError(f"replica grouping: group_size={group_size} must be in 1..{replication}")
        if group_size == 1:
            stride = 1
        if replication % (stride * group_size):
            raise ValueError(f"replica grouping: stride={stride} * group_size={group_size} must divide the "
                             f"replication factor {replication}")
        # Blocks of stride*group_size replicas hold `stride` interleaved groups each.
        block = stride * group_size
        assignment = [r % stride + stride * (r // block) for r in range(replication)]
        return cls._make(replication, assignment, stride, group_size)

    @classmethod
    def _from_assignment(cls, replication: int, assignment: Sequence[int]) -> "ReplicaGrouping":
        assignment = [int(g) for g in assignment]
        if len(assignment) != replication:
            raise ValueError(f"replica grouping assignment {assignment} has {len(assignment)} entries for "
                             f"{replication} replicas")
        seen: List[int] = []
        for g in assignment:
            if g not in seen:
                if g != len(seen):
                    raise ValueError(f"replica grouping assignment {assignment}: groups must be numbered 0, 1, ... "
                                     f"in order of first appearance")
                seen.append(g)
        sizes = {assignment.count(g) for g in seen}
        if len(sizes) != 1:
            raise ValueError(f"replica grouping assignment {assignment}: groups must have equal sizes")
        group_size = sizes.pop()
        members = [[r for r, a in enumerate(assignment) if a == g] for g in seen]
        strides = {b - a for m in members for a, b in zip(m, m[1:])}
        if len(strides) <= 1:
            stride = strides.pop() if strides else 1
            try:
                const = cls._create(replication, stride, group_size)
            except ValueError:
                const = None
            if const is not None and const.assignment == assignment:
                return const
        return cls._make(replication, assignment, None, group_size)

    @property
    def stride(self) -> int:
        """The distance between consecutive replicas of a group (const groupings only)."""
        if self._stride is None:
            raise ValueError(f"{self!r} is not a const grouping: its groups have no single stride")
        return self._stride

    @property
    def group_size(self) -> int:
        return self._group_size

    @property
    def num_groups(self) -> int:
        return self._replication // self._group_size

    @property
    def assignment(self) -> List[int]:
        return list(self._assignment)

    @property
    def is_const(self) -> bool:
        """Whether a stride and group size describe the grouping (collectives need this)."""
        return self._stride is not None

    def groups(self) -> List[Tuple[int, ...]]:
        """The replicas of each group, in ascending order, groups in order."""
        return [tuple(int(r) for r in row) for row in self._member_matrix()]

    def _member_matrix(self) -> np.ndarray:
        """``(num_groups, group_size)`` replica ids; row g lists group g's replicas in ascending order."""
        order = np.argsort(np.asarray(self._assignment), kind="stable")
        return order.reshape(self.num_groups, self._group_size)

    def _peers(self, size: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Who each replica works with, and where it stands among them.

        Each group is cut into consecutive blocks of ``size`` members (default: the whole group).
        Returns ``peers`` ``(R, size)``: the block of replica r, in group order, and ``position``
        ``(R,)``: r's index in its block.
        """
        size = self._group_size if size is None else int(size)
        blocks = self._member_matrix().reshape(-1, size)
        peers = np.empty((self._replication, size), dtype=np.int64)
        position = np.empty(self._replication, dtype=np.int64)
        peers[blocks.ravel()] = np.repeat(blocks, size, axis=0)
        position[blocks.ravel()] = np.tile(np.arange(size), blocks.shape[0])
        return peers, position

    def transpose(self) -> "ReplicaGrouping":
        """The grouping whose group j holds the j-th replica of every group of this one."""
        members = self._member_matrix()
        assignment = np.empty(self._replication, dtype=np.int64)
        assignment[members] = np.arange(self._group_size)[None, :]
        return ReplicaGrouping._from_assignment(self._replication, assignment.tolist())

    def __eq__(self, other) -> bool:
        return (isinstance(other, ReplicaGrouping) and self._replication == other._replication
                and self._assignment == other._assignment)

    def __hash__(self):
        return hash((self._replication, self._assignment))

    def __repr__(self) -> str:
        layout = f"stride={self._stride}" if self.is_const else f"assignment={list(self._assignment)}"
        return (f"ReplicaGrouping(num_replicas={self._replication}, {layout}, group_size={self._group_size}, "
                f"num_groups={self.num_groups})")
