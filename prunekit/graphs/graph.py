"""The channel graph: units, groups and pins of a traced model.

>>> import torch, torchvision
>>> g = build_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
>>> g.coupled_channels("layer1.0.conv2", 5)      # the residual couples the stage
{'conv1': [5], 'layer1.0.conv2': [5], 'layer1.1.conv2': [5]}
"""

from __future__ import annotations

import difflib
import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..arguments import check_leaf_modules, check_model
from ..errors import ArgumentError, PrunekitError, UsageError
from ..ops import layer_spec
from ..ops.op import CONSTANT_PIN
from .state import ChannelState
from .trace import UNTRACEABLE, Fallback, Traced, trace_both_modes
from .walk import walk


class PinnedChannelError(PrunekitError):
    """A channel that prunekit must not remove was asked for."""


@dataclass(frozen=True)
class Pin:
    """Channels left alone: where they come from, how many, and why."""

    source: str
    channels: int
    reason: str


@dataclass(frozen=True)
class Group:
    """Units that share the same producers: one row of `prunekit graph`."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    units: tuple[int, ...]
    prunable_units: tuple[int, ...]
    reasons: tuple[str, ...]
    granularity: tuple[str, ...] = ()  # how grouped convolutions among its layers are cut

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable(self) -> bool:
        return bool(self.prunable_units)


def as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ArgumentError(f"example_inputs must be a tensor or a tuple of the forward's positional inputs, got "
                        f"{type(example_inputs).__name__}" + ("; pass a dict input as (inputs,)."
                                                              if isinstance(example_inputs, dict) else "."))


def check_graph_matches(graph, model: nn.Module, inputs: tuple) -> None:
    """``model`` must be one prunekit can read, and ``graph`` a ChannelGraph built from it as it is now (same
    tensors, same shapes) and for inputs of these shapes (the FLOPs depend on them)."""
    check_model(model)
    if not isinstance(graph, ChannelGraph):
        raise ArgumentError(f"graph must be a ChannelGraph (from prunekit.build_graph), got {type(graph).__name__}.")
    shapes = tensor_shapes(model)
    differing = next((n for n in sorted(graph.tensor_shapes.keys() | shapes.keys())
                      if graph.tensor_shapes.get(n) != shapes.get(n)), None)
    if differing is not None:
        raise UsageError(f"graph was built from another model: its '{differing}' has shape "
                         f"{graph.tensor_shapes.get(differing)}, the model's {shapes.get(differing)}; build it from "
                         "this model.")
    traced = [n.meta.get("prunekit_shape") for n in graph.fx_graph.nodes if n.op == "placeholder"]
    given = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]
    for was, now in zip(traced, given):
        if isinstance(was, tuple) and now is not None and was != now:
            raise UsageError(f"graph was built for an input of shape {list(was)}, not {list(now)}; build it from "
                             "this input.")


def _produced(num_units: int, producers: Mapping[str, np.ndarray]) -> np.ndarray:
    """Which units hold some layer's output channels."""
    produced = np.zeros(num_units, dtype=bool)
    for units in producers.values():
        produced[units] = True
    return produced


class ChannelGraph:
    """Which channels must leave together, and which must stay.

    Every atom (one output channel of one producer) belongs to exactly one
    *unit*; removing a unit removes every atom in it from every layer that
    produces or reads it. Units are numbered ``0..num_units-1``.
    """

    def __init__(self, model: nn.Module, traces: list[Traced], state: ChannelState):
        self.fx_graph = traces[0].graph  # eval mode: the one costs are counted on
        self.fx_graphs = [t.graph for t in traces]
        # modules traced as opaque leaves because their code could not be traced, and
        # what was specialised to the example input (branches on data at the top level)
        self.fallbacks: list[Fallback] = list(dict.fromkeys(f for t in traces for f in t.fallbacks))
        self.notes: list[str] = list(dict.fromkeys(n for t in traces for n in t.notes))
        self.real_data = any(not t.meta for t in traces)  # some values were computed from the weights
        self.retraced: str | None = None  # why this graph was traced again instead of derived (see update.py)
        self.parent_units: np.ndarray | None = None  # a derived graph's units, as units of the graph it came from
        self.grouping = dict(state.grouping)
        roots = np.asarray(state.parent, dtype=np.int64)
        while True:  # pointer jumping: every atom ends at its class's root
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                break
            roots = jumped
        _, self.unit_of_atom = np.unique(roots, return_inverse=True)
        self.num_units = int(self.unit_of_atom.max()) + 1 if len(roots) else 0
        self.producers: dict[str, np.ndarray] = self._units(state.producers)
        # channels no layer produces (a per-channel tensor's that met none) cannot be removed
        for atom in np.flatnonzero(~_produced(self.num_units, self.producers)[self.unit_of_atom]).tolist():
            state.pin_reason.setdefault(atom, f"{CONSTANT_PIN} '{state.source[atom][0]}' meets no layer's channels")
        self.unit_pin: dict[int, str] = {}
        for atom, reason in state.pin_reason.items():
            self.unit_pin.setdefault(int(self.unit_of_atom[atom]), reason)
        self.pinned = np.zeros(self.num_units, dtype=bool)
        self.pinned[list(self.unit_pin)] = True
        # pinned atom -> (where it comes from, why): what `pins` reports
        self.pinned_atoms = {atom: (state.source[atom][0], reason) for atom, reason in state.pin_reason.items()}

        self.producer_kind = dict(state.producer_kind)
        self.producer_weight = dict(state.producer_weight)
        self.slices: dict[tuple[str, int], np.ndarray] = self._units(state.slices)
        self.widths: dict[tuple[str, str], np.ndarray] = self._units(state.widths)
        # the traced copy's layers: same names, same attributes
        self.original_attrs = width_attributes(model, self.widths, traces[0].modules)
        self.tensor_shapes = tensor_shapes(model)

    def _units(self, table: dict) -> dict:
        """Each atom vector of ``table`` as unit ids, converted in one pass (many small arrays are slow)."""
        lengths = [len(atoms) for atoms in table.values()]
        flat = np.fromiter(itertools.chain.from_iterable(table.values()), dtype=np.int64, count=sum(lengths))
        pieces = np.split(self.unit_of_atom[flat], np.cumsum(lengths)[:-1]) if lengths else []
        return dict(zip(table, pieces))

    # -- queries ---------------------------------------------------------

    def prunable_channels(self) -> dict[str, list[int]]:
        """Producer name -> output indices that may be removed."""
        return {name: np.flatnonzero(~self.pinned[u]).tolist() for name, u in self.producers.items()
                if (~self.pinned[u]).any()}

    def unit_of(self, name: str, index: int) -> int:
        if not isinstance(name, str):
            raise ArgumentError(f"a producer is named by a string (a module name), got {name!r}.")
        _check_index(name, index)
        if name not in self.producers:
            close = sorted(self.producers, key=lambda p: _distance(p, name))[:1]
            hint = f"; did you mean '{close[0]}'" if close else ""
            raise PrunekitError(f"'{name}' is not a producer (conv, transposed conv or linear) in this model{hint}.")
        units = self.producers[name]
        if not 0 <= index < len(units):
            raise PrunekitError(f"'{name}' has {len(units)} output channels; index {index} is out of range.")
        return int(units[index])

    def coupled_channels(self, name: str, index: int) -> dict[str, list[int]]:
        """Every producer channel that must go with ``name[index]`` (itself included)."""
        unit = self.unit_of(name, index)
        if self.pinned[unit]:
            raise PinnedChannelError(f"channel {index} of '{name}' cannot be removed: {self.unit_pin[unit]}.")
        return self.members(unit)

    def members(self, unit: int) -> dict[str, list[int]]:
        return {n: idx.tolist() for n, u in self.producers.items()
                if (idx := np.flatnonzero(u == unit)).size}

    def units_for(self, selection: Mapping[str, Iterable[int]]) -> np.ndarray:
        """The units holding the given producer channels; pinned ones raise."""
        if not isinstance(selection, Mapping):
            raise ArgumentError(f"channels must map producer names to lists of channel indices, like "
                                f"{{'conv1': [0, 3]}}, got {type(selection).__name__}.")
        chosen = []
        for name, indices in selection.items():
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
                raise ArgumentError(f"the channels of '{name}' must be a list of indices, got {indices!r}.")
            indices = list(indices)
            for index in indices:
                _check_index(name, index)
            indices = np.asarray(indices, dtype=np.int64)
            if name not in self.producers or indices.size == 0:
                self.unit_of(name, 0) if indices.size else None  # raises the helpful error
                continue
            units = self.producers[name]
            bad = indices[(indices < 0) | (indices >= len(units))]
            if bad.size:
                self.unit_of(name, int(bad[0]))
            picked = units[indices]
            pinned = np.flatnonzero(self.pinned[picked])
            if pinned.size:
                index, unit = int(indices[pinned[0]]), int(picked[pinned[0]])
                raise PinnedChannelError(f"channel {index} of '{name}' cannot be removed: {self.unit_pin[unit]}.")
            chosen.append(picked)
        return np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

    def removal_mask(self, units: Sequence[int] | np.ndarray) -> np.ndarray:
        mask = np.zeros(self.num_units, dtype=bool)
        mask[np.asarray(units, dtype=np.int64)] = True
        return mask

    def check_removal(self, mask: np.ndarray) -> None:
        """Refuse a removal that would empty a layer."""
        for (name, role), units in self.widths.items():
            if units.size and mask[units].all():
                raise PrunekitError(f"removing these channels would leave '{name}' with no {role}put channels.")
        for name, units in self.producers.items():
            if units.size and mask[units].all():
                raise PrunekitError(f"removing these channels would leave '{name}' with no output channels.")

    # -- display ---------------------------------------------------------

    def producer_set_keys(self) -> np.ndarray:
        """Per unit, a key equal for units made by the same set of producers (0: made by none).

        A random 64-bit tag per producer, summed with wrap-around over a unit's producers:
        collisions are negligible, and a model's units are keyed in milliseconds.
        """
        tags = np.random.default_rng(0).integers(1, 2**63, size=len(self.producers), dtype=np.uint64)
        key = np.zeros(self.num_units, dtype=np.uint64)
        for tag, units in zip(tags, self.producers.values()):
            key[np.unique(units)] += tag
        return key

    @property
    def groups(self) -> list[Group]:
        key = self.producer_set_keys()
        keys, inverse = np.unique(key, return_inverse=True)
        members = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[members], np.arange(len(keys) + 1))
        units_of = {int(k): members[bounds[i]:bounds[i + 1]] for i, k in enumerate(keys) if k}
        producers: dict[int, list[str]] = defaultdict(list)
        for name, units in self.producers.items():
            for k in np.unique(key[units]):
                producers[int(k)].append(name)
        consumers: dict[int, set[str]] = defaultdict(set)
        for (name, role), units in self.widths.items():
            if role == "in":
                for k in np.unique(key[units]):
                    consumers[int(k)].add(name)
        out = []
        for k, units in units_of.items():
            names = tuple(sorted(producers[k]))
            users = sorted(consumers[k] - set(names))
            reasons = tuple(sorted({self.unit_pin[u] for u in units if self.pinned[u]}))
            prunable = tuple(int(u) for u in units if not self.pinned[u])
            granularity = tuple(_granularity(m, *self.grouping[m]) for m in (*names, *users)
                                if m in self.grouping)
            out.append(Group(names, tuple(users), tuple(int(u) for u in units), prunable, reasons, granularity))
        out.sort(key=lambda g: (not g.prunable, g.producers))
        return out

    @property
    def pins(self) -> list[Pin]:
        """Channels left alone: per (source, reason), the pinned units. A unit the eval and train traces
        both pin counts once; a weight's own channels (a functional op's constant, cut with its layer's
        channels elsewhere, or never) are not listed unless they pin a layer's output."""
        produced = _produced(self.num_units, self.producers)
        pinned: dict[tuple[str, str], set[int]] = defaultdict(set)
        for atom, (source, reason) in self.pinned_atoms.items():
            unit = int(self.unit_of_atom[atom])
            if produced[unit] or not reason.startswith(CONSTANT_PIN):
                pinned[(source, reason)].add(unit)
        return [Pin(src, len(units), reason) for (src, reason), units in sorted(pinned.items())]

    def fallback_cost(self, fallback: Fallback) -> int:
        """How many channels a fallback leaf pinned (those not pinned for another reason first)."""
        where = f"'{fallback.module}'" if fallback.module else "(the whole model)"
        reason = f"{UNTRACEABLE} ({fallback.type} {where})"
        return sum(1 for _source, r in self.pinned_atoms.values() if r == reason)

    def __repr__(self) -> str:
        prunable = int((~self.pinned).sum())
        return (f"ChannelGraph({len(self.producers)} producers, {self.num_units} units, "
                f"{prunable} prunable, {len(self.groups)} groups)")


def width_attributes(model: nn.Module, widths: Mapping[tuple[str, str], object],
                     modules: Mapping[str, nn.Module] | None = None) -> dict[str, dict[str, int]]:
    """The size attributes (in_channels, groups, num_features...) of every layer a cut resizes."""
    modules = modules or {}
    return {
        name: {a: getattr(m, a) for a in spec.widths}
        for (name, _role) in widths for m in [modules.get(name) or model.get_submodule(name)]
        for spec in [layer_spec(m)] if spec is not None
    }


def tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def _granularity(name: str, kind: str, groups: int) -> str:
    if kind == "depthwise":
        return f"depthwise '{name}' goes with its channels"
    if kind == "positions":
        return f"channel j of each of the {groups} groups of '{name}'"
    return f"whole groups of '{name}' ({groups} groups)"


def _check_index(name: str, index) -> None:
    """A channel index is a whole number (Python's or numpy's), not a bool, a float or a string."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, (bool, np.bool_)):
        raise ArgumentError(f"channel indices are whole numbers, got {index!r} for '{name}'.")


def _distance(a: str, b: str) -> int:
    return -int(1000 * difflib.SequenceMatcher(None, a, b).ratio())


def build_graph(model: nn.Module, example_inputs, leaf_modules: Iterable[str] = ()) -> ChannelGraph:
    """Trace ``model`` and work out which channels are coupled and which are pinned.

    ``example_inputs``: one tensor, or a tuple of the forward's positional inputs.
    ``leaf_modules``: names of submodules to treat as opaque ops (their inputs
    and outputs are pinned); use it for modules torch.fx cannot trace.
    The model is not modified.
    """
    check_model(model)
    check_leaf_modules(model, leaf_modules)
    inputs = as_inputs(example_inputs)
    traces = trace_both_modes(model, inputs, leaf_modules)
    state = ChannelState()
    for traced in traces:
        walk(traced, state)
    _unite_shared_tensors(model, state)
    _pin_unregistered(model, state)
    return ChannelGraph(model, traces, state)


def _pin_unregistered(model: nn.Module, state: ChannelState) -> None:
    """A tensor a functional op reads that is no parameter or buffer (a constant torch.fx lifted
    from the forward, a plain tensor attribute) cannot be cut: its channels are pinned."""
    registered = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    registered.update(n for n, _ in model.named_buffers(remove_duplicate=False))
    for key in [k for k in state.slices if k[0] not in registered]:
        state.pin(state.slices.pop(key), f"'{key[0]}' is a constant of the forward, not a parameter or buffer")


def _unite_shared_tensors(model: nn.Module, state: ChannelState) -> None:
    """A tensor registered under several names (tied weights) is cut once, so its names must agree.

    The slices of every name are united position by position; a name in another
    module that never sliced that dim would break, so those channels are pinned.
    """
    names: dict[int, list[str]] = defaultdict(list)
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names[id(t)].append(name)
    for aliases in names.values():
        if len(aliases) < 2:
            continue
        owners = {a: model.get_submodule(a.rpartition(".")[0]) for a in aliases}
        for dim in sorted({d for (n, d) in state.slices if n in owners}):
            sliced = [a for a in aliases if (a, dim) in state.slices]
            first = state.slices[(sliced[0], dim)]
            for a in sliced[1:]:
                state.unite_vectors(first, state.slices[(a, dim)])
            cut_in = {id(owners[a]) for a in sliced}
            missing = [a for a in aliases if id(owners[a]) not in cut_in]
            if missing:
                state.pin(first, f"tensor shared with '{missing[0]}', which does not follow the channels")
