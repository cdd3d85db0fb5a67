"""How many units each layer loses: uniform, global, or by measured sensitivity.

The criterion decides which units of a layer go first; the allocation decides how
many each layer gives up. Both reach the planner as one score per unit (lower goes
first), and the planner applies the per-layer limits in every mode.

- uniform: a unit's rank within its layer (0..1), combined over the producers it
  couples and ranked again within its group (units with the same producers), so every
  layer and every residual stream offers the same fraction of its filters at each
  score level.
- global: the score divided by its layer's mean, one ranking across layers.
- sensitivity: measured. For every group of units that share their producers (a layer,
  or the layers a residual sum couples), remove 10/25/50/75% of its prunable units in
  the criterion's order from a copy (surgery on the same graph: nothing is traced again)
  and record the damage D(r) = ||y_r - y||^2 / ||y||^2 of the main output on up to
  ``SENSITIVITY_IMAGES`` calibration images. D is interpolated linearly between those
  ratios (D(0) = 0, extended past 75% with the last slope) and made non-decreasing. The
  i-th unit of a group (criterion order) is scored by its marginal damage per FLOP saved,
  (D(i/n) - D((i-1)/n)) / (share of the model's FLOPs one unit saves), running max within
  the group so the criterion's order is kept. Taking units in ascending order of that score
  removes the least total damage for the FLOPs saved when D is convex (a Lagrangian
  greedy), which is what the planner does.
"""

from __future__ import annotations

import numpy as np
import torch

RATIOS = (0.1, 0.25, 0.5, 0.75)
SENSITIVITY_IMAGES = 16
ALLOCATIONS = ("uniform", "global", "sensitivity")


def sample(batches, images: int = SENSITIVITY_IMAGES) -> list:
    """The first calibration batches, cut to ``images`` images in all (non-tensor batches: the first one)."""
    out, count = [], 0
    for batch in batches:
        if not isinstance(batch, torch.Tensor):
            return out or [batch]
        out.append(batch[: images - count])
        count += len(out[-1])
        if count >= images:
            break
    return out


def _outputs(model, inputs) -> list[torch.Tensor]:
    from ..data.trainer import main_output

    with torch.no_grad():
        return [main_output(model(x)).detach().double() for x in inputs]


def damage(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """||y' - y||^2 / ||y||^2 over all sampled images."""
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference))
    den = sum(float(r.pow(2).sum()) for r in reference)
    return num / den if den > 0 else num


def sensitivity_curves(model, graph, order_scores: np.ndarray, batches, ratios=RATIOS,
                       images: int = SENSITIVITY_IMAGES) -> dict[tuple[int, ...], dict[int, float]]:
    """Per group (its prunable units in criterion order): removed count -> measured damage.

    One forward pass of a pruned copy on the sample per (group, ratio); the sample is at
    most ``images`` images, so each pair costs less than one pass over the calibration batches.
    """
    from ..surgery import apply_removal

    inputs = sample(batches, images)
    if not inputs:
        raise ValueError("allocation: sensitivity needs calibration batches; none were given.")
    was_training = model.training
    model.eval()
    try:
        reference = _outputs(model, inputs)
        curves = {}
        for group in graph.groups:
            units = np.array([u for u in group.prunable_units if np.isfinite(order_scores[u])], dtype=np.int64)
            if units.size < 2:
                continue
            units = units[np.argsort(order_scores[units], kind="stable")]
            curve = {}
            for r in ratios:
                k = min(max(1, round(r * units.size)), units.size - 1)
                if k not in curve:
                    pruned = apply_removal(model, graph, graph.removal_mask(units[:k])).eval()
                    curve[k] = damage(reference, _outputs(pruned, inputs))
            curves[tuple(units.tolist())] = curve
    finally:
        model.train(was_training)
    return curves


def _marginal(curve: dict[int, float], n: int) -> np.ndarray:
    """D((i+1)/n) - D(i/n) for i = 0..n-1 from the measured points, D non-decreasing."""
    ks = np.array([0, *sorted(curve)], dtype=np.float64)
    ds = np.maximum.accumulate(np.array([0.0, *(curve[int(k)] for k in ks[1:])]))
    at = np.arange(1, n + 1, dtype=np.float64)
    inside = np.interp(at, ks, ds)
    if len(ks) > 1 and ks[-1] > ks[-2]:
        slope = max((ds[-1] - ds[-2]) / (ks[-1] - ks[-2]), 0.0)
        inside = np.where(at > ks[-1], ds[-1] + slope * (at - ks[-1]), inside)
    return np.diff(np.concatenate([[0.0], inside]))


def sensitivity_scores(model, graph, order_scores: np.ndarray, batches, costs, ratios=RATIOS,
                       images: int = SENSITIVITY_IMAGES) -> np.ndarray:
    """Marginal damage per FLOP saved for every unit (see the module docstring); +inf where not measured."""
    curves = sensitivity_curves(model, graph, order_scores, batches, ratios, images)
    flops0, params0 = max(costs.flops(), 1), max(costs.params(), 1)
    out = np.full(graph.num_units, np.inf)
    for units, curve in curves.items():
        units = np.asarray(units)
        one = graph.removal_mask(units[:1])
        saved = (flops0 - costs.flops(one)) / flops0 or (params0 - costs.params(one)) / params0
        per_unit = np.maximum.accumulate(_marginal(curve, units.size)) / max(saved, 1e-12)
        # ties (flat stretches) keep the criterion's order
        per_unit = per_unit + np.arange(units.size) * 1e-12 * (1 + per_unit.max())
        out[units] = np.minimum(out[units], per_unit)
    return out
