"""Choose which units to remove in one step.

Units are taken in ascending score, skipping any that would break a
per-layer limit (at most a fraction of a layer's original filters removed,
at least one kept, 0 = never touched); the shortest prefix of that sequence
whose analytic cost meets the step's goal is the step. Costs are priced with
the :class:`~prunekit.costs.CostModel`, never by running the model.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import Limits
from .costs import CostModel
from .graphs import ChannelGraph


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
    """The run's targets in absolute terms: what each step aims at, and when the run is done."""

    flops0: int  # the original model's
    params0: int
    flops: float  # fractions of the original to keep at most
    params: float
    stop_when: str = "both"  # both | any
    priority: str = "flops"  # the resource whose geometric schedule sizes the steps
    steps: int = 1

    def done(self, flops: int, params: int) -> bool:
        ok = (flops <= self.flops * self.flops0 + 0.5, params <= self.params * self.params0 + 0.5)
        return all(ok) if self.stop_when == "both" else any(ok)

    def goal(self, step: int) -> Callable[[int, int], bool]:
        """Step ``step`` of ``steps`` removes a geometric share of the way (or reaches the targets)."""
        if step >= self.steps:
            return self.done
        fraction = step / self.steps
        if self.priority == "flops":
            limit = self.flops0 * self.flops ** fraction
            return lambda flops, params: flops <= limit or self.done(flops, params)
        limit = self.params0 * self.params ** fraction
        return lambda flops, params: params <= limit or self.done(flops, params)


@dataclass
class Plan:
    units: np.ndarray  # unit ids to remove
    flops: int
    params: int
    reached: bool  # the goal holds after this removal


class Planner:
    """Greedy, limit-respecting removal sequences priced with analytic costs."""

    def __init__(self, graph: ChannelGraph, costs: CostModel, limits: Limits,
                 original_widths: dict[str, int]):
        self.graph, self.costs, self.limits = graph, costs, limits
        self.budget: dict[str, int] = {}
        for name, units in graph.producers.items():
            original = original_widths.get(name, len(units))
            allowed = math.floor(layer_limit(name, limits) * original + 1e-9)
            already = original - len(units)
            self.budget[name] = max(0, min(allowed - already, len(units) - 1))
        # unit -> [(producer, channels of that producer in the unit)]
        self.touches: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for name, units in graph.producers.items():
            ids, counts = np.unique(units, return_counts=True)
            for u, c in zip(ids.tolist(), counts.tolist()):
                self.touches[u].append((name, c))

    def sequence(self, scores: np.ndarray) -> list[int]:
        """Every removable unit, cheapest to lose first, as far as the limits allow."""
        used: dict[str, int] = defaultdict(int)
        order = np.argsort(scores, kind="stable")
        chosen = []
        for u in order.tolist():
            if not np.isfinite(scores[u]) or self.graph.pinned[u] or u not in self.touches:
                continue
            touches = self.touches[u]
            if all(used[p] + c <= self.budget[p] for p, c in touches):
                for p, c in touches:
                    used[p] += c
                chosen.append(u)
        return chosen

    def _rounded(self, units: list[int]) -> list[int]:
        """Drop the last-chosen units until every touched layer keeps a multiple of round_to.

        Passes from the end of the sequence, keeping the set of misaligned layers up
        to date as units go; a unit dropped late can misalign a layer again, so passes
        repeat until none drops anything (one or two in practice, each linear).
        """
        step = self.limits.round_to
        if step <= 1:
            return units
        removed: dict[str, int] = defaultdict(int)
        for u in units:
            for p, c in self.touches[u]:
                removed[p] += c
        width = {p: len(self.graph.producers[p]) for p in removed}

        def misaligned(p: str) -> bool:
            return bool(removed[p]) and (width[p] - removed[p]) % step != 0

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

    def plan(self, scores: np.ndarray, goal: Callable[[int, int], bool]) -> Plan:
        """The shortest prefix of the removal sequence whose costs satisfy ``goal(flops, params)``."""
        sequence = self.sequence(scores)

        def price(k: int) -> tuple[np.ndarray, int, int]:
            units = np.array(self._rounded(sequence[:k]), dtype=np.int64)
            mask = self.graph.removal_mask(units)
            return units, self.costs.flops(mask), self.costs.params(mask)

        low, high = 0, len(sequence)
        best = price(high)
        if not goal(best[1], best[2]):
            return Plan(*best, reached=False)
        while low < high:  # smallest k that reaches the goal
            mid = (low + high) // 2
            candidate = price(mid)
            if goal(candidate[1], candidate[2]):
                best, high = candidate, mid
            else:
                low = mid + 1
        return Plan(*best, reached=True)
