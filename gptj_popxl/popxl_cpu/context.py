"""Build-time context: the graph stack, name scopes and op placement settings."""
import contextlib
import inspect
from typing import Callable, Dict, List


class Context:
    """What ops created now are added to, and with which settings."""

    def __init__(self):
        self._graphs: List = []
        self._name_scopes: List[str] = []
        self._in_sequence: List[bool] = []
        self._ipu_id = 0
        self._io_tile_set = False
        self._hooks: Dict[int, Callable] = {}
        self._next_hook = 0

    @property
    def graph(self):
        if not self._graphs:
            raise RuntimeError("no graph is being built: use `with ir.main_graph:` or ir.create_graph(...)")
        return self._graphs[-1]

    @property
    def ir(self):
        return self.graph.ir

    @property
    def main_graph(self):
        return self.graph.ir.main_graph

    @property
    def name_scopes(self) -> List[str]:
        return list(self._name_scopes)

    @property
    def ipu_id(self) -> int:
        return self._ipu_id

    @property
    def io_tile_set(self) -> bool:
        return self._io_tile_set

    def in_sequence(self) -> bool:
        return bool(self._in_sequence) and self._in_sequence[-1]

    def push_graph(self, g) -> None:
        self._graphs.append(g)

    def pop_graph(self):
        return self._graphs.pop()

    def push_name_scope(self, name: str) -> None:
        self._name_scopes.append(name)

    def pop_name_scope(self) -> str:
        return self._name_scopes.pop()

    def register_op_created_hook(self, fn: Callable) -> int:
        handle = self._next_hook
        self._next_hook += 1
        self._hooks[handle] = fn
        return handle

    def remove_op_created_hook(self, handle: int) -> None:
        self._hooks.pop(handle, None)

    def _op_created(self, op) -> None:
        for fn in list(self._hooks.values()):
            fn(op)


_CONTEXT = Context()


def get_current_context() -> Context:
    return _CONTEXT


def get_current_graph():
    """The graph ops are being added to."""
    return _CONTEXT.graph


def get_main_graph():
    """The main graph of the IR currently being built."""
    return _CONTEXT.graph.ir.main_graph


def get_ir():
    return _CONTEXT.graph.ir


gcg = get_current_graph
gmg = get_main_graph
gir = get_ir


@contextlib.contextmanager
def name_scope(name: str):
    """Prefixes the names of tensors created inside with ``name/``; yields the scopes now open, as popxl."""
    _CONTEXT.push_name_scope(name)
    try:
        yield list(_CONTEXT._name_scopes)
    finally:
        _CONTEXT.pop_name_scope()


@contextlib.contextmanager
def in_sequence(mode=True):
    """Ops created inside run in creation order (this runtime always does; recorded for fidelity) when
    ``mode`` is true, in any order the scheduler likes when false; ``"pass"`` keeps the enclosing
    setting. Yields ``mode`` (None for ``"pass"``), as popxl."""
    if mode is None:
        raise TypeError("in_sequence: mode must be a bool or 'pass', got None")
    if isinstance(mode, str) and mode == "pass":
        yield None
        return
    _CONTEXT._in_sequence.append(bool(mode))
    try:
        yield mode
    finally:
        _CONTEXT._in_sequence.pop()


@contextlib.contextmanager
def ipu(ipu: int):
    """Places ops on virtual IPU ``ipu``; recorded on each op, all run on the CPU."""
    if ipu < 0:
        raise ValueError(f"ipu must be >= 0, got {ipu}")
    prev, _CONTEXT._ipu_id = _CONTEXT._ipu_id, ipu
    try:
        yield ipu
    finally:
        _CONTEXT._ipu_id = prev


@contextlib.contextmanager
def io_tiles():
    """Places ops on IO tiles; recorded on each op, no effect on results."""
    prev, _CONTEXT._io_tile_set = _CONTEXT._io_tile_set, True
    try:
        yield
    finally:
        _CONTEXT._io_tile_set = prev


@contextlib.contextmanager
def op_debug_context(name: str):
    with name_scope(name):
        yield


def debug_context_frame_offset(i: int):
    """Decorator kept for API compatibility: debug info in this runtime needs no frame offsets."""

    def decorator(fn):
        return fn

    return decorator


def get_source_location(offset: int):
    frame = inspect.stack()[offset + 1]
    return frame.function, frame.filename, frame.lineno
