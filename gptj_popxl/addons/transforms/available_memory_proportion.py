"""Available memory proportion per IPU: how much tile memory Poplar may plan matmuls and gathers with.

On the Poplar SDK this sets each op's ``availableMemoryProportion``. The CPU runtime has no tile
memory to plan, so the proportions are checked and recorded (``recorded_proportions``) only.
"""
import weakref
from typing import Iterable, Tuple

from ...backend import popxl

__all__ = ["set_available_memory_proportion_by_ipu", "set_graph_available_memory_proportion_by_ipu"]

_recorded = weakref.WeakKeyDictionary()


def _checked(proportions: Iterable[float], what: str) -> Tuple[float, ...]:
    values = tuple(float(p) for p in proportions)
    if not values:
        raise ValueError(f"{what}: proportions is empty; give one proportion per IPU (proportions[N] for IPU N)")
    bad = [p for p in values if not 0.0 < p <= 1.0]
    if bad:
        raise ValueError(f"{what}: every proportion must be in (0, 1], got {list(values)}")
    return values


def set_available_memory_proportion_by_ipu(ir: popxl.Ir, proportions: Iterable[float]) -> None:
    """Sets the available memory proportion of every op of ``ir`` that has one: ``proportions[N]``
    on IPU N (``proportions[0]`` for IPUs beyond the list). Overrides proportions set per op."""
    _recorded[ir] = _checked(proportions, "set_available_memory_proportion_by_ipu")


def set_graph_available_memory_proportion_by_ipu(graph: popxl.Graph, proportions: Iterable[float]) -> None:
    """As :func:`set_available_memory_proportion_by_ipu`, for the ops of ``graph`` and the graphs it calls."""
    _recorded[graph] = _checked(proportions, "set_graph_available_memory_proportion_by_ipu")


def recorded_proportions(ir_or_graph) -> Tuple[float, ...]:
    """The proportions last set on an Ir or Graph here (empty when none were)."""
    return _recorded.get(ir_or_graph, ())
