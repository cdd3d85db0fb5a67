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
import traceback
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from ..errors import PrunekitError
from .proxy import _model_code_sees_values
from .tracer import ConcreteTracer, _factories_take_values, _LeafNeeded, _watch_training_reads, user_location


class UntraceableModelError(PrunekitError):
    """Kept for compatibility: tracing now falls back to opaque leaves instead of failing."""


class ExampleInputError(PrunekitError):
    """The model does not run on the example inputs (wrong shape or dtype)."""

    @classmethod
    def raised(cls, exc: BaseException) -> ExampleInputError:
        """The model's own exception on the example input, as one sentence."""
        from ..safety import first_line

        return cls(f"the model fails on the example input: {first_line(exc) or type(exc).__name__}.")


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

    def signature(self) -> list[tuple[str, Any, tuple[str, ...]]]:
        """Each node's op, target and the nodes it reads: two traces with the same signature carry
        channels alike (an output returned only in training differs in what the output node reads)."""
        return [(n.op, n.target, tuple(a.name for a in n.all_input_nodes)) for n in self.graph.nodes]


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
        # a GraphModule's __new__ makes a class without the instance's generated forward: skip it
        copied = object.__new__(m.__class__) if isinstance(m, fx.GraphModule) else m.__class__.__new__(m.__class__)
        memo[id(m)] = copied
        state = {k: tensor(v) if isinstance(v, torch.Tensor) else v for k, v in m.__dict__.items()}
        for k, v in state.items():  # self.forward = self.forward_fast: the copy's own method
            if isinstance(v, types.MethodType) and v.__self__ is m:
                state[k] = types.MethodType(v.__func__, copied)
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
            raise ExampleInputError.raised(exc) from None


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
    # a batch of one cannot take batch statistics (BatchNorm after global pooling): train on two
    batch = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[0] == 1 else x
                  for x in inputs)
    try:
        train = trace(model, batch, traces[0].leaves, training=True)
    except ExampleInputError as exc:
        traces[0].notes.append(f"the model does not run in train mode on the example input ({exc}); "
                               "branches taken only in training were not traced")
        return traces
    if train.signature() != traces[0].signature() or train.leaves != traces[0].leaves:
        traces.append(train)
    return traces
