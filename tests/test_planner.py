"""The planner's width alignment: every layer it touches keeps a multiple of round_to."""

from __future__ import annotations

import numpy as np
import pytest
import torchvision
import torch

import prunekit
from prunekit.config import Limits
from prunekit.costs import CostModel
from prunekit.planner import Planner


@pytest.mark.parametrize("step", [2, 8])
def test_round_to_aligns_every_touched_layer(step):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 64, 64))
    costs = CostModel(model, graph)
    widths = {n: len(u) for n, u in graph.producers.items()}
    planner = Planner(graph, costs, Limits(round_to=step), widths)
    scores = np.random.default_rng(step).random(graph.num_units)
    flops0 = costs.flops()
    plan = planner.plan(scores, lambda flops, params: flops <= 0.6 * flops0)
    assert plan.reached and plan.flops <= 0.6 * flops0
    mask = graph.removal_mask(plan.units)
    for name, units in graph.producers.items():
        removed = int(mask[units].sum())
        if removed:
            assert (len(units) - removed) % step == 0, (name, len(units), removed)
    # the unaligned sequence is a superset: alignment only drops units
    assert set(plan.units.tolist()) <= set(planner.sequence(scores))


def test_targets_say_each_steps_goal_and_when_the_run_is_done():
    from prunekit.planner import Targets

    t = Targets(flops0=1000, params0=100, flops=0.25, params=1.0, stop_when="both", priority="flops", steps=2)
    assert not t.done(300, 100) and t.done(250, 100)
    half_way = t.goal(1)  # sqrt(0.25) of the FLOPs after the first of two steps
    assert half_way(500, 100) and not half_way(501, 100)
    assert t.goal(2) == t.done
    either = Targets(1000, 100, 0.25, 0.5, stop_when="any", steps=1)
    assert either.done(1000, 50) and either.done(250, 100) and not either.done(1000, 51)
    by_params = Targets(1000, 100, 1.0, 0.25, priority="params", steps=2)
    assert by_params.goal(1)(1000, 50) and not by_params.goal(1)(1000, 51)
