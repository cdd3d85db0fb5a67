"""Importance scorers and the ranking they feed.

A scorer is any callable ``fn(model, graph, batches, **options)`` returning a
mapping from producer name (as in ``graph.producers``) to one score per output
channel (a tensor, array or list); lower is pruned first. ``batches`` is an
iterable of input tensors (calibration data; may be empty for weight-only
scorers). Options a scorer does not name in its signature are not passed;
built-ins receive ``norm``, ``omega``, ``measure``, ``scale``, ``propagate``,
``seed`` and, when training data is configured, ``loss_batches`` and
``loss_fn``. Producers missing from the mapping are never pruned.

The criterion says which units of a layer go first; the allocation
(:mod:`.allocation`) says how many each layer loses: scores become their rank
within the layer (uniform), are divided by the layer's mean (global), or are
replaced by the measured damage per FLOP of removing them (sensitivity); then
they are combined over the producers a unit couples (mean by default) into one
score per unit, which uniform ranks again within the unit's group.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import PrunekitError
from ..graphs import ChannelGraph
from .activations import fisher, ipad, taylor
from .allocation import ALLOCATIONS, sensitivity_scores
from .weights import bn_scale, group_l2, l1, l2, random

SCORERS: dict[str, Callable] = {
    "ipad": ipad,
    "l1": l1,
    "l2": l2,
    "bn_scale": bn_scale,
    "group_l2": group_l2,
    "taylor": taylor,
    "fisher": fisher,
    "random": random,
}

__all__ = ["SCORERS", "resolve_scorer", "score_units", "unit_scores"]


def resolve_scorer(method) -> Callable:
    """A built-in name, a ``package.module:function`` string, or a callable."""
    if callable(method):
        return method
    if method in SCORERS:
        return SCORERS[method]
    if isinstance(method, str) and ":" in method:
        from ..builders import resolve_callable

        return resolve_callable(method)
    raise PrunekitError(
        f"importance method '{method}' is unknown; use one of {', '.join(SCORERS)} or package.module:function.")


def _call(scorer: Callable, model, graph, batches, options: dict):
    params = inspect.signature(scorer).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = options
    else:
        accepted = {k: v for k, v in options.items() if k in params}
    return scorer(model, graph, batches, **accepted)


def _normalised(s: np.ndarray, how: str) -> np.ndarray:
    """Per-layer scores on a common scale.

    "rank": each filter's position in its layer, 0 (least important) to 1, so
    every layer offers its weakest filters first and no layer is emptied just
    because its scores are spread wide. "mean": score / the layer's mean.
    """
    if how == "rank":
        if len(s) == 1:
            return np.zeros(1)
        ranks = np.empty(len(s))
        ranks[np.argsort(s, kind="stable")] = np.arange(len(s))
        return ranks / (len(s) - 1)
    scale = np.abs(s).mean()
    return s / scale if scale > 0 else s


def unit_scores(graph: ChannelGraph, scores: Mapping[str, object], combine: str = "mean",
                source: str = "scorer", normalize: str = "rank",
                original_widths: Mapping[str, int] | None = None) -> np.ndarray:
    """One score per unit: per-layer normalised producer scores, combined; +inf when unscored or pinned.

    With ``normalize="rank"`` (uniform allocation) the combined scores are ranked again within
    each group of units that share their producers (see :func:`_ranked_within_groups`);
    ``original_widths`` (producer name -> output channels before pruning) carries what earlier
    steps removed into those ranks.
    """
    if not isinstance(scores, Mapping):
        raise PrunekitError(f"{source} must return a mapping of producer name to scores, got {type(scores).__name__}.")
    total = np.zeros(graph.num_units)
    count = np.zeros(graph.num_units)
    peak = np.full(graph.num_units, -np.inf)
    for name, values in scores.items():
        if name not in graph.producers:
            raise PrunekitError(f"{source} returned scores for '{name}', which is not a producer in this model.")
        units = graph.producers[name]
        s = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
        if s.shape != (len(units),):
            raise PrunekitError(f"{source} returned {s.size} scores for '{name}', "
                                f"which has {len(units)} output channels.")
        if not np.isfinite(s).all():
            raise PrunekitError(f"{source} returned a score that is not finite for '{name}'.")
        s = _normalised(s, normalize)
        np.add.at(total, units, s)
        np.add.at(count, units, 1)
        np.maximum.at(peak, units, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        combined = {"mean": total / count, "sum": total, "max": peak}[combine]
    combined = np.where(count > 0, combined, np.inf)
    combined[graph.pinned] = np.inf
    return _ranked_within_groups(graph, combined, original_widths) if normalize == "rank" else combined


def _ranked_within_groups(graph: ChannelGraph, scores: np.ndarray,
                          original_widths: Mapping[str, int] | None) -> np.ndarray:
    """Each unit's rank (0..1) among the scored units that share its producers.

    The mean of a coupled unit's per-layer ranks (a residual stream read by many convs)
    crowds towards 0.5, so ranks are taken again within each group of units with the same
    producers: every group offers the same share of its units at each score level. Given
    the original widths, a group that already lost a fraction f of its channels ranks its
    units from f to 1 instead of 0 to 1, so step after step all groups shrink alike (with
    few units per group, as GroupNorm groups, ties would otherwise favour the same layers
    at every step).
    """
    scored = np.flatnonzero(np.isfinite(scores))
    if scored.size == 0:
        return scores
    key, removed = graph.producer_set_keys(), _removed_shares(graph, original_widths or {})
    order = scored[np.lexsort((scores[scored], key[scored]))]
    keys = key[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    sizes = np.diff(np.r_[starts, order.size])
    position = (np.arange(order.size) - np.repeat(starts, sizes)) / np.repeat(np.maximum(sizes - 1, 1), sizes)
    out = scores.copy()
    out[order] = removed[order] + (1 - removed[order]) * position
    return out


def _removed_shares(graph: ChannelGraph, original_widths: Mapping[str, int]) -> np.ndarray:
    """Per unit, the mean fraction of its producers' original channels already removed."""
    removed = np.zeros(graph.num_units)
    count = np.zeros(graph.num_units)
    for name, units in graph.producers.items():
        width0 = original_widths.get(name, 0)
        share = max(0.0, 1 - len(units) / width0) if width0 else 0.0
        units = np.unique(units)
        removed[units] += share
        count[units] += 1
    return removed / np.maximum(count, 1)


def score_units(model: nn.Module, graph: ChannelGraph, method, batches: Iterable = (),
                options: dict | None = None, combine: str = "mean", normalize: str = "rank",
                allocation: str = "uniform", costs=None,
                original_widths: Mapping[str, int] | None = None) -> np.ndarray:
    """Run a scorer on ``model`` and return one score per unit of ``graph``.

    ``allocation`` uniform | global | sensitivity (see :mod:`.allocation`); ``normalize: mean``
    with the default allocation is the older spelling of global. Sensitivity needs ``costs``
    (the graph's :class:`~prunekit.costs.CostModel`) and calibration ``batches``.
    ``original_widths``: producer name -> output channels before the first step (uniform
    allocation evens out what earlier steps removed; see :func:`unit_scores`).
    """
    if allocation not in ALLOCATIONS:
        raise PrunekitError(f"allocation '{allocation}' is unknown; use one of {', '.join(ALLOCATIONS)}.")
    scorer = resolve_scorer(method)
    name = method if isinstance(method, str) else getattr(scorer, "__name__", "scorer")
    source = f"importance '{name}'"
    if allocation == "sensitivity" and iter(batches) is batches:
        batches = list(batches)  # read twice: by the scorer, then by the measurement
    try:
        raw = _call(scorer, model, graph, batches, dict(options or {}))
        if allocation == "sensitivity":
            if costs is None:
                from ..costs import CostModel

                costs = CostModel(model, graph)
            order = unit_scores(graph, raw, combine, source=source, normalize="rank")
            return np.where(graph.pinned, np.inf, sensitivity_scores(model, graph, order, batches, costs))
    except ValueError as exc:
        raise PrunekitError(f"{source}: {exc}") from None
    how = "mean" if allocation == "global" else normalize
    return unit_scores(graph, raw, combine, source=source, normalize=how, original_widths=original_widths)
