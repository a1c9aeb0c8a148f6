"""Module: a popxl.Module whose ``build`` declares its own variables as named graph inputs.

Inside ``build``, ``self.add_variable_input(name, data_iter, ...)`` adds a graph input and records a
:class:`VariableFactory` for it. ``create_graph(*specs)`` traces ``build`` into a graph and returns
``(NamedVariableFactories, GraphWithNamedArgs)``; a module keeps no state between calls. A Module
assigned as an attribute of another is a sub-module: its variables are named ``<attribute>.<name>``
and its tensors are made under the name scope ``<attribute>``.
"""
import functools
from typing import Callable, Dict, List, Optional, Tuple

from ..backend import popxl
from .graph import GraphWithNamedArgs
from .named_tensors import NamedTensors
from .variable_factory import (DataIter, NamedVariableFactories, VariableFactory, add_replica_sharded_variable_input,
                               add_variable_input)

_AUTODIFF_MODES = ("auto", "autodiff", "none")


def _scoped(build: Callable) -> Callable:
    """Runs ``build`` under the module's name scope when it has one (sub-modules)."""

    @functools.wraps(build)
    def build_in_scope(self, *args, **kwargs):
        scope = self.__dict__.get("_name_scope")
        if scope is None:
            return build(self, *args, **kwargs)
        with popxl.name_scope(scope):
            return build(self, *args, **kwargs)
    return build_in_scope


def _spec_key(arg):
    """A hashable description of a create_graph argument: tensor specs by value, others by repr."""
    if isinstance(arg, (popxl.Tensor, popxl.TensorSpec)):
        return ("tensor", tuple(arg.shape), arg.dtype.name, tuple(arg.meta_shape or ()))
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__,) + tuple(_spec_key(a) for a in arg)
    return ("value", repr(arg))


def _tensor_args(args, kwargs) -> list:
    """The arguments that ``create_graph`` turned into graph inputs, in graph input order."""
    def is_tensors(a):
        return isinstance(a, popxl.Tensor) or (isinstance(a, (list, tuple)) and a
                                                and all(isinstance(t, popxl.Tensor) for t in a))
    return [a for a in list(args) + list(kwargs.values()) if is_tensors(a)]


class Module(popxl.Module):
    """Base class of layers. Subclasses define ``build(*args)``; see the module docstring."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "build" in cls.__dict__:
            cls.build = _scoped(cls.__dict__["build"])

    def __init__(self, cache: bool = False, grad_inlining_error: str = "error"):
        # grad_inlining_error guards inlining modules that define build_grad, which these modules never do.
        if grad_inlining_error not in ("error", "warning", "none"):
            raise ValueError(f"grad_inlining_error must be 'error', 'warning' or 'none', got {grad_inlining_error!r}")
        self._variable_factories = NamedVariableFactories()
        self._named_inputs = NamedTensors()
        self._graph_cache: Optional[Dict] = {} if cache else None
        self.called_graphs_grad_info: Dict = {}

    def __setattr__(self, key: str, value) -> None:
        if isinstance(value, Module):
            value.set_name_scope(key)
            self._variable_factories.insert(key, value._variable_factories, overwrite=True)
            self._named_inputs.insert(key, value._named_inputs, overwrite=True)
        super().__setattr__(key, value)

    def set_name_scope(self, name: str) -> None:
        object.__setattr__(self, "_name_scope", name)

    # --- variables
    def add_variable_input(self, name: str, data_iter: DataIter, dtype=None, by_ref: bool = False,
                           replica_grouping=None, overwrite: bool = False) -> popxl.Tensor:
        """A graph input named ``name`` whose variables are made from ``data_iter`` (see VariableFactory)."""
        self._check_new(name, overwrite)
        t, f = add_variable_input(name, data_iter, dtype, by_ref, replica_grouping)
        self._record(name, t, f, overwrite)
        return t

    def add_replica_sharded_variable_input(self, name: str, data_iter: DataIter, dtype=None, by_ref: bool = False,
                                           replica_grouping=None, shard_over: Optional[int] = None) -> popxl.Tensor:
        """A replica-sharded graph input (flat shard, ``meta_shape`` = full shape)."""
        self._check_new(name, False)
        t, f = add_replica_sharded_variable_input(name, data_iter, dtype, by_ref, replica_grouping, shard_over)
        self._record(name, t, f, False)
        return t

    def add_variable_factory(self, variable_f: VariableFactory, name: Optional[str] = None) -> popxl.Tensor:
        """A graph input for an existing factory (named ``name``, default the factory's name)."""
        name = name or variable_f.name
        self._check_new(name, False)
        t = variable_f.create_input()
        self._record(name, t, variable_f, False)
        return t

    def add_variable_inputs(self, name, variable_f: NamedVariableFactories, overwrite: bool = False) -> NamedTensors:
        """Graph inputs for every factory of ``variable_f``, under ``name``; returns them by name.

        Lets a graph made by another module be called several times with different variables:
        ``graph.bind(self.add_variable_inputs("0", facts))``.
        """
        if isinstance(name, int):
            if name < 0:
                raise ValueError(f"add_variable_inputs: integer name must be >= 0, got {name}")
            name = str(name)
        tensors = NamedTensors.from_dict({n: f.create_input() for n, f in variable_f.to_dict().items()})
        self._variable_factories.insert(name, variable_f.copy(), overwrite=overwrite)
        self._named_inputs.insert(name, tensors, overwrite=overwrite)
        return tensors

    def _check_new(self, name: str, overwrite: bool) -> None:
        # Checked before the graph input is made, so a clash leaves the graph unchanged.
        if not overwrite and name in self._named_inputs:
            raise ValueError(f"{type(self).__name__}: a variable input named {name!r} already exists")

    def _record(self, name: str, t: popxl.Tensor, f: VariableFactory, overwrite: bool) -> None:
        self._variable_factories.insert(name, f, overwrite=overwrite)
        self._named_inputs.insert(name, t, overwrite=overwrite)

    # --- graphs
    def create_graph(self, *args, **kwargs) -> Tuple[NamedVariableFactories, GraphWithNamedArgs]:
        """Traces ``build(*args, **kwargs)`` into a new graph of the current IR.

        Tensor/TensorSpec arguments become graph inputs (in signature order, before the variable
        inputs). Returns the factories of the variables and the graph with them as named args.
        """
        ir = popxl.gir()
        key = None
        if self._graph_cache is not None:
            key = (id(ir), tuple(map(_spec_key, args)), tuple(sorted((k, _spec_key(v)) for k, v in kwargs.items())))
            hit = self._graph_cache.get(key)
            if hit is not None:
                graph, facts, named = hit
                return facts.copy(), GraphWithNamedArgs(graph, named.copy(), from_module=self)
        self.called_graphs_grad_info = {}
        try:
            graph = ir.create_graph(self, *args, **kwargs)
            facts, named = self._variable_factories.copy(), self._named_inputs.copy()
            infos = self.called_graphs_grad_info
        finally:
            self._reset()
        if key is not None:
            self._graph_cache[key] = (graph, facts, named)
        return facts.copy(), GraphWithNamedArgs(graph, named, from_module=self, called_graphs_grad_info=infos)

    def _reset(self) -> None:
        """Forgets the variables of the last build (sub-modules' too: their trees are nested in ours)."""
        self._variable_factories._clear()
        self._named_inputs._clear()
        self.called_graphs_grad_info = {}

    def call_module(self, module: "Module", name: Optional[str] = None, autodiff: str = "auto",
                    grads_provided=None, grads_required=None):
        """Outlines ``module``: returns a function that builds its graph, adds its variables to this
        module under ``name`` (default: the class name) and calls it, returning the outputs tuple.

        ``autodiff="autodiff"`` also makes its gradient graph now (with ``grads_provided`` /
        ``grads_required``) and records it for reuse when this module's graph is differentiated;
        ``"auto"``/``"none"`` leave that to the outer autodiff.
        """
        if autodiff not in _AUTODIFF_MODES:
            raise ValueError(f"call_module: autodiff must be one of {_AUTODIFF_MODES}, got {autodiff!r}")
        name = name or type(module).__name__

        def call(*args, **kwargs):
            facts, graph = module.create_graph(*args, **kwargs)
            variables = self.add_variable_inputs(name, facts)
            self.called_graphs_grad_info.update(graph.called_graphs_grad_info)
            n_outputs = len(graph.graph.outputs)
            if autodiff == "autodiff":
                grad = graph.autodiff(grads_provided=grads_provided, grads_required=grads_required)
                self.called_graphs_grad_info[graph.graph] = grad.grad_graph_info
            return graph.bind(variables).call(*_tensor_args(args, kwargs))[:n_outputs]
        return call

    # --- containers of sub-modules
    @classmethod
    def from_list(cls, sub_modules: List["Module"]) -> "Module":
        """A module holding ``sub_modules`` as attributes ``"0"``, ``"1"``, ... (iterable, indexable)."""
        self = cls()
        for i, m in enumerate(sub_modules):
            setattr(self, str(i), m)
        object.__setattr__(self, "_sub_modules", list(sub_modules))
        return self

    def get(self, key):
        return getattr(self, str(key))

    def __getitem__(self, item):
        return self.get(item)

    def __iter__(self):
        subs = self.__dict__.get("_sub_modules")
        if subs is None:
            raise TypeError(f"{type(self).__name__} is not iterable: only modules made by Module.from_list are")
        return iter(subs)
