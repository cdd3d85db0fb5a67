"""Exactness on seeded random architectures (see dag_generator.py).

Each seed builds a small DAG of convolutions (plain, depthwise, grouped,
transposed), norms, activations, pooling, upsampling, residual adds, gates,
concatenations, chunks and Linear heads, with one to three outputs; a
seeded random third of its prunable units is zeroed and cut, and the
outputs must not move. Every tenth seed also runs the pruned model in
train mode, and another tenth checks the analytic costs against fvcore.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import prunekit
from dag_generator import KINDS, random_dag
from helpers import assert_exact, assert_train_mode_runs, pick_units
from prunekit.costs import CostModel, fvcore_counts

SEEDS = range(200)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_dag_is_exact(seed):
    model, x, used = random_dag(seed)
    graph = prunekit.build_graph(model, x)
    units = pick_units(graph, fraction=1 / 3, seed=seed)
    assert units, f"seed {seed}: nothing prunable ({used})"
    pruned = assert_exact(model, graph, x, units)
    if seed % 10 == 0:
        assert_train_mode_runs(model, pruned, torch.cat([x, x]))
    if seed % 10 == 5:
        mask = graph.removal_mask(units)
        costs = CostModel(model, graph)
        flops, _ = fvcore_counts(pruned, x)
        assert abs(costs.flops(mask) - flops) <= 0.01 * flops
        assert costs.params(mask) == sum(p.numel() for p in pruned.parameters())


def test_generator_is_deterministic():
    a, xa, used_a = random_dag(7)
    b, xb, used_b = random_dag(7)
    assert used_a == used_b and torch.equal(xa, xb)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert random_dag(8)[2] != used_a


def test_generator_covers_every_op_kind():
    """The default seeds use every op kind and head, and several output structures."""
    counts: Counter = Counter()
    forms: Counter = Counter()
    for seed in SEEDS:
        model, _, used = random_dag(seed)
        counts.update(set(used))
        forms[model.out_form] += 1
    for kind in KINDS + ("head:seg", "head:mean_fc", "head:pool_fc", "head:view_fc", "head:raw"):
        assert counts[kind] >= 5, f"op kind {kind!r} is used by only {counts[kind]} of the generated models"
    assert set(forms) == {"tensor", "tuple", "dict"}
