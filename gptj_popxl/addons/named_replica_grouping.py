"""Replica groupings by variable name, and groupings restricted to one instance or IPU-link domain.

Without poprun there is one instance holding every replica; the IPU-link domain (ILD) has
``ipuLinkDomainSize`` replicas from ``POPLAR_TARGET_OPTIONS`` when set, else ``min(replicas, 64)``.
"""
import json
import os
from typing import List

from ..backend import popxl
from .dot_tree import DotTree


def _ir():
    return popxl.gcg().ir


def fill_none_group(rg, none_value):
    """``rg``, or ``none_value`` when ``rg`` is None."""
    return none_value if rg is None else rg


class NamedReplicaGrouping(DotTree[object]):
    """Replica groupings by dotted variable name."""

    @classmethod
    def build_groups(cls, names: List[str], value) -> "NamedReplicaGrouping":
        """Every name in ``names`` mapped to ``value`` (None: all replicas of the current IR)."""
        value = value or _ir().replica_grouping()
        return cls.pack(names, [value] * len(names))


def _restricted(replica_grouping, domain_size: int, what: str):
    """``replica_grouping`` cut down to the first ``domain_size`` replicas (same stride)."""
    ir = _ir()
    replica_grouping = replica_grouping or ir.replica_grouping()
    if replica_grouping.stride > domain_size:
        raise ValueError(f"replica grouping stride {replica_grouping.stride} exceeds the {what} size {domain_size}")
    if replica_grouping.group_size * replica_grouping.stride > domain_size:
        return ir.replica_grouping(stride=replica_grouping.stride, group_size=domain_size // replica_grouping.stride)
    return replica_grouping


def is_cross_instance(replica_grouping) -> bool:
    """Whether a group of ``replica_grouping`` spans replicas of more than one instance."""
    return replica_grouping.group_size * replica_grouping.stride > _ir().instance_replication_factor


def get_instance_replica_grouping(replica_grouping=None):
    """``replica_grouping`` (default: all replicas) restricted to the replicas of one instance."""
    return _restricted(replica_grouping, _ir().instance_replication_factor, "instance")


def get_ild_size_from_popdist() -> int:
    """Replicas per IPU-link domain: ``ipuLinkDomainSize`` of ``POPLAR_TARGET_OPTIONS``, else min(replicas, 64)."""
    size = json.loads(os.environ.get("POPLAR_TARGET_OPTIONS", "{}")).get("ipuLinkDomainSize")
    return int(size) if size is not None else min(_ir().replication_factor, 64)


def is_cross_ild(replica_grouping) -> bool:
    """Whether a group of ``replica_grouping`` spans more than one IPU-link domain."""
    return replica_grouping.group_size * replica_grouping.stride > get_ild_size_from_popdist()


def get_ild_replica_grouping(replica_grouping=None):
    """``replica_grouping`` (default: all replicas) restricted to the replicas of one IPU-link domain."""
    return _restricted(replica_grouping, get_ild_size_from_popdist(), "IPU-link domain")
