"""The channel walk: apply each node's channel rule to the values the tracer recorded.

Nothing is executed here: the concrete tracer already computed every node's
value, so the walk reads them, applies the op's rule from the table in
:mod:`prunekit.ops` and records the shape and channel vector on ``node.meta``
(``prunekit_shape``, ``prunekit_chan``) for the costs and reports.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from ..ops import is_leaf_type, spec_for
from ..ops.op import Op, size_reads
from .state import Chan, ChannelState
from .trace import Traced


def walk(traced: Traced, state: ChannelState) -> None:
    """Run every node's rule once, in graph order, adding what it learns to ``state``."""
    chans: dict[fx.Node, Any] = {}
    values = traced.values
    fetch = values.get
    live = reaching_output(traced.graph)
    for n in traced.graph.nodes:
        module = traced.modules[n.target] if n.op == "call_module" else None
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), fetch)
        out = values.get(n)
        chan = spec_for(n, module).rule(Op(n, args, kwargs, out, module, state, chans, n in live, traced.modules))
        chans[n] = chan
        n.meta["prunekit_shape"] = _shape_of(out)
        n.meta["prunekit_chan"] = chan
        if _opaque_compute(n, module):
            # what fvcore would count inside an op we do not model: priced once, by shape
            n.meta["prunekit_call"] = _shapes_only((args, kwargs))
    _pin_control_sizes(traced, chans, state)


def reaching_output(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value reaches the model's output."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def _pin_control_sizes(traced: Traced, chans: dict, state: ChannelState) -> None:
    """A channel count that steered Python (``if x.size(1) == 64``, ``range(c)``) would steer it
    differently once channels go: those channels are pinned. Spatial and batch sizes are free."""
    for node in traced.control:
        for source, dims in size_reads([node]):
            chan = chans.get(source)
            if isinstance(chan, Chan) and chan.dim in dims:
                state.pin(chan.atoms, f"its channel count decides a branch ({node.name})")


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


def _opaque_compute(n: fx.Node, module: nn.Module | None) -> bool:
    if n.op == "call_module":
        return not is_leaf_type(module) and any(True for _ in module.parameters())
    if n.op == "call_function" and "prunekit_leaf" in n.meta:  # the whole model, opaque
        return True
    if n.op == "call_function":
        home = (getattr(n.target, "__module__", None) or "").split(".")[0]
        return inspect.isfunction(n.target) and home not in ("torch", "_operator", "operator", "math", "builtins")
    return False


class TensorSpec(NamedTuple):
    shape: tuple
    dtype: torch.dtype
    ident: int


def _shapes_only(value):
    """Replace tensors by their specs, so a recorded call keeps no data alive."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype, id(value))
    if isinstance(value, (tuple, list)):
        return type(value)(_shapes_only(v) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        return {k: _shapes_only(v) for k, v in value.items()}
    return value


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
