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


def _greedy(planner: Planner, scores: np.ndarray) -> list[int]:
    """The removal sequence by its definition: units by ascending score (ties by id), each taken when
    every producer it touches still has room for all of the unit's channels in it."""
    used = dict.fromkeys(planner.budget, 0)
    chosen = []
    for u in np.argsort(scores, kind="stable").tolist():
        touches = planner.touches.get(u)
        if not np.isfinite(scores[u]) or planner.graph.pinned[u] or not touches:
            continue
        if all(used[p] + c <= planner.budget[p] for p, c in touches):
            for p, c in touches:
                used[p] += c
            chosen.append(u)
    return chosen


def _sequence_cases():
    from archs import ARCHS
    from dag_generator import random_dag

    for name in ("se_resnet", "unet_cat_stack", "shuffle", "separable2d", "split_chunk", "groupnorm_residual",
                 "zoo_resnet_small", "zoo_unet_transpose"):
        arch = ARCHS[name]
        yield name, arch.build().eval(), arch.inputs(1)
    for seed in range(12):
        model, x, _ = random_dag(seed)
        yield f"dag{seed}", model, x


def test_the_removal_sequence_and_its_alignment_are_the_one_by_one_choices():
    """The planner decides most units class by class with numpy; it must choose exactly as the plain greedy,
    and align exactly as the unit-by-unit passes."""
    rng = np.random.default_rng(0)
    checked = 0
    for name, model, x in _sequence_cases():
        graph = prunekit.build_graph(model, x)
        costs = CostModel(model, graph)
        widths = {n: len(u) + int(rng.integers(0, 3)) for n, u in graph.producers.items()}
        for limits in (Limits(default=0.9), Limits(default=0.5), Limits(default=0.3, layers={"*": 0.6})):
            planner = Planner(graph, costs, limits, widths)
            for trial in range(4):
                scores = rng.random(graph.num_units)
                scores[rng.random(graph.num_units) < 0.1] = np.inf
                if trial == 3:
                    scores = np.round(scores * 3)  # many ties
                sequence = planner.sequence(scores)
                assert sequence == _greedy(planner, scores), name
                checked += 1
                for step in (2, 3, 8):  # alignment by classes gives back what the unit-by-unit passes give back
                    planner.round_to = step
                    for k in (1, len(sequence) // 2, len(sequence)):
                        assert planner._rounded(sequence[:k]) == planner._rounded_checked(sequence[:k]), (name, step)
                planner.round_to = 1
    assert checked > 100


def test_round_to_aligns_wide_layers_and_leaves_narrow_ones_free():
    """At round_to 8 a layer of 32 channels or more keeps a multiple of 8; a narrower one is pruned
    freely (aligned, a 16-channel layer could keep only 8 or 16, an 8-channel one all of them)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 64, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 4, 1)).eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 16, 16))
    costs = CostModel(model, graph)
    widths = {n: len(u) for n, u in graph.producers.items()}
    planner = Planner(graph, costs, Limits(default=0.5, round_to=8), widths)
    assert planner.alignment == {"0": 1, "2": 1, "4": 8, "6": 1}
    scores = np.random.default_rng(0).random(graph.num_units)
    plan = planner.plan(scores, lambda flops, params: flops <= 0.55 * costs.flops())
    mask = graph.removal_mask(plan.units)
    kept = {name: int((~mask[units]).sum()) for name, units in graph.producers.items()}
    assert kept["4"] % 8 == 0 and kept["4"] < 64
    assert kept["0"] < 16 and kept["2"] < 8  # pruned, to counts no alignment to 8 would allow
    assert (kept["0"] % 8, kept["2"] % 8) != (0, 0)
