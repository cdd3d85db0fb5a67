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


def _aligned_reference(planner: Planner, sequence: list[int], k: int) -> list[int]:
    """The alignment by its definition. Units that touch the same producers with the same counts, alone
    among all units, form a class; a class keeps the aligned count of its units nearest to the number
    in the first k (within one step either way, or none; half way: the larger), taking them in sequence
    order. Every other unit goes through the unit-by-unit passes, which only give back."""
    step = planner.round_to
    key = {u: tuple(sorted(planner.touches[u])) for u in sequence}
    touched_by: dict[str, set] = {}
    for u in range(planner.graph.num_units):
        for p, _ in planner.touches.get(u, []):
            touched_by.setdefault(p, set()).add(tuple(sorted(planner.touches[u])))
    is_class = {kk: all(touched_by[p] == {kk} for p, _ in kk) for kk in set(key.values())}
    others = [u for u in sequence[:k] if not is_class[key[u]]]
    kept = set(planner._rounded_checked(others))
    for kk in {key[u] for u in sequence[:k] if is_class[key[u]]}:
        members = [u for u in sequence if key[u] == kk]
        n = sum(1 for u in sequence[:k] if key[u] == kk)
        width = {p: len(planner.graph.producers[p]) for p, _ in kk}
        aligned = [m for m in range(max(0, n - step), min(len(members), n + step) + 1)
                   if all((width[p] - m * c) % planner.alignment[p] == 0 for p, c in kk)]
        count = min(aligned + [0], key=lambda m: (abs(m - n), -m)) if n else 0
        kept.update(members[:count])
    return [u for u in sequence if u in kept]


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
    and align exactly as the alignment's definition."""
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
                for step in (2, 3, 8):  # alignment by classes, with numpy, is the alignment by its definition
                    planner.round_to = step
                    for k in (1, len(sequence) // 3, len(sequence) // 2, len(sequence)):
                        assert planner._rounded(sequence, k).tolist() == _aligned_reference(planner, sequence, k), \
                            (name, step)
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


def test_round_to_takes_the_nearest_group_and_gives_back_what_the_goal_can_spare():
    """Two 64-channel layers whose units alternate in the sequence: half a group of each rounds up to a whole
    group (rounding down would never cut either until 8 of its units came first), and of the two groups
    taken at the shortest prefix that reaches the goal, the one the goal does not need is given back."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3),
                                torch.nn.ReLU(), torch.nn.Conv2d(64, 4, 1)).eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 16, 16))
    costs = CostModel(model, graph)
    widths = {n: len(u) for n, u in graph.producers.items()}
    planner = Planner(graph, costs, Limits(default=0.5, layers={"4": 0}, round_to=8), widths)
    scores = np.full(graph.num_units, np.inf)
    scores[graph.producers["2"]] = np.arange(64) * 2.0
    scores[graph.producers["0"]] = np.arange(64) * 2.0 + 1  # the sequence alternates: 2, 0, 2, 0, ...
    sequence = planner.sequence(scores)

    def kept(units):
        mask = graph.removal_mask(np.asarray(units, dtype=np.int64))
        return {name: int((~mask[graph.producers[name]]).sum()) for name in ("0", "2")}

    assert kept(planner._rounded(sequence, 7)) == {"0": 64, "2": 56}  # 3 and 4 of the first 7: 0 and 8
    assert kept(planner._rounded(sequence, 8)) == {"0": 56, "2": 56}
    assert kept(planner._rounded(sequence, 6)) == {"0": 64, "2": 64}
    # a goal that 8 units of "2" miss and 8 of "0" meet: the prefix of 8 takes both groups, "2"'s is given back
    goal = costs.flops(graph.removal_mask(np.asarray(graph.producers["0"][:8], dtype=np.int64)))
    assert costs.flops(graph.removal_mask(np.asarray(graph.producers["2"][:8], dtype=np.int64))) > goal
    plan = planner.plan(scores, lambda flops, params: flops <= goal)
    assert plan.reached and kept(plan.units) == {"0": 56, "2": 64}


def test_round_to_holds_a_costly_layer_at_one_group_less_when_the_goal_does_not_need_it():
    """A wide full-resolution layer whose group of 8 channels is worth about a fifth of the FLOPs: the
    shortest aligned prefix that reaches a 10% cut takes that group (its fourth unit rounds up to 8), but
    the goal is met with the cheap layers' groups instead, which leaves more of the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),  # "0": the costly one
                                torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
                                torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 4, 1)).eval()
    graph = prunekit.build_graph(model, torch.randn(1, 3, 32, 32))
    costs = CostModel(model, graph)
    flops0 = costs.flops()
    widths = {n: len(u) for n, u in graph.producers.items()}
    planner = Planner(graph, costs, Limits(default=0.5, layers={"9": 0}, round_to=8), widths)
    scores = np.full(graph.num_units, np.inf)
    scores[graph.producers["0"]] = np.r_[np.arange(4.0), np.full(28, 100.0)]  # four of "0" come first
    scores[graph.producers["2"]] = 200.0
    cheap = np.r_[graph.producers["5"], graph.producers["7"]]
    scores[cheap] = np.random.default_rng(0).uniform(4, 50, cheap.size)
    group_of_0 = graph.removal_mask(np.asarray(graph.producers["0"][:8], dtype=np.int64))
    assert costs.flops(group_of_0) < 0.82 * flops0  # that group alone is worth more than 18% of the FLOPs

    def goal(flops, params):
        return flops <= 0.9 * flops0

    plan = planner.plan(scores, goal)
    mask = graph.removal_mask(plan.units)
    removed = {name: int(mask[units].sum()) for name, units in graph.producers.items()}
    assert plan.reached and goal(plan.flops, plan.params)
    assert removed["0"] == 0 and removed["5"] + removed["7"] > 0
    assert plan.flops > 0.85 * flops0  # about the 10% asked for, not the 18% of the costly group
    assert all((widths[name] - n) % planner.alignment[name] == 0 for name, n in removed.items())
