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
from typing import TYPE_CHECKING, Callable

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


class Planner:
    """Greedy, limit-respecting removal sequences priced with analytic costs."""

    def __init__(self, graph: ChannelGraph, costs: CostModel, limits: Limits,
                 original_widths: dict[str, int], latency: LatencyModel | None = None, round_to: int | None = None):
        self.graph, self.costs, self.limits, self.latency = graph, costs, limits, latency
        self.round_to = limits.round_to if round_to is None else round_to
        if not isinstance(self.round_to, int):
            raise ValueError("round_to: auto is resolved from latency tables before planning")
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
        self._touch_list = [self.touches.get(u, ()) for u in range(graph.num_units)]
        self._touching = np.array([bool(t) for t in self._touch_list], dtype=bool)

    def sequence(self, scores: np.ndarray) -> list[int]:
        """Every removable unit, cheapest to lose first, as far as the limits allow."""
        order = np.argsort(scores, kind="stable")
        candidate = np.isfinite(scores) & ~self.graph.pinned & self._touching
        budget, touches = self.budget, self._touch_list
        used = dict.fromkeys(budget, 0)
        chosen = []
        for u in order[candidate[order]].tolist():
            unit_touches = touches[u]
            if len(unit_touches) == 1:  # the common case: one producer, one check
                p, c = unit_touches[0]
                if used[p] + c <= budget[p]:
                    used[p] += c
                    chosen.append(u)
            elif all(used[p] + c <= budget[p] for p, c in unit_touches):
                for p, c in unit_touches:
                    used[p] += c
                chosen.append(u)
        return chosen

    def _rounded(self, units: list[int]) -> list[int]:
        """Drop the last-chosen units until every touched layer keeps a multiple of round_to.

        Passes from the end of the sequence, keeping the set of misaligned layers up
        to date as units go; a unit dropped late can misalign a layer again, so passes
        repeat until none drops anything (one or two in practice, each linear).
        """
        step = self.round_to
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

    def plan(self, scores: np.ndarray, goal: Callable[..., bool]) -> Plan:
        """The shortest prefix of the removal sequence whose costs satisfy ``goal(flops, params[, latency])``
        (latency when the planner has a latency model)."""
        sequence = self.sequence(scores)

        def price(k: int) -> Plan:
            units = np.array(self._rounded(sequence[:k]), dtype=np.int64)
            mask = self.graph.removal_mask(units)
            latency = self.latency.ratio(mask) if self.latency is not None else None
            return Plan(units, self.costs.flops(mask), self.costs.params(mask), False, latency)

        def meets(plan: Plan) -> bool:
            values = (plan.flops, plan.params) if plan.latency is None else (plan.flops, plan.params, plan.latency)
            return goal(*values)

        low, high = 0, len(sequence)
        best = price(high)
        if not meets(best):
            return best
        while low < high:  # smallest k that reaches the goal
            mid = (low + high) // 2
            candidate = price(mid)
            if meets(candidate):
                best, high = candidate, mid
            else:
                low = mid + 1
        best.reached = True
        return best
