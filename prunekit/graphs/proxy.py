"""The proxy of the concrete tracer: an fx proxy that also holds its value for the example input.

Python's questions about it (``if``, ``bool``, ``len``, ``int``, ``range``,
iteration, ``isinstance``, ``.dtype``) are answered from that value by the
tracer's ``concretize``; tensor ops, methods and size queries are recorded.
"""

from __future__ import annotations

import builtins
import math
import operator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import fx

_CONCRETE_ATTRS = {"dtype", "device", "is_cuda", "is_meta", "ndim", "requires_grad", "layout", "is_sparse",
                   "is_quantized", "is_leaf", "grad_fn", "names", "itemsize"}
_python_isinstance = builtins.isinstance


class ConcreteProxy(fx.Proxy):
    """An fx proxy that knows its value for the example input."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, value: Any):
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
    """An op's arguments with every proxy replaced by its value, each container rebuilt as the type it was:
    a function that edits a list it is given (torchvision's swin3d clamps its window sizes in place) gets a
    list, not the immutable one that fx's own ``map_aggregate`` makes."""
    kind = type(value)
    if kind is ConcreteProxy:
        return value.prunekit_value
    if kind is tuple or kind is list:
        return kind(_unwrap(v) for v in value)
    if kind is dict:
        return {k: _unwrap(v) for k, v in value.items()}
    if kind is slice:
        return slice(_unwrap(value.start), _unwrap(value.stop), _unwrap(value.step))
    if isinstance(value, (tuple, list, dict)):  # named tuples, fx's immutable containers, dict subclasses
        return fx.node.map_aggregate(value, lambda a: a.prunekit_value if isinstance(a, ConcreteProxy) else a)
    return value


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
