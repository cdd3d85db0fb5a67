"""Channel vectors, atoms and the union-find that couples them.

An *atom* is one output channel of one producer (a conv, transposed conv or
linear layer), or one channel of something we may not change (a model input,
a constant, the output of an op we do not understand). Every tensor in the
traced model carries a :class:`Chan`: the dimension that holds its channels
and, slot by slot, the atom each channel comes from. Ops that must remove a
channel together *unite* atoms; ops that would break if a channel went away
*pin* them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Chan(NamedTuple):
    """The channel vector of one tensor: ``atoms[i]`` feeds slot ``i`` of ``dim``."""

    dim: int
    atoms: tuple[int, ...]


@dataclass
class ChannelState:
    """Everything the channel rules learn while they walk the traced graph."""

    parent: list[int] = field(default_factory=list)
    # (producer or source label, output index) for every atom
    source: list[tuple[str, int]] = field(default_factory=list)
    pin_reason: dict[int, str] = field(default_factory=dict)
    producers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    producer_kind: dict[str, str] = field(default_factory=dict)
    # producer -> (its weight's qualified name, the weight dim of its outputs)
    producer_weight: dict[str, tuple[str, int]] = field(default_factory=dict)
    # (tensor qualified name, dim) -> atoms of that dim, slot by slot
    slices: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    # (module name, "in" | "out") -> atoms; drives attribute updates and widths
    widths: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    # grouped convolution -> (how it is cut: "depthwise", "positions" (channel j of every
    # group: the groups stay) or "whole" (whole groups leave), its number of groups)
    grouping: dict[str, tuple[str, int]] = field(default_factory=dict)

    def new_atoms(self, label: str, count: int, pin: str | None = None) -> tuple[int, ...]:
        start = len(self.parent)
        atoms = tuple(range(start, start + count))
        self.parent.extend(atoms)
        self.source.extend((label, i) for i in range(count))
        if pin is not None:
            for a in atoms:
                self.pin_reason[a] = pin
        return atoms

    def producer_atoms(self, name: str, count: int, kind: str, weight: tuple[str, int]) -> tuple[int, ...]:
        """Output atoms of a producer; a producer called twice keeps its atoms."""
        atoms = self.producers.get(name)
        if atoms is None:
            atoms = self.producers[name] = self.new_atoms(name, count)
            self.producer_kind[name] = kind
            self.producer_weight[name] = weight
        return atoms

    def shared_producer(self, name: str, atoms: tuple[int, ...], kind: str, weight: tuple[str, int]) -> None:
        """A layer that owns per-channel weights of channels another layer made (a depthwise conv):
        listed as a producer of those same atoms."""
        if name not in self.producers:
            self.producers[name] = atoms
            self.producer_kind[name] = kind
            self.producer_weight[name] = weight
        else:
            self.unite_vectors(self.producers[name], atoms)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def unite(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb

    def unite_vectors(self, xs: tuple[int, ...], ys: tuple[int, ...]) -> None:
        if xs is ys:
            return
        for a, b in zip(xs, ys, strict=True):
            if a != b:
                self.unite(a, b)

    def pin(self, atoms, reason: str) -> None:
        for a in atoms:
            self.pin_reason.setdefault(a, reason)

    def add_slice(self, tensor: str, dim: int, atoms: tuple[int, ...]) -> None:
        """``tensor`` keeps, along ``dim``, the positions whose atom survives."""
        self._record(self.slices, (tensor, dim), atoms)

    def add_width(self, module: str, role: str, atoms: tuple[int, ...]) -> None:
        """``module``'s input or output width is the count of these atoms that survive."""
        self._record(self.widths, (module, role), atoms)

    def _record(self, table: dict, key: tuple, atoms: tuple[int, ...]) -> None:
        # reached twice (a module called on two inputs, tied weights): both
        # vectors must lose the same positions, so they are united
        seen = table.get(key)
        if seen is None:
            table[key] = atoms
        else:
            self.unite_vectors(seen, atoms)
