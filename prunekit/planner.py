"""Choose which units to remove in one step.

Units are taken in ascending score, skipping any that would break a
per-layer limit (at most a fraction of a layer's original filters removed,
at least one kept, 0 = never touched); the shortest prefix of that sequence
whose analytic cost meets the step's goal is the step. Costs are priced with
the :class:`~prunekit.costs.CostModel`, never by running the model.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Collection

import numpy as np

from .config import Limits
from .costs import CostModel
from .graphs import ChannelGraph

if TYPE_CHECKING:
    from .latency_model import LatencyModel


def layer_limit(name: str, limits: Limits) -> float:
    """The max fraction of ``name``'s filters that may go: exact name, then the first matching glob."""
    if name in limits.layers:
        return float(limits.layers[name])
    for pattern, value in limits.layers.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(value)
    return float(limits.default)


@dataclass(frozen=True)
class Targets:
    """The run's targets in absolute terms: what each step aims at, and when the run is done.

    Latency is a fraction of the original's (measured after a cut, predicted while planning);
    a check without a latency value counts a latency target as not yet met.
    """

    flops0: int  # the original model's
    params0: int
    flops: float  # fractions of the original to keep at most
    params: float
    stop_when: str = "both"  # both | any
    priority: str = "flops"  # the resource whose geometric schedule sizes the steps
    steps: int = 1
    latency: float | None = None

    def done(self, flops: int, params: int, latency: float | None = None) -> bool:
        ok = [flops <= self.flops * self.flops0 + 0.5, params <= self.params * self.params0 + 0.5]
        if self.latency is not None:
            ok.append(latency is not None and latency <= self.latency)
        return all(ok) if self.stop_when == "both" else any(ok)

    def goal(self, step: int) -> Callable[..., bool]:
        """Step ``step`` of ``steps`` removes a geometric share of the way (or reaches the targets)."""
        if step >= self.steps:
            return self.done
        fraction = step / self.steps
        if self.priority == "latency":
            limit = self.latency ** fraction
            return lambda flops, params, latency=None: (latency is not None and latency <= limit) or \
                self.done(flops, params, latency)
        if self.priority == "flops":
            limit = self.flops0 * self.flops ** fraction
            return lambda flops, params, latency=None: flops <= limit or self.done(flops, params, latency)
        limit = self.params0 * self.params ** fraction
        return lambda flops, params, latency=None: params <= limit or self.done(flops, params, latency)


@dataclass
class Plan:
    units: np.ndarray  # unit ids to remove
    flops: int
    params: int
    reached: bool  # the goal holds after this removal
    latency: float | None = None  # predicted, as a fraction of the original's


def _class_ranks(group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a sequence's class labels (-1: no class): the positions of the classed units, class by class
    in sequence order; their classes; and each one's rank within its class."""
    in_class = np.flatnonzero(group >= 0)
    by_class = in_class[np.argsort(group[in_class], kind="stable")]
    grouped = group[by_class]
    return by_class, grouped, np.arange(len(grouped)) - np.searchsorted(grouped, grouped, side="left")


class _Sequence:
    """A removal sequence with its units' classes worked out once: a plan aligns many of its prefixes."""

    def __init__(self, units, unit_class: np.ndarray, num_classes: int):
        self.units = np.asarray(units, dtype=np.int64)
        self.group = unit_class[self.units]
        self.by_class, self.grouped, self.rank = _class_ranks(self.group)
        self.in_class = self.group[self.group >= 0]
        self.classed_before = np.concatenate(([0], np.cumsum(self.group >= 0)))  # classed units in [:k]
        self.available = np.bincount(self.in_class, minlength=num_classes)


# limits.round_to aligns a layer of at least this many times round_to channels (originally); a narrower
# one is pruned freely: aligned, a 16-channel layer could only keep 8 or 16 at round_to 8, an 8-channel
# one nothing but all of them
ALIGN_FROM = 4
# when the last unit of the shortest aligned prefix that reaches a goal removes more than this share of
# the model's FLOPs or parameters, the plan tries holding each layer whose group is worth more than that
# at one group less (at most this many layers per plan: each is one more search)
COSTLY_GROUP = 0.02
MAX_ROUNDED_DOWN = 4


class Planner:
    """Greedy, limit-respecting removal sequences priced with analytic costs."""

    def __init__(self, graph: ChannelGraph, costs: CostModel, limits: Limits,
                 original_widths: dict[str, int], latency: LatencyModel | None = None, round_to: int | None = None):
        self.graph, self.costs, self.limits, self.latency = graph, costs, limits, latency
        round_to = limits.round_to if round_to is None else round_to
        if not isinstance(round_to, int):
            raise ValueError("round_to: auto is resolved from latency tables before planning")
        self.budget: dict[str, int] = {}
        self._original_widths: dict[str, int] = {}
        for name, units in graph.producers.items():
            original = self._original_widths[name] = original_widths.get(name, len(units))
            allowed = math.floor(layer_limit(name, limits) * original + 1e-9)
            already = original - len(units)
            self.budget[name] = max(0, min(allowed - already, len(units) - 1))
        self._compile_touches()
        self.round_to = round_to

    @property
    def round_to(self) -> int:
        return self._round_to

    @round_to.setter
    def round_to(self, value: int) -> None:
        """The alignment, and with it the multiple each producer's width keeps (1: free)."""
        self._round_to = value
        self.alignment = {name: value if width >= ALIGN_FROM * value else 1
                          for name, width in self._original_widths.items()}
        self._steps = [self.alignment[n] for n in self._names]
        self._compile_alignment()

    def _compile_alignment(self) -> None:
        """For every class and every count m of its units it may lose, the nearest counts at or below and
        at or above m that leave all its producers aligned, as two flat arrays (``-1`` / a huge value: none)."""
        classes = list(self._members)
        sizes = [int(self._keep_first[c]) + 1 for c in classes]
        self._offset = np.zeros(len(self._keep_first), dtype=np.int64)
        self._offset[classes] = np.cumsum([0] + sizes[:-1]) if classes else []
        aligned = np.concatenate([np.logical_and.reduce(
            [(self._widths[q] - np.arange(size) * per) % self._steps[q] == 0 for q, per in self._members[c]])
            for c, size in zip(classes, sizes)]) if classes else np.zeros(0, dtype=bool)
        position = np.arange(len(aligned))
        self._at_or_below = np.maximum.accumulate(np.where(aligned, position, -1)) if len(aligned) else position
        none = np.iinfo(np.int64).max
        self._at_or_above = np.minimum.accumulate(np.where(aligned, position, none)[::-1])[::-1] \
            if len(aligned) else position

    def _compile_touches(self) -> None:
        """Which producers each unit touches, with how many of their channels, as flat arrays.

        Units fall into *classes*: all the units that touch one set of producers (a conv and the
        depthwise conv it feeds, a residual stream's convs), each with the same channel counts,
        when no other unit touches those producers. Within a class the greedy sequence keeps the
        first units in score order, as many as the tightest producer's budget allows, and
        alignment moves each class to its nearest aligned count: numpy decides that for every class at once.
        Units outside a class (concatenations that share producers unevenly) are checked one by one.
        """
        names = list(self.graph.producers)
        self._names = names
        P, num_units = max(len(names), 1), self.graph.num_units
        self._widths = [len(self.graph.producers[n]) for n in names]
        flat = np.concatenate([np.asarray(self.graph.producers[n], dtype=np.int64) for n in names]) \
            if names else np.zeros(0, dtype=np.int64)
        pairs, counts = np.unique(flat * P + np.repeat(np.arange(len(names)), self._widths), return_counts=True)
        unit, producer = np.divmod(pairs, P)  # sorted by unit, then producer
        self._pair_unit, self._pair_producer, self._pair_count = unit, producer, counts
        first = np.searchsorted(unit, np.arange(num_units + 1))  # unit u's pairs: first[u]:first[u + 1]
        npairs = np.diff(first)
        self._touching = npairs > 0
        touching = np.flatnonzero(self._touching)
        # a unit's row: its (producer, count) pairs, padded; a class is led by its lowest producer
        rows = np.full((num_units, int(npairs.max(initial=0)), 2), -1, dtype=np.int64)
        column = np.arange(len(unit)) - first[unit]
        rows[unit, column, 0], rows[unit, column, 1] = producer, counts
        lead = np.full(num_units, -1, dtype=np.int64)
        lead[touching] = producer[first[touching]]
        reference = np.full(P, num_units, dtype=np.int64)
        np.minimum.at(reference, lead[touching], touching)  # the lowest unit of each lead
        same = np.ones(num_units, dtype=bool)
        same[touching] = (rows[touching] == rows[reference[lead[touching]]]).all(axis=(1, 2))
        valid = np.zeros(P, dtype=bool)
        valid[np.unique(lead[touching])] = True
        valid[lead[touching[~same[touching]]]] = False
        # ... and its producers are touched by the units of that class alone
        low, high = np.full(P, num_units, dtype=np.int64), np.full(P, -1, dtype=np.int64)
        np.minimum.at(low, producer, lead[unit])
        np.maximum.at(high, producer, lead[unit])
        valid[lead[unit[(low != high)[producer]]]] = False
        self._class = np.where(self._touching & valid[np.maximum(lead, 0)], lead, -1)  # -1: checked one by one
        budget = np.array([self.budget[n] for n in names], dtype=np.int64)
        self._members: dict[int, list[tuple[int, int]]] = {}  # class -> its [(producer, channels per unit)]
        self._keep_first = np.zeros(P, dtype=np.int64)  # how many units a class may lose
        for c in np.flatnonzero(valid).tolist():
            members = [(q, n) for q, n in rows[reference[c]].tolist() if q >= 0]
            self._members[c] = members
            self._keep_first[c] = min(int(budget[q]) // n for q, n in members)
        self._first_pair = first.tolist()
        self._budget_list = budget.tolist()
        self._pair_lists = producer.tolist(), counts.tolist()

    @functools.cached_property
    def touches(self) -> dict[int, list[tuple[str, int]]]:
        """unit -> [(producer, channels of that producer in the unit)]"""
        touches: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for u, p, c in zip(self._pair_unit.tolist(), self._pair_producer.tolist(), self._pair_count.tolist()):
            touches[u].append((self._names[p], c))
        return touches

    def sequence(self, scores: np.ndarray) -> list[int]:
        """Every removable unit, cheapest to lose first, as far as the limits allow."""
        order = np.argsort(scores, kind="stable")
        candidate = np.isfinite(scores) & ~self.graph.pinned & self._touching
        order = order[candidate[order]]
        accepted = np.zeros(len(order), dtype=bool)
        # classes: each keeps its first units in score order, as many as its budget allows
        group = self._class[order]
        by_class, grouped, rank = _class_ranks(group)
        accepted[by_class] = rank < self._keep_first[grouped]
        # the others: one by one, every producer the unit touches must have room for it
        checked = np.flatnonzero(group < 0)
        if checked.size:
            first, budget, used = self._first_pair, self._budget_list, [0] * len(self._budget_list)
            pair_producer, pair_count = self._pair_lists
            for i, u in zip(checked.tolist(), order[checked].tolist()):
                rows = range(first[u], first[u + 1])
                if all(used[pair_producer[r]] + pair_count[r] <= budget[pair_producer[r]] for r in rows):
                    for r in rows:
                        used[pair_producer[r]] += pair_count[r]
                    accepted[i] = True
        return order[accepted].tolist()

    def _ordered(self, sequence) -> _Sequence:
        return sequence if isinstance(sequence, _Sequence) else _Sequence(sequence, self._class, len(self._keep_first))

    def _class_counts(self, sequence, k: int, down_only: Collection[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """How many units each class has in the first ``k`` of ``sequence``, and how many it keeps aligned:
        the nearest aligned count within one step (half way: the larger; none within a step below: 0),
        only the one below for the classes in ``down_only``; every class at once."""
        seq = self._ordered(sequence)
        taken = np.bincount(seq.in_class[:seq.classed_before[k]], minlength=len(self._keep_first))
        available = seq.available
        count = taken.copy()
        c = np.flatnonzero(taken)
        n, start, step = taken[c], self._offset[c], self.round_to
        below = self._at_or_below[start + n] - start
        below = np.where(below >= np.maximum(n - step, 0), below, 0)
        above = self._at_or_above[np.minimum(start + n + 1, start + self._keep_first[c])] - start
        up = (above > n) & (above <= np.minimum(n + step, available[c])) & (above - n <= n - below)
        if down_only:
            up &= ~np.isin(c, list(down_only))
        count[c] = np.where(up, above, below)
        return taken, count

    def _rounded(self, sequence, k: int, down_only: Collection[int] = ()) -> np.ndarray:
        """The first ``k`` units of ``sequence``, each touched layer brought to a multiple of its alignment.

        A class of units (see :meth:`_compile_touches`) goes to its nearest aligned count: it gives
        back its last units, or takes its next ones from the rest of the sequence when fewer are
        needed, so a layer whose units come late in the sequence is still cut instead of never
        reaching a whole group. Every class at once; the other units go through
        :meth:`_rounded_checked`, which only gives back.
        """
        seq = self._ordered(sequence)
        if max(self._steps, default=1) <= 1 or not k:
            return seq.units[:k]
        _, count = self._class_counts(seq, k, down_only)
        keep = np.zeros(len(seq.units), dtype=bool)
        keep[seq.by_class] = seq.rank < count[seq.grouped]
        others = np.flatnonzero(seq.group[:k] < 0)
        keep[others] = np.isin(seq.units[others], self._rounded_checked(seq.units[others].tolist()))
        return seq.units[keep]

    def _rounded_checked(self, units: list[int]) -> list[int]:
        """:meth:`_rounded` for units that share producers: passes from the end of the sequence,
        keeping the set of misaligned layers up to date as units go; a unit dropped late can
        misalign a layer again, so passes repeat until none drops anything (one or two, each linear)."""
        removed: dict[str, int] = defaultdict(int)
        for u in units:
            for p, c in self.touches[u]:
                removed[p] += c
        width = {p: len(self.graph.producers[p]) for p in removed}

        def misaligned(p: str) -> bool:
            return bool(removed[p]) and (width[p] - removed[p]) % self.alignment[p] != 0

        bad = {p for p in removed if misaligned(p)}
        kept = list(units)
        while bad:
            survivors = []
            for u in reversed(kept):
                touches = self.touches[u]
                if any(p in bad for p, _ in touches):
                    for p, c in touches:
                        removed[p] -= c
                        bad.add(p) if misaligned(p) else bad.discard(p)
                else:
                    survivors.append(u)
            survivors.reverse()
            if len(survivors) == len(kept):
                break
            kept = survivors
        return kept

    def plan(self, scores: np.ndarray, goal: Callable[..., bool]) -> Plan:
        """The shortest prefix of the removal sequence whose costs satisfy ``goal(flops, params[, latency])``
        (latency when the planner has a latency model)."""
        sequence = self._ordered(self.sequence(scores))

        def price(units: np.ndarray) -> Plan:
            mask = self.graph.removal_mask(units)
            latency = self.latency.ratio(mask) if self.latency is not None else None
            return Plan(units, *self.costs.totals(mask), False, latency)

        def meets(plan: Plan) -> bool:
            values = (plan.flops, plan.params) if plan.latency is None else (plan.flops, plan.params, plan.latency)
            return goal(*values)

        def shortest(sequence: _Sequence) -> tuple[int, Plan, bool]:
            """The smallest k whose aligned prefix reaches the goal, its plan, and whether any does."""
            low, high = 0, len(sequence.units)
            best = price(self._rounded(sequence, high))
            if not meets(best):
                return high, best, False
            while low < high:
                mid = (low + high) // 2
                candidate = price(self._rounded(sequence, mid))
                if meets(candidate):
                    best, high = candidate, mid
                else:
                    low = mid + 1
            return high, best, True

        k, best, reached = shortest(sequence)
        if not reached:
            return best
        if max(self._steps, default=1) > 1:
            best = self._give_back(sequence, k, best, price, meets)
            best = self._round_down_instead(sequence, k, best, price, meets, shortest)
        best.reached = True
        return best

    def _give_back(self, sequence: _Sequence, k: int, best: Plan, price, meets) -> Plan:
        """A class rounded up at the shortest prefix that reaches the goal may take a whole group more than
        the goal needs: give back each such group the goal can spare, the latest in the sequence first."""
        taken, up = self._class_counts(sequence, k)
        rounded_up = np.flatnonzero(up > taken)
        if not rounded_up.size:
            return best
        _, down = self._class_counts(sequence, k, down_only=rounded_up.tolist())
        by_class, grouped, rank = sequence.by_class, sequence.grouped, sequence.rank
        extra = (rank >= down[grouped]) & (rank < up[grouped])  # the units each class took by rounding up
        extra_units = sequence.units[by_class[extra]]
        extra_class = grouped[extra]
        last = np.full(len(self._keep_first), -1, dtype=np.int64)  # each class's last position in the sequence
        np.maximum.at(last, grouped, by_class)
        given = np.zeros(self.graph.num_units, dtype=bool)
        for c in rounded_up[np.argsort(-last[rounded_up], kind="stable")].tolist():
            trial = given.copy()
            trial[extra_units[extra_class == c]] = True
            candidate = price(best.units[~trial[best.units]])
            if meets(candidate):
                best, given = candidate, trial
        return best

    def _round_down_instead(self, sequence: _Sequence, k: int, best: Plan, price, meets, shortest) -> Plan:
        """Aligned, a layer with a large share of the model's cost can only lose whole groups, each worth
        more than a step's share (VNet's widest full-resolution conv: a third of the FLOPs, 8 of its 32
        channels are 16 points), and the shortest prefix that reaches the goal may take far more than the
        goal needs. When it does, hold such a layer at one group less than the plan takes and take what the
        goal still needs from the rest of the sequence, if that leaves more of what the goal limits."""
        flops0, params0 = self.costs.totals()
        whole = {"flops": max(flops0, 1), "params": max(params0, 1), "latency": 1.0}  # the unpruned model's

        def more(a: Plan, b: Plan) -> float:
            """How much more of the model ``a`` keeps than ``b``, as the larger share of FLOPs or params."""
            return max((a.flops - b.flops) / whole["flops"], (a.params - b.params) / whole["params"])

        # what the goal limits: the resources without whose removal the plan would not meet it
        limited = [r for r in whole if getattr(best, r) is not None and not meets(replace(best, **{r: whole[r]}))]

        def kept(plan: Plan) -> float:
            return sum(getattr(plan, r) / whole[r] for r in limited)

        banned, tried = np.zeros(self.graph.num_units, dtype=bool), set()
        for _ in range(MAX_ROUNDED_DOWN):
            if not k or more(price(self._rounded(sequence, k - 1)), best) <= COSTLY_GROUP:
                break  # the last unit did not complete a costly group: the goal needed about this much
            groups = self._last_groups(best.units)
            worth = {p: more(price(best.units[~np.isin(best.units, units)]), best)
                     for p, units in groups.items() if p not in tried}
            costly = [p for p in sorted(worth, key=worth.get, reverse=True) if worth[p] > COSTLY_GROUP]
            if not costly:
                break
            p = costly[0]
            tried.add(p)
            trial = banned.copy()  # the layer loses one group less than in the plan, and no other units
            trial[self._pair_unit[self._pair_producer == p]] = True
            trial[best.units[~np.isin(best.units, groups[p])]] = False
            shorter = self._ordered(sequence.units[~trial[sequence.units]])
            k_shorter, candidate, reached = shortest(shorter)
            if reached and kept(candidate) > kept(best):  # then see whether its own last unit overshoots
                best, banned, sequence, k = candidate, trial, shorter, k_shorter
        return best

    def _last_groups(self, units: np.ndarray) -> dict[int, np.ndarray]:
        """For every aligned producer that ``units`` (in sequence order) cut: the last of them that
        together remove one group of its channels."""
        groups: dict[int, list[int]] = defaultdict(list)
        removed: dict[int, int] = defaultdict(int)
        first, (pair_producer, pair_count) = self._first_pair, self._pair_lists
        for u in reversed(units.tolist()):
            for r in range(first[u], first[u + 1]):
                q = pair_producer[r]
                if self._steps[q] > 1 and removed[q] < self._steps[q]:
                    removed[q] += pair_count[r]
                    groups[q].append(u)
        return {q: np.asarray(g, dtype=np.int64) for q, g in groups.items()}
