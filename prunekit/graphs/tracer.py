"""The concrete tracer: records the model's ops as an fx graph while computing each one's value.

Values are meta tensors (shapes, no data) or real ones. While a trace runs,
Python's ``isinstance`` sees a tensor's proxy as a tensor, tensor factories take
sizes read from proxies, and reads of ``module.training`` are noted.
"""

from __future__ import annotations

import builtins
import inspect
import os
import traceback
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _orig_module_call
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..ops import is_leaf_type, spec_for_target
from .proxy import ConcreteProxy, _concrete_isinstance, _python_isinstance, _unwrap


class _LeafNeeded(Exception):
    """The module running at ``scope`` must be traced as an opaque leaf."""

    def __init__(self, scope: str, reason: str, location: str):
        super().__init__(reason)
        self.scope, self.reason, self.location = scope, reason, location


class _RealDataNeeded(Exception):
    """A top-level branch reads data that meta tensors do not have."""


_SIZE_METHODS = {"size", "dim", "numel", "nelement"}


_WEIGHT_HOOKS = (WeightNorm, SpectralNorm)


def _user_hooks(module: nn.Module) -> bool:
    """Forward (pre-)hooks that may change what the module returns; a weight recomputed before each
    call (old-style weight_norm, spectral_norm) is not one: the module's weight already holds it."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return any(not isinstance(h, _WEIGHT_HOOKS) for h in hooks)


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
        try:
            name = self.path_of_module(m)
        except NameError:  # made in the forward (a pooling layer, a slice of a Sequential): traced through
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, name):
            if _user_hooks(m):  # a recorded layer call would leave them out: trace them around it
                return self._leaf_with_hooks(m, forward, args, kwargs)
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

    def _leaf_with_hooks(self, m: nn.Module, forward, args: tuple, kwargs: dict):
        """A layer's call with its forward hooks traced around it, in the order nn.Module runs them."""
        for key, hook in m._forward_pre_hooks.items():
            if isinstance(hook, _WEIGHT_HOOKS):
                continue  # run with the layer itself (see _evaluate)
            if key in m._forward_pre_hooks_with_kwargs:
                result = hook(m, args, kwargs)
                if result is not None:
                    args, kwargs = result
            else:
                result = hook(m, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        out = super().call_module(m, forward, args, kwargs)
        for key, hook in m._forward_hooks.items():
            result = hook(m, args, kwargs, out) if key in m._forward_hooks_with_kwargs else hook(m, args, out)
            if result is not None:
                out = result
        return out

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
        if isinstance(a, nn.Parameter) and id(a) not in self.tensor_names:
            # a module kept outside the model's tree (in a list): a constant like any foreign tensor,
            # where torch.fx would refuse the parameter it cannot name
            return super().create_arg(a.detach())
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
        self.executing += 1  # the op's own code (and its shape function) is run, not recorded
        try:
            shortcut = _meta_result(kind, target, module, args, kwargs) if self.meta else None
            if shortcut is not None:
                return shortcut
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                if _user_hooks(module):  # its hooks are traced around this call: the layer alone here
                    for hook in module._forward_pre_hooks.values():
                        if isinstance(hook, _WEIGHT_HOOKS):
                            hook(module, args)
                    return module.forward(*args, **kwargs)
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


def _meta_result(kind: str, target, module: nn.Module | None, args: tuple, kwargs: dict):
    """The output of an op on meta tensors, from its shape alone, without running it.

    Many meta kernels (BatchNorm, hardswish, adaptive pooling, linear, cat) are slow
    Python code, and only the shape matters here.
    """
    if kind not in ("call_module", "call_function") or not args:
        return None
    first = args[0][0] if isinstance(args[0], (list, tuple)) and args[0] else args[0]  # cat's list
    if not isinstance(first, torch.Tensor):
        return None
    tensors = [a for a in (*args, *(args[0] if isinstance(args[0], (list, tuple)) else ()))
               if isinstance(a, torch.Tensor)]
    if any(t.device.type != "meta" for t in tensors):
        return None
    shape = spec_for_target(kind, target, module).shape
    if callable(shape):  # the op's own shape function (conv, linear, adaptive pooling, cat)
        size = shape(args, module, kwargs)
        return None if size is None else torch.empty(size, dtype=first.dtype, device="meta")
    if first is not args[0]:
        return None
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
            if any(_python_isinstance(p.prunekit_value, torch.Tensor) for p in found):
                # torch.as_tensor(x) of a traced tensor: an op on it, recorded
                return tracer.create_proxy("call_function", original, args, kwargs)
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
