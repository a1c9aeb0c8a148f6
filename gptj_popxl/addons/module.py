"""Module: a popxl.Module whose ``build`` declares its own variables as named graph inputs.

Inside ``build``, ``self.add_variable_input(name, data_iter, ...)`` adds a graph input and records a
:class:`VariableFactory` for it. ``create_graph(*specs)`` traces ``build`` into a graph and returns
``(NamedVariableFactories, GraphWithNamedArgs)``; a module keeps no state between calls. A Module
assigned as an attribute of another is a sub-module: its variables are named ``<attribute>.<name>``
and its tensors are made under the name scope ``<attribute>``.
"""
import contextlib
import functools
import inspect
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from ..backend import IS_CPU, popxl
from .graph import GraphWithNamedArgs
from .named_tensors import NamedTensors
from .utils import OrderedDict, duplicate_items, overrides
from .variable_factory import (DataIter, NamedVariableFactories, VariableFactory, add_replica_sharded_variable_input,
                               add_variable_input)

_AUTODIFF_MODES = ("auto", "build_grad", "autodiff", "none")
_GRAD_INLINING = ("error", "warning", "none")

# Modules whose build / build_grad is being traced, innermost last.
_BUILDING: List["Module"] = []
_BUILDING_GRAD: List["Module"] = []


@contextlib.contextmanager
def _tracing(stack: List["Module"], module: "Module"):
    stack.append(module)
    try:
        yield
    finally:
        stack.pop()


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


class NameScopeMeta(type):
    """Metaclass of :class:`Module`: wraps each class's own ``build`` so it runs in the module's name scope."""

    def __new__(mcs, name, bases, dct):
        if callable(dct.get("build")):
            dct["build"] = _scoped(dct["build"])
        return super().__new__(mcs, name, bases, dct)


class _Aux:
    """Forward tensors a ``build_grad`` needs: set ``self.aux[key] = t`` in ``build``; reading
    ``self.aux[key]`` in ``build_grad`` gives a gradient-graph input connected to ``t``."""

    def __init__(self):
        self._values = OrderedDict()
        self._inputs = OrderedDict()    # key -> gradient-graph input
        self._grad_to_fwd = OrderedDict()  # gradient-graph input -> forward tensor

    def __setitem__(self, key, value) -> None:
        self._values[key] = value

    def __getitem__(self, key):
        if not _BUILDING_GRAD or _BUILDING_GRAD[-1].aux is not self:
            raise RuntimeError("aux values can only be read in build_grad (through create_grad_graph or autodiff)")
        value = self._values[key]
        if not isinstance(value, popxl.Tensor):
            return value
        if key not in self._inputs:
            x = popxl.graph_input(value.shape, value.dtype, str(key), False, value.meta_shape or None)
            self._inputs[key] = x
            self._grad_to_fwd[x] = value
        return self._inputs[key]

    def __contains__(self, key) -> bool:
        return key in self._values

    def copy(self) -> "_Aux":
        new = _Aux()
        new._values, new._inputs, new._grad_to_fwd = (self._values.copy(), self._inputs.copy(),
                                                      self._grad_to_fwd.copy())
        return new

    def __repr__(self):
        return repr(self._values)


class _VarGrads:
    """Gradients of the forward graph's variables, set in ``build_grad`` as ``self.var_grad[name] = t``."""

    def __init__(self, variables: Optional[Dict[str, popxl.Tensor]] = None):
        self._grads = OrderedDict()
        self._variables = variables

    def _check_context(self) -> None:
        if not _BUILDING_GRAD or _BUILDING_GRAD[-1].var_grad is not self or self._variables is None:
            raise RuntimeError("var_grad can only be used in build_grad (through create_grad_graph or autodiff)")

    def __getitem__(self, key):
        self._check_context()
        return self._grads[key]

    def __setitem__(self, key, t) -> None:
        self._check_context()
        if not isinstance(t, popxl.Tensor):
            raise TypeError(f"var_grad[{key!r}] must be a Tensor, got {type(t).__name__}")
        if key not in self._variables:
            raise KeyError(f"var_grad: {key!r} is not a variable of the forward graph; variables: "
                           f"{list(self._variables)}")
        var = self._variables[key]
        if tuple(t.shape) != tuple(var.shape) or tuple(t.meta_shape or ()) != tuple(var.meta_shape or ()):
            raise ValueError(f"var_grad[{key!r}]: gradient '{t.name}' {t.shape} (meta {t.meta_shape}) does not match "
                             f"the variable {var.shape} (meta {var.meta_shape})")
        self._grads[key] = t

    def __contains__(self, key) -> bool:
        return key in self._grads

    def __repr__(self):
        return repr(self._grads)


def _spec_key(arg):
    """A hashable description of a create_graph argument: tensor specs by value, others by repr."""
    if isinstance(arg, (popxl.Tensor, popxl.TensorSpec)):
        return ("tensor", tuple(arg.shape), arg.dtype.name, tuple(arg.meta_shape or ()))
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__,) + tuple(_spec_key(a) for a in arg)
    return ("value", repr(arg))


def _tensor_args(build, args, kwargs) -> list:
    """The arguments of ``build`` that ``create_graph`` turned into graph inputs, in graph input order:
    the signature's (defaults included), whatever the order of the keywords given."""
    def is_tensors(a):
        return isinstance(a, popxl.Tensor) or (isinstance(a, (list, tuple)) and a
                                                and all(isinstance(t, popxl.Tensor) for t in a))
    signature = inspect.signature(build)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            values.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            values.extend(value.values())
        else:
            values.append(value)
    return [a for a in values if is_tensors(a)]


class Module(popxl.Module, metaclass=NameScopeMeta):
    """Base class of layers. Subclasses define ``build(*args)``; see the module docstring.

    A subclass may also define ``build_grad(*output_grads)`` returning the gradients of the
    forward graph's non-variable inputs (in order), setting ``self.var_grad[name]`` for its
    variables and reading forward tensors saved in ``build`` as ``self.aux[key] = t``; see
    :meth:`create_grad_graph`. Such a module must be outlined (``call_module``), not inlined:
    calling it directly raises (``grad_inlining_error="error"``), warns ("warning") or not ("none").
    """

    def __init__(self, cache: bool = False, grad_inlining_error: str = "error"):
        if grad_inlining_error not in _GRAD_INLINING:
            raise ValueError(f"grad_inlining_error must be one of {_GRAD_INLINING}, got {grad_inlining_error!r}")
        self._variable_factories = NamedVariableFactories()
        self._named_inputs = NamedTensors()
        self._graph_cache: Optional[Dict] = {} if cache else None
        self.called_graphs_grad_info: Dict = {}
        self.grad_inlining_error = grad_inlining_error
        self.aux = _Aux()
        self.var_grad = _VarGrads()
        if cache and self.implements_grad_graph:
            raise ValueError(f"{type(self).__name__}: graph caching cannot be used with build_grad")

    def __call__(self, *args, **kwargs):
        if self.implements_grad_graph and not (_BUILDING and _BUILDING[-1] is self):
            msg = (f"{type(self).__name__} defines build_grad but is called inline, so autodiff would not use "
                   f"build_grad; outline it with call_module (or set grad_inlining_error='none')")
            if self.grad_inlining_error == "error":
                raise RuntimeError(msg)
            if self.grad_inlining_error == "warning":
                warnings.warn(msg, stacklevel=2)
        return super().__call__(*args, **kwargs)

    def build_grad(self, *args, **kwargs):
        """The gradient graph's body (override it): takes the gradients of the forward outputs and
        returns those of the forward graph's non-variable inputs; see :meth:`create_grad_graph`."""
        raise NotImplementedError(f"{type(self).__name__} does not define build_grad")

    @property
    def implements_grad_graph(self) -> bool:
        """Whether this module's class defines ``build_grad``."""
        return overrides(type(self), Module, "build_grad")

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
        self.aux = _Aux()
        try:
            with _tracing(_BUILDING, self):
                graph = ir.create_graph(self, *args, **kwargs)
            facts, named = self._variable_factories.copy(), self._named_inputs.copy()
            infos, aux = self.called_graphs_grad_info, self.aux.copy()
        finally:
            self._reset()
        if key is not None:
            self._graph_cache[key] = (graph, facts, named)
        return facts.copy(), GraphWithNamedArgs(graph, named, from_module=self, aux=aux,
                                                called_graphs_grad_info=infos)

    def _reset(self) -> None:
        """Forgets the variables of the last build (sub-modules' too: their trees are nested in ours)."""
        self._variable_factories._clear()
        self._named_inputs._clear()
        self.called_graphs_grad_info = {}
        self.aux = _Aux()
        self.var_grad = _VarGrads()

    def create_grad_graph(self, fwd_graph: GraphWithNamedArgs, grads_provided: Optional[Iterable] = None,
                          grads_required: Optional[Iterable] = None) -> GraphWithNamedArgs:
        """The gradient graph of ``fwd_graph`` (made by this module's ``create_graph``) traced from
        ``build_grad``, with its ``grad_graph_info``.

        ``build_grad`` receives one input per output of ``grads_provided`` (default: all forward
        outputs), must return the gradients of the non-variable inputs of ``grads_required``
        (default: all forward inputs) in order, and set ``self.var_grad[name]`` for each variable
        among them (gradient outputs follow, in ``grads_required`` order). The aux tensors it reads
        become forward outputs (so ``fwd_graph`` changes: make its call sites afterwards, or use
        ``call_module``).
        """
        if not self.implements_grad_graph:
            raise TypeError(f"{type(self).__name__}.create_grad_graph needs build_grad to be defined")
        for name, p in inspect.signature(self.build_grad).parameters.items():
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                raise TypeError(f"{type(self).__name__}.build_grad: parameters must be positional (one per output "
                                f"gradient); {name!r} is not")
        graph = fwd_graph.graph
        provided = _checked_subset(grads_provided, graph.outputs, "grads_provided", "output", graph)
        required = _checked_subset(grads_required, graph.inputs, "grads_required", "input", graph)
        name_of = {t: n for n, t in fwd_graph.args.to_dict().items()}
        required_vars = OrderedDict((name_of[t], t) for t in required if t in name_of)
        required_others = [t for t in required if t not in name_of]

        ir = graph.ir
        self.var_grad = _VarGrads(fwd_graph.args.to_dict())
        self.aux = fwd_graph._aux.copy() if fwd_graph._aux is not None else _Aux()
        try:
            with _tracing(_BUILDING_GRAD, self):
                grad_graph = ir.create_graph(self.build_grad, *provided)
            missing = [n for n in required_vars if n not in self.var_grad._grads]
            if missing:
                raise ValueError(f"{type(self).__name__}.build_grad did not set var_grad for {missing}; pass "
                                 f"grads_required to leave variables out")
            outs = list(grad_graph.outputs)
            if len(outs) != len(required_others):
                raise ValueError(f"{type(self).__name__}.build_grad returned {len(outs)} gradients, expected "
                                 f"{len(required_others)} (one per non-variable input in grads_required)")
            for i, (dx, x) in enumerate(zip(outs, required_others)):
                if tuple(dx.shape) != tuple(x.shape) or tuple(dx.meta_shape or ()) != tuple(x.meta_shape or ()):
                    raise ValueError(f"{type(self).__name__}.build_grad output {i} '{dx.name}' {dx.shape} does not "
                                     f"match the input '{x.name}' {x.shape}")
            with grad_graph:
                for name in required_vars:
                    popxl.graph_output(self.var_grad._grads[name])
            grad_to_fwd = self.aux._grad_to_fwd
            with graph:
                for t in grad_to_fwd.values():
                    if t not in graph.inputs and t not in graph.outputs:
                        popxl.graph_output(t)
            grad_inputs = OrderedDict(zip(grad_graph.inputs, provided))
            grad_inputs.update(grad_to_fwd)
            grad_outputs = OrderedDict(zip(grad_graph.outputs, required_others + list(required_vars.values())))
            info = create_grad_graph_info(ir, graph, grad_graph, grad_inputs, grad_outputs, set(grad_to_fwd.values()))
        finally:
            self._reset()
        return GraphWithNamedArgs.from_grad_graph(info)

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
            if autodiff in ("build_grad", "autodiff") or (autodiff == "auto" and module.implements_grad_graph):
                grad = graph.autodiff(grads_provided=grads_provided, grads_required=grads_required, method=autodiff)
                self.called_graphs_grad_info[graph.graph] = grad.grad_graph_info
            return graph.bind(variables).call(*_tensor_args(module.build, args, kwargs))[:n_outputs]
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

    @classmethod
    def from_variable_factories(cls, inputs: List[VariableFactory]) -> "Module":
        """A module with one variable input per factory, named and held as attributes "0", "1", ...

        Use it inside another module's build (the inputs are made in the current graph).
        """
        self = cls()
        for i, f in enumerate(inputs):
            object.__setattr__(self, str(i), self.add_variable_factory(f, name=str(i)))
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


def _checked_subset(chosen, allowed, what: str, kind: str, graph) -> list:
    """``chosen`` (default: all of ``allowed``) checked to be distinct tensors of ``allowed``."""
    if chosen is None:
        return list(allowed)
    chosen = list(chosen)
    for t in chosen:
        if not isinstance(t, popxl.Tensor) or t not in allowed:
            raise ValueError(f"{what}: {t!r} is not an {kind} of graph '{graph.name}'")
    dups = duplicate_items(chosen)
    if dups:
        raise ValueError(f"{what}: tensors given more than once: {sorted(t.name for t in dups)}")
    return chosen


def create_grad_graph_info(ir, fwd_graph, grad_graph, grad_input_to_fwd_output, grad_output_to_fwd_input,
                           fwd_tensors):
    """popxl's ``GradGraphInfo`` for a hand-built gradient graph.

    ``grad_input_to_fwd_output``: each gradient-graph input (in order) -> the forward tensor it
    takes: a forward value when in ``fwd_tensors``, else that output's gradient.
    ``grad_output_to_fwd_input``: each gradient-graph output (in order) -> the forward input whose
    gradient it is.
    """
    fwd_tensors = set(fwd_tensors)
    if IS_CPU:
        from ..popxl_cpu.transforms.autodiff import ExpectedConnection, ExpectedConnectionType, GradGraphInfo

        def connection(t, is_value):
            return ExpectedConnection._create(t, ExpectedConnectionType.Fwd if is_value
                                              else ExpectedConnectionType.FwdGrad)
        return GradGraphInfo._create(grad_graph, fwd_graph,
                                     [connection(t, t in fwd_tensors) for t in grad_input_to_fwd_output.values()],
                                     [connection(t, False) for t in grad_output_to_fwd_input.values()])
    import popart._internal.ir as _ir
    from popxl.transforms.autodiff import GradGraphInfo

    def pb_connection(t, is_value):
        return _ir.ExpectedConnection(t.id, _ir.ExpectedConnectionType.Fwd if is_value
                                      else _ir.ExpectedConnectionType.FwdGrad)
    bwd = _ir.BwdGraphInfo(grad_graph._pb_graph.id,
                           [pb_connection(t, t in fwd_tensors) for t in grad_input_to_fwd_output.values()],
                           [pb_connection(t, False) for t in grad_output_to_fwd_input.values()])
    return GradGraphInfo._from_pb(ir._pb_ir, fwd_graph._pb_graph, bwd)
