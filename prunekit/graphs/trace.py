"""The concrete tracer: a torch.fx trace in which every proxy also holds its value.

The trace is specialised to the example input. Python's questions about a
proxy (``if``, ``bool``, ``len``, ``int``, ``range``, iteration,
``isinstance``, ``.dtype``) are answered from the value the proxy has for that
input, while tensor ops and size queries are still recorded as nodes, so a
channel count read from ``x.size(1)`` keeps its provenance. The pruned model is
always the user's own class, never the trace, so nothing is lost by this.

>>> import torchvision
>>> traced = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
>>> traced.values[next(iter(traced.graph.nodes))].shape
torch.Size([1, 3, 64, 64])

Values are meta tensors (shapes, no data) unless the model needs real data
(an op without a meta kernel, ``.item()``, a branch on a value at the top
level); then the trace is run again on real tensors. A module whose code still
cannot be traced, or branches on its data, becomes an opaque leaf (its
channels pinned) and the trace goes on: a model that runs is never refused.
"""

from __future__ import annotations

import builtins
import math
import operator
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call

from ..errors import PrunekitError
from ..ops import is_leaf_type, spec_for_target


class UntraceableModelError(PrunekitError):
    """Kept for compatibility: tracing now falls back to opaque leaves instead of failing."""


class ExampleInputError(PrunekitError):
    """The model does not run on the example inputs (wrong shape or dtype)."""


@dataclass(frozen=True)
class Fallback:
    """A submodule traced as one opaque op because its code could not be traced."""

    module: str
    type: str
    reason: str
    location: str  # file:line of the statement that failed

    def describe(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"'{self.module}' ({self.type}) treated as an opaque leaf: {self.reason}{where}"


@dataclass
class Traced:
    """One trace: the fx graph, each node's value, and what had to be specialised or left opaque."""

    graph: fx.Graph
    root: nn.Module  # the (meta or real) copy that was traced; node targets name its submodules
    values: dict[fx.Node, Any]
    control: list[fx.Node]  # nodes whose value steered Python (if, int(), range...)
    leaves: dict[str, str]  # opaque leaf module -> why it is opaque
    fallbacks: list[Fallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reads_training: bool = False
    meta: bool = True
    modules: dict[str, nn.Module] = field(default_factory=dict)  # the root's submodules by name

    def signature(self) -> list[tuple[str, Any]]:
        return [(n.op, n.target) for n in self.graph.nodes]


# ---------------------------------------------------------------------------
# The proxy


_CONCRETE_ATTRS = {"dtype", "device", "is_cuda", "is_meta", "ndim", "requires_grad", "layout", "is_sparse",
                   "is_quantized", "is_leaf", "grad_fn", "names", "itemsize"}


class ConcreteProxy(fx.Proxy):
    """An fx proxy that knows its value for the example input."""

    def __init__(self, node: fx.Node, tracer: "ConcreteTracer", value: Any):
        super().__init__(node, tracer)
        self.prunekit_value = value

    def __bool__(self) -> bool:
        return self.tracer.concretize(self, bool)

    def __int__(self) -> int:
        return self.tracer.concretize(self, int)

    def __index__(self) -> int:
        return self.tracer.concretize(self, operator.index)

    def __float__(self) -> float:
        return self.tracer.concretize(self, float)

    def __round__(self, ndigits=None):
        return self.tracer.concretize(self, lambda v: round(v, ndigits))

    def __floor__(self):
        return self.tracer.concretize(self, math.floor)

    def __ceil__(self):
        return self.tracer.concretize(self, math.ceil)

    def __trunc__(self):
        return self.tracer.concretize(self, math.trunc)

    def __format__(self, spec: str) -> str:
        return format(self.prunekit_value, spec)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.tracer.concretize(self, lambda v: v), dtype=dtype)

    def __len__(self) -> int:
        value = self.prunekit_value
        if isinstance(value, torch.Tensor):
            return self.tracer.concretize(self.size(0), int)
        return len(value)

    def __iter__(self):
        value = self.prunekit_value
        if isinstance(value, dict):
            return iter(value)
        return (self[i] for i in range(len(self)))

    def __contains__(self, item) -> bool:
        return item in self.prunekit_value

    def keys(self):
        return self.prunekit_value.keys()

    def __setitem__(self, key, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "prunekit_value":
            raise AttributeError(name)
        value = self.prunekit_value
        attr = getattr(value, name)  # an AttributeError here is the model's own
        if isinstance(value, dict) and name in ("items", "values", "get"):
            return _DictView(self, name)
        if name in _CONCRETE_ATTRS or not isinstance(value, torch.Tensor) and not callable(attr):
            return attr
        if callable(attr):
            return _Method(self, name)
        return self.tracer.create_proxy("call_function", getattr, (self, name), {})  # .shape, .T: recorded


class _Method:
    """A tensor method looked up on a proxy; calling it records the call."""

    def __init__(self, proxy: ConcreteProxy, name: str):
        self.proxy, self.name = proxy, name

    def __call__(self, *args, **kwargs):
        return self.proxy.tracer.create_proxy("call_method", self.name, (self.proxy,) + args, kwargs)


class _DictView:
    """items() / values() / get() of a dict-valued proxy, item by item through recorded getitems."""

    def __init__(self, proxy: ConcreteProxy, name: str):
        self.proxy, self.name = proxy, name

    def __call__(self, *args):
        keys = list(self.proxy.prunekit_value)
        if self.name == "items":
            return [(k, self.proxy[k]) for k in keys]
        if self.name == "values":
            return [self.proxy[k] for k in keys]
        key, default = args[0], args[1] if len(args) > 1 else None
        return self.proxy[key] if key in keys else default


def _unwrap(value):
    return fx.node.map_aggregate(value, lambda a: a.prunekit_value if isinstance(a, ConcreteProxy) else a)


# ---------------------------------------------------------------------------
# The tracer


class _LeafNeeded(Exception):
    """The module running at ``scope`` must be traced as an opaque leaf."""

    def __init__(self, scope: str, reason: str, location: str):
        super().__init__(reason)
        self.scope, self.reason, self.location = scope, reason, location


class _RealDataNeeded(Exception):
    """A top-level branch reads data that meta tensors do not have."""


_SIZE_METHODS = {"size", "dim", "numel", "nelement"}


class ConcreteTracer(fx.Tracer):
    """Records the model's ops as an fx graph while computing each one's value."""

    def __init__(self, leaves: dict[str, str], inputs: tuple, meta: bool):
        super().__init__()
        self.leaves = leaves
        self.inputs = inputs
        self.meta = meta
        self.values: dict[fx.Node, Any] = {}
        self.data_dependent: set[fx.Node] = set()
        self.control: list[fx.Node] = []
        self.notes: list[str] = []
        self.scopes: list[str] = [""]
        self.executing = 0  # > 0 while a value is being computed: no recording
        self.reads_training = False
        self._next_value: Any = None
        self.modules: dict[str, nn.Module] = {}
        self.tensor_names: dict[int, str] = {}

    def trace(self, root: nn.Module, concrete_args=None) -> fx.Graph:
        self.modules = dict(root.named_modules())
        self.tensor_names = {id(t): name for name, t in reversed([*root.named_parameters(), *root.named_buffers()])}
        return super().trace(root, concrete_args)

    # -- what is a leaf ----------------------------------------------------

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or is_leaf_type(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if self.executing:
            return forward(*args, **kwargs)
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        self.scopes.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "prunekit_scopes"):
                exc.prunekit_scopes = list(self.scopes)
            raise
        finally:
            self.scopes.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict):
        """A parameter or buffer read in traced code becomes a get_attr node (torch.fx's own
        version searches every parameter on every read)."""
        if self.executing or not _python_isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self.tensor_names.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    # -- the root's arguments: the example inputs, then the forward's defaults

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        import inspect

        names = [p.name for p in inspect.signature(root_fn).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
        proxies = []
        for i, value in enumerate(self.inputs):
            self._next_value = value
            name = names[i] if i < len(names) else f"input_{i}"
            proxies.append(super().create_proxy("placeholder", name, (), {}))
        root = self.root

        def forward():
            return root_fn(root, *proxies)

        return forward, []

    # -- values ------------------------------------------------------------

    def create_arg(self, a: Any):
        if isinstance(a, fx.Proxy):  # before torch.fx's tensor checks, which a tensor's proxy passes
            return a.node
        return super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        builtins.isinstance = _python_isinstance  # torch.fx's bookkeeping: Python's own (faster, exact)
        try:
            self._next_value = self._evaluate(kind, target, args, kwargs)
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
            if kind == "call_module" and target in self.leaves:
                proxy.node.meta["prunekit_leaf"] = self.leaves[target]
            if self._reads_data(kind, target, args, kwargs, self._next_value):
                self.data_dependent.add(proxy.node)
            return proxy
        finally:
            builtins.isinstance = _concrete_isinstance

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        self.values[node] = self._next_value
        return ConcreteProxy(node, self, self._next_value)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "get_attr":  # a constant or parameter handed to an op directly
            self.values[node] = self._fetch(target)
        return node

    def _evaluate(self, kind: str, target, args, kwargs):
        args, kwargs = _unwrap(args), _unwrap(kwargs)
        if kind == "get_attr":
            return self._fetch(target)
        module = self.modules[target] if kind == "call_module" else None
        if self.meta:
            shortcut = _meta_result(kind, target, module, args)
            if shortcut is not None:
                return shortcut
        self.executing += 1
        try:
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return _orig_module_call(module, *args, **kwargs)
        finally:
            self.executing -= 1
        raise AssertionError(f"unexpected node kind {kind}")

    def _fetch(self, target: str):
        self.executing += 1  # module attribute reads must not be recorded again
        try:
            return _fetch(self.root, target)
        finally:
            self.executing -= 1

    def _reads_data(self, kind, target, args, kwargs, value) -> bool:
        """Whether the value depends on tensor data rather than on shapes only."""
        if kind == "call_method" and target in _SIZE_METHODS:
            return False
        if kind == "call_function" and target is getattr and len(args) > 1 and args[1] == "shape":
            return False
        if isinstance(value, torch.Tensor):
            return True
        found = []
        fx.node.map_aggregate((args, kwargs), lambda a: found.append(a.node in self.data_dependent)
                              if isinstance(a, ConcreteProxy) else None)
        return any(found)

    # -- Python asks a proxy for a concrete answer ----------------------------

    def concretize(self, proxy: ConcreteProxy, convert: Callable):
        node = proxy.node
        if node in self.data_dependent:
            scope = self.scopes[-1]
            location = user_location(traceback.extract_stack()[:-2])
            if scope:
                raise _LeafNeeded(scope, "its code branches on tensor data", location)
            if self.meta:
                raise _RealDataNeeded()
            self.notes.append(f"a branch on tensor data{f' at {location}' if location else ''} "
                              "was resolved for the example input")
        self.control.append(node)
        return convert(proxy.prunekit_value)

    def to_bool(self, obj) -> bool:
        return self.concretize(obj, bool)

    def iter(self, obj):
        return iter(obj)

    def keys(self, obj):
        return obj.prunekit_value.keys()


def _fetch(root: nn.Module, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _meta_result(kind: str, target, module: nn.Module | None, args: tuple):
    """The output of a shape-keeping op on meta tensors, without running it.

    Several such ops (BatchNorm, hardswish...) have slow Python meta kernels,
    and only the shape matters here.
    """
    if kind not in ("call_module", "call_function") or not args or not isinstance(args[0], torch.Tensor):
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.device.type != "meta" for t in tensors):
        return None
    shape = spec_for_target(kind, target, module).shape
    if shape == "input":
        return torch.empty(args[0].shape, dtype=args[0].dtype, device="meta")
    if shape == "broadcast" and len({t.dtype for t in tensors}) == 1:
        return torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)), dtype=tensors[0].dtype,
                           device="meta")
    return None


_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def user_location(frames) -> str:
    """``path:line`` of the innermost frame outside torch and prunekit (the model's own code)."""
    for frame in reversed(list(frames)):
        path = os.path.abspath(frame.filename)
        if path.startswith((_HERE, _TORCH)) or "<" in frame.filename:
            continue
        parts = path.split(os.sep)
        return f"{os.sep.join(parts[-2:])}:{frame.lineno}"
    return ""


# ---------------------------------------------------------------------------
# Copies to trace: the caller's model is never touched


def structural_copy(module: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy with new module objects and converted tensors (parameters, buffers, tensor attributes).

    Other attributes are shared with the original: the copy is short-lived and
    only traced, which is much cheaper than a deepcopy.
    """
    memo: dict[int, Any] = {}  # keyed by the original objects, which the model keeps alive

    def tensor(t):
        if id(t) not in memo:
            memo[id(t)] = convert(t)
        return memo[id(t)]

    def parameter(p):
        if id(p) not in memo:
            memo[id(p)] = nn.Parameter(convert(p), p.requires_grad)
        return memo[id(p)]

    def copy(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        copied = m.__class__.__new__(m.__class__)
        memo[id(m)] = copied
        state = {k: tensor(v) if isinstance(v, torch.Tensor) else v for k, v in m.__dict__.items()}
        state["_parameters"] = {k: None if p is None else parameter(p) for k, p in m._parameters.items()}
        state["_buffers"] = {k: None if b is None else tensor(b) for k, b in m._buffers.items()}
        state["_modules"] = {k: None if c is None else copy(c) for k, c in m._modules.items()}
        object.__setattr__(copied, "__dict__", state)  # skips nn.Module.__setattr__'s checks
        return copied

    return copy(module)


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("meta")


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


@contextmanager
def training_mode(model: nn.Module, training: bool):
    """Switch every submodule's mode, restoring each one's own flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


_python_isinstance = builtins.isinstance


def _concrete_isinstance(obj, classes):
    """``isinstance(x, torch.Tensor)`` in the model's code holds for a tensor's proxy.

    Python's own ``isinstance`` is swapped while the model's code runs, rather than
    the proxy faking its ``__class__``: C++ code asks ``PyObject_IsInstance`` too and
    must never mistake a proxy for a tensor. Only tensors: torch.fx itself takes
    anything that looks like a tuple or a dict apart.
    """
    if type(obj) is ConcreteProxy and _python_isinstance(obj.prunekit_value, torch.Tensor):
        return _python_isinstance(obj.prunekit_value, classes) or _python_isinstance(obj, classes)
    return _python_isinstance(obj, classes)


@contextmanager
def _model_code_sees_values():
    builtins.isinstance = _concrete_isinstance
    try:
        yield
    finally:
        builtins.isinstance = _python_isinstance


# tensor factories whose size arguments torch.fx cannot record (they take ints, not proxies)
_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "linspace", "logspace", "eye",
              "tensor", "as_tensor")


@contextmanager
def _factories_take_values(tracer: "ConcreteTracer"):
    """``torch.zeros(x.shape[0], ...)``: sizes read from proxies are answered from their values (a
    channel count read this way is pinned, as any that steers Python); the result is a constant."""
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def wrap(name, original):
        def factory(*args, **kwargs):
            found = []
            fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if type(a) is ConcreteProxy else None)
            if not found:
                return original(*args, **kwargs)
            args, kwargs = fx.node.map_aggregate(
                (args, kwargs), lambda a: tracer.concretize(a, lambda v: v) if type(a) is ConcreteProxy else a)
            if tracer.meta and "device" not in kwargs and name not in ("tensor", "as_tensor"):
                kwargs["device"] = "meta"
            return original(*args, **kwargs)

        return factory

    for name, original in originals.items():
        setattr(torch, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


@contextmanager
def _watch_training_reads(tracer: "ConcreteTracer"):
    """Notes any read of ``module.training`` by traced code (not by the leaves it runs).

    A property on nn.Module shadows the instance flag for the length of the trace,
    so only reads of ``training`` pay for it, wherever they happen (a helper
    function, a variable): no guess from source code.
    """

    def read(self):
        if not tracer.executing:
            tracer.reads_training = True
        try:
            return self.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None

    def write(self, value):
        self.__dict__["training"] = value

    nn.Module.training = property(read, write)
    try:
        yield
    finally:
        del nn.Module.training


# ---------------------------------------------------------------------------
# One trace, with fallbacks


_MAX_FALLBACKS = 64
UNTRACEABLE = "could not be traced"  # the pin reason of a fallback leaf's channels


def _trace_once(root: nn.Module, inputs: tuple, leaves: dict[str, str], meta: bool) -> Traced:
    tracer = ConcreteTracer(leaves, inputs, meta)
    before = set(root.__dict__)
    with torch.no_grad(), _watch_training_reads(tracer), _model_code_sees_values(), _factories_take_values(tracer):
        graph = tracer.trace(root)
    # torch.fx stows tensors made in the forward on the root ('_tensor_constant0'...): keep them there
    graph.prunekit_constants = {k: root.__dict__[k] for k in root.__dict__ if k not in before}
    return Traced(graph, root, tracer.values, tracer.control, dict(leaves), notes=tracer.notes,
                  reads_training=tracer.reads_training, meta=meta, modules=tracer.modules)


def _failure(exc: BaseException) -> tuple[str, str]:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    reason = f"{type(exc).__name__}: {first}" if not isinstance(exc, fx.proxy.TraceError) else first
    return reason[:200], user_location(traceback.extract_tb(exc.__traceback__))


def trace(model: nn.Module, inputs: tuple, leaf_modules: Iterable[str] = (), training: bool = False) -> Traced:
    """Trace ``model`` on ``inputs`` in eval (or train) mode; the model itself is not modified."""
    leaves = dict(leaf_modules) if isinstance(leaf_modules, dict) else \
        {name: "a leaf named by the user" for name in leaf_modules}
    fallbacks: list[Fallback] = []
    use_meta, runs = True, False
    for _ in range(_MAX_FALLBACKS):
        copy = structural_copy(model, _to_meta if use_meta else _clone)
        args = tuple(_to_meta(x) if use_meta and isinstance(x, torch.Tensor) else
                     _clone(x) if isinstance(x, torch.Tensor) else x for x in inputs)
        with training_mode(copy, training):
            try:
                traced = _trace_once(copy, args, leaves, use_meta)
                traced.fallbacks = fallbacks
                return traced
            except _LeafNeeded as need:
                _add_leaf(model, need.scope, need.reason, need.location, leaves, fallbacks)
            except Exception as exc:  # noqa: BLE001 - any failure: real data, then a leaf
                if use_meta:
                    use_meta = False
                    continue
                if not runs:  # a model that fails by itself is the caller's error, not a tracing problem
                    _check_runs(model, inputs, training)
                    runs = True
                scope = _innermost_new_scope(exc, leaves)
                if scope is None:
                    return _opaque_model(model, inputs, training, *_failure(exc), fallbacks)
                _add_leaf(model, scope, *_failure(exc), leaves, fallbacks)
    raise PrunekitError(f"tracing {type(model).__name__} needed more than {_MAX_FALLBACKS} opaque leaves.")


def _add_leaf(model, scope, reason, location, leaves, fallbacks) -> None:
    kind = type(model.get_submodule(scope)).__name__
    fallbacks.append(Fallback(scope, kind, reason, location))
    leaves[scope] = UNTRACEABLE


def _innermost_new_scope(exc: BaseException, leaves: dict) -> str | None:
    for scope in reversed(getattr(exc, "prunekit_scopes", [])):
        if scope and scope not in leaves:
            return scope
    return None


def _check_runs(model: nn.Module, inputs: tuple, training: bool) -> None:
    copy = structural_copy(model, _clone)
    with torch.no_grad(), training_mode(copy, training):
        try:
            copy(*(_clone(x) if isinstance(x, torch.Tensor) else x for x in inputs))
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one sentence
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExampleInputError(f"the model fails on the example input: {first}.") from None


def _opaque_model(model, inputs, training, reason, location, fallbacks) -> Traced:
    """The whole model as one opaque op: its top-level code could not be traced at all."""
    copy = structural_copy(model, _clone)
    graph = fx.Graph()
    values: dict[fx.Node, Any] = {}
    placeholders = []
    for i, x in enumerate(inputs):
        node = graph.placeholder(f"input_{i}")
        values[node] = x
        placeholders.append(node)
    # the module itself as the target: costs price it with fvcore
    call = graph.create_node("call_function", copy, tuple(placeholders), name="whole_model")
    with torch.no_grad(), training_mode(copy, training):
        values[call] = copy(*inputs)
    call.meta["prunekit_leaf"] = UNTRACEABLE
    graph.output(call)
    graph.prunekit_constants = {}
    fallbacks = fallbacks + [Fallback("", type(model).__name__, reason, location)]
    return Traced(graph, copy, values, [], {"": UNTRACEABLE}, fallbacks, meta=False,
                  modules=dict(copy.named_modules()))


def trace_both_modes(model: nn.Module, inputs: tuple, leaf_modules: Iterable[str] = ()) -> list[Traced]:
    """The eval-mode trace first, then the train-mode one when it differs.

    Train-only branches (aux heads, stochastic depth) exist only in the train
    trace; the channel graph unites both, so the pruned model stays consistent
    in either mode. The train trace is taken whenever traced code read a
    ``.training`` flag.
    """
    traces = [trace(model, inputs, leaf_modules, training=False)]
    if not traces[0].reads_training:
        return traces
    train = trace(model, inputs, traces[0].leaves, training=True)
    if train.signature() != traces[0].signature() or train.leaves != traces[0].leaves:
        traces.append(train)
    return traces
