"""What a channel rule sees (:class:`Op`), and the rules every part of the table shares.

A rule receives an :class:`Op` (the node, its argument values and output, and
the channel vectors of its inputs) and returns the channel vector(s) of its
output. It may unite atoms (residual adds, concatenated skips that meet
again), pin them (anything that mixes channels), or record that a parameter
must be sliced. Anything prunekit does not know is pinned: it never guesses.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn

from ..graphs.state import Chan, ChannelState


@dataclass
class Op:
    node: fx.Node
    args: tuple
    kwargs: dict
    out: Any
    module: nn.Module | None
    state: ChannelState
    chans: dict  # fx.Node -> channel structure of its value
    live: bool = True  # False when the value never reaches the output (it only steers Python)
    modules: dict | None = None  # the traced model's layers by name, to find a functional op's weight's layer

    @property
    def name(self) -> str:
        return str(self.node.target) if self.node.op == "call_module" else self.node.name

    def label(self) -> str:
        target = self.node.target
        if self.node.op == "call_module":
            return f"{type(self.module).__name__} '{target}'"
        if self.node.op == "call_method":
            return f"method .{target}() at '{self.node.name}'"
        if isinstance(target, nn.Module):  # the whole model, as one opaque op
            return f"{type(target).__name__} (the whole model)"
        return f"{getattr(target, '__name__', str(target))}() at '{self.node.name}'"

    def raw(self, index: int, keyword: str | None = None, default=None):
        """The unevaluated argument (an fx.Node or a constant)."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(keyword, default) if keyword else default

    def value(self, index: int, keyword: str | None = None, default=None):
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(keyword, default) if keyword else default

    def chan(self, index: int = 0, keyword: str | None = None):
        arg = self.raw(index, keyword)
        return self.chans.get(arg) if isinstance(arg, fx.Node) else None

    def all_chans(self) -> list[Chan]:
        found: list[Chan] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: _collect(self.chans.get(n), found))
        return found

    def pin_inputs(self, why: str) -> None:
        for c in self.all_chans():
            self.state.pin(c.atoms, f"{why} ({self.label()})")
        # a channel count read in code (n, c, h, w = t.size()) and handed to this op stays fixed too
        for source, dims in size_reads(n for n in self.node.all_input_nodes if not _is_tensor_node(n)):
            chan = self.chans.get(source)
            if isinstance(chan, Chan) and chan.dim in dims:
                self.state.pin(chan.atoms, f"its channel count is read by {self.label()}")

    def opaque(self, why: str):
        """Fresh pinned channels for every tensor in the output.

        A same-rank output keeps the input's channel dim, so a Linear after a
        LayerNorm over channels still finds its features on the last dim.
        """
        reason = f"{why} ({self.label()})"
        first, x = self.chan(0, "input"), self.value(0, "input")
        if (isinstance(first, Chan) and isinstance(self.out, torch.Tensor) and isinstance(x, torch.Tensor)
                and self.out.dim() == x.dim()):
            return Chan(first.dim, self.state.new_atoms(self.name, self.out.shape[first.dim], pin=reason))
        return opaque(self.state, self.out, reason, self.name)


def _is_tensor_node(node: fx.Node) -> bool:
    shape = node.meta.get("prunekit_shape")
    return isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)


def _shape_dims(node: fx.Node) -> tuple[fx.Node, set[int]] | None:
    """(tensor, dims) when ``node`` reads sizes of a tensor: x.size(), x.size(1), x.shape[2:], x.numel()."""
    if node.op == "call_method" and node.target in ("size", "numel", "nelement") \
            and isinstance(node.args[0], fx.Node):
        ndim = _node_ndim(node.args[0])
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dim, int):
            return node.args[0], {dim % ndim if ndim else dim}
        return node.args[0], set(range(ndim))
    if node.op == "call_function" and node.target is torch.numel and isinstance(node.args[0], fx.Node):
        return node.args[0], set(range(_node_ndim(node.args[0])))
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape" \
            and isinstance(node.args[0], fx.Node):
        return node.args[0], set(range(_node_ndim(node.args[0])))
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        whole = _shape_dims(node.args[0])
        index = node.args[1]
        if whole is not None and isinstance(index, (int, slice)):
            dims = sorted(whole[1])
            return whole[0], set(dims[index] if isinstance(index, slice) else [dims[index]])
    return None


def size_reads(starts) -> list[tuple[fx.Node, set[int]]]:
    """Every (tensor, dims) whose sizes the values of ``starts`` are computed from, through arithmetic."""
    found, seen, stack = [], set(), list(starts)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        read = _shape_dims(n)
        if read is not None:
            found.append(read)
        elif n.op in ("call_function", "call_method") and not _is_tensor_node(n):
            stack.extend(n.all_input_nodes)
    return found


def _node_ndim(node: fx.Node) -> int:
    shape = node.meta.get("prunekit_shape")
    return len(shape) if isinstance(shape, tuple) else 0


def _collect(chan, found: list) -> None:
    if isinstance(chan, Chan):
        found.append(chan)
    elif isinstance(chan, (tuple, list)):
        for c in chan:
            _collect(c, found)
    elif isinstance(chan, dict):
        for c in chan.values():
            _collect(c, found)


def opaque(state: ChannelState, value, reason: str, label: str):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None
        dim = 1 if value.dim() >= 2 else 0
        return Chan(dim, state.new_atoms(label, value.shape[dim], pin=reason))
    if isinstance(value, (tuple, list)):
        return type(value)(opaque(state, v, reason, label) for v in value) if not _is_namedtuple(value) else tuple(
            opaque(state, v, reason, label) for v in value
        )
    if isinstance(value, dict):
        return {k: opaque(state, v, reason, label) for k, v in value.items()}
    return None


def _is_namedtuple(value) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _ndim(value) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _shape_source(node) -> tuple[fx.Node, int | None] | None:
    """(tensor, dim) when ``node`` reads a tensor's size: t.size(i), t.shape[i]; dim None for the whole shape."""
    if not isinstance(node, fx.Node):
        return None
    if (node.op == "call_method" and node.target in ("numel", "nelement")) or \
            (node.op == "call_function" and node.target is torch.numel):  # every dim, channels included
        return (node.args[0], None) if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (node.args[0], dim) if isinstance(node.args[0], fx.Node) and isinstance(dim, (int, type(None))) else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return (node.args[0], None) if isinstance(node.args[0], fx.Node) else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        whole = _shape_source(node.args[0])
        return (whole[0], node.args[1]) if whole and whole[1] is None else None
    return None


# ---------------------------------------------------------------------------
# Rules every table part uses


def unknown(op: Op):
    op.pin_inputs("op not understood")
    return op.opaque("output of an op not understood")


def pin_all(why: str) -> Callable[[Op], Any]:
    def rule(op: Op):
        op.pin_inputs(why)
        return op.opaque(why)

    return rule


def model_output(op: Op):
    op.pin_inputs("model output")
    return None


def model_input(op: Op):
    return opaque(op.state, op.out, "model input", f"input '{op.node.name}'")


CONSTANT_PIN = "constant tensor"  # the reason a get_attr's own channels are pinned with


def constant(op: Op):
    return opaque(op.state, op.out, f"{CONSTANT_PIN} '{op.node.target}'", str(op.node.target))


def no_channels(op: Op):
    """Shape queries (x.size(), x.dim()...) read no channel values."""
    return None
