"""Tracing with torch.fx, and the pass that walks the trace once with real values.

:class:`ChannelProp` is an :class:`torch.fx.Interpreter` that runs every node
on the example inputs, records the output shape on ``node.meta`` and applies
that op's channel rule. It is the only pass that executes the model; the
costs, the surgery and the scorers read what it records.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable

import torch
from torch import fx, nn

from ..errors import PrunekitError
from .rules import Op, is_leaf_type, rule_for
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
    with training_mode(model, training):
        try:
            return tracer.trace(model)
        except Exception as exc:
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
    try:
        train_graph = trace(model, leaf_modules, training=True)
    except UntraceableModelError:
        return graphs
    if _signature(train_graph) != _signature(graphs[0]):
        graphs.append(train_graph)
    return graphs


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


class ChannelProp(fx.Interpreter):
    """Runs a traced graph once, recording shapes and channel vectors on each node."""

    def __init__(self, model: nn.Module, graph: fx.Graph, state: ChannelState):
        super().__init__(model, graph=graph)
        self.state = state
        self.chans: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = getattr(self, n.op)(n.target, args, kwargs)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        op = Op(n, args, kwargs, out, module, self.state, self.chans)
        chan = rule_for(n, module)(op)
        self.chans[n] = chan
        n.meta["prunekit_shape"] = _shape_of(out)
        n.meta["prunekit_chan"] = chan
        if module is not None and n.op == "call_module" and not is_leaf_type(module):
            n.meta["prunekit_leaf_inputs"] = (args, kwargs)
        return out


def propagate(model: nn.Module, graphs: list[fx.Graph], inputs: tuple) -> ChannelState:
    state = ChannelState()
    with torch.no_grad(), training_mode(model, False):
        for graph in graphs:
            ChannelProp(model, graph, state).run(*inputs)
    return state
