"""Replica groupings: which replicas share a variable's value or a collective."""
from typing import List, Tuple


class ReplicaGrouping:
    """Replicas ``r`` split into groups; replicas of one group are ``stride`` apart.

    ``assignment[r]`` is the group of replica ``r``. Made by ``ir.replica_grouping``.
    """

    def __init__(self):
        raise TypeError("use ir.replica_grouping(stride, group_size) to make a ReplicaGrouping")

    @classmethod
    def _create(cls, replication: int, stride: int = 1, group_size: int = None) -> "ReplicaGrouping":
        if group_size is None:
            group_size = replication // stride
        if stride < 1 or group_size < 1:
            raise ValueError(f"replica grouping needs stride >= 1 and group_size >= 1, got stride={stride}, "
                             f"group_size={group_size}")
        if replication % (stride * group_size) and not (group_size == 1):
            raise ValueError(f"replica grouping stride={stride}, group_size={group_size} does not tile "
                             f"replication factor {replication}")
        if stride * group_size > replication and group_size > 1:
            raise ValueError(f"replica grouping stride={stride} * group_size={group_size} exceeds replication "
                             f"factor {replication}")
        self = object.__new__(cls)
        self._replication = replication
        self._stride = stride
        self._group_size = group_size
        self._assignment = tuple(cls._assign(replication, stride, group_size))
        return self

    @staticmethod
    def _assign(replication: int, stride: int, group_size: int) -> List[int]:
        # Blocks of stride*group_size replicas; inside a block, replica r is in group r % stride.
        block = stride * group_size
        groups_per_block = stride
        return [(r // block) * groups_per_block + (r % block) % stride for r in range(replication)]

    @property
    def stride(self) -> int:
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
        return True

    def groups(self) -> List[Tuple[int, ...]]:
        """The replicas of each group, in group order."""
        members = [[] for _ in range(self.num_groups)]
        for r, g in enumerate(self._assignment):
            members[g].append(r)
        return [tuple(m) for m in members]

    def transpose(self) -> "ReplicaGrouping":
        """The grouping whose groups take one replica from each of this grouping's groups."""
        if self._group_size == 1:
            return ReplicaGrouping._create(self._replication, 1, self._replication)
        if self._stride == 1:
            return ReplicaGrouping._create(self._replication, self._group_size, self._replication // self._group_size)
        if self._stride * self._group_size == self._replication:
            return ReplicaGrouping._create(self._replication, 1, self._stride)
        raise ValueError(f"ReplicaGrouping(stride={self._stride}, group_size={self._group_size}) over "
                         f"{self._replication} replicas has no transpose expressible with stride and group_size")

    def __eq__(self, other) -> bool:
        return (isinstance(other, ReplicaGrouping) and self._replication == other._replication
                and self._assignment == other._assignment)

    def __hash__(self):
        return hash((self._replication, self._assignment))

    def __repr__(self) -> str:
        return (f"ReplicaGrouping(num_replicas={self._replication}, stride={self._stride}, "
                f"group_size={self._group_size}, num_groups={self.num_groups})")
