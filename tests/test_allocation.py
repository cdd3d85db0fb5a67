"""Per-layer allocation: uniform, global and measured sensitivity, each under limits and targets."""

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
import prunekit.graphs
from prunekit.costs import CostModel
from prunekit.importance import score_units
from prunekit.importance.allocation import RATIOS, SENSITIVITY_IMAGES, _marginal, sensitivity_curves
from prunekit.zoo import resnet_small, unet

UNET = {"in_channels": 1, "num_classes": 2, "width": 8, "depth": 3}


def seg_batches(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 1, size, size, generator=g) for _ in range(n)]


class TwoBranch(nn.Module):
    """Two parallel convs read by one head; the head barely reads branch a."""

    images = 0  # class-wide: counts images through every copy, pruned ones included

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        type(self).images += x.shape[0]
        return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))


def _two_branch():
    torch.manual_seed(0)
    m = TwoBranch().eval()
    with torch.no_grad():
        m.head.weight[:, :8] *= 1e-3
    return m


def test_global_is_one_ranking_of_scores_over_their_layer_mean():
    model = _two_branch()
    graph = prunekit.build_graph(model, torch.rand(1, 1, 8, 8))
    scores = lambda m, g, b: {"a": torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]), "b": torch.ones(8) * 3}  # noqa: E731
    uniform = score_units(model, graph, scores)
    assert np.allclose(uniform[graph.producers["a"]], np.arange(8) / 7)  # rank within the layer
    glob = score_units(model, graph, scores, allocation="global")
    assert np.allclose(glob[graph.producers["a"]], np.arange(1, 9) / 4.5)
    assert np.allclose(glob[graph.producers["b"]], 1.0)
    assert np.array_equal(glob, score_units(model, graph, scores, normalize="mean"))  # the older spelling


class Residual(nn.Module):
    """A stem and two convs that add into one residual stream, each block opening with its own conv."""

    def __init__(self, width=8):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.inner = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.outer = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(2))
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        for inner, outer in zip(self.inner, self.outer):
            x = x + outer(torch.relu(inner(x)))
        return self.head(x)


def test_uniform_ranks_a_coupled_group_like_a_single_layer():
    model = Residual().eval()
    graph = prunekit.build_graph(model, torch.rand(1, 1, 8, 8))
    stream = graph.producers["stem"]
    assert np.array_equal(graph.producers["outer.0"], stream)  # one group of units, three producers
    rng = np.random.default_rng(0)
    raw = {name: rng.random(len(units)) for name, units in graph.producers.items() if name != "head"}
    scores = score_units(model, graph, lambda m, g, b: raw)
    # the mean of three layers' ranks would crowd towards 0.5; ranked again, the stream spans 0..1
    assert np.allclose(np.sort(scores[stream]), np.arange(8) / 7)
    mean_rank = np.mean([np.argsort(np.argsort(raw[n])) for n in ("stem", "outer.0", "outer.1")], axis=0)
    assert np.array_equal(np.argsort(scores[stream], kind="stable"), np.argsort(mean_rank, kind="stable"))
    assert np.allclose(scores[graph.producers["inner.0"]], np.argsort(np.argsort(raw["inner.0"])) / 7)


def test_uniform_carries_what_earlier_steps_removed():
    model = Residual().eval()
    graph = prunekit.build_graph(model, torch.rand(1, 1, 8, 8))
    widths0 = {name: 2 * len(units) for name, units in graph.producers.items()}  # every layer was twice as wide
    widths0["inner.0"] = 8  # ... but this one, untouched so far
    scores = score_units(model, graph, "l1", original_widths=widths0)
    assert np.isclose(scores[graph.producers["inner.0"]].min(), 0.0)
    assert np.isclose(scores[graph.producers["inner.1"]].min(), 0.5)  # half its channels are gone
    assert np.isclose(scores[graph.producers["stem"]].max(), 1.0)


def test_uniform_prunes_residual_streams_like_the_other_layers():
    torch.manual_seed(0)
    model = resnet_small(in_channels=1, width=16).eval()
    x = torch.rand(1, 1, 28, 28)
    graph = prunekit.build_graph(model, x)
    result = prunekit.prune(model, x, config={"targets": {"flops": 0.5}, "importance": {"method": "l1"},
                                              "schedule": {"steps": 3}, "limits": {"default": 0.9}})
    before, after = dict(model.named_modules()), dict(result.model.named_modules())
    kept = {grp.producers: after[grp.producers[0]].out_channels / before[grp.producers[0]].out_channels
            for grp in graph.groups if grp.prunable_units}
    coupled = [k for producers, k in kept.items() if len(producers) > 1]
    single = [k for producers, k in kept.items() if len(producers) == 1]
    assert coupled and single
    assert abs(np.mean(coupled) - np.mean(single)) < 0.1, kept
    assert max(kept.values()) - min(kept.values()) < 0.25, kept


def test_sensitivity_prefers_the_layer_the_output_barely_reads():
    model = _two_branch()
    batches = [torch.rand(4, 1, 8, 8) for _ in range(3)]
    graph = prunekit.build_graph(model, batches[0][:1])
    sens = score_units(model, graph, "l1", batches, allocation="sensitivity", costs=CostModel(model, graph))
    a, b = sens[graph.producers["a"]], sens[graph.producers["b"]]
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert a.max() < b.min()
    # within a layer the criterion's order is kept
    l1 = model.a.weight.detach().abs().sum((1, 2, 3)).numpy()
    assert np.array_equal(np.argsort(a, kind="stable"), np.argsort(l1, kind="stable"))


def test_sensitivity_reuses_the_graph_and_costs_less_than_a_pass_per_pair(monkeypatch):
    model = _two_branch()
    batches = [torch.rand(8, 1, 8, 8) for _ in range(4)]  # 32 calibration images
    graph = prunekit.build_graph(model, batches[0][:1])
    order = score_units(model, graph, "l1")

    def no_trace(*args, **kwargs):
        raise AssertionError("the sensitivity measurement traced the model again")

    monkeypatch.setattr(prunekit.graphs, "build_graph", no_trace)
    monkeypatch.setattr(prunekit, "build_graph", no_trace)
    monkeypatch.setattr(torch.fx.Tracer, "trace", no_trace)
    TwoBranch.images = 0
    curves = sensitivity_curves(model, graph, order, batches)
    pairs = sum(len(c) for c in curves.values())
    assert len(curves) == 2 and pairs == 2 * len(RATIOS)
    # one reference pass and one pass per pair, each on at most SENSITIVITY_IMAGES images
    assert TwoBranch.images <= (pairs + 1) * SENSITIVITY_IMAGES < pairs * 32
    for curve in curves.values():
        assert all(v >= 0 for v in curve.values())


def test_marginal_damage_interpolates_and_extends_the_curve():
    # measured D(1) = 0.1, D(2) = 0.3 of 4 units; extended with the last slope: D(3) = 0.5, D(4) = 0.7
    assert np.allclose(_marginal({1: 0.1, 2: 0.3}, 4), [0.1, 0.2, 0.2, 0.2])
    assert np.allclose(_marginal({1: 0.2, 2: 0.1}, 2), [0.2, 0.0])  # noise never makes D decrease


@pytest.mark.parametrize("allocation", ["uniform", "global", "sensitivity"])
def test_every_allocation_respects_limits_and_targets(allocation):
    torch.manual_seed(0)
    model = unet(**UNET).eval()
    x = torch.rand(1, 1, 32, 32)
    limits = {"default": 0.6, "layers": {"out": 0.0, "enc1.*": 0.0, "dec1.block.3": 0.25}}
    cfg = {"targets": {"flops": 0.5, "params": 0.6}, "limits": limits, "schedule": {"steps": 2},
           "importance": {"method": "ipad", "allocation": allocation},
           "data": {"calibration": {"factory": "tests.test_allocation:seg_batches"}}}
    result = prunekit.prune(model, x, cfg, progress=False)
    assert result.targets_met
    costs0 = CostModel(model, prunekit.build_graph(model, x))
    costs1 = CostModel(result.model, prunekit.build_graph(result.model, x))
    assert costs1.flops() <= 0.5 * costs0.flops() + 0.5 and costs1.params() <= 0.6 * costs0.params() + 0.5
    widths0 = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    widths1 = {n: m.out_channels for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, before in widths0.items():
        lost = before - widths1[name]
        if name == "out" or name.startswith("enc1."):
            assert lost == 0, name
        else:
            assert lost <= int((0.25 if name == "dec1.block.3" else 0.6) * before), name
    if allocation != "uniform":  # layers lose different shares
        shares = {round(1 - widths1[n] / widths0[n], 2) for n in widths0 if n != "out" and not n.startswith("enc1.")}
        assert len(shares) > 1


def test_sensitivity_without_data_names_the_key():
    model = unet(**UNET).eval()
    cfg = {"targets": {"flops": 0.7}, "importance": {"method": "l1", "allocation": "sensitivity"}}
    with pytest.raises(prunekit.PrunekitError, match="allocation 'sensitivity'") as info:
        prunekit.prune(model, torch.rand(1, 1, 32, 32), cfg, progress=False)
    assert info.value.key == "data.calibration"


@pytest.mark.parametrize("raw, fragment", [
    ({"allocation": "sensitive"}, "'importance.allocation' must be 'uniform' or 'global' or 'sensitivity'"),
    ({"measure": "relu"}, "'importance.measure' must be 'raw' or 'bn' or 'act'"),
    ({"propagate": 1.5}, "'importance.propagate' must be a number in [0, 1]"),
    ({"omega_scale": "paper2"}, "'importance.omega_scale' must be 'layer' or 'paper'"),
])
def test_bad_importance_keys_name_the_key(raw, fragment):
    from prunekit.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config({"importance": raw})
    assert fragment in str(info.value)


def test_sensitivity_on_a_residual_model_measures_each_coupled_group_once(monkeypatch):
    """Residual sums couple layers into one group: one curve per group, every pass on the sample only."""
    from prunekit.zoo import resnet_small

    torch.manual_seed(0)
    model = resnet_small(in_channels=1, width=4).eval()
    batches = [torch.rand(8, 1, 16, 16) for _ in range(3)]  # 24 calibration images
    graph = prunekit.build_graph(model, batches[0][:1])
    costs = CostModel(model, graph)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))  # deep copies keep it

    def no_trace(*args, **kwargs):
        raise AssertionError("the sensitivity measurement traced the model again")

    monkeypatch.setattr(torch.fx.Tracer, "trace", no_trace)
    scores = score_units(model, graph, "l1", batches, allocation="sensitivity", costs=costs)
    measured = [g for g in graph.groups if len(g.prunable_units) >= 2]
    layers = {p for g in measured for p in g.producers}
    assert len(measured) < len(layers)  # the residual stream of a stage is one group of several convs
    pairs = len(measured) * len(RATIOS)
    # l1 reads no data: every image seen is the measurement's, the reference sample plus at most one
    # sample per (group, ratio), a sample being SENSITIVITY_IMAGES of the 24 calibration images
    assert 0 < sum(seen) <= (pairs + 1) * SENSITIVITY_IMAGES < pairs * sum(len(b) for b in batches)
    prunable = np.array([u for g in measured for u in g.prunable_units])
    assert np.isfinite(scores[prunable]).all()
