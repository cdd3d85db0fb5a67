"""The channel graph of a pruned model, derived from the graph it was cut with.

Cutting units changes no op and no coupling: the pruned model's graph is the
old one without the removed units (same nodes, unions and pins, shorter
channel vectors, smaller widths). Units are numbered by their first atom, so
dropping the removed atoms and counting the rest again gives exactly the
numbering a fresh trace would give, and :func:`derive` needs no trace.

>>> import torch, torchvision
>>> from prunekit.surgery import apply_removal
>>> model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
>>> graph = build_graph(model, x)
>>> removed = graph.removal_mask(graph.units_for({"layer1.0.conv1": [0, 1]}))
>>> smaller = apply_removal(model, graph, removed)
>>> updated_graph(graph, removed, smaller, x).producers["layer1.0.conv1"].size
62

The channel rules read values as well as structure, so a few cuts could
make a fresh trace decide differently. Then the graph is traced again and
``graph.retraced`` says why (see :func:`obstacle`):

- a width reaches one (a layer's channels, a GroupNorm's groups, a PReLU's
  parameters, a grouped convolution's groups, any tensor's channels): a
  one-channel tensor broadcasts, a one-group convolution is a plain one;
- a grouped convolution reaches one channel per group on a side: channel j
  of every group leaving together becomes whole groups leaving;
- an opaque op whose input shrank (its FLOPs were counted by fvcore on the
  old shapes), or code that reads a cut weight other than as a layer's
  weight or for a size the cut kept (``if self.conv.weight.shape[0] > 4``);
- the trace depended on more than shapes: opaque fallback leaves, real data
  (an op without a meta kernel, a read of tensor data), or notes (a branch on
  data, a train mode that did not run): the weights the cut changed could
  change the trace.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Iterable

import numpy as np
from torch import fx, nn

from ..ops import layer_spec, spec_for
from ..ops.op import _shape_dims as shape_dims
from ..ops.layers import conv_grouping
from .graph import ChannelGraph, build_graph, tensor_shapes, width_attributes
from .state import Chan

DERIVE = True  # False: every graph is traced again (tests compare the two)


class _Retrace(Exception):
    """A cut the derivation cannot follow; the message says why."""


def updated_graph(graph: ChannelGraph, removed: np.ndarray, pruned: nn.Module, example_inputs,
                  leaf_modules: Iterable[str] = ()) -> ChannelGraph:
    """The channel graph of ``pruned`` = ``apply_removal(model, graph, removed)``.

    Derived from ``graph`` when that gives what a fresh trace gives, else
    ``build_graph(pruned, ...)`` with the reason in ``.retraced``.
    """
    why = obstacle(graph, removed, pruned) if DERIVE else "derivation switched off"
    if why is None:
        try:
            return derive(graph, removed, pruned)
        except _Retrace as exc:
            why = str(exc)
    fresh = build_graph(pruned, example_inputs, leaf_modules)
    fresh.retraced = why
    return fresh


def obstacle(graph: ChannelGraph, removed: np.ndarray, pruned: nn.Module) -> str | None:
    """Why a fresh trace of ``pruned`` could differ from the derived graph; None when it cannot."""
    if graph.fallbacks:
        return f"opaque leaves are traced again every step ({graph.fallbacks[0].module or 'the whole model'})"
    if graph.real_data:
        return "the trace needed real data, which the cut changed"
    if graph.notes:
        return f"the trace was specialised: {graph.notes[0]}"
    if (removed & graph.pinned).any():
        return "pinned channels were removed"
    modules = dict(pruned.named_modules(remove_duplicate=False))
    for name, before in graph.original_attrs.items():
        module = modules[name]
        spec = layer_spec(module)
        after = {a: getattr(module, a) for a in spec.widths}
        for attr, old in before.items():
            if isinstance(old, int) and old > 1 and after[attr] <= 1:
                return f"{type(module).__name__} '{name}' reached {after[attr]} {attr}"
        if name in graph.grouping:
            kind = conv_grouping(after["groups"], after["in_channels"], after["out_channels"])
            if kind != graph.grouping[name][0]:
                return f"grouped convolution '{name}' reached one channel per group"
    return None


def derive(graph: ChannelGraph, removed: np.ndarray, pruned: nn.Module) -> ChannelGraph:
    """``graph`` without the ``removed`` units, renumbered as a fresh trace of ``pruned`` numbers them.

    Raises _Retrace when a value does not follow the cut (see :func:`obstacle`).
    """
    shapes = tensor_shapes(pruned)
    # a weight read by a functional op (F.conv2d(x, self.weight)) is a constant of the trace whose own
    # pinned channels follow its new shape: those past it go (they are units of their own)
    kept_atom = np.ones(len(graph.unit_of_atom), dtype=bool)
    for fx_graph in graph.fx_graphs:
        for node in fx_graph.nodes:  # (a per-channel tensor is cut with the channels it meets: nothing to do)
            if node.op == "get_attr" and not node.meta.get("prunekit_per_channel") and shapes.get(
                    node.target, node.meta.get("prunekit_shape")) != node.meta.get("prunekit_shape"):
                kept_atom[_cut_constant(node, node.meta["prunekit_shape"], shapes[node.target])] = False
    gone = graph.unit_of_atom[~kept_atom]
    if (np.bincount(graph.unit_of_atom, minlength=graph.num_units)[gone] != 1).any():
        raise _Retrace("a cut weight's channels are coupled to others")
    kept_unit = ~np.asarray(removed, dtype=bool)
    kept_unit[gone] = False
    new_unit = np.cumsum(kept_unit) - 1
    kept_atom &= kept_unit[graph.unit_of_atom]
    new_atom = np.cumsum(kept_atom) - 1

    def units(table: dict) -> dict:
        return {key: new_unit[u[kept_unit[u]]] for key, u in table.items()}

    derived = copy.copy(graph)  # what a cut does not change is shared: kinds, weights, notes
    derived.retraced = None
    derived.parent_units = np.flatnonzero(kept_unit)
    derived.unit_of_atom = new_unit[graph.unit_of_atom[kept_atom]]
    derived.num_units = int(kept_unit.sum())
    derived.unit_pin = {int(new_unit[u]): reason for u, reason in graph.unit_pin.items() if kept_unit[u]}
    derived.pinned = graph.pinned[kept_unit]
    derived.pinned_atoms = {int(new_atom[a]): pin for a, pin in graph.pinned_atoms.items() if kept_atom[a]}
    derived.producers = units(graph.producers)
    derived.slices = units(graph.slices)
    derived.widths = units(graph.widths)
    derived.grouping = {name: (kind, _groups_after(kind, groups, graph.widths[(name, "in")], kept_unit))
                        for name, (kind, groups) in graph.grouping.items()}
    derived.original_attrs = width_attributes(pruned, graph.widths)
    derived.tensor_shapes = shapes
    shrink = _Shrink(kept_atom, new_atom, shapes)
    derived.fx_graphs = [shrink.graph(g) for g in graph.fx_graphs]
    derived.fx_graph = derived.fx_graphs[0]
    return derived


def _cut_constant(node: fx.Node, before: tuple, after: tuple) -> list[int]:
    """The atoms of a get_attr node that a fresh trace of the smaller tensor would not create.

    Its users must read it as a weight (a functional op's tensor argument) or read only sizes the
    cut left alone (``self.weight.shape[-1]``); anything else computes with the cut tensor.
    """
    changed = {d for d, (b, a) in enumerate(zip(before, after)) if b != a}
    for user in node.users:
        if not (_as_weight(user, node) or changed.isdisjoint(_dims_read(user, len(before)))):
            raise _Retrace(f"'{user.name}' computes with the cut tensor '{node.target}'")
    chan = node.meta.get("prunekit_chan")
    return list(chan.atoms[after[chan.dim]:]) if isinstance(chan, Chan) and chan.dim < len(after) else []


def _as_weight(user: fx.Node, node: fx.Node) -> bool:
    spec = spec_for(user, None) if user.op == "call_function" else None
    params = (spec.params or {}) if spec is not None else {}
    return any(a is node for i, a in enumerate(user.args) if i in params.values()) or \
        any(v is node for k, v in user.kwargs.items() if k in params)


def _dims_read(user: fx.Node, ndim: int) -> set[int]:
    """The dims of its input whose sizes ``user`` reads: all of them unless it is a size query whose
    result is only indexed (``w.shape[-1]``, ``w.size(2)``)."""
    read = shape_dims(user)
    if read is None:
        return set(range(ndim))
    if user.users and all(u.op == "call_function" and u.target is operator.getitem and shape_dims(u)
                          for u in user.users):
        return set().union(*(shape_dims(u)[1] for u in user.users))
    return read[1]


def _groups_after(kind: str, groups: int, in_units: np.ndarray, kept_unit: np.ndarray) -> int:
    if kind == "positions":  # every group loses the same positions
        return groups
    # depthwise or whole groups: one group per kept slice of the input
    return groups * int(kept_unit[in_units].sum()) // len(in_units)


class _Shrink:
    """Copies of the fx graphs whose recorded shapes and channel vectors lose the removed atoms."""

    def __init__(self, kept_atom: np.ndarray, new_atom: np.ndarray, tensor_shapes: dict):
        self.kept_atom, self.new_atom, self.tensor_shapes = kept_atom, new_atom, tensor_shapes
        # one Python int per atom, shared by every channel vector that holds it (as a trace shares them)
        self.atom_ints = np.array(list(range(int(kept_atom.sum()))), dtype=object)
        self.chans: dict[int, tuple[Chan, Chan]] = {}  # id(old) -> (old, new): one new vector per old one

    def graph(self, old: fx.Graph) -> fx.Graph:
        new = fx.Graph()
        copies: dict[fx.Node, fx.Node] = {}
        for node in old.nodes:
            copied = copies[node] = new.node_copy(node, copies.__getitem__)
            if "prunekit_chan" in node.meta:
                shape, chan = self.value(node.meta.get("prunekit_shape"), node.meta["prunekit_chan"], node)
                if node.op == "get_attr" and node.target in self.tensor_shapes:  # a model tensor: its new shape
                    shape = self.tensor_shapes[node.target]
                copied.meta["prunekit_shape"], copied.meta["prunekit_chan"] = shape, chan
                if "prunekit_call" in node.meta and any(
                        copies[n].meta.get("prunekit_shape") != n.meta.get("prunekit_shape")
                        for n in node.all_input_nodes):
                    raise _Retrace(f"the inputs of opaque op '{node.name}' shrank")
        new.prunekit_constants = getattr(old, "prunekit_constants", {})
        return new

    def value(self, shape, chan, node: fx.Node) -> tuple[Any, Any]:
        """The shape and channel structure of one value (a tensor, or a tuple or dict of them)."""
        if isinstance(chan, Chan):
            new = self.chan(chan, node)
            if not (isinstance(shape, tuple) and len(shape) > chan.dim and shape[chan.dim] == len(chan.atoms)):
                raise _Retrace(f"the channels of '{node.name}' do not match its shape")
            return shape[:chan.dim] + (len(new.atoms),) + shape[chan.dim + 1:], new
        if isinstance(chan, (tuple, list)):
            if not (isinstance(shape, tuple) and len(shape) == len(chan)):
                raise _Retrace(f"the channels of '{node.name}' do not match its shape")
            pairs = [self.value(s, c, node) for s, c in zip(shape, chan)]
            return tuple(s for s, _ in pairs), type(chan)(c for _, c in pairs)
        if isinstance(chan, dict):  # no shape is recorded for a dict
            if any(not isinstance(c, (Chan, type(None))) for c in chan.values()):
                raise _Retrace(f"'{node.name}' holds nested channel structures")
            return shape, {k: c if c is None else self.chan(c, node) for k, c in chan.items()}
        return shape, chan

    def chan(self, chan: Chan, node: fx.Node) -> Chan:
        seen = self.chans.get(id(chan))
        if seen is None or seen[0] is not chan:
            atoms = np.fromiter(chan.atoms, dtype=np.int64, count=len(chan.atoms))
            kept = self.new_atom[atoms[self.kept_atom[atoms]]]
            if 1 >= kept.size != atoms.size:  # a single channel broadcasts: the rules read it differently
                raise _Retrace(f"'{node.name}' reached {kept.size} channel")
            seen = self.chans[id(chan)] = (chan, Chan(chan.dim, tuple(self.atom_ints[kept])))
        return seen[1]
