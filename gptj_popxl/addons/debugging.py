"""Runtime prints that can be switched off: ``MODEL_LOG_LEVEL`` (TRACE, DEBUG, INFO, WARN; default INFO)
selects which ``level`` prints are built into the graph."""
import os
from typing import Optional

from ..backend import ops, popxl

LEVELS = {"TRACE": 0, "DEBUG": 1, "INFO": 2, "WARN": 3}


def _enabled(level: str) -> bool:
    if level not in LEVELS:
        raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
    threshold = os.environ.get("MODEL_LOG_LEVEL", "INFO")
    if threshold not in LEVELS:
        raise ValueError(f"MODEL_LOG_LEVEL must be one of {list(LEVELS)}, got {threshold!r}")
    return LEVELS[threshold] <= LEVELS[level]


def print_tensor(t: popxl.Tensor, *args, level: str = "DEBUG", **kwargs) -> popxl.Tensor:
    """``ops.print_tensor(t, *args, **kwargs)`` when ``level`` is enabled, else ``t`` unchanged."""
    return ops.print_tensor(t, *args, **kwargs) if _enabled(level) else t


def print_text(text: str, num: Optional[popxl.Tensor] = None, level: str = "DEBUG") -> None:
    """Prints ``text`` (with tensor ``num``, if given) when the program runs and ``level`` is enabled."""
    if _enabled(level):
        ops.print_tensor(num if num is not None else popxl.constant(0.0), text)
