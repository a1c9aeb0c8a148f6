"""Reuse of graphs built from the same function with compatible arguments (same tensor specs)."""
import functools
import inspect
import weakref
from typing import Callable

from ..backend import ops, popxl
from .graph import BoundGraph, GraphWithNamedArgs


def bound_arguments(fn, *args, **kwargs) -> dict:
    """The arguments ``fn(*args, **kwargs)`` would receive, by parameter name, defaults included
    (``self`` too for a bound method or a callable object)."""
    if not inspect.isfunction(fn) and not inspect.ismethod(fn) and hasattr(fn, "__call__"):
        fn = fn.__call__
    if inspect.ismethod(fn):
        args = (fn.__self__,) + args
        fn = fn.__func__
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def tensor_hash(t: popxl.Tensor) -> int:
    """Hash of what a graph input made from ``t`` depends on: shape, dtype and meta shape."""
    return hash((tuple(t.shape), t.dtype, tuple(t.meta_shape or ())))


def argument_hash(arg) -> int:
    """Hash of a graph-building argument: tensors by spec, graphs by identity, containers recursively."""
    if isinstance(arg, popxl.Tensor):
        return tensor_hash(arg)
    if isinstance(arg, BoundGraph):
        return hash((arg.graph, argument_hash(arg.args)))
    if isinstance(arg, GraphWithNamedArgs):
        return hash(arg.graph)
    if isinstance(arg, dict):
        return hash(tuple((argument_hash(k), argument_hash(v)) for k, v in arg.items()))
    if isinstance(arg, (tuple, list)):
        return hash(tuple(argument_hash(a) for a in arg))
    return hash(arg)


def get_function_hash(fn, *args, **kwargs) -> int:
    """Hash identifying the graph ``ir.create_graph(fn, *args, **kwargs)`` would build."""
    return hash((fn,) + tuple(argument_hash(a) for a in bound_arguments(fn, *args, **kwargs).values()))


class GraphCache:
    """``create_graph`` like ``ir.create_graph``, returning an already built graph when ``fn`` and
    its arguments' hashes match (graphs are mutable: a cached graph changed later stays changed)."""

    def __init__(self):
        self._cache = weakref.WeakKeyDictionary()

    def create_graph(self, fn, *args, **kwargs):
        ir = popxl.gcg().ir
        graphs = self._cache.setdefault(ir, {})
        key = get_function_hash(fn, *args, **kwargs)
        if key not in graphs:
            graphs[key] = ir.create_graph(fn, *args, **kwargs)
        return graphs[key]


def function(fn: Callable) -> Callable:
    """Decorator outlining ``fn``: each call builds (or reuses) its graph and ``ops.call``s it."""
    cache = GraphCache()

    @functools.wraps(fn)
    def outlined(*args, **kwargs):
        return ops.call(cache.create_graph(fn, *args, **kwargs), *args, **kwargs)
    return outlined
