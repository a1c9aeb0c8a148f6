"""Small helpers shared by popxl-addons programs: timing, ordered/validated dicts, graph names."""
import collections
import contextlib
import logging
import re
import time
from typing import Iterable, MutableMapping, Optional, Set

import numpy as np

from ..backend import popxl

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def null_context():
    """A context manager that does nothing (``with cond_ctx if cond else null_context():``)."""
    yield


def suffix_graph_name(name: str, suffix: str) -> str:
    """``name`` without popxl's ``_subgraph(N)`` decorations, then ``_suffix``."""
    return f"{re.sub(r'_subgraph[(][0-9]+[)]', '', name)}_{suffix}"


@contextlib.contextmanager
def timer(title: Optional[str] = None, log_to_wandb: bool = True):
    """Logs (INFO) how long the ``with`` body took, in minutes.

    ``log_to_wandb``: also records it in the summary of an active Weights & Biases run, if wandb is
    installed and a run was started.
    """
    start = time.perf_counter()
    logger.info("Starting %s", title or "")
    yield
    minutes = (time.perf_counter() - start) / 60
    logger.info("%s: %.2f mins", f"{title} duration" if title else "Duration", minutes)
    if log_to_wandb and title:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is not None:
            wandb.run.summary[title.lower().replace(" ", "_") + "_mins"] = minutes


def overrides(cls: type, base_cls: type, method: str) -> bool:
    """Whether ``cls`` defines ``method`` differently from ``base_cls``."""
    return getattr(cls, method) is not getattr(base_cls, method)


def duplicate_items(iterable: Iterable) -> Set:
    """The items that occur more than once in ``iterable``."""
    seen, dups = set(), set()
    for item in iterable:
        (dups if item in seen else seen).add(item)
    return dups


class OrderedDict(collections.OrderedDict):
    """An ordered dict whose values can also be fetched by position (``idx``)."""

    def idx(self, idx: int):
        """The value at position ``idx`` (insertion order)."""
        return list(self.values())[idx]

    def __repr__(self):
        return "{" + "".join(f"\n{k}: {v}," for k, v in self.items()) + ("\n}" if self else "}")


class WeightsDict(MutableMapping):
    """``{variable: host array}`` that checks each array's dtype and shape against its variable."""

    def __init__(self, *args, **kwargs):
        self._data = {}
        self.update(*args, **kwargs)

    def __getitem__(self, key):
        return self._data[key]

    def __setitem__(self, key, value) -> None:
        value = np.asarray(value)
        dtype = popxl.dtypes.dtype.as_dtype(value.dtype)
        if dtype != key.dtype:
            raise ValueError(f"WeightsDict: data for '{key.name}' has dtype {dtype.name}, the variable "
                             f"{key.dtype.name}")
        expected = tuple(key.shape_on_host)
        if tuple(value.shape) != expected:
            raise ValueError(f"WeightsDict: data for '{key.name}' has shape {value.shape}, the variable "
                             f"{expected} on the host")
        self._data[key] = value

    def __delitem__(self, key) -> None:
        del self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)
