"""Tracing with torch.fx, and the pass that walks the trace once with real values.

:class:`ChannelProp` is an :class:`torch.fx.Interpreter` that runs every node
on the example inputs, records the output shape on ``node.meta`` and applies
that op's channel rule. It is the only pass that executes the model; the
costs, the surgery and the scorers read what it records.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from contextlib import contextmanager
from typing import Any, Iterable, NamedTuple

import torch
from torch import fx, nn

from ..errors import PrunekitError
from .rules import SHAPE_KEEPING_RULES, Op, elementwise, is_leaf_type, passthrough, rule_for
from .state import ChannelState


class UntraceableModelError(PrunekitError):
    """torch.fx could not trace the model (data-dependent control flow...)."""


class PrunekitTracer(fx.Tracer):
    """Stops at the layers prunekit understands and at the ones the user names."""

    def __init__(self, leaf_modules: Iterable[str] = ()):
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self.scopes: list[tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaf_names or is_leaf_type(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.scopes.append((self.path_of_module(m), type(m).__name__))
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "prunekit_scope"):
                exc.prunekit_scope = self.scopes[-1]
            raise
        self.scopes.pop()
        return result


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


def trace(model: nn.Module, leaf_modules: Iterable[str] = (), training: bool = False) -> fx.Graph:
    tracer = PrunekitTracer(leaf_modules)
    before = set(model.__dict__)
    with training_mode(model, training):
        try:
            graph = tracer.trace(model)
            # torch.fx stores tensors made in the forward on the traced module ('_tensor_constant0'...):
            # they go with the graph, so the caller's model is left as it was
            graph.prunekit_constants = {k: model.__dict__.pop(k) for k in list(model.__dict__) if k not in before}
            return graph
        except Exception as exc:
            for k in [k for k in model.__dict__ if k not in before]:
                del model.__dict__[k]
            scope = getattr(exc, "prunekit_scope", None)
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if scope and scope[0]:
                where = f"module '{scope[0]}' ({scope[1]})"
                hint = f"mark it as a leaf (leaf_modules=['{scope[0]}'], or `leaf_modules:` in the config)"
            else:
                where = f"the forward of {type(model).__name__}"
                hint = "move the data-dependent code into a submodule and mark that module as a leaf"
            raise UntraceableModelError(
                f"torch.fx cannot trace {where}: {first_line}; {hint} so prunekit treats it as one opaque op."
            ) from None


def _signature(graph: fx.Graph) -> list[tuple[str, Any]]:
    return [(n.op, n.target) for n in graph.nodes]


def trace_both_modes(model: nn.Module, leaf_modules: Iterable[str] = ()) -> list[fx.Graph]:
    """The eval-mode graph first, then the train-mode one when it differs.

    Train-only branches (GoogLeNet and Inception aux heads) exist only in the
    train-mode trace; the channel graph unites both, so the pruned model stays
    consistent in either mode.
    """
    graphs = [trace(model, leaf_modules, training=False)]
    if not _reads_training_flag(model, leaf_modules):
        return graphs
    try:
        train_graph = trace(model, leaf_modules, training=True)
    except UntraceableModelError:
        return graphs
    if _signature(train_graph) != _signature(graphs[0]):
        graphs.append(train_graph)
    return graphs


_READS_TRAINING: dict[type, bool] = {}


def _reads_training_flag(model: nn.Module, leaf_modules: Iterable[str]) -> bool:
    """Whether any traced-through forward may branch on ``self.training``."""
    leaves = set(leaf_modules)
    for name, m in model.named_modules():
        if name in leaves or is_leaf_type(m) or m.__module__.startswith("torch.nn"):
            continue
        cls = type(m)
        if cls not in _READS_TRAINING:  # an inherited forward counts too: look at every base class
            _READS_TRAINING[cls] = any(_branches_on_training(k) for k in cls.__mro__
                                       if k is not object and not k.__module__.startswith(("torch.nn", "builtins")))
        if _READS_TRAINING[cls]:
            return True
    return False


def _branches_on_training(cls: type) -> bool:
    """Whether a class's code has a condition that reads ``.training``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return True  # no source: assume it might
    for node in ast.walk(tree):
        if isinstance(node, (ast.If, ast.IfExp, ast.While, ast.Assert, ast.BoolOp)):
            tests = [node.test] if not isinstance(node, ast.BoolOp) else node.values
            for test in tests:
                if any(isinstance(n, ast.Attribute) and n.attr == "training" for n in ast.walk(test)):
                    return True
    return False


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


class ChannelProp(fx.Interpreter):
    """Runs a traced graph once, recording shapes and channel vectors on each node."""

    def __init__(self, model: nn.Module, graph: fx.Graph, state: ChannelState, meta: bool = False):
        super().__init__(model, graph=graph)
        self.state = state
        self.chans: dict[fx.Node, Any] = {}
        self.constants = {k: v.to("meta") if meta else v for k, v in getattr(graph, "prunekit_constants", {}).items()}

    def fetch_attr(self, target: str):
        if target in self.constants:
            return self.constants[target]
        return super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        rule = rule_for(n, module)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = _meta_result(n, rule, args)
            if out is None:
                out = getattr(self, n.op)(n.target, args, kwargs)
        op = Op(n, args, kwargs, out, module, self.state, self.chans)
        chan = rule(op)
        self.chans[n] = chan
        n.meta["prunekit_shape"] = _shape_of(out)
        n.meta["prunekit_chan"] = chan
        if _opaque_compute(n, module):
            # what fvcore would count inside an op we do not model: priced once, by shape
            n.meta["prunekit_call"] = _shapes_only((args, kwargs))
        return out


def _meta_result(n: fx.Node, rule, args: tuple):
    """The output of a shape-keeping op on meta tensors, without running it.

    Several such ops (BatchNorm, hardswish...) have slow Python meta kernels,
    and only the shape matters here.
    """
    if n.op not in ("call_module", "call_function") or not args:
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.device.type != "meta" for t in tensors) or not isinstance(args[0], torch.Tensor):
        return None
    if rule in SHAPE_KEEPING_RULES and (n.op == "call_module" or rule is passthrough):
        return torch.empty(args[0].shape, dtype=args[0].dtype, device="meta")
    if rule is elementwise and n.op == "call_function" and len({t.dtype for t in tensors}) == 1 \
            and n.target not in (torch.where,):
        return torch.empty(torch.broadcast_shapes(*(t.shape for t in tensors)), dtype=tensors[0].dtype,
                           device="meta")
    return None


def _opaque_compute(n: fx.Node, module: nn.Module | None) -> bool:
    if n.op == "call_module":
        return not is_leaf_type(module) and any(True for _ in module.parameters())
    if n.op == "call_function":
        home = (getattr(n.target, "__module__", None) or "").split(".")[0]
        return inspect.isfunction(n.target) and home not in ("torch", "_operator", "operator", "math", "builtins")
    return False


class TensorSpec(NamedTuple):
    shape: tuple
    dtype: torch.dtype
    ident: int


def _shapes_only(value):
    """Replace tensors by their specs; parameters (real tensors) are kept."""
    if isinstance(value, torch.Tensor) and not _is_fake(value):
        return value
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype, id(value))
    if isinstance(value, (tuple, list)):
        return type(value)(_shapes_only(v) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        return {k: _shapes_only(v) for k, v in value.items()}
    return value


def _is_fake(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def materialize(value, made: dict | None = None):
    """Zeros standing for recorded specs; one tensor per original identity."""
    made = {} if made is None else made
    if isinstance(value, TensorSpec):
        if value.ident not in made:
            made[value.ident] = torch.zeros(value.shape, dtype=value.dtype)
        return made[value.ident]
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(materialize(v, made) for v in value)
    if isinstance(value, dict):
        return {k: materialize(v, made) for k, v in value.items()}
    return value


def _run(model: nn.Module, graphs: list[fx.Graph], inputs: tuple, meta: bool = False) -> ChannelState:
    state = ChannelState()
    for graph in graphs:
        ChannelProp(model, graph, state, meta).run(*inputs)
    return state


def _on_meta(module: nn.Module) -> nn.Module:
    """A structural copy whose tensors live on the meta device: shapes, no data.

    Module objects and their tensor tables are new; other attributes are
    shared with the original (the copy is read-only and short-lived), which
    is much cheaper than a deepcopy.
    """
    copied = module.__class__.__new__(module.__class__)
    state = module.__dict__.copy()
    state["_parameters"] = {k: None if p is None else nn.Parameter(p.detach().to("meta"), p.requires_grad)
                            for k, p in module._parameters.items()}
    state["_buffers"] = {k: None if b is None else b.to("meta") for k, b in module._buffers.items()}
    state["_modules"] = {k: None if m is None else _on_meta(m) for k, m in module._modules.items()}
    object.__setattr__(copied, "__dict__", state)  # skips nn.Module.__setattr__'s checks
    return copied


def propagate(model: nn.Module, graphs: list[fx.Graph], inputs: tuple) -> ChannelState:
    """Walk every graph once, on the meta device when the ops allow it (shapes only).

    Ops without a meta kernel fall back to one real forward pass.
    """
    with torch.no_grad(), training_mode(model, False):
        try:
            meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
            return _run(_on_meta(model), graphs, meta_inputs, meta=True)
        except Exception:
            for graph in graphs:
                for node in graph.nodes:
                    node.meta.pop("prunekit_call", None)
        try:
            return _run(model, graphs, inputs)
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExampleInputError(f"the model fails on the example input: {first_line}.") from None


class ExampleInputError(PrunekitError):
    """The model does not run on the example inputs (wrong shape or dtype)."""
